"""Dispatcher: claims ready deliveries from the journal and runs them against sinks.

No head-of-line blocking: each sink has its own concurrency budget, and a sink that
is failing backs off in the journal (next_attempt_at), never in a queue in front of
the others.  Memory stays bounded: at most `router.concurrency` deliveries are in
flight, and completions are written back in batches (one commit per burst).  New
events' deliveries usually arrive already claimed by intake (`adopt`); ticks claim
the rest: backlogs, retries, prerequisites met, work other processes made due.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import Counter, Histogram

from router.config import RetryPolicy, RouterConfig, mask_url_passwords
from router.db import until_it_answers
from router.delivery import (
    Action,
    ArtifactView,
    DeliveryContext,
    DeliveryItem,
    DeliveryResult,
    PermanentError,
    StagedFile,
    TransientError,
)
from router.journal import (
    ClaimedDelivery,
    Completion,
    DeliveryJournal,
    FinishedEvent,
    Outcome,
)
from router.metrics import RouterMetrics
from sinks.registry import create_sink, sink_class

__all__ = ["Dispatcher", "InFlightSlots", "IntakeSlots", "SinkPool", "backoff_delay"]

log = structlog.get_logger("router.dispatcher")
# Actions whose sink reads the artifact's files (a bundle must be located for them).
_FILE_ACTIONS = frozenset({Action.STORE.value, Action.TRACK.value, Action.EXPORT.value})

OPEN_TIMEOUT = 30.0  # seconds a sink may take to open at start (SinkPool.warm_up)
HEALTH_TIMEOUT = 5.0  # seconds each sink's health() may take (SinkPool.health)
# Seconds between claims when nothing said new work is due: what another process (the
# CLI's retry, approve; a pool member) or the clock (a retry's backoff) makes due is
# claimed within this.
CLAIM_EVERY = 0.5
# A delivery still running after this many seconds is logged once, with where it waits:
# a hung request (a server that accepts and never answers) shows in the log by itself.
SLOW_DELIVERY = 60.0


def backoff_delay(policy: RetryPolicy, attempt: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter (AWS architecture blog's recommendation).

    The exponent stops growing at 60 (any max_delay is reached long before): a policy
    bounded by max_age may run to thousands of attempts, and 2.0 ** 1025 overflows.
    """
    ceiling = min(policy.max_delay, policy.base_delay * 2.0 ** min(60, max(0, attempt - 1)))
    return (rng or random).uniform(0, ceiling)


def _completion(d: ClaimedDelivery, outcome: Outcome, **fields: Any) -> Completion:
    return Completion(
        key=d.key, event_id=d.event_id, artifact_index=d.artifact_index, sink_id=d.sink_id,
        action=d.action, outcome=outcome, attempts=d.attempts, **fields,
    )


def _sink_class_or_none(type_name: str) -> Any:
    try:
        return sink_class(type_name)
    except (KeyError, ImportError):
        return None


def _waiting_in(task: asyncio.Task[Any]) -> str:
    """The innermost await a task is suspended in, as `function (file:line)` links
    (Task.get_stack shows only the outermost coroutine). Follows awaited coroutines and
    tasks, the first unfinished child of a gather, and the task a wait_for runs."""
    where: list[str] = []
    awaited: Any = task.get_coro()
    frame: Any = None
    while awaited is not None and len(where) < 40:
        if isinstance(awaited, asyncio.Task):
            awaited = awaited.get_coro()
            continue
        if isinstance(awaited, asyncio.Future):
            # A gather's children; else a task the awaiting frame holds (wait_for's).
            children = getattr(awaited, "_children", None) or [
                v for v in (frame.f_locals.values() if frame else ())
                if isinstance(v, asyncio.Task)]
            awaited = next((c for c in children if not c.done()), None)
            continue
        inner = next((f for a in ("cr_frame", "ag_frame", "gi_frame")
                      if (f := getattr(awaited, a, None)) is not None), None)
        if inner is None:
            # `await future` suspends in the future's iterator, which only the garbage
            # collector's view of its references leads back to the future.
            awaited = next((r for r in gc.get_referents(awaited)
                            if isinstance(r, asyncio.Future)), None)
            continue
        frame = inner
        code = frame.f_code
        where.append(f"{code.co_name} ({Path(code.co_filename).name}:{frame.f_lineno})")
        awaited = next((w for a in ("cr_await", "ag_await", "gi_yieldfrom")
                        if (w := getattr(awaited, a, None)) is not None), None)
    if len(where) > 8:  # where it entered the sink, and the innermost awaits
        where = [*where[:3], "...", *where[-5:]]
    return " -> ".join(where)


class SinkPool:
    """Sinks built lazily from the config, one instance per sink id."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self._sinks: dict[str, Any] = {}
        self._retired: list[Any] = []  # replaced by a reload; closed at the end
        # sink id -> why it was last found unhealthy: a probe every few seconds must
        # not repeat the same warning, only say when it starts, changes or ends.
        self._unhealthy: dict[str, str] = {}

    def replace_config(self, config: RouterConfig) -> None:
        """A reloaded config: sinks whose settings changed (or that are gone) are built
        afresh on next use; the old instances finish what they hold, closed at close()."""
        old, self.config = self.config, config
        for sink_id in list(self._sinks):
            stack, component = sink_id.split(".", 1)
            before, after = old.stacks.get(stack), config.stacks.get(stack)
            if (before.component(component) if before else None) != (
                after.component(component) if after else None
            ):
                self._retired.append(self._sinks.pop(sink_id))

    def _component(self, stack: str, component: str) -> Any:
        found = self.config.stacks.get(stack)
        comp = found.component(component) if found else None
        if comp is None:
            raise PermanentError(
                f"sink {stack}.{component} is no longer in the configuration; restore it "
                "and run `artifact-router retry`"
            )
        return comp

    def get(self, stack: str, component: str) -> Any:
        sink_id = f"{stack}.{component}"
        if sink_id not in self._sinks:
            try:
                self._sinks[sink_id] = create_sink(sink_id, self._component(stack, component))
            except LookupError as exc:
                raise PermanentError(str(exc)) from exc
        return self._sinks[sink_id]

    def policy(self, stack: str, component: str) -> tuple[RetryPolicy, int]:
        settings = self.config.router
        try:
            comp = self._component(stack, component)
        except PermanentError:
            return settings.retry, settings.sink_concurrency
        default = getattr(_sink_class_or_none(comp.type), "default_concurrency", None)
        return comp.retry or settings.retry, (
            comp.concurrency or default or settings.sink_concurrency
        )

    async def warm_up(self, stack: str) -> None:
        """Build a stack's sinks and let each `open()` its connections ahead of the first
        delivery.  Best effort: a sink that cannot open now reports it when it delivers."""
        found = self.config.stacks.get(stack)

        async def open_one(component: str) -> None:
            try:
                sink = self.get(stack, component)
                opener = getattr(sink, "open", None)
                if opener is not None:
                    await asyncio.wait_for(opener(), OPEN_TIMEOUT)
            except Exception as exc:
                log.debug("sink not opened ahead of use", sink=f"{stack}.{component}",
                          error=str(exc) or type(exc).__name__)

        if found is not None:
            await asyncio.gather(*(open_one(path) for path, _ in found.components()))

    def batch_size(self, stack: str, component: str) -> int:
        """How many deliveries the sink takes in one call (`max_batch`; 1: one at a time)."""
        try:
            comp = self._component(stack, component)
        except PermanentError:
            return 1
        return int(getattr(_sink_class_or_none(comp.type), "max_batch", 1) or 1)

    async def health(self) -> dict[str, bool]:
        """Each built sink's health, checked all at once: /healthz answers within about
        HEALTH_TIMEOUT however many sinks hang (one after another, N hung sinks took N
        timeouts, past a liveness probe's).  A sink that hangs, raises or says no is
        unhealthy, and why is logged once (again only when the reason changes, and
        when it recovers); the others are reported as they answer."""
        sinks = list(self._sinks.items())  # a reload may change the pool meanwhile
        tasks = [asyncio.create_task(_checked(sink), name=f"health {sink_id}")
                 for sink_id, sink in sinks]
        done: set[asyncio.Task[tuple[bool, str | None]]] = set()
        try:
            if tasks:
                # asyncio.wait, not wait_for: the bound holds even for a check that is
                # slow to give up once cancelled (it is left to finish on its own).
                done, _ = await asyncio.wait(tasks, timeout=HEALTH_TIMEOUT)
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
                    task.add_done_callback(_retrieve)
        out: dict[str, bool] = {}
        for (sink_id, _sink), task in zip(sinks, tasks, strict=True):
            healthy: bool = False
            reason: str | None = f"health check timed out after {HEALTH_TIMEOUT:g} s"
            if task in done:
                healthy, reason = ((False, "health check was cancelled") if task.cancelled()
                                   else task.result())
            out[sink_id] = healthy
            self._report(sink_id, reason)
        for gone in set(self._unhealthy) - set(out):  # retired by a reload
            del self._unhealthy[gone]
        return out

    def _report(self, sink_id: str, reason: str | None) -> None:
        before = self._unhealthy.get(sink_id)
        if reason is None:
            if before is not None:
                del self._unhealthy[sink_id]
                log.info("sink healthy again", sink=sink_id, was=before)
        elif reason != before:
            self._unhealthy[sink_id] = reason
            log.warning("sink unhealthy", sink=sink_id, reason=reason)

    async def close(self) -> None:
        for sink in [*self._sinks.values(), *self._retired]:
            with contextlib.suppress(Exception):
                await sink.close()
        self._sinks.clear()
        self._retired.clear()


async def _checked(sink: Any) -> tuple[bool, str | None]:
    """One sink's health() as (healthy, why not): an error is that sink's answer, not
    the whole /healthz's."""
    try:
        if await sink.health():
            return True, None
        return False, "the sink's health check says it cannot work (see its settings)"
    except Exception as exc:
        error = mask_url_passwords(str(exc)) or type(exc).__name__
        return False, f"health check failed: {error}"


def _retrieve(task: asyncio.Task[tuple[bool, str | None]]) -> None:
    """Collect a cancelled check's outcome, so asyncio never warns it went unretrieved."""
    if not task.cancelled():
        task.exception()


class InFlightSlots:
    """Deliveries in flight, per sink and in all: the dispatcher's limits.

    A claim takes a slot per row inside its journal transaction (on the journal's
    writer thread), so a row is never claimed past a limit even when two transactions
    (an intake batch's and a dispatcher tick's) claim back to back before the loop has
    started the first one's work; a finished task gives its slots back (on the loop).
    Hence the lock. Implements `router.journal.ClaimSlots`.
    """

    def __init__(self, pool: SinkPool, total: int, lease_seconds: float) -> None:
        self.pool = pool
        self.total = total
        self.lease_seconds = lease_seconds
        self.running = 0
        self.by_sink: dict[str, int] = {}
        self.refused: set[str] = set()  # sinks a take() found full since the last reset
        self._limits: dict[str, int] = {}  # per sink id; refreshed every tick (reloads)
        self._sinks: dict[str, tuple[str, str]] = {}  # sink id -> (stack, component)
        self._lock = threading.Lock()

    def limit(self, sink_id: str, stack: str, component: str) -> int:
        found = self._limits.get(sink_id)
        if found is None:
            self._sinks[sink_id] = (stack, component)
            found = self._limits[sink_id] = self.pool.policy(stack, component)[1]
        return found

    def refresh(self) -> None:
        """Limits as the config says now (a reload may have changed them)."""
        self._limits = {sink_id: self.pool.policy(*where)[1]
                        for sink_id, where in list(self._sinks.items())}

    def take(self, sink_id: str, stack: str, component: str) -> bool:
        limit = self.limit(sink_id, stack, component)
        with self._lock:
            held = self.by_sink.get(sink_id, 0)
            if self.running >= self.total or held >= limit:
                self.refused.add(sink_id)
                return False
            self.by_sink[sink_id] = held + 1
            self.running += 1
            return True

    def give_back(self, sink_ids: Sequence[str]) -> None:
        with self._lock:
            for sink_id in sink_ids:
                self.by_sink[sink_id] -= 1
            self.running -= len(sink_ids)

    def saturated(self) -> list[str]:
        """Sinks with no free slot."""
        limits = self._limits
        return [sink_id for sink_id, n in list(self.by_sink.items())
                if n >= limits.get(sink_id, n + 1)]


class IntakeSlots:
    """The dispatcher's slots as intake may take them: never for a sink that has older
    due work waiting, which must not be overtaken by newer events."""

    def __init__(self, slots: InFlightSlots, backlogged: frozenset[str]) -> None:
        self.slots = slots
        self.backlogged = backlogged
        self.lease_seconds = slots.lease_seconds

    def take(self, sink_id: str, stack: str, component: str) -> bool:
        return sink_id not in self.backlogged and self.slots.take(sink_id, stack, component)

    def give_back(self, sink_ids: Sequence[str]) -> None:
        self.slots.give_back(sink_ids)


class Dispatcher:
    def __init__(
        self,
        journal: DeliveryJournal,
        pool: SinkPool,
        config: RouterConfig,
        *,
        locate_bundles: Callable[[list[str]], Awaitable[dict[str, Path | None]]],
        on_finished: Callable[[list[FinishedEvent]], Awaitable[None]],
        metrics: RouterMetrics,
    ) -> None:
        self.journal = journal
        self.pool = pool
        self.locate_bundles = locate_bundles
        self.on_finished = on_finished
        self.metrics = metrics
        self._per_sink_metrics: dict[str, tuple[Histogram, Counter]] = {}
        self._wake = asyncio.Event()
        self._done: list[Completion] = []  # outcomes waiting for the next tick
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[str, int] = {}  # delivery key -> tasks running it (leases)
        self._started: dict[asyncio.Task[None], float] = {}  # until reported slow
        self.lease_seconds = config.router.lease_seconds
        self.slots = InFlightSlots(pool, config.router.concurrency, self.lease_seconds)
        # Intake claims its new events' deliveries itself (slots_for_intake) only while
        # the last claim took every due delivery it could, and never for sinks that were
        # full then (they may have older work waiting): a backlog is never overtaken.
        self._caught_up = False
        self._backlogged: frozenset[str] = frozenset()
        # Whether work may be due that no claim has seen yet (see wake); without it a
        # tick only records outcomes, and claims every CLAIM_EVERY seconds.
        self._claim_hint = True
        self._last_claim = -math.inf  # not 0.0: monotonic time counts from boot
        self._stopping = False
        self._drained = False  # stop() is past its grace: claimed work is left for later
        self._idle = asyncio.Event()  # clear while a tick is in its journal transaction
        self._idle.set()
        self.healthy = True  # false while journal ticks fail (shown by /healthz)

    def wake(self) -> None:
        """New work may be due: the next tick claims."""
        self._claim_hint = True
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return self.slots.running

    def slots_for_intake(self) -> IntakeSlots | None:
        """The slots an intake batch may claim its deliveries with (`journal.accept`),
        or None while older work waits or the dispatcher stops."""
        if not self._caught_up or self._stopping:
            return None
        return IntakeSlots(self.slots, self._backlogged)

    def adopt(self, claimed: list[ClaimedDelivery], waiting: bool) -> None:
        """Start deliveries that intake claimed in its accept transaction; `waiting`:
        it journaled others unclaimed (no slot, or a prerequisite), for a claim tick."""
        if claimed:
            self._start_all(claimed)
        if waiting:
            self.wake()

    async def run(self) -> None:
        """Run deliveries until stop(): one loop, one transaction per tick.

        Each tick records the outcomes that came in since the last one and, when new
        work may be due (or every CLAIM_EVERY seconds), claims it in the same journal
        transaction (`DeliveryJournal.cycle`).
        """
        recovered = await until_it_answers(
            self.journal.recover, "resuming deliveries left in flight",
            lambda ok: setattr(self, "healthy", ok))
        if recovered:
            log.info("resumed deliveries left in flight", count=recovered)
        leases = asyncio.create_task(self._maintain_leases(), name="leases")
        try:
            while True:
                # Clear before the tick: a wake-up that arrives during it must not be
                # lost (or we would sleep with work waiting).
                self._wake.clear()
                batch, self._done = self._done[:500], self._done[500:]
                free = 0 if self._stopping else self.slots.total - self.slots.running
                if not (self._claim_hint or time.monotonic() - self._last_claim >= CLAIM_EVERY):
                    free = 0  # nothing new can be due: record outcomes only
                claimed: list[ClaimedDelivery] = []
                if batch or free > 0:
                    claimed = await self._tick(batch, free)
                if self._stopping and not self._tasks and not self._done:
                    break
                self.metrics.buffer.labels(component="dispatcher").set(self.slots.running)
                if len(claimed) < max(free, 1) and not self._done:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=CLAIM_EVERY)
                    # Let a burst of completions land: one transaction for many.
                    await asyncio.sleep(0.002)
        finally:
            leases.cancel()

    async def _tick(self, batch: list[Completion], free: int) -> list[ClaimedDelivery]:
        self._idle.clear()
        try:
            return await self._tick_once(batch, free)
        finally:
            self._idle.set()

    async def _tick_once(self, batch: list[Completion], free: int) -> list[ClaimedDelivery]:
        saturated: list[str] = []
        if free > 0:
            self.slots.refresh()
            self.slots.refused = set()
            saturated = self.slots.saturated()
            self._claim_hint = False  # before the await: a wake() meanwhile stands
            self._last_claim = time.monotonic()
        try:
            finished, claimed = await self.journal.cycle(
                batch,
                free,
                slots=self.slots,
                exclude_sinks=saturated,
                lease_seconds=self.lease_seconds,
            )
        except Exception:
            # Nothing was written: the outcomes are kept for the next tick, and the
            # rows stay in_flight (resumed by lease expiry or restart if we die).
            self.healthy = False
            log.exception("journal tick failed", outcomes=len(batch))
            self._claim_hint = self._claim_hint or free > 0
            self._done[:0] = batch
            await asyncio.sleep(0.5)
            return []
        self.healthy = True
        if free > 0:
            self._caught_up = len(claimed) < free
            # Full sinks were left out of the claim, or refused rows it found.
            self._backlogged = frozenset(saturated) | self.slots.refused
            if not self._caught_up:
                self._claim_hint = True  # a full claim: more may be due
        self._start_all(claimed)
        if finished:
            try:
                await self.on_finished(finished)
            except Exception:
                # Moving bundles and sending receipts is redone at the next start (events
                # finish with moved=False); a failure here must not end the dispatcher.
                log.exception("handling finished events failed", events=len(finished))
        return claimed

    def _start_all(self, claimed: list[ClaimedDelivery]) -> None:
        """One task per delivery, or per batch for sinks that take many in one call
        (their per-call costs, a thread hop and a flush to disk, are paid once)."""
        batches: dict[str, list[ClaimedDelivery]] = {}
        sizes: dict[str, int] = {}
        for delivery in claimed:
            if delivery.sink_id not in sizes:
                sizes[delivery.sink_id] = self.pool.batch_size(delivery.stack, delivery.component)
            # Deploys go one by one: each checks first that no newer deploy superseded it.
            if delivery.action != Action.DEPLOY.value and sizes[delivery.sink_id] > 1:
                batches.setdefault(delivery.sink_id, []).append(delivery)
            else:
                self._start([delivery], self._attempt(delivery))
        for sink_id, group in batches.items():
            size = sizes[sink_id]
            for i in range(0, len(group), size):
                chunk = group[i : i + size]
                self._start(chunk, self._attempt_batch(chunk))

    def _start(
        self, deliveries: list[ClaimedDelivery], work: Coroutine[Any, Any, None]
    ) -> None:
        """Run claimed deliveries; their slots, taken by the claim, are freed at the end."""
        sink_ids = [d.sink_id for d in deliveries]
        if self._drained:
            # Claimed by a transaction that outlived stop()'s grace: they stay in flight
            # in the journal and are resumed at the next start, as cancelled ones are.
            work.close()
            self.slots.give_back(sink_ids)
            log.info("claimed after the drain; left for the next start", count=len(sink_ids))
            return
        name = f"deliver {deliveries[0].key} (+{len(deliveries) - 1})"
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        self._started[task] = time.monotonic()
        keys = [d.key for d in deliveries]
        for key in keys:
            self._running[key] = self._running.get(key, 0) + 1

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._started.pop(t, None)
            self.slots.give_back(sink_ids)
            for key in keys:
                if (left := self._running.pop(key) - 1) > 0:
                    self._running[key] = left

        task.add_done_callback(done)

    async def stop(self, grace: float) -> None:
        """Stop claiming; let in-flight deliveries finish within `grace` seconds.

        Whatever is still running after that is cancelled and stays in_flight in the
        journal, to be resumed at the next start: nothing is lost.
        """
        self._stopping = True
        self.wake()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # A tick in its transaction now starts what it claims when it returns: wait for
        # it, so that work is drained (or cancelled) with the rest.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - loop.time()))
        self._drained = True  # from here on nothing new starts
        # Cancel what is left, including work intake handed over during the wait.
        pending = [task for task in self._tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)

    @staticmethod
    def _needs_files(d: ClaimedDelivery) -> bool:
        return d.action in _FILE_ACTIONS

    async def _build_items(self, ds: list[ClaimedDelivery]) -> list[DeliveryItem | Exception]:
        """Delivery items for claimed rows; bundles are located in one thread hop."""
        records = []
        for d in ds:
            records.append(d.record or await self.journal.event_record(d.event_id))
        wanted = {
            record["bundle"]
            for d, record in zip(ds, records, strict=True)
            if record.get("bundle") and self._needs_files(d)
            and record["files"][d.artifact_index]
        }
        located = await self.locate_bundles(sorted(wanted)) if wanted else {}
        items: list[DeliveryItem | Exception] = []
        for d, record in zip(ds, records, strict=True):
            try:
                items.append(self._item(d, record, located.get(record.get("bundle") or "")))
            except Exception as exc:
                items.append(exc)
        return items

    def _item(self, d: ClaimedDelivery, record: dict[str, Any], bundle_dir: Path | None
              ) -> DeliveryItem:
        manifest = record["manifest"]
        artifact = manifest["artifacts"][d.artifact_index]
        needs_files = self._needs_files(d)
        files = []
        for raw in record["files"][d.artifact_index]:
            staged = StagedFile.model_validate(raw)
            if staged.path is not None and not staged.path.is_absolute() and needs_files:
                if bundle_dir is None:
                    raise TransientError(
                        f"bundle {record.get('bundle')!r} is not in accepted/ or failed/"
                    )
                staged.path = bundle_dir / staged.path
            files.append(staged)
        detected = (record.get("detected") or [{}] * (d.artifact_index + 1))[d.artifact_index]
        view = ArtifactView(
            index=d.artifact_index,
            kind=artifact["type"],
            name=artifact["name"],
            version=record["versions"][d.artifact_index],
            framework=artifact.get("framework") or detected.get("framework"),
            format=artifact.get("format") or detected.get("format"),
            metadata=artifact.get("metadata") or {},
            values=artifact.get("values") or {},
            step=artifact.get("step"),
            files=files,
        )
        context = DeliveryContext(
            event_id=d.event_id,
            pipeline=manifest["pipeline"],
            run_id=manifest["run_id"],
            step_name=manifest["step_name"],
            received_at=record["received_at"],
            run_status=manifest.get("run_status"),
        )
        return DeliveryItem(
            key=d.key,
            action=Action(d.action),
            sink_id=d.sink_id,
            context=context,
            artifact=view,
            target=d.target,
            params=d.params,
            upstream=d.upstream,
            attempt=d.attempts,
        )

    async def _attempt(self, d: ClaimedDelivery) -> None:
        started = time.monotonic()
        outcome: DeliveryResult | Exception
        try:
            if d.action == Action.DEPLOY.value:
                superseded = await self.journal.deploy_superseded(d.key)
                if superseded:
                    raise PermanentError(superseded)
            (item,) = await self._build_items([d])
            if isinstance(item, Exception):
                raise item
            outcome = await self.pool.get(d.stack, d.component).deliver(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome = exc
        self._record([d], [outcome], started)

    async def _attempt_batch(self, ds: list[ClaimedDelivery]) -> None:
        """Several deliveries to one sink in one `deliver_batch` call; each gets its own
        outcome (one bad item never fails the others)."""
        started = time.monotonic()
        outcomes: list[DeliveryResult | Exception] = []
        try:
            sink = self.pool.get(ds[0].stack, ds[0].component)
            items = await self._build_items(ds)
            ready = [item for item in items if isinstance(item, DeliveryItem)]
            results = iter(await sink.deliver_batch(ready) if ready else [])
            outcomes = [item if isinstance(item, Exception) else next(results) for item in items]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcomes = [exc] * len(ds)
        self._record(ds, outcomes, started)

    def _record(self, ds: list[ClaimedDelivery], outcomes: list[DeliveryResult | Exception],
                started: float) -> None:
        policy, _ = self.pool.policy(ds[0].stack, ds[0].component)
        elapsed = time.monotonic() - started
        for d, outcome in zip(ds, outcomes, strict=True):
            try:
                completion = self._outcome(d, policy, outcome)
            except Exception as exc:
                # No outcome recorded would leave the row in flight until its lease
                # ran out (or a restart). Retry it after max_delay.
                log.exception("recording a delivery outcome failed", key=d.key)
                completion = _completion(
                    d, "retry", error=f"internal error recording the outcome: {exc!r}",
                    next_attempt_at=time.time() + policy.max_delay)
            self._done.append(completion)
            self._sink_metrics(d.sink_id)[0].observe(elapsed)
            if d.sink_id in self._backlogged or (
                    d.has_dependents and completion.outcome == "done"):
                self._claim_hint = True  # a slot for older work, or what waited for it
        self._wake.set()

    def _sink_metrics(self, sink_id: str) -> tuple[Histogram, Counter]:
        """The sink's duration and sent series: looked up by labels once, not per
        delivery (prometheus_client's labels() was 2 % of a busy daemon's time)."""
        found = self._per_sink_metrics.get(sink_id)
        if found is None:
            found = self._per_sink_metrics[sink_id] = (
                self.metrics.duration.labels(sink=sink_id),
                self.metrics.sent.labels(component="dispatcher", sink=sink_id))
        return found

    def _outcome(self, d: ClaimedDelivery, policy: RetryPolicy,
                 outcome: DeliveryResult | Exception) -> Completion:
        if isinstance(outcome, PermanentError):
            # The reason is kept in the journal (`status`, `artifacts --json`): a URL a
            # sink quotes must not carry its password there.
            return self._dead(d, f"permanent: {mask_url_passwords(str(outcome))}")
        if isinstance(outcome, Exception):  # transient by default: bugs and surprises retry
            reason = mask_url_passwords(str(outcome)) or type(outcome).__name__
            if not isinstance(outcome, TransientError | OSError | TimeoutError):
                reason = f"{type(outcome).__name__}: {reason}"
            return self._retry_or_dead(d, policy, reason)
        self._sink_metrics(d.sink_id)[1].inc()
        return _completion(d, "done", result=outcome)

    def _dead(self, d: ClaimedDelivery, reason: str) -> Completion:
        log.warning("delivery dead-lettered", key=d.key, sink=d.sink_id, error=reason)
        self.metrics.errors.labels(component=d.sink_id, error_type="dead", stage="delivery").inc()
        self.metrics.discarded.labels(component=d.sink_id, reason="dead_letter").inc()
        return _completion(d, "dead", error=reason)

    def _retry_or_dead(self, d: ClaimedDelivery, policy: RetryPolicy, reason: str) -> Completion:
        delay = backoff_delay(policy, d.attempts)
        age = time.time() - d.created_at
        if d.attempts >= policy.max_attempts:
            return self._dead(d, f"gave up after {d.attempts} attempts: {reason}")
        if age + delay > policy.max_age:
            return self._dead(d, f"gave up after {age:.0f}s (max_age): {reason}")
        log.info(
            "delivery will be retried",
            key=d.key,
            sink=d.sink_id,
            attempt=d.attempts,
            delay=round(delay, 3),
            error=reason,
        )
        self.metrics.retries.labels(sink=d.sink_id).inc()
        self.metrics.errors.labels(
            component=d.sink_id, error_type="transient", stage="delivery"
        ).inc()
        return _completion(d, "retry", error=reason, next_attempt_at=time.time() + delay)

    def _report_slow(self) -> None:
        """Log each delivery running past SLOW_DELIVERY once, with the code it waits in."""
        now = time.monotonic()
        for task, started in list(self._started.items()):
            if now - started < SLOW_DELIVERY:
                continue
            del self._started[task]
            log.warning("delivery still running", task=task.get_name(),
                        seconds=round(now - started), waiting_in=_waiting_in(task))

    async def _maintain_leases(self) -> None:
        while True:
            await asyncio.sleep(min(self.lease_seconds / 3, SLOW_DELIVERY / 2))
            self._report_slow()
            try:
                await self.journal.renew_leases(self.lease_seconds, list(self._running))
                reaped = await self.journal.reap_expired_leases()
                if reaped:
                    log.warning("took over deliveries whose lease expired", count=reaped)
                    self.wake()
            except Exception:
                log.exception("lease maintenance failed")


