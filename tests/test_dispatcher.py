"""The dispatcher's in-flight limits, and intake's hand-off of new work to it: a real
journal (SQLite) and the real jsonl tracker, the dispatcher's loop running in-process."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog.testing

import router.dispatcher as dispatcher_module
from router.config import load_config
from router.daemon import Daemon
from router.db import deliveries
from router.dispatcher import InFlightSlots, SinkPool
from router.intake import AcceptedEvent
from router.manifest import parse_manifest
from sinks.trackers.jsonl import read_jsonl
from tests.conftest import Workspace
from tests.test_journal import FixedSlots

TRACKER = "local.experiment_tracker"
STORE = "local.artifact_store"


def metrics_event(event_id: str) -> AcceptedEvent:
    manifest = parse_manifest({
        "manifest_version": 1, "pipeline": "p", "run_id": event_id, "step_name": "s",
        "artifacts": [{"type": "metrics", "name": "m", "values": {"acc": 0.5}}],
    })
    return AcceptedEvent(event_id=event_id, source="mqtt", manifest=manifest, files=[[]],
                         digest=f"d-{event_id}", received_at=time.time())


def pool_for(tmp_path: Path, tracker_concurrency: int) -> SinkPool:
    ws = Workspace(tmp_path)  # only its config
    ws.stack["experiment_tracker"]["concurrency"] = tracker_concurrency
    ws.write()
    return SinkPool(load_config(ws.config_path).config)


def test_slots_hold_each_sinks_limit_and_the_total(tmp_path: Path) -> None:
    pool = pool_for(tmp_path, tracker_concurrency=2)
    slots = InFlightSlots(pool, total=3, lease_seconds=60)
    assert [slots.take(TRACKER, "local", "experiment_tracker") for _ in range(3)] == [
        True, True, False]
    assert slots.refused == {TRACKER} and slots.saturated() == [TRACKER]
    assert slots.take(STORE, "local", "artifact_store")
    assert not slots.take(STORE, "local", "artifact_store"), "the total of 3 is reached"
    slots.give_back([TRACKER])
    assert slots.take(STORE, "local", "artifact_store")
    assert (slots.running, slots.by_sink) == (3, {TRACKER: 1, STORE: 2})


def test_slots_stay_exact_when_threads_take_and_give_back_at_once(tmp_path: Path) -> None:
    """Claims take slots on the journal's writer thread while finished tasks give them
    back on the loop: the counts never pass a limit and end where they started."""
    pool = pool_for(tmp_path, tracker_concurrency=5)
    slots = InFlightSlots(pool, total=1000, lease_seconds=60)
    peak = [0]

    def churn() -> None:
        for _ in range(20_000):
            if slots.take(TRACKER, "local", "experiment_tracker"):
                peak[0] = max(peak[0], slots.by_sink[TRACKER])
                slots.give_back([TRACKER])

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert slots.by_sink[TRACKER] == 0 and slots.running == 0
    assert 1 <= peak[0] <= 5


@pytest.fixture
async def daemon_parts(tmp_path: Path) -> AsyncIterator[Callable[[int], Daemon]]:
    """A daemon's journal, sinks and dispatcher (no sources, nothing running yet)."""
    made: list[Daemon] = []

    def make(tracker_concurrency: int) -> Daemon:
        root = tmp_path / f"ws{len(made)}"
        root.mkdir()
        ws = Workspace(root)
        ws.stack["experiment_tracker"]["concurrency"] = tracker_concurrency
        ws.write()
        made.append(Daemon(load_config(ws.config_path)))
        return made[-1]

    yield make
    for daemon in made:
        await daemon.pool.close()
        await daemon.db.dispose()


async def run_dispatcher(daemon: Daemon) -> asyncio.Task[None]:
    await daemon.db.migrate()
    return asyncio.create_task(daemon.dispatcher.run())


async def wait_for(condition: Callable[[], object]) -> None:
    for _ in range(3000):  # 30 s
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def finished(daemon: Daemon) -> dict[str, float]:
    async with daemon.db.read() as conn:
        rows = await conn.exec_driver_sql(
            "select id, finished_at from events where state = 'done'")
        return {r[0]: r[1] for r in rows}


async def wait_finished(daemon: Daemon, done: dict[str, float], count: int) -> None:
    """Fill `done` (event id -> finished_at) until `count` events are done."""
    async with asyncio.timeout(120):
        while len(done) < count:
            done.update(await finished(daemon))
            await asyncio.sleep(0.01)


async def test_intake_hands_new_work_straight_to_the_dispatcher(
    daemon_parts: Callable[[int], Daemon],
) -> None:
    daemon = daemon_parts(32)
    task = await run_dispatcher(daemon)
    try:
        await wait_for(lambda: daemon.dispatcher.slots_for_intake() is not None)
        outcomes = await daemon.journal.accept(
            [metrics_event(f"e{i}") for i in range(5)], daemon.plan, daemon.dispatcher)
        assert [len(o.claimed) for o in outcomes] == [1] * 5, "claimed in the accept"
        assert all(c.sink_id == TRACKER for o in outcomes for c in o.claimed)
        await wait_finished(daemon, {}, 5)
    finally:
        await daemon.dispatcher.stop(5)
        await task
    tracking = Path(daemon.config.router.spool).parent / "tracking"
    lines = [row for f in tracking.rglob("*.jsonl") for row in read_jsonl(f)]
    assert sorted({str(row["run_id"]) for row in lines}) == [f"e{i}" for i in range(5)]


async def test_a_backlog_is_never_overtaken_by_newer_events(
    daemon_parts: Callable[[int], Daemon],
) -> None:
    """200 events wait for a tracker that takes one at a time: while they wait, intake
    may not claim for that tracker (even in the moment a slot is free), and an event
    accepted meanwhile is delivered after all of them."""
    daemon = daemon_parts(1)
    await daemon.db.migrate()
    await daemon.journal.accept([metrics_event(f"old{i:03d}") for i in range(200)],
                                daemon.plan)
    task = await run_dispatcher(daemon)
    done: dict[str, float] = {}
    try:
        await wait_for(lambda: daemon.dispatcher.in_flight > 0)  # the backlog is draining
        (outcome,) = await daemon.journal.accept(
            [metrics_event("new")], daemon.plan, daemon.dispatcher)
        assert outcome.outcome == "accepted" and outcome.claimed == []
        samples = 0
        while len(done) < 150:  # plenty still waiting
            intake = daemon.dispatcher.slots_for_intake()
            assert intake is None or TRACKER in intake.backlogged
            samples += 1
            done.update(await finished(daemon))
        assert samples > 10
        await wait_finished(daemon, done, 201)
    finally:
        await daemon.dispatcher.stop(5)
        await task
    assert done["new"] >= max(t for k, t in done.items() if k != "new")


async def test_a_delivery_retried_past_a_thousand_attempts_is_still_retried(
    tmp_path: Path,
) -> None:
    """Retries bounded by max_age, not max_attempts, run to thousands of attempts over
    a long outage; the backoff must not overflow (2.0 ** 1025) and strand the row in
    flight. The jsonl tracker's path lies under a regular file: every attempt fails."""
    ws = Workspace(tmp_path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    ws.stack["experiment_tracker"]["path"] = str(blocker / "tracking")
    ws.router["retry"] = {"base_delay": 0.5, "max_delay": 60, "max_attempts": 100_000,
                          "max_age": 86_400}
    ws.write()
    daemon = Daemon(load_config(ws.config_path))
    await daemon.db.migrate()
    await daemon.journal.accept([metrics_event("e1")], daemon.plan)
    await daemon.db.run_write(
        lambda conn: conn.execute(sa.update(deliveries).values(attempts=1025)))
    task = asyncio.create_task(daemon.dispatcher.run())
    try:
        async with asyncio.timeout(30):
            while True:
                async with daemon.db.read() as conn:
                    row = (await conn.execute(sa.select(
                        deliveries.c.state, deliveries.c.attempts, deliveries.c.last_error,
                        deliveries.c.next_attempt_at))).one()
                if row.attempts == 1026 and row.state == "pending":
                    break
                await asyncio.sleep(0.05)
    finally:
        await daemon.dispatcher.stop(5)
        await task
        await daemon.pool.close()
        await daemon.db.dispose()
    assert "tracking" in (row.last_error or ""), row.last_error
    assert row.next_attempt_at - time.time() <= 60, "backed off at most max_delay"


async def test_stop_bounds_work_that_a_tick_in_progress_claims(tmp_path: Path) -> None:
    """SIGTERM while a claim tick is in its journal transaction: what that tick claims
    starts after stop() began, and the drain must still bound it by its grace (it
    waited forever before). The hung sink is an MLflow tracker whose server accepts
    connections and never answers; the slow commit is simulated by delaying
    `journal.cycle`. The cancelled delivery stays in the journal for the next start."""
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ws = Workspace(tmp_path)
    ws.stack["experiment_tracker"] = {"type": "mlflow", "tracking_uri": f"http://127.0.0.1:{port}"}
    ws.write()
    daemon = Daemon(load_config(ws.config_path))
    await daemon.db.migrate()
    real_cycle = daemon.journal.cycle
    claiming = asyncio.Event()

    async def slow_cycle(completions, limit, **kw):  # type: ignore[no-untyped-def]
        if limit > 0:
            claiming.set()
            await asyncio.sleep(0.3)  # a commit that takes a moment
        return await real_cycle(completions, limit, **kw)

    daemon.journal.cycle = slow_cycle  # type: ignore[method-assign]
    task = asyncio.create_task(daemon.dispatcher.run())
    try:
        await asyncio.sleep(0.7)  # past the first (empty) claim
        await daemon.journal.accept([metrics_event("e1")], daemon.plan)  # no hand-off
        claiming.clear()
        await claiming.wait()
        started = time.monotonic()
        await daemon.dispatcher.stop(grace=1.0)
        await asyncio.wait_for(task, timeout=10)
        assert time.monotonic() - started < 8, "the drain kept to its grace"
        async with daemon.db.read() as conn:
            (state,) = (await conn.execute(sa.select(deliveries.c.state))).one()
        assert state == "in_flight"
        assert await daemon.journal.recover() == 1, "resumed at the next start"
    finally:
        if not task.done():
            task.cancel()
        server.close()
        await daemon.pool.close()
        await daemon.db.dispose()


@pytest.mark.postgres
async def test_a_journal_unreachable_at_start_is_waited_out_not_a_crash(tmp_path: Path) -> None:
    """The journal refuses connections when the dispatcher starts (PostgreSQL with
    connections to the database turned off): it reports unhealthy and retries, then
    resumes the work left in flight once the journal answers, instead of ending."""
    import asyncpg

    from tests.conftest import _PG_REASON, PG_ADMIN_DSN, create_pg_database, drop_pg_database

    if _PG_REASON:
        pytest.skip(_PG_REASON)
    url = await asyncio.to_thread(create_pg_database)
    name = url.rsplit("/", 1)[1]

    async def allow(on: bool) -> None:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(on).lower()}')
        finally:
            await admin.close()

    ws = Workspace(tmp_path, journal_url=url)
    ws.write()
    daemon = Daemon(load_config(ws.config_path))
    task = None
    try:
        await daemon.db.migrate()
        await daemon.journal.accept([metrics_event("e1")], daemon.plan)
        await daemon.journal.claim(10)  # left in flight, as by a crash
        await daemon.db.engine.dispose()  # no pooled connection left to reuse
        await allow(False)
        task = asyncio.create_task(daemon.dispatcher.run())
        await wait_for(lambda: not daemon.dispatcher.healthy)
        assert not task.done()
        await allow(True)
        await wait_finished(daemon, {}, 1)  # resumed and delivered
        assert daemon.dispatcher.healthy
    finally:
        await allow(True)
        if task is not None:
            await daemon.dispatcher.stop(5)
            await task
        await daemon.pool.close()
        await daemon.db.dispose()
        await asyncio.to_thread(drop_pg_database, url)


async def test_a_claim_nobody_started_expires_and_is_taken_over(tmp_path: Path) -> None:
    """A claim committed whose answer was lost (the connection dropped after COMMIT)
    leaves a row in flight under this daemon that no task runs; its lease must not be
    renewed with the running ones, so it expires and is delivered. The lost answer is
    played by an intake hand-off that claims and never starts the work."""
    ws = Workspace(tmp_path, lease_seconds=3)
    ws.write()
    daemon = Daemon(load_config(ws.config_path))
    await daemon.db.migrate()
    task = asyncio.create_task(daemon.dispatcher.run())
    try:
        await asyncio.sleep(0.5)  # past recover(), which would release it at once
        lost = FixedSlots({})  # claims at intake, then never hands the work over
        lost.lease_seconds = 3.0
        await daemon.journal.accept([metrics_event("e1")], daemon.plan, lost)
        assert [c.event_id for c in lost.adopted] == ["e1"]
        assert daemon.dispatcher.in_flight == 0
        done: dict[str, float] = {}
        async with asyncio.timeout(30):  # a lease of 3 s, renewed every second: never
            while "e1" not in done:
                done.update(await finished(daemon))
                await asyncio.sleep(0.1)
    finally:
        await daemon.dispatcher.stop(5)
        await task
        await daemon.pool.close()
        await daemon.db.dispose()


async def test_a_delivery_hung_on_a_silent_server_is_logged_with_where_it_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that accepts the connection and never answers holds a delivery until the
    sink's own timeout: the log says so long before, naming the await it hangs in."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepted by the kernel, never read, never answered
    monkeypatch.setattr(dispatcher_module, "SLOW_DELIVERY", 0.5)
    ws = Workspace(tmp_path)
    ws.stack["experiment_tracker"] = {
        "type": "mlflow", "tracking_uri": f"http://127.0.0.1:{silent.getsockname()[1]}",
        "request_timeout": 600}
    ws.write()
    daemon = Daemon(load_config(ws.config_path))
    await daemon.db.migrate()
    task = asyncio.create_task(daemon.dispatcher.run())
    try:
        with structlog.testing.capture_logs() as logs:
            await daemon.journal.accept([metrics_event("e1")], daemon.plan)
            daemon.dispatcher.wake()
            await wait_for(lambda: any(e["event"] == "delivery still running" for e in logs))
        (slow,) = [e for e in logs if e["event"] == "delivery still running"]
        assert slow["log_level"] == "warning" and slow["seconds"] >= 0.5
        assert "e1" in slow["task"]
        # The chain reaches into the sink, down to the HTTP request it waits for.
        # From the dispatcher's attempt, through the sink, to the socket read it waits in.
        where = slow["waiting_in"]
        assert where.startswith("_attempt (dispatcher.py:"), where
        assert " -> deliver (mlflow.py:" in where, where
        assert " -> read (streams.py:" in where, where
        assert await finished(daemon) == {}, "still waiting for the server, not given up"
    finally:
        await daemon.dispatcher.stop(0.1)
        await task
        await daemon.pool.close()
        await daemon.db.dispose()
        silent.close()


async def test_a_failure_handling_finished_events_does_not_end_the_dispatcher(
    daemon_parts: Callable[[int], Daemon],
) -> None:
    """Moving bundles and sending receipts after events finish may fail (a disk error,
    a bug); the dispatcher logs it and goes on delivering (the moves are redone at the
    next start from the journal's moved flag)."""
    daemon = daemon_parts(4)
    calls: list[list[str]] = []

    async def fails_once(finished_events: list[Any]) -> None:
        calls.append([e.event_id for e in finished_events])
        if len(calls) == 1:
            raise OSError(28, "No space left on device")

    daemon.dispatcher.on_finished = fails_once
    task = await run_dispatcher(daemon)
    try:
        with structlog.testing.capture_logs() as logs:
            await daemon.journal.accept([metrics_event("e1")], daemon.plan, daemon.dispatcher)
            done: dict[str, float] = {}
            await wait_finished(daemon, done, 1)
            await wait_for(lambda: calls)
            await daemon.journal.accept([metrics_event("e2")], daemon.plan, daemon.dispatcher)
            await wait_finished(daemon, done, 2)
            await wait_for(lambda: len(calls) >= 2)
        assert not task.done(), "the dispatcher is still running"
        assert [e["event"] for e in logs if e["log_level"] == "error"] == [
            "handling finished events failed"]
        assert sorted(e for call in calls for e in call) == ["e1", "e2"]
    finally:
        await daemon.dispatcher.stop(5)
        await task
