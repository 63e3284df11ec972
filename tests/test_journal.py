"""DeliveryJournal and catalog on both backends: SQLite (WAL) and the local PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from router.catalog import list_runs
from router.catalog_read import get_run, query_artifacts, resolve_refs
from router.client import _SqlBackend
from router.config import StackConfig, load_config
from router.db import Database, events
from router.delivery import DeliveryResult, StagedFile, StoredObject
from router.intake import AcceptedEvent
from router.journal import ClaimedDelivery, Completion, DeliveryJournal, Outcome
from router.manifest import MAX_STEP, MetricsArtifact, parse_manifest
from router.rules import plan_event

CONFIG = load_config(discover=False).config


def event(event_id: str, *, name: str = "clf", version: str | None = None,
          upload: bool = True, inputs: list[str] | None = None,
          step: int | None = None) -> AcceptedEvent:
    artifact: dict[str, object] = {"type": "model", "name": name, "upload": upload,
                                   "files": [{"path": "model.pkl"}]}
    if version:
        artifact["version"] = version
    metrics: dict[str, object] = {"type": "metrics", "name": "eval", "values": {"acc": 0.9}}
    if step is not None:
        metrics["step"] = step
    manifest = parse_manifest({
        "manifest_version": 1, "pipeline": "fraud", "run_id": "run-1", "step_name": "train",
        "inputs": inputs or [], "artifacts": [artifact, metrics],
    })
    return AcceptedEvent(
        event_id=event_id, source="spool", bundle=event_id, manifest=manifest,
        files=[[StagedFile(name="model.pkl", type="pkl", path=Path("model.pkl"),
                           sha256="ab" * 32, size=10)], []],
        digest=f"digest-{event_id}", received_at=time.time(),
    )


def planner(ev: AcceptedEvent, versions: list[str]):  # type: ignore[no-untyped-def]
    return plan_event(ev.manifest, event_id=ev.event_id, stack=CONFIG.stacks["local"],
                      versions=versions, received_at=datetime.now(UTC))


class FixedSlots:
    """Per-sink limits for claims (the dispatcher's InFlightSlots, minus the dispatcher);
    sinks not named get 100. Also a Handoff: what is claimed at intake lands in
    `adopted`."""

    lease_seconds = 60.0

    def __init__(self, limits: dict[str, int], fail_on_take: int = 0) -> None:
        self.limits = limits
        self.held: dict[str, int] = {}
        self.adopted: list[ClaimedDelivery] = []
        self.takes = 0
        self.fail_on_take = fail_on_take

    def take(self, sink_id: str, stack: str, component: str) -> bool:
        self.takes += 1
        if self.takes == self.fail_on_take:
            raise RuntimeError("the journal fails mid-transaction")
        if self.held.get(sink_id, 0) >= self.limits.get(sink_id, 100):
            return False
        self.held[sink_id] = self.held.get(sink_id, 0) + 1
        return True

    def give_back(self, sink_ids: list[str]) -> None:
        for sink_id in sink_ids:
            self.held[sink_id] -= 1

    def slots_for_intake(self) -> FixedSlots:
        return self

    def adopt(self, claimed: list[ClaimedDelivery], waiting: bool) -> None:
        self.adopted += claimed
        self.waiting = waiting


@pytest.fixture
async def journal(db_url: str):  # type: ignore[no-untyped-def]
    db = Database(db_url)
    await db.migrate()
    yield DeliveryJournal(db, owner="test")
    await db.dispose()


async def test_accept_journals_plan_and_catalog_in_one_batch(journal: DeliveryJournal) -> None:
    outcomes = await journal.accept([event("e1"), event("e2")], planner)
    assert [o.outcome for o in outcomes] == ["accepted", "accepted"]
    assert outcomes[0].deliveries == 2  # store the model, log the metrics
    status = await journal.status()
    assert status.events == {"accepted": 2}
    assert status.deliveries.pending == 4
    async with journal.db.read() as conn:
        rows = await query_artifacts(conn, pipeline="fraud")
        runs = await list_runs(conn)
    # versions: next integer per (pipeline, name), assigned in acceptance order
    assert sorted(r.version for r in rows if r.name == "clf") == ["1", "2"]
    assert runs[0].run_id == "run-1" and runs[0].artifacts == 4


async def test_steps_up_to_the_largest_a_manifest_allows_are_catalogued(
    journal: DeliveryJournal,
) -> None:
    """Steps past 32 bits (a timestamp in milliseconds, a sample count) and up to the
    manifest's cap: PostgreSQL's INTEGER column held none of them."""
    steps = [3_000_000_000, MAX_STEP]
    outcomes = await journal.accept(
        [event(f"e{i}", step=step) for i, step in enumerate(steps)], planner)
    assert [o.outcome for o in outcomes] == ["accepted", "accepted"]
    async with journal.db.read() as conn:
        rows = await query_artifacts(conn, pipeline="fraud", name="eval")
    assert sorted(r.step or 0 for r in rows) == steps


@pytest.mark.parametrize("step", [2**63, 2**64], ids=["over-the-column", "over-json"])
async def test_an_event_the_database_cannot_hold_is_refused_alone_and_its_batch_goes_on(
    journal: DeliveryJournal, step: int
) -> None:
    """A value the catalog cannot store (a step past the column's 64 bits, or past what
    the JSON record's serializer holds, as if the manifest check had missed it) fails
    the batch's transaction: the batch is journaled in parts, the event at fault is
    refused with the reason, and the others are accepted instead of the whole batch
    failing at every retry (which held up all intake behind it)."""
    bad = event("bad")
    metrics = bad.manifest.artifacts[1]
    assert isinstance(metrics, MetricsArtifact)
    metrics.step = step
    batch = [event("e1"), event("e2"), bad, event("e3"), event("e4")]
    slots = FixedSlots({})
    outcomes = await journal.accept(batch, planner, slots)
    assert [o.event_id for o in outcomes] == ["e1", "e2", "bad", "e3", "e4"]
    assert [o.outcome for o in outcomes] == [
        "accepted", "accepted", "refused", "accepted", "accepted"]
    problem = outcomes[2].problem
    assert problem is not None and problem.value == "bad"
    assert "cannot record" in problem.message and "range" in problem.message
    status = await journal.status()
    assert status.events == {"accepted": 4}
    # The claims of the rolled-back attempts were given back: only adopted ones held.
    assert sum(slots.held.values()) == len(slots.adopted) == 8


async def test_one_run_is_read_by_its_id_with_its_own_artifact_count(
    journal: DeliveryJournal,
) -> None:
    """get_run reads the one run (and counts only its artifacts) instead of listing
    every run of the pipeline to find it."""
    batch = [event("e1"), event("e2"), event("e3")]
    for ev, run_id in zip(batch, ["run-a", "run-b", "run-b"], strict=True):
        ev.manifest.run_id = run_id
    await journal.accept(batch, planner)
    async with journal.db.read() as conn:
        one = await get_run(conn, "fraud", "run-b")
        missing = await get_run(conn, "fraud", "run-c")
        other_pipeline = await get_run(conn, "other", "run-a")
        listed = await list_runs(conn, pipeline="fraud")
    assert one is not None and (one.run_id, one.artifacts) == ("run-b", 4)
    assert missing is None and other_pipeline is None
    assert sorted((r.run_id, r.artifacts) for r in listed) == [("run-a", 2), ("run-b", 4)]


async def test_an_input_resolves_to_the_version_its_consumer_was_made_from(
    journal: DeliveryJournal,
) -> None:
    """A step run again re-emits `clf` after `scorer` consumed it: scorer's input is
    still the version it was made from, not the newest; a consumer catalogued before
    its input (manifests out of order) gets the input's first version."""
    ref = "fraud/run-1/train/clf"
    early = event("early", name="early", inputs=[ref])
    await journal.accept([early], planner)
    await journal.accept([event("v1")], planner)
    await journal.accept([event("scorer", name="scorer", inputs=[ref])], planner)
    await journal.accept([event("v2")], planner)
    async with journal.db.read() as conn:
        rows = {r.name: r for r in await query_artifacts(conn, pipeline="fraud")
                if r.name in ("early", "scorer")}
        by_version = {r.version: r.id for r in await query_artifacts(conn, name="clf")}
        newest = await resolve_refs(conn, [ref])
        as_made = await resolve_refs(conn, [ref], as_of=rows["scorer"].created_at)
        before = await resolve_refs(conn, [ref], as_of=rows["early"].created_at)
    assert newest[ref].id == by_version["2"]
    assert as_made[ref].id == by_version["1"]
    assert before[ref].id == by_version["1"]


async def test_the_catalog_client_reads_a_run_whole_past_ten_thousand_artifacts(
    journal: DeliveryJournal,
) -> None:
    """Run.artifacts and Flow reads stopped at 10,000 rows without a word."""
    per_event = 1_000
    batch = []
    for i in range(11):
        manifest = parse_manifest({
            "manifest_version": 1, "pipeline": "big", "run_id": "run-1", "step_name": "log",
            "artifacts": [{"type": "metrics", "name": f"m{i}-{j}", "values": {"x": 1.0}}
                          for j in range(per_event)],
        })
        batch.append(AcceptedEvent(
            event_id=f"big-{i}", source="spool", bundle=None, manifest=manifest,
            files=[[] for _ in range(per_event)], digest=f"d{i}", received_at=time.time()))
    await journal.accept(batch, planner)
    backend = _SqlBackend(journal.db.url)
    try:
        rows = await asyncio.to_thread(backend.artifacts, pipeline="big", run_id="run-1")
    finally:
        await asyncio.to_thread(backend.close)
    assert len(rows) == len({r.id for r in rows}) == 11 * per_event


async def test_replayed_event_is_a_duplicate_and_changed_one_a_conflict(
    journal: DeliveryJournal,
) -> None:
    await journal.accept([event("e1")], planner)
    again = await journal.accept([event("e1")], planner)
    assert again[0].outcome == "duplicate"
    changed = event("e1")
    changed.digest = "something else"
    conflict = await journal.accept([changed], planner)
    assert conflict[0].outcome == "conflict"
    assert "different manifest" in (conflict[0].detail or "")
    assert (await journal.status()).deliveries.pending == 2  # nothing planned twice


async def test_automatic_versions_never_repeat_an_explicit_whole_number(
    journal: DeliveryJournal,
) -> None:
    """An explicit "3" raises the counter: the next automatic version is 4, in a later
    batch or the same one; versions that are no whole number leave it alone."""
    await journal.accept([event("e1", version="3")], planner)
    await journal.accept([event("e2"), event("e3", version="1")], planner)
    await journal.accept([event("e4", version="1.0.0"), event("e5", version="9999999999"),
                          event("e6")], planner)
    async with journal.db.read() as conn:
        rows = await query_artifacts(conn, pipeline="fraud")
    versions = {r.event_id: r.version for r in rows if r.name == "clf"}
    assert versions == {"e1": "3", "e2": "4", "e3": "1", "e4": "1.0.0", "e5": "9999999999",
                        "e6": "5"}


async def test_explicit_versions_are_kept(journal: DeliveryJournal) -> None:
    await journal.accept([event("e1", version="1.0.0")], planner)
    async with journal.db.read() as conn:
        rows = await query_artifacts(conn, name="clf")
    assert rows[0].version == "1.0.0"


async def test_claim_respects_prerequisites_and_sink_capacity(journal: DeliveryJournal) -> None:
    await journal.accept([event(f"e{i}") for i in range(5)], planner)
    claimed = await journal.claim(
        100, slots=FixedSlots({"local.artifact_store": 2})
    )
    by_sink: dict[str, int] = {}
    for c in claimed:
        by_sink[c.sink_id] = by_sink.get(c.sink_id, 0) + 1
    assert by_sink == {"local.artifact_store": 2, "local.experiment_tracker": 5}
    assert all(c.attempts == 1 for c in claimed)
    # claimed rows are not handed out twice
    again = await journal.claim(100, slots=FixedSlots({}))
    assert {c.key for c in again}.isdisjoint({c.key for c in claimed})
    assert len(again) == 3


async def test_a_full_sinks_backlog_does_not_hide_other_sinks_due_work(
    journal: DeliveryJournal,
) -> None:
    """400 metrics wait for a tracker that takes one at a time, more than one claim's
    window of due rows; a model accepted after them is still claimed for the store at
    once, not after the tracker has worked through its backlog."""
    backlog = [event(f"m{i:03d}", upload=False) for i in range(400)]
    await journal.accept(backlog, planner)
    await journal.accept([event("late")], planner)
    claimed = await journal.claim(
        255, slots=FixedSlots({"local.experiment_tracker": 1})
    )
    assert sorted((c.sink_id, c.event_id) for c in claimed) == [
        ("local.artifact_store", "late"), ("local.experiment_tracker", "m000")]


async def test_accept_claims_what_can_start_at_once_and_hands_it_over(
    journal: DeliveryJournal,
) -> None:
    """With a handoff, intake journals deliveries already claimed (no claim tick): within
    the sinks' limits, never one that waits for a prerequisite; the rest stay pending
    for the dispatcher, and nothing is handed out twice."""
    def chained(ev: AcceptedEvent, versions: list[str]):  # type: ignore[no-untyped-def]
        plan = planner(ev, versions)
        if ev.event_id == "e0":  # its metrics wait for its model to be stored
            plan.artifacts[1].deliveries[0].after = plan.artifacts[0].deliveries[0].key
        return plan

    handoff = FixedSlots({"local.artifact_store": 2})
    outcomes = await journal.accept([event(f"e{i}") for i in range(4)], chained, handoff)

    by_sink: dict[str, int] = {}
    for c in handoff.adopted:
        by_sink[c.sink_id] = by_sink.get(c.sink_id, 0) + 1
        assert c.attempts == 1 and c.record is not None and c.record["event_id"] == c.event_id
    assert by_sink == {"local.artifact_store": 2, "local.experiment_tracker": 3}
    assert [c.key for o in outcomes for c in o.claimed] == [c.key for c in handoff.adopted]
    assert handoff.held == by_sink
    assert handoff.waiting, "the dispatcher is told that some were left for a claim"
    assert [(c.event_id, c.action) for c in handoff.adopted if c.has_dependents] == [
        ("e0", "store")], "e0's metrics wait for its store"
    status = await journal.status()
    assert (status.deliveries.in_flight, status.deliveries.pending) == (5, 3)

    rest = await journal.claim(100)
    assert {c.key for c in rest}.isdisjoint({c.key for c in handoff.adopted})
    assert len(rest) == 2, "the two stores over the limit; e0's metrics wait for its store"
    done = [Completion(key=c.key, event_id=c.event_id, artifact_index=c.artifact_index,
                       sink_id=c.sink_id, action=c.action, outcome="done",
                       result=DeliveryResult()) for c in handoff.adopted + rest]
    await journal.complete(done)
    assert [c.artifact_index for c in await journal.claim(100)] == [1], "now e0's metrics"


async def test_a_failed_accept_gives_its_slots_back(journal: DeliveryJournal) -> None:
    handoff = FixedSlots({}, fail_on_take=3)
    with pytest.raises(RuntimeError, match="mid-transaction"):
        await journal.accept([event("e1"), event("e2")], planner, handoff)
    assert handoff.takes == 3 and all(n == 0 for n in handoff.held.values())
    assert handoff.adopted == []
    assert (await journal.status()).events == {}, "rolled back whole"


async def test_completion_records_locations_and_finishes_the_event(
    journal: DeliveryJournal,
) -> None:
    await journal.accept([event("e1", inputs=["fraud/run-0/prep/train_data"])], planner)
    claimed = await journal.claim(10)
    completions = []
    for c in claimed:
        result = DeliveryResult(
            objects=[StoredObject(file_name="model.pkl", uri="file:///x/model.pkl", size=10,
                                  sha256="ab" * 32)]
        ) if c.action == "store" else DeliveryResult(uri="file:///t.jsonl")
        completions.append(Completion(key=c.key, event_id=c.event_id,
                                      artifact_index=c.artifact_index, sink_id=c.sink_id,
                                      action=c.action, outcome="done", result=result))
    finished = await journal.complete(completions[:1])
    assert finished == []  # one delivery still open
    finished = await journal.complete(completions[1:])
    assert [(f.event_id, f.state, f.bundle) for f in finished] == [("e1", "done", "e1")]
    async with journal.db.read() as conn:
        rows = await query_artifacts(conn, run_id="run-1")
    model = next(r for r in rows if r.kind == "model")
    assert [loc.uri for loc in model.locations] == ["file:///x/model.pkl"]
    assert model.inputs == ["fraud/run-0/prep/train_data"]
    assert model.checksum == "ab" * 32


async def test_a_bundle_name_used_again_after_a_prune_reads_as_its_newest_event(
    journal: DeliveryJournal,
) -> None:
    """Once done/<name> is pruned, a new bundle may take the name again. Recovery at
    start reads the bundle's state by name: the old event (done) must not stand for the
    new one, else accepted/<name> would be moved to done/ with its work still to do."""
    old = event("z-old")
    old.bundle, old.received_at = "b1", time.time() - 8 * 86400
    await journal.accept([old], planner)
    claimed = await journal.claim(10)
    await journal.complete([outcome_of(c, "done") for c in claimed])
    assert await journal.bundle_states(["b1"]) == {"b1": "done"}
    new = event("a-new")
    new.bundle = "b1"
    await journal.accept([new], planner)
    # The old row written again after the new one (PostgreSQL then keeps it last).
    await journal.mark_moved(["z-old"])
    await journal.flush_moved()
    assert await journal.bundle_states(["b1"]) == {"b1": "accepted"}


async def test_retry_then_dead_letter_then_operator_retry(journal: DeliveryJournal) -> None:
    await journal.accept([event("e1")], planner)
    store = next(c for c in await journal.claim(10) if c.action == "store")
    await journal.complete([Completion(
        key=store.key, event_id="e1", artifact_index=0, sink_id=store.sink_id, action="store",
        outcome="retry", error="disk full", next_attempt_at=time.time() + 3600)])
    status = await journal.status()
    assert status.sinks["local.artifact_store"].pending == 1
    # not due yet: a backing-off delivery is not claimed
    assert all(c.key != store.key for c in await journal.claim(10))

    from sqlalchemy import update

    from router.db import deliveries
    await journal.db.run_write(lambda conn: conn.execute(
        update(deliveries).where(deliveries.c.key == store.key).values(next_attempt_at=0)))
    again = await journal.claim(10)
    assert [c.key for c in again] == [store.key] and again[0].attempts == 2
    finished = await journal.complete([Completion(
        key=store.key, event_id="e1", artifact_index=0, sink_id=store.sink_id, action="store",
        outcome="dead", error="permanent: access denied")])
    status = await journal.status()
    assert status.dead_letters[0]["last_error"] == "permanent: access denied"
    assert finished == [] or finished[0].state == "failed"

    assert await journal.retry_dead(store.key) == 1
    status = await journal.status()
    assert status.sinks["local.artifact_store"].pending == 1
    assert status.sinks["local.artifact_store"].dead == 0


async def test_in_flight_deliveries_are_recovered_after_a_crash(journal: DeliveryJournal) -> None:
    await journal.accept([event("e1")], planner)
    claimed = await journal.claim(10)
    assert (await journal.status()).deliveries.in_flight == len(claimed) == 2
    # a new daemon with the same owner id starts: its in-flight work goes back to pending
    restarted = DeliveryJournal(journal.db, owner="test")
    assert await restarted.recover() == 2
    assert (await journal.status()).deliveries.pending == 2


async def test_expired_leases_of_a_dead_peer_are_taken_over(journal: DeliveryJournal) -> None:
    await journal.accept([event("e1")], planner)
    await journal.claim(10, lease_seconds=-1)  # a peer that died holding work
    peer = DeliveryJournal(journal.db, owner="other-daemon")
    assert await peer.recover() == 0  # not its own work
    assert await peer.reap_expired_leases() == 2
    assert len(await peer.claim(10)) == 2


async def test_a_late_outcome_from_a_daemon_whose_lease_was_taken_over_is_ignored(
    journal: DeliveryJournal,
) -> None:
    """A slow daemon's lease expires and a peer takes the delivery over; the slow one's
    outcome, arriving late, must not reset the peer's attempt (a "retry" would let a
    third attempt start beside it). The peer's own outcome then counts."""
    await journal.accept([event("e1", upload=False)], planner)
    (slow,) = await journal.claim(10, lease_seconds=-1)  # its lease runs out
    peer = DeliveryJournal(journal.db, owner="other-daemon")
    assert await peer.reap_expired_leases() == 1
    (taken,) = await peer.claim(10)
    assert taken.key == slow.key
    await journal.complete([Completion(
        key=slow.key, event_id="e1", artifact_index=slow.artifact_index, sink_id=slow.sink_id,
        action=slow.action, outcome="retry", error="timed out", next_attempt_at=0)])
    status = await journal.status()
    assert status.deliveries.in_flight == 1 and status.deliveries.pending == 0
    finished = await peer.complete([Completion(
        key=taken.key, event_id="e1", artifact_index=taken.artifact_index,
        sink_id=taken.sink_id, action=taken.action, outcome="done",
        result=DeliveryResult(uri="x://e1"))])
    assert [f.state for f in finished] == ["done"]


async def test_rejections_are_visible_in_status(journal: DeliveryJournal) -> None:
    from router.errors import Problem
    from router.intake import Rejection

    await journal.reject(Rejection(source="mqtt", event_id="bad-1", problems=[
        Problem(field="artifacts[0].type", value="modle", message="unknown artifact type")]))
    status = await journal.status()
    assert status.events == {"rejected": 1}
    assert "artifacts[0].type = 'modle'" in status.rejected[0]["error"]
    # a fixed event with the same id is accepted over the rejection
    assert (await journal.accept([event("bad-1")], planner))[0].outcome == "accepted"


async def test_held_messages_are_kept_per_holder_in_order_until_released(
    journal: DeliveryJournal,
) -> None:
    """MQTT messages acknowledged before their (large) hash is done live here: each
    daemon reads back its own, oldest first, until it releases them once journaled."""
    first = await journal.hold("router-a", {"messages": [{"topic": "t", "payload": "MQ=="}]})
    second = await journal.hold("router-a", {"messages": [{"topic": "t", "payload": "Mg=="}]})
    await journal.hold("router-b", {"messages": [{"topic": "t", "payload": "Mw=="}]})
    assert [r["messages"][0]["payload"] for _, r in await journal.held("router-a")] == [
        "MQ==", "Mg=="]
    assert first < second
    await journal.release(first)
    assert [i for i, _ in await journal.held("router-a")] == [second]
    assert len(await journal.held("router-b")) == 1
    # a pool member that takes router-b's session over adopts what it held
    adopted = await journal.adopt_held("router-b", "router-a")
    assert [r["messages"][0]["payload"] for _, r in adopted] == ["Mw=="]
    assert await journal.held("router-b") == []
    assert [i for i, _ in await journal.held("router-a")] == [second, adopted[0][0]]
    assert (await journal.status()).held_messages == 2


# --- stale outcomes: an attempt is (owner, attempt number) ----------------------------


def outcome_of(c: ClaimedDelivery, outcome: Outcome, **fields: Any) -> Completion:
    """What the dispatcher records for claim `c` (router.dispatcher._completion)."""
    return Completion(
        key=c.key, event_id=c.event_id, artifact_index=c.artifact_index,
        sink_id=c.sink_id, action=c.action, outcome=outcome, attempts=c.attempts, **fields)


def metrics_after_store(ev: AcceptedEvent, versions: list[str]):  # type: ignore[no-untyped-def]
    """The event's metrics are logged only once its model is stored (a register's wait)."""
    plan = planner(ev, versions)
    plan.artifacts[1].deliveries[0].after = plan.artifacts[0].deliveries[0].key
    return plan


def stored(uri: str, version_id: str) -> DeliveryResult:
    return DeliveryResult(objects=[StoredObject(
        file_name="model.pkl", uri=uri, size=10, sha256="ab" * 32, version_id=version_id)])


async def test_a_stale_dead_letter_does_not_kill_what_waits_for_the_new_holder(
    journal: DeliveryJournal,
) -> None:
    """A slow daemon gives up on a store whose lease a peer took over: its "dead" must
    not kill the delivery waiting for that store, which the peer's "done" unblocks."""
    await journal.accept([event("e1")], metrics_after_store)
    (slow,) = await journal.claim(10, lease_seconds=-1)  # the store; the metrics wait
    peer = DeliveryJournal(journal.db, owner="other-daemon")
    assert await peer.reap_expired_leases() == 1
    (taken,) = await peer.claim(10)
    assert (taken.key, taken.action) == (slow.key, "store")

    finished = await journal.complete([outcome_of(slow, "dead", error="permanent: gone")])
    assert finished == []
    status = await journal.status()
    assert status.sinks["local.experiment_tracker"].model_dump() == {
        "pending": 1, "in_flight": 0, "done": 0, "dead": 0}, "the metrics still wait"
    assert status.sinks["local.artifact_store"].in_flight == 1
    assert status.dead_letters == []

    await peer.complete([outcome_of(taken, "done", result=stored("s3://b/m", "v1"))])
    (metrics,) = await peer.claim(10)
    assert metrics.artifact_index == 1
    finished = await peer.complete([outcome_of(metrics, "done", result=DeliveryResult(
        uri="file:///t.jsonl"))])
    assert [(f.event_id, f.state) for f in finished] == [("e1", "done")]


async def test_a_stale_done_records_no_location(journal: DeliveryJournal) -> None:
    """The slow daemon's store lands after a peer took the delivery over: the catalog
    lists the location of the attempt that holds the row (one location per delivery and
    file name: a stale one recorded first would hide the new holder's version)."""
    await journal.accept([event("e1")], planner)
    slow = next(c for c in await journal.claim(10, lease_seconds=-1) if c.action == "store")
    peer = DeliveryJournal(journal.db, owner="other-daemon")
    await peer.reap_expired_leases()
    taken = next(c for c in await peer.claim(10) if c.key == slow.key)

    await journal.complete([outcome_of(slow, "done", result=stored("s3://b/m", "v-stale"))])
    async with journal.db.read() as conn:
        model = next(r for r in await query_artifacts(conn, name="clf"))
    assert model.locations == []
    assert (await journal.status()).sinks["local.artifact_store"].in_flight == 1

    await peer.complete([outcome_of(taken, "done", result=stored("s3://b/m", "v-new"))])
    async with journal.db.read() as conn:
        model = next(r for r in await query_artifacts(conn, name="clf"))
    assert [(loc.uri, loc.version_id) for loc in model.locations] == [("s3://b/m", "v-new")]


async def test_the_same_daemon_claiming_again_ignores_its_first_attempts_outcome(
    journal: DeliveryJournal,
) -> None:
    """This daemon's own lease expires (its reaper puts the row back to pending) and it
    claims the store again: the owner is the same, the attempt number tells the first
    attempt's late outcomes (a retry, a dead letter) from the second's, which counts."""
    await journal.accept([event("e1")], metrics_after_store)
    (first,) = await journal.claim(10, lease_seconds=-1)
    assert await journal.reap_expired_leases() == 1
    (second,) = await journal.claim(10)
    assert (second.key, first.attempts, second.attempts) == (first.key, 1, 2)

    await journal.complete([outcome_of(first, "retry", error="timed out", next_attempt_at=0)])
    await journal.complete([outcome_of(first, "dead", error="permanent: gone")])
    status = await journal.status()
    assert status.sinks["local.artifact_store"].in_flight == 1
    assert status.sinks["local.experiment_tracker"].pending == 1
    assert status.dead_letters == []
    assert await journal.claim(10) == [], "the second attempt still holds the store"

    await journal.complete([outcome_of(second, "done", result=stored("s3://b/m", "v2"))])
    assert [c.artifact_index for c in await journal.claim(10)] == [1]
    async with journal.db.read() as conn:
        model = next(r for r in await query_artifacts(conn, name="clf"))
    assert [loc.version_id for loc in model.locations] == ["v2"]


async def test_a_stale_failed_deploy_does_not_fail_the_decision(
    journal: DeliveryJournal,
) -> None:
    """A deploy's lease runs out and a peer deploys again: the slow attempt's dead letter
    must not record the version failed while the peer's attempt runs (a late "done", by
    contrast, counts: the endpoint serves that version, tests/test_approvals.py)."""
    st = StackConfig.model_validate({
        "name": "prod",
        "artifact_store": {"type": "local", "path": "/tmp/unused"},
        "model_registry": {"type": "mlflow", "tracking_uri": "http://127.0.0.1:1"},
        "model_deployer": {"type": "mlflow_alias", "tracking_uri": "http://127.0.0.1:1"},
        "artifact_routing": {"Model": {"store": "local", "register": True, "deploy": True,
                                       "deploy_condition": "auto"}},
    })

    def deploying(ev: AcceptedEvent, versions: list[str]):  # type: ignore[no-untyped-def]
        return plan_event(ev.manifest, event_id=ev.event_id, stack=st, versions=versions,
                          received_at=datetime.now(UTC))

    async def decision() -> str:
        (row,) = await journal.decisions(name="clf")
        return row.state

    await journal.accept([event("e1", version="1")], deploying)
    for action in ("store", "register"):
        (c,) = [c for c in await journal.claim(10) if c.artifact_index == 0]
        assert c.action == action
        await journal.complete([outcome_of(c, "done", result=DeliveryResult(uri=f"x://{action}"))])
    (slow,) = await journal.claim(10, lease_seconds=-1)
    assert slow.action == "deploy" and await decision() == "deploying"
    peer = DeliveryJournal(journal.db, owner="other-daemon")
    assert await peer.reap_expired_leases() == 1
    (taken,) = await peer.claim(10)

    await journal.complete([outcome_of(slow, "dead", error="permanent: endpoint gone")])
    assert await decision() == "deploying"
    await peer.complete([outcome_of(taken, "done", result=DeliveryResult(uri="x://deploy"))])
    assert await decision() == "deployed"


async def test_execute_many_stores_what_sqlalchemy_stores(journal: DeliveryJournal) -> None:
    """The journal's hot inserts and updates skip SQLAlchemy's per-row parameter work
    (db.execute_many): every column, a JSON null and a value fixed in the statement
    (`state="done"`) included, must come out as `conn.execute` stores them."""
    from router import journal as journal_module
    from router.db import deliveries, events, execute_many

    def delivery(key: str) -> dict[str, object]:
        return {"key": key, "event_id": key, "artifact_index": 2, "action": "store",
                "stack": "s", "component": "c", "sink_id": "s.c", "target": None,
                "params": {"on_conflict": "skip", "n": [1, 2.5, None]}, "after": None,
                "state": "in_flight", "attempts": 1, "next_attempt_at": 1.5,
                "created_at": 2.5, "updated_at": 3.5, "owner": "test", "lease_until": 9.5}

    def event_row(key: str) -> dict[str, object]:
        return {"id": key, "source": "mqtt", "bundle": None, "state": "accepted",
                "stack": "s", "pipeline": "p", "run_id": "r", "step_name": "t",
                "digest": "d", "record": {"a": {"b": [True, None]}}, "error": None,
                "received_at": 1.25, "finished_at": None, "moved": False}

    def write(conn: sa.Connection) -> None:
        conn.execute(events.insert(), [event_row("by-sqlalchemy")])
        execute_many(conn, events.insert(), [event_row("by-driver")])
        conn.execute(deliveries.insert(), [delivery("by-sqlalchemy")])
        execute_many(conn, deliveries.insert(), [delivery("by-driver")])
        done = {"r": None, "now": 7.0, "o": "test", "a": 1}
        conn.execute(journal_module._MARK_DONE, [{**done, "k": "by-sqlalchemy"}])
        execute_many(conn, journal_module._MARK_DONE, [{**done, "k": "by-driver"}])

    await journal.db.run_write(write)
    async with journal.db.read() as conn:
        stored = {}
        for table, key in ((events, events.c.id), (deliveries, deliveries.c.key)):
            query = sa.select(table).where(key.like("by-%")).order_by(key)
            for row in (await conn.execute(query)).mappings():
                data = dict(row)
                data.pop(key.name)
                data.pop("event_id", None)
                stored.setdefault(table.name, []).append(data)
        raw = (await conn.execute(sa.text(
            "SELECT result IS NULL FROM deliveries WHERE key LIKE 'by-%' ORDER BY key"
        ))).scalars().all()
    assert stored["events"][0] == stored["events"][1]
    assert stored["deliveries"][0] == stored["deliveries"][1]
    assert stored["deliveries"][0]["state"] == "done" and stored["deliveries"][0]["owner"] is None
    assert raw[0] == raw[1], "None in a JSON column: the same JSON null (or SQL NULL) both ways"


async def test_execute_many_of_many_rows_stores_each_row_once_in_order(
    journal: DeliveryJournal,
) -> None:
    """On SQLite, execute_many sends INSERT rows as multi-row VALUES, a power of two per
    statement (300 rows: 256 + 32 + 8 + 4): every row lands with its own values, and an
    ON CONFLICT insert takes rows in order as executemany does (the first of two with
    one key wins, a row already stored is left alone). PostgreSQL: one row each."""
    from router import catalog
    from router.db import _compiled_many, execute_many, locations

    def event_row(i: int) -> dict[str, object]:
        return {"id": f"many-{i:03d}", "source": "mqtt", "bundle": None, "state": "done",
                "stack": "s", "pipeline": "p", "run_id": f"r{i % 7}", "step_name": "t",
                "digest": f"d{i}", "record": {"i": i, "tags": [i, None]}, "error": None,
                "received_at": i + 0.5, "finished_at": None, "moved": i % 2 == 0}

    def location(i: int, uri: str) -> dict[str, object]:
        return {"artifact_id": 1, "delivery_key": f"k{i % 40}", "sink_id": "s.c",
                "action": "store", "file_name": "f", "uri": uri, "sha256": None,
                "size": i, "version_id": None, "created_at": 1.0}

    def write(conn: sa.Connection) -> tuple[bool, bool]:
        execute_many(conn, events.insert(), [event_row(i) for i in range(300)])
        add = catalog._add_locations(conn.dialect.name)
        execute_many(conn, add, [location(i, "first") for i in range(10)])
        # 80 rows on 40 keys, 10 of them stored already: the earliest row of a key wins.
        execute_many(conn, add, [location(i, f"row {i}") for i in range(80)])
        multi = _compiled_many(events.insert(), conn.dialect, tuple(event_row(0)))
        upsert = _compiled_many(add, conn.dialect, tuple(location(0, "")))
        return multi.multi is not None, upsert.multi is not None

    multi_rows = await journal.db.run_write(write)
    assert multi_rows == ((True, True) if journal.db.is_sqlite else (False, False))
    async with journal.db.read() as conn:
        rows = (await conn.execute(
            sa.select(events.c.id, events.c.record, events.c.moved, events.c.run_id)
            .where(events.c.id.like("many-%")).order_by(events.c.id))).all()
        stored = dict((await conn.execute(
            sa.select(locations.c.delivery_key, locations.c.uri)
            .where(locations.c.delivery_key.like("k%")))).all())
    assert [r[0] for r in rows] == [f"many-{i:03d}" for i in range(300)]
    assert all(r[1] == {"i": i, "tags": [i, None]} and r[2] == (i % 2 == 0)
               and r[3] == f"r{i % 7}" for i, r in enumerate(rows))
    assert stored == {f"k{i}": "first" if i < 10 else f"row {i}" for i in range(40)}


async def test_execute_many_updates_each_row_as_executemany_would(
    journal: DeliveryJournal,
) -> None:
    """On SQLite, execute_many sends an UPDATE's rows as one `WITH ... UPDATE ... FROM`
    per power of two (300 rows: 256 + 32 + 8 + 4). The outcome matches SQLAlchemy's own
    executemany row for row: each row's values land on its key, stale attempts and other
    owners' rows are left alone, JSON results are stored as JSON; and a batch naming one
    key twice goes row by row, so that the first outcome wins as it would one by one."""
    from router import journal as journal_module
    from router.db import _compiled_many, deliveries, execute_many

    def in_flight(key: str, attempts: int) -> dict[str, object]:
        return {"key": key, "event_id": "e", "artifact_index": 0, "action": "store",
                "stack": "s", "component": "c", "sink_id": "s.c", "target": None,
                "params": {}, "after": None, "state": "in_flight", "attempts": attempts,
                "next_attempt_at": 0.0, "created_at": 1.0, "updated_at": 1.0,
                "owner": "me" if attempts % 5 else "peer", "lease_until": 9.0}

    def outcome(key: str, i: int) -> dict[str, object]:
        # Every 7th row names an attempt older than the row's; every 3rd none at all.
        attempt = None if i % 3 == 0 else (i % 4) + 1 - (i % 7 == 0)
        return {"k": key, "r": {"uri": f"u{i}", "n": [i, None]} if i % 2 else None,
                "now": 5.0 + i, "o": "me", "a": attempt}

    def write(conn: sa.Connection) -> bool:
        for way in ("by-sqlalchemy", "by-driver"):
            execute_many(conn, deliveries.insert(),
                         [in_flight(f"{way}-{i:03d}", (i % 4) + 1) for i in range(300)])
        conn.execute(journal_module._MARK_DONE,
                     [outcome(f"by-sqlalchemy-{i:03d}", i) for i in range(300)])
        execute_many(conn, journal_module._MARK_DONE,
                     [outcome(f"by-driver-{i:03d}", i) for i in range(300)])
        twice = {"key": "twice", "attempts": 1}
        execute_many(conn, deliveries.insert(), [{**in_flight("twice", 1), **twice}])
        execute_many(conn, journal_module._MARK_DEAD, [
            {"k": "twice", "e": "first", "now": 1.0, "o": "me", "a": None},
            {"k": "twice", "e": "second", "now": 2.0, "o": "me", "a": None}])
        keys = tuple(outcome("k", 1))
        return _compiled_many(journal_module._MARK_DONE, conn.dialect, keys).multi is not None

    multi_rows = await journal.db.run_write(write)
    assert multi_rows == journal.db.is_sqlite
    async with journal.db.read() as conn:
        query = sa.select(deliveries.c.key, deliveries.c.state, deliveries.c.owner,
                          deliveries.c.result, deliveries.c.updated_at,
                          deliveries.c.lease_until, deliveries.c.last_error)
        rows = (await conn.execute(query.where(deliveries.c.key.like("by-%"))
                                   .order_by(deliveries.c.key))).all()
        twice = (await conn.execute(query.where(deliveries.c.key == "twice"))).one()
    by_sqlalchemy = [tuple(r[1:]) for r in rows if r[0].startswith("by-sqlalchemy")]
    by_driver = [tuple(r[1:]) for r in rows if r[0].startswith("by-driver")]
    assert len(by_driver) == 300 and by_driver == by_sqlalchemy
    done = [i for i, r in enumerate(by_driver) if r[0] == "done"]
    assert 100 < len(done) < 300, "some rows updated, stale attempts and peers' left"
    assert all(by_driver[i][2] == ({"uri": f"u{i}", "n": [i, None]} if i % 2 else None)
               and by_driver[i][3] == 5.0 + i for i in done)
    assert (twice.state, twice.last_error, twice.updated_at) == ("dead", "first", 1.0)


async def test_a_claim_tick_hands_out_each_events_journaled_record(
    journal: DeliveryJournal, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A delivery claimed by a dispatcher tick carries its event's record, which the
    sink reads (manifest, files, versions). The journal keeps the records of events it
    accepted for that tick instead of reading them back (a bounded number, oldest out
    first); an evicted one, or one accepted by another daemon, is read from the
    database. Whichever, the record handed out is the one journaled, and what is kept
    is dropped when its event finishes."""
    from router import journal as journal_module

    monkeypatch.setattr(journal_module, "_RECORDS_KEPT", 3)
    await journal.accept([event(f"e{i}") for i in range(5)], planner)
    assert sorted(journal._records) == ["e2", "e3", "e4"], "the newest three kept"
    peer = DeliveryJournal(journal.db, owner="peer")  # accepted none of them

    mine = await journal.claim(4)  # e0 and e1: evicted, read back
    theirs = await peer.claim(100)
    assert len(mine) == 4 and len(theirs) == 6
    for c in mine + theirs:
        assert c.record == await journal.event_record(c.event_id)
        assert c.record["event_id"] == c.event_id
        assert c.record["versions"] and c.record["files"][0][0]["name"] == "model.pkl"

    await journal.complete([outcome_of(c, "done", result=DeliveryResult()) for c in mine])
    await peer.complete([outcome_of(c, "done", result=DeliveryResult()) for c in theirs])
    assert {s for s, n in (await journal.status()).events.items() if n} == {"done"}
    assert sorted(journal._records) == ["e2", "e3", "e4"], "finished by the peer"
    await journal.accept([event("e5")], planner)
    both = await journal.claim(10)
    assert [c.record == await journal.event_record("e5") for c in both] == [True, True]
    await journal.complete([outcome_of(c, "done", result=DeliveryResult()) for c in both])
    assert "e5" not in journal._records, "finished here: dropped"


def test_sqlite_still_binds_none_as_null_and_booleans_as_integers() -> None:
    """router.db registers sqlite3 adapters for None and bool (they skip a failed
    attribute lookup per value); what SQLite stores must not change: queries such as
    `lease_until IS NULL` and `moved = 0` rely on it."""
    import sqlite3

    import router.db  # noqa: F401 - registers the adapters

    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (a, b, c)")
    conn.executemany("INSERT INTO t VALUES (?, ?, ?)", [(None, True, False)])
    conn.execute("INSERT INTO t VALUES (?, ?, ?)", (None, False, True))
    assert conn.execute(
        "SELECT typeof(a), a IS NULL, typeof(b), b, typeof(c), c FROM t ORDER BY rowid"
    ).fetchall() == [("null", 1, "integer", 1, "integer", 0),
                     ("null", 1, "integer", 0, "integer", 1)]
