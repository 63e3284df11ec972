"""SpoolSource: the language-neutral intake (DESIGN section 2).

A bundle is a directory under `incoming/` holding `manifest.json` and the files it
names.  It is complete once `manifest.json` exists in a directory whose name does not
start with '.'.  The source validates it, journals it (one commit per batch), and only
then renames it to `accepted/`; finished bundles move to `done/` or `failed/`, invalid
ones to `rejected/` with an `error.json` saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog
import watchfiles

from router.db import until_it_answers
from router.errors import Problem
from router.intake import (
    AcceptedEvent,
    HashAbandoned,
    LargeBundle,
    Rejection,
    bundle_path_ok,
    load_bundle,
    not_utf8,
)
from router.journal import AcceptOutcome, DeliveryJournal, FinishedEvent, Handoff, Planner
from router.metrics import RouterMetrics

__all__ = ["SpoolPaths", "SpoolSource"]

log = structlog.get_logger("router.spool")

STATES = ("incoming", "accepted", "done", "failed", "rejected")
# A bundle directory seen without its manifest (written in place, manifest last) is
# looked at again after FIRST_LOOK seconds, then ever less often, up to LAST_LOOK.
FIRST_LOOK = 0.02
LAST_LOOK = 1.0


class SpoolPaths:
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.incoming = self.root / "incoming"
        self.accepted = self.root / "accepted"
        self.done = self.root / "done"
        self.failed = self.root / "failed"
        self.rejected = self.root / "rejected"

    def ensure(self) -> None:
        for state in STATES:
            (self.root / state).mkdir(parents=True, exist_ok=True)

    def locate(self, bundle: str) -> Path | None:
        """Where a journaled bundle is now (it moves while deliveries run)."""
        for folder in (self.accepted, self.failed, self.incoming, self.done):
            candidate = folder / bundle
            if candidate.is_dir():
                return candidate
        return None


_LARGE_STOP_GRACE = 5.0  # seconds a stopping spool waits for its large bundles' tasks

def _load_if_complete(path: Path, hash_up_to: int | None = None,
                      abandon: threading.Event | None = None
                      ) -> AcceptedEvent | Rejection | LargeBundle | None:
    """Read a bundle if it is one (a directory with manifest.json), in a worker thread.

    A symlink is refused (load_bundle says why), whether or not it leads to a manifest;
    an entry that cannot be looked into (a symlink loop, a directory without search
    permission) is rejected alone, never failing the batch it was read with."""
    try:
        # One stat: is it a directory with a manifest? load_bundle checks it, not again.
        manifest_st: os.stat_result | None = os.lstat(path / "manifest.json")
    except FileNotFoundError:
        return load_bundle(path, time.time()) if os.path.islink(path) else None
    except NotADirectoryError:
        if os.path.islink(path):
            return load_bundle(path, time.time())
        _not_a_bundle(path.name)
        return None
    except OSError:
        # ELOOP, EACCES...: load_bundle rejects it, naming the entry and the error
        manifest_st = None
    return load_bundle(path, time.time(), hash_up_to, abandon, manifest_st=manifest_st)


@functools.lru_cache(maxsize=256)  # once per name: a file being written changes often
def _not_a_bundle(name: str) -> None:
    log.warning("not a bundle: only directories are read from incoming/; ignored",
                entry=not_utf8(name) or name)


Loaded = AcceptedEvent | Rejection | LargeBundle | None


def _load_many(paths: list[Path], held: tuple[Path, ...], hash_up_to: int | None,
               abandon: threading.Event) -> list[Loaded]:
    return [_named_uniquely(_load_if_complete(p, hash_up_to, abandon), held) for p in paths]


def _named_uniquely(result: Loaded, held: tuple[Path, ...]) -> Loaded:
    """Journal a bundle under the name it will have in accepted/ or failed/.

    Deliveries and moves find a bundle by its journaled name. A name still held by an
    older bundle (in one of the `held` folders) would lead them to that bundle's files,
    so the newcomer is journaled, and moved, as `<name>-<ns>` instead. (A replay of an
    already journaled event keeps its first name: see SpoolSource._settle_duplicate.)"""
    if isinstance(result, AcceptedEvent) and result.bundle is not None and any(
            os.path.lexists(folder / result.bundle) for folder in held):
        fresh = _fresh_name(result.bundle)
        log.info("bundle name in use by an older bundle: journaled and moved under a new "
                 "name", bundle=result.bundle, renamed=fresh, event_id=result.event_id)
        result.bundle = fresh
    return result


def _move_all(moves: list[tuple[Path, Path, str]]) -> None:
    for src, dest_dir, name in moves:
        try:
            _move(src, dest_dir, name)
        except OSError:
            log.exception("could not move bundle", bundle=src.name)


def _fresh_name(name: str) -> str:
    """`<name>-<ns>`, within the 255 bytes a file name may take."""
    return f"{name.encode()[:200].decode(errors='ignore')}-{time.time_ns()}"


def _move(src: Path, dest_dir: Path, name: str | None = None) -> Path:
    """Rename keeping the directory name (or the given one, the name it is journaled
    under); never overwrite an older bundle of that name."""
    dest = dest_dir / (name or src.name)
    if os.path.lexists(dest):
        dest = dest_dir / _fresh_name(dest.name)
    os.replace(src, dest)
    with contextlib.suppress(OSError):
        # Retention counts from the move, not from the writer's mtime. No follow: a
        # refused symlink is moved too, and its target is not ours to touch.
        os.utime(dest, follow_symlinks=False)
    return dest


_ERROR_JSON = "error.json"


def _write_error_json(bundle: Path, body: bytes) -> None:
    """Write bundle/error.json whatever the writer left at that name (a symlink, a FIFO,
    a directory), never following it: a new file made in the bundle directory, opened
    without following links, renamed over the old entry. OSError if it cannot be done."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    dir_fd = os.open(bundle, flags)  # a symlink in place of the bundle: ELOOP/ENOTDIR
    try:
        tmp = f".error.json.{os.getpid()}.{time.time_ns()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
            try:
                os.rename(tmp, _ERROR_JSON, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except IsADirectoryError:
                # A directory named error.json: keep it, under another name.
                os.rename(_ERROR_JSON, f"{_ERROR_JSON}.{time.time_ns()}.bundled",
                          src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                os.rename(tmp, _ERROR_JSON, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)


class SpoolSource:
    def __init__(
        self,
        paths: SpoolPaths,
        journal: DeliveryJournal,
        planner: Planner,
        *,
        preflight: Callable[[AcceptedEvent], Problem | None],
        metrics: RouterMetrics,
        handoff: Handoff | None = None,
        batch_size: int = 256,
        rescan_seconds: float = 5.0,
        retention_days: float = 7.0,
        hash_apart_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.paths = paths
        self.journal = journal
        self.planner = planner
        self.preflight = preflight
        self.handoff = handoff  # deliveries claimed at intake go straight to the dispatcher
        self.metrics = metrics
        self.batch_size = batch_size
        self.rescan_seconds = rescan_seconds
        self.retention_days = retention_days
        # Bundles over this many bytes are hashed in a task of their own (at most two at
        # once), so that a checkpoint's seconds of hashing never hold up the bundles
        # behind it. Bundles of its run, or naming its run as an input, are journaled
        # with it (same batch) or after it: lineage is resolved in journal order.
        self.hash_apart_bytes = hash_apart_bytes
        self._hashing: dict[str, tuple[str, str]] = {}  # name -> its (pipeline, run_id)
        self._behind: set[str] = set()  # bundles waiting for a large bundle they link to
        self._large_slots = asyncio.Semaphore(2)
        self._large_tasks: set[asyncio.Task[None]] = set()
        self._pending: set[str] = set()
        self._in_batch: frozenset[str] = frozenset()  # the batch being read and journaled
        # Directories in incoming/ still without manifest.json: name -> (next look,
        # interval). The watcher sees only incoming/ itself, not inside bundles.
        self._incomplete: dict[str, tuple[float, float]] = {}
        self._incomplete_added = asyncio.Event()
        self._kick = asyncio.Event()
        self._stop = asyncio.Event()
        self._abandon = threading.Event()  # set with _stop: hashes under way give up
        # Bundles journaled but not yet renamed out of incoming/: the dispatcher may
        # claim their deliveries in the very next transaction, before the rename.
        self._in_transit: dict[str, asyncio.Event] = {}
        # Ready, for /healthz: false until the watcher is armed and the start scan done,
        # so that a supervisor which waits for it knows a bundle renamed in is seen at once.
        self.healthy = False

    # --- lifecycle ----------------------------------------------------------------

    async def run(self) -> None:
        self.paths.ensure()
        def unready_while_failing(ok: bool) -> None:  # ready only once watching (below)
            if not ok:
                self.healthy = False

        await until_it_answers(self._recover, "finishing bundle moves a crash cut off",
                               unready_while_failing)
        tasks = [asyncio.create_task(self._watch(), name="spool-watch"),
                 asyncio.create_task(self._look_again(), name="spool-incomplete")]
        # The watcher first, then the scan: a bundle renamed in between would otherwise
        # wait for the next rescan, behind bundles that came after it. watchfiles sets
        # up its inotify watches before its first await, so one turn of the loop arms it.
        await asyncio.sleep(0)
        self._scan()
        self.healthy = True
        tasks.append(asyncio.create_task(self._rescan_loop(), name="spool-rescan"))
        try:
            while not self._stop.is_set():
                if not self._pending:
                    self._kick.clear()
                    waiter = asyncio.create_task(self._kick.wait())
                    stopper = asyncio.create_task(self._stop.wait())
                    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    stopper.cancel()
                    continue
                self._pending.difference_update(self._hashing, self._behind)
                if not self._pending:
                    continue
                batch = sorted(self._pending)[: self.batch_size]
                self._pending.difference_update(batch)
                self._in_batch = frozenset(batch)
                try:
                    await self._process(batch)
                except HashAbandoned:
                    break  # stopping: the batch stays in incoming/, unacknowledged
                except Exception:
                    await self._failed(batch)
                finally:
                    self._in_batch = frozenset()
        finally:
            self._abandon.set()
            if self._large_tasks:
                # Large bundles' tasks end by themselves: a hash under way gives up after
                # its chunk (the bundle stays in incoming/), a journal commit under way
                # finishes. Bounded all the same: a journal that hangs is not waited for.
                await asyncio.wait(list(self._large_tasks), timeout=_LARGE_STOP_GRACE)
            for task in [*tasks, *self._large_tasks]:
                task.cancel()
            await asyncio.gather(*tasks, *self._large_tasks, return_exceptions=True)

    def stop(self) -> None:
        self._stop.set()
        self._abandon.set()

    async def _failed(self, names: list[str]) -> None:
        """The journal is unavailable (disk full, database down): keep the bundles in
        incoming/ and try again in a second; nothing was acknowledged."""
        self.healthy = False
        log.exception("intake failed; bundles stay in incoming/", count=len(names),
                      first=names[0] if names else None)
        self.metrics.errors.labels(component="spool", error_type="journal", stage="intake").inc()
        await asyncio.sleep(1.0)
        self._pending.update(names)

    async def _recover(self) -> None:
        """Finish the moves a crash interrupted, from the journal's word on each bundle.

        accepted/ and failed/ are small (only unfinished work), so a directory scan at
        start replaces a per-event `moved` flag written on every completion.
        """
        for folder in (self.paths.accepted, self.paths.failed):
            names = [p.name for p in folder.iterdir() if p.is_dir()]
            states = await self.journal.bundle_states(names)
            for name in names:
                state = states.get(name)
                target = {"done": self.paths.done, "failed": self.paths.failed}.get(state or "")
                with contextlib.suppress(OSError):
                    if state is None and folder == self.paths.accepted:
                        # Not journaled (cannot happen by rename order): read it again.
                        os.replace(folder / name, self.paths.incoming / name)
                    elif target is not None and target != folder:
                        _move(folder / name, target)

    def _in_hand(self) -> frozenset[str]:
        """Names the intake already has: queued, in the batch under way, hashed apart or
        held behind, or watched until complete. A scan need not look at them: three
        stats a name, each of which may hand the GIL over, were a sixth of a 5,000-bundle
        burst's time with a rescan every 2 s (bench/RESULTS.md, session 33), and the
        names of the batch under way, queued again, were read again once gone."""
        return frozenset().union(self._pending, self._in_batch, self._hashing, self._behind,
                                 self._incomplete)

    def _bundles_by_state(self, in_hand: frozenset[str] = frozenset()
                          ) -> tuple[list[str], list[str]]:
        """(complete bundles, directories still without a manifest) in incoming/, but
        for those `in_hand` (file system only: thread-safe)."""
        try:
            names = [n for n in os.listdir(self.paths.incoming)
                     if n not in in_hand and bundle_path_ok(n)]
        except FileNotFoundError:
            self.paths.ensure()
            return [], []
        states = self._states(names)
        return ([n for n, st in zip(names, states, strict=True) if st == "complete"],
                [n for n, st in zip(names, states, strict=True) if st == "incomplete"])

    def _scan(self) -> None:
        self._enqueue_scan(self._bundles_by_state())

    def _enqueue_scan(self, found: tuple[list[str], list[str]]) -> None:
        complete, incomplete = found
        self._enqueue(complete)
        self._watch_incomplete(incomplete)

    def _enqueue(self, names: list[str]) -> None:
        self._pending.update(names)
        if self._pending:
            self._kick.set()

    async def _scan_async(self) -> None:
        self._enqueue_scan(await asyncio.to_thread(self._bundles_by_state, self._in_hand()))

    def _watch_incomplete(self, names: list[str]) -> None:
        """Look again soon at directories read before their manifest was there."""
        fresh = [n for n in names if n not in self._incomplete]
        if fresh:
            first = time.monotonic() + FIRST_LOOK
            self._incomplete.update((n, (first, FIRST_LOOK)) for n in fresh)
            self._incomplete_added.set()

    async def _look_again(self) -> None:
        """Queue bundles completed in place (files first, manifest.json renamed in last).

        The watcher sees incoming/ only: watching inside every bundle cost an inotify
        watch per directory, and removing one scanned all others (a burst of 5,000
        bundles spent a third of the daemon's CPU there). So a directory read without
        its manifest is looked at again FIRST_LOOK later, then less often (LAST_LOOK at
        most) while it stays incomplete; one stat each, all in one thread hop."""
        while True:
            self._incomplete_added.clear()  # set again by any name added from here on
            now = time.monotonic()
            due = [n for n, (at, _) in self._incomplete.items() if at <= now]
            if due:
                states = await asyncio.to_thread(self._states, due)
                now = time.monotonic()
                for name, state in zip(due, states, strict=True):
                    if state == "incomplete" and name in self._incomplete:
                        interval = min(LAST_LOOK, self._incomplete[name][1] * 2)
                        self._incomplete[name] = (now + interval, interval)
                    else:  # complete (or a symlink: refused when read), or gone
                        self._incomplete.pop(name, None)
                        if state == "complete":
                            self._enqueue([name])
            timeout = None
            if self._incomplete:
                wake = min(at for at, _ in self._incomplete.values())
                timeout = max(0.0, wake - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._incomplete_added.wait(), timeout)

    def _states(self, names: list[str]) -> list[str]:
        """Each name in incoming/: complete (its manifest is there; a symlink is too,
        never a bundle: refused when read), incomplete (a directory without its
        manifest yet), or gone (not a directory, or no longer there)."""
        out = []
        for name in names:
            path = self.paths.incoming / name
            if os.path.islink(path):
                out.append("complete")
            elif not os.path.isdir(path):
                out.append("gone")
            elif os.path.exists(path / "manifest.json"):
                out.append("complete")
            else:
                out.append("incomplete")
        return out

    async def _rescan_loop(self) -> None:
        # watchfiles can miss events (inotify queue overflow, network filesystems):
        # a periodic scan is the safety net; it also prunes old done/ bundles.
        last_prune = -math.inf  # not 0.0: monotonic time counts from boot
        while True:
            await asyncio.sleep(self.rescan_seconds)
            await self._scan_async()
            if time.monotonic() - last_prune > 600:
                last_prune = time.monotonic()
                await asyncio.to_thread(self._prune_done)

    async def _watch(self) -> None:
        incoming = self.paths.incoming
        async for changes in watchfiles.awatch(
            incoming,
            stop_event=self._stop,
            # A steady stream of bundles is yielded every `debounce` ms: the floor of
            # intake latency (bench: p99 < 100 ms at 200 bundles/s needs well under 100).
            debounce=10,
            step=5,
            recursive=False,  # inside bundles: see _look_again
            ignore_permission_denied=True,
        ):
            for change, changed in changes:
                if change == watchfiles.Change.deleted:  # moved out, by us or the writer
                    continue
                try:
                    rel = Path(changed).relative_to(incoming)
                except ValueError:
                    continue
                if not rel.parts or not bundle_path_ok(rel.parts[0]):
                    continue
                # Completeness is checked when the bundle is read, off the event loop.
                self._pending.add(rel.parts[0])
            if self._pending:
                self._kick.set()

    # --- intake -------------------------------------------------------------------

    def _preflight(self, name: str, result: AcceptedEvent | Rejection | None
                   ) -> AcceptedEvent | Rejection | None:
        if isinstance(result, AcceptedEvent):
            problem = self.preflight(result)
            if problem is not None:
                return Rejection(
                    source="spool", bundle=name, event_id=result.event_id, problems=[problem]
                )
        return result

    async def _read_all(self, names: list[str], hash_up_to: int | None) -> list[Loaded]:
        """Read a batch in one thread hop: a task and a hop per bundle cost more loop
        time than reading a small bundle does, and reading in several threads at once
        cost more than it gained (bench small-to-local, 5,000 bundles: 633 against 550
        bundles/s with four threads, in alternating runs): small bundles are Python
        work, which holds the GIL, so the threads only took it from each other. A bundle
        over `hash_up_to` bytes comes back unhashed, as a LargeBundle, to be hashed
        in a task of its own (_hash_apart)."""
        held = (self.paths.accepted, self.paths.failed, self.paths.done)
        loaded = await asyncio.to_thread(
            _load_many, [self.paths.incoming / n for n in names], held, hash_up_to,
            self._abandon)
        return [r if isinstance(r, LargeBundle) else self._preflight(n, r)
                for n, r in zip(names, loaded, strict=True)]

    async def _process(self, names: list[str]) -> None:
        loaded = await self._read_all(names, self.hash_apart_bytes)
        large = {r.manifest.linked_runs()[0] for r in loaded if isinstance(r, LargeBundle)}
        hashing = set(self._hashing.values())
        now: list[tuple[str, AcceptedEvent | Rejection | None]] = []
        apart: dict[tuple[str, str], list[str]] = {}
        for name, result in zip(names, loaded, strict=True):
            linked = result.manifest.linked_runs() if isinstance(
                result, AcceptedEvent | LargeBundle) else []
            if any(run in hashing for run in linked):
                self._behind.add(name)  # came after a large bundle of a run it is linked to
            elif run := next((run for run in linked if run in large), None):
                apart.setdefault(run, []).append(name)
            else:
                assert not isinstance(result, LargeBundle)
                now.append((name, result))
        for run, group in apart.items():
            self._hash_apart(run, group)
        await self._journal_loaded([n for n, _ in now], [r for _, r in now])

    def _hash_apart(self, run: tuple[str, str], names: list[str]) -> None:
        """Hash and journal a run's large bundles, with the bundles of the same batch
        linked to that run, in a task of their own: one transaction, as in line."""
        for name in names:
            self._hashing[name] = run
        task = asyncio.create_task(self._intake_apart(names), name=f"spool-large-{names[0]}")
        self._large_tasks.add(task)
        task.add_done_callback(self._large_tasks.discard)

    async def _intake_apart(self, names: list[str]) -> None:
        try:
            async with self._large_slots:
                loaded = await self._read_all(names, None)
                results = [r for r in loaded if not isinstance(r, LargeBundle)]
                assert len(results) == len(names)  # none without a limit
                await self._journal_loaded(names, results)
        except HashAbandoned as exc:
            log.info("stopping: a large bundle's hash was given up; it stays in incoming/ "
                     "for the next start", bundles=names, hashed_bytes=exc.hashed,
                     size=exc.size)
        except Exception:
            await self._failed(names)
        finally:
            for name in names:
                self._hashing.pop(name, None)
            # Bundles held behind it are read again; any still behind another wait on.
            self._pending.update(self._behind)
            self._behind.clear()
            self._kick.set()

    async def _journal_loaded(self, names: list[str],
                              results: list[AcceptedEvent | Rejection | None]) -> None:
        # None: not a bundle yet (a directory without its manifest), or gone already.
        self._watch_incomplete([n for n, r in zip(names, results, strict=True) if r is None])
        pairs = [(n, r) for n, r in zip(names, results, strict=True)
                 if isinstance(r, AcceptedEvent)]
        rejected = [r for r in results if isinstance(r, Rejection)]
        self.metrics.received.labels(component="spool").inc(len(pairs) + len(rejected))
        for rejection in rejected:
            await self._reject(rejection)
        if not pairs:
            self.healthy = self.healthy or bool(rejected)  # healthy again once it writes
            return
        sources = [n for n, _ in pairs]  # directory names in incoming/, by position
        accepted = [e for _, e in pairs]
        moved = asyncio.Event()
        for event in accepted:
            assert event.bundle is not None
            self._in_transit[event.bundle] = moved
        try:
            outcomes = await self.journal.accept(accepted, self.planner, self.handoff)
            self.healthy = True
            await self._settle(accepted, sources, outcomes)
        finally:
            for event in accepted:
                assert event.bundle is not None
                self._in_transit.pop(event.bundle, None)
            moved.set()

    async def _settle(self, accepted: list[AcceptedEvent], sources: list[str],
                      outcomes: list[AcceptOutcome]) -> None:
        """Move each journaled bundle to where its outcome says. Outcomes come in batch
        order; paired by position, since two bundles may carry the same id."""
        moves: list[tuple[Path, Path, str]] = []
        for event, source, outcome in zip(accepted, sources, outcomes, strict=True):
            assert event.bundle is not None
            src = self.paths.incoming / source
            if outcome.outcome == "accepted":
                if outcome.detail:
                    log.warning("event accepted with plan errors", event_id=event.event_id,
                                errors=outcome.detail)
                moves.append((src, self.paths.done if outcome.deliveries == 0
                               else self.paths.accepted, event.bundle))
            elif outcome.outcome == "duplicate":
                await self._settle_duplicate(event, source)
            else:
                await self._reject(
                    Rejection(
                        source="spool",
                        bundle=source,
                        event_id=event.event_id,
                        problems=[outcome.problem or Problem(
                            field="id", value=event.event_id, message="duplicate id")],
                    )
                )
        await asyncio.to_thread(_move_all, moves)

    async def locate_many(self, bundles: list[str]) -> dict[str, Path | None]:
        """Where journaled bundles are now, in one thread hop; waits while any is being
        renamed out of incoming/, so that a delivery never reads from a moving path.

        A journaled bundle still in incoming/ (a crash came between the commit and the
        rename) is about to move too: intake will find it a duplicate and move it to
        accepted/. None for it, then: the delivery is retried and finds it there,
        instead of reading files that vanish mid-copy."""
        for moving in {id(e): e for b in bundles if (e := self._in_transit.get(b))}.values():
            await moving.wait()

        def where(bundle: str) -> Path | None:
            found = self.paths.locate(bundle)
            return None if found is not None and found.parent == self.paths.incoming else found

        return await asyncio.to_thread(lambda: {b: where(b) for b in bundles})

    async def _settle_duplicate(self, event: AcceptedEvent, source: str) -> None:
        """Same id, same content: a replay (or our own crash between commit and move)."""
        state = (await self.journal.known_events([event.event_id])).get(event.event_id)
        record = await self.journal.event_record(event.event_id) if state else {}
        # The name the journal knows it by (it may differ from `source`: _named_uniquely).
        journaled: str = (record.get("source") == "spool" and record.get("bundle")) or source
        src = self.paths.incoming / source
        here = await asyncio.to_thread(self.paths.locate, journaled)
        # The journaled bundle itself, left in incoming/ by a crash, or a replay whose
        # first copy is gone: it goes where its deliveries look for it. A second copy of
        # a bundle that is elsewhere is finished.
        own = here is None or here == src
        target = {"accepted": self.paths.accepted, "failed": self.paths.failed}.get(state or "")
        if own and target is not None:
            await asyncio.to_thread(_move, src, target, journaled)
        else:
            await asyncio.to_thread(_move, src, self.paths.done)
        log.info("duplicate bundle: already journaled", event_id=event.event_id, state=state)

    async def _reject(self, rejection: Rejection) -> None:
        assert rejection.bundle is not None
        src_name = rejection.bundle
        if (shown := not_utf8(src_name)) is not None:
            # The journal and the log take text: the name with its bytes escaped.
            rejection = rejection.model_copy(update={"bundle": shown})
        log.warning(
            "bundle rejected", bundle=rejection.bundle, errors=rejection.summary
        )
        self.metrics.discarded.labels(component="spool", reason="invalid").inc()
        self.metrics.errors.labels(component="spool", error_type="invalid", stage="intake").inc()
        body = {
            "bundle": rejection.bundle,
            "event_id": rejection.event_id,
            "rejected_at": rejection.rejected_at,
            "errors": [p.model_dump(mode="json") for p in rejection.problems],
            "summary": rejection.summary,
        }
        data = (json.dumps(body, indent=2, default=str) + "\n").encode()
        src = self.paths.incoming / src_name
        if not await asyncio.to_thread(self._file_rejected, src, data):
            return
        await self.journal.reject(rejection)

    def _file_rejected(self, src: Path, error_json: bytes) -> bool:
        """Move a refused bundle to rejected/ and write its error.json (a thread: the
        writer controls what is there). False when the bundle is gone already."""
        if not os.path.lexists(src):  # lexists: a refused symlink may well dangle
            return False
        try:
            dest = _move(src, self.paths.rejected)
        except OSError:
            log.exception("could not move rejected bundle", bundle=not_utf8(src.name) or
                          src.name)
            return True  # still journaled: status shows why it stays in incoming/
        try:
            if stat.S_ISDIR(os.lstat(dest).st_mode):
                _write_error_json(dest, error_json)
            else:
                log.warning("no error.json: the rejected entry is not a directory; the "
                            "reason is in this log and in `artifact-router status`",
                            bundle=not_utf8(dest.name) or dest.name)
        except OSError as exc:
            log.warning("could not write error.json; the reason is in this log and in "
                        "`artifact-router status`", bundle=not_utf8(dest.name) or dest.name,
                        error=f"{exc.strerror or exc}")
        return True

    # --- completion -----------------------------------------------------------------

    async def on_finished(self, finished: list[FinishedEvent]) -> None:
        """Move finished bundles to done/ or failed/ (a crash in between: see _recover)."""
        wanted = [
            (event.bundle, self.paths.done if event.state == "done" else self.paths.failed)
            for event in finished
            if event.bundle is not None and event.source == "spool"
        ]
        if wanted:
            await asyncio.to_thread(self._move_finished, wanted)

    def _move_finished(self, wanted: list[tuple[str, Path]]) -> None:
        for bundle, target in wanted:
            current = self.paths.locate(bundle)
            if current is not None and current.parent != target:
                try:
                    _move(current, target)
                except OSError:
                    log.exception("could not move bundle", bundle=bundle)

    def _prune_done(self) -> None:
        if self.retention_days <= 0:
            return
        cutoff = time.time() - self.retention_days * 86400
        for entry in os.scandir(self.paths.done):
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry.path)
