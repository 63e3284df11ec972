"""Deploy conditions persisted in the catalog, acting through the journal (both backends)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from router.approvals import DecisionError
from router.config import StackConfig
from router.db import Database
from router.delivery import DeliveryResult, StagedFile
from router.intake import AcceptedEvent
from router.journal import Completion, DeliveryJournal
from router.manifest import parse_manifest
from router.rules import plan_event


def stack(condition: str, **rule: Any) -> StackConfig:
    return StackConfig.model_validate({
        "name": "prod",
        "artifact_store": {"type": "local", "path": "/tmp/unused"},
        "model_registry": {"type": "mlflow", "tracking_uri": "http://127.0.0.1:1"},
        "model_deployer": {"type": "mlflow_alias", "tracking_uri": "http://127.0.0.1:1"},
        "artifact_routing": {"Model": {"store": "local", "register": True, "deploy": True,
                                       "deploy_condition": condition, **rule}},
    })


def model_event(event_id: str, version: str, metrics: dict[str, float]) -> AcceptedEvent:
    manifest = parse_manifest({
        "manifest_version": 1, "pipeline": "fraud", "run_id": event_id, "step_name": "train",
        "artifacts": [{"type": "model", "name": "clf", "version": version, "upload": True,
                       "files": [{"path": "m.pkl"}], "metadata": {"metrics": metrics}}],
    })
    return AcceptedEvent(event_id=event_id, source="spool", bundle=event_id, manifest=manifest,
                         files=[[StagedFile(name="m.pkl", type="pkl", path=Path("m.pkl"),
                                            sha256="0" * 64, size=1)]],
                         digest=event_id, received_at=time.time())


@pytest.fixture
async def journal(db_url: str):  # type: ignore[no-untyped-def]
    db = Database(db_url)
    await db.migrate()
    yield DeliveryJournal(db, owner="test")
    await db.dispose()


async def accept(journal: DeliveryJournal, st: StackConfig, *events: AcceptedEvent) -> None:
    def planner(ev: AcceptedEvent, versions: list[str]):  # type: ignore[no-untyped-def]
        return plan_event(ev.manifest, event_id=ev.event_id, stack=st, versions=versions,
                          received_at=datetime.now(UTC))

    outcomes = await journal.accept(list(events), planner)
    assert all(o.outcome == "accepted" for o in outcomes)


async def run_all(journal: DeliveryJournal, ok: bool = True) -> list[str]:
    """Play the dispatcher: complete every claimable delivery, until none is left."""
    done = []
    while claimed := await journal.claim(100):
        await journal.complete([
            Completion(key=c.key, event_id=c.event_id, artifact_index=c.artifact_index,
                       sink_id=c.sink_id, action=c.action,
                       outcome="done" if ok or c.action != "deploy" else "dead",
                       result=DeliveryResult(uri=f"x://{c.key}"),
                       error=None if ok else "deployer down for good")
            for c in claimed])
        done += [c.action for c in claimed]
    return done


async def run_all_but_deploys(journal: DeliveryJournal) -> int:
    """Complete every claimable delivery except deploys (left pending); how many."""
    count = 0
    while claimed := [c for c in await journal.claim(100) if c.action != "deploy"]:
        await journal.complete([
            Completion(key=c.key, event_id=c.event_id, artifact_index=c.artifact_index,
                       sink_id=c.sink_id, action=c.action, outcome="done",
                       result=DeliveryResult(uri=f"x://{c.key}"))
            for c in claimed])
        count += len(claimed)
    await journal.recover()  # deploys claimed on the way go back to pending
    return count


async def state(journal: DeliveryJournal, version: str) -> Any:
    return next(r for r in await journal.decisions(name="clf") if r.version == version)


async def test_auto_deploys_when_every_bound_holds(journal: DeliveryJournal) -> None:
    await accept(journal, stack("auto", deploy_min_metrics={"accuracy": 0.9, "loss": {"max": 0.2}}),
                 model_event("e1", "1", {"accuracy": 0.95, "loss": 0.1}))
    assert (await state(journal, "1")).state == "deploying"
    assert await run_all(journal) == ["store", "register", "deploy"]
    assert (await state(journal, "1")).state == "deployed"


async def test_auto_below_the_bound_is_blocked_with_the_shortfall(
    journal: DeliveryJournal,
) -> None:
    await accept(journal, stack("auto", deploy_min_metrics={"accuracy": 0.9, "loss": {"max": 0.2}}),
                 model_event("e1", "1", {"accuracy": 0.85, "loss": 0.5}))
    row = await state(journal, "1")
    assert row.state == "blocked"
    assert "accuracy=0.85" in (row.reason or "") and "0.05" in (row.reason or "")
    assert "loss=0.5" in (row.reason or "") and "above the maximum" in (row.reason or "")
    assert await run_all(journal) == ["store", "register"]  # no deploy planned
    # an operator may still deploy it by hand
    await journal.decide(action="deploy", name="clf", version="1", by="ops")
    assert await run_all(journal) == ["deploy"]
    assert (await state(journal, "1")).state == "deployed"


async def test_manual_waits_for_model_deploy(journal: DeliveryJournal) -> None:
    await accept(journal, stack("manual"), model_event("e1", "1", {}))
    assert (await state(journal, "1")).state == "awaiting_manual"
    assert await run_all(journal) == ["store", "register"]
    pending = await journal.decisions(pending=True)
    assert [r.version for r in pending] == ["1"]
    row = await journal.decide(action="deploy", name="clf", version="1", by="alice",
                               endpoint_name=lambda _s: "blue")
    assert row.state == "deploying" and row.decided_by == "alice"
    claimed = await journal.claim(10)
    assert [c.action for c in claimed] == ["deploy"]
    assert claimed[0].params["endpoint_name"] == "blue"
    assert claimed[0].upstream is not None  # the register result, for the deployer


async def test_on_approval_approve_and_reject(journal: DeliveryJournal) -> None:
    st = stack("on_approval")
    await accept(journal, st, model_event("e1", "1", {}), model_event("e2", "2", {}))
    await run_all(journal)
    assert {r.state for r in await journal.decisions()} == {"pending_approval"}
    with pytest.raises(DecisionError, match="known versions: 1, 2"):
        await journal.decide(action="deploy", name="clf", version="9")
    await journal.decide(action="reject", name="clf", version="1", by="bob", comment="drift")
    row = await state(journal, "1")
    assert (row.state, row.decided_by, row.comment) == ("rejected", "bob", "drift")
    with pytest.raises(DecisionError, match="not pending approval"):
        await journal.decide(action="approve", name="clf", version="1")
    await journal.decide(action="approve", name="clf", version="2", by="carol")
    assert await run_all(journal) == ["deploy"]
    assert (await state(journal, "2")).state == "deployed"


async def test_a_late_approval_never_replaces_a_newer_deployed_version(
    journal: DeliveryJournal,
) -> None:
    await accept(journal, stack("on_approval"), model_event("e1", "1", {}),
                 model_event("e2", "2", {}))
    await run_all(journal)
    await journal.decide(action="approve", name="clf", version="2")
    await run_all(journal)
    with pytest.raises(DecisionError, match="newer"):
        await journal.decide(action="approve", name="clf", version="1")
    assert (await state(journal, "1")).state == "pending_approval"
    await journal.decide(action="approve", name="clf", version="1", force=True)
    await run_all(journal)
    assert (await state(journal, "1")).state == "deployed"
    assert (await state(journal, "2")).state == "superseded"


async def test_an_older_deploy_queued_behind_a_newer_one_is_superseded(
    journal: DeliveryJournal,
) -> None:
    """Version 1's deploy fails transiently; version 2's deploy lands meanwhile. When
    version 1 comes round again the dispatcher's check dead-letters it as superseded,
    and it is recorded `superseded`, not `failed`."""
    await accept(journal, stack("on_approval"), model_event("e1", "1", {}),
                 model_event("e2", "2", {}))
    await run_all(journal)
    await journal.decide(action="approve", name="clf", version="1")
    await journal.decide(action="approve", name="clf", version="2")
    (v1,) = await journal.claim(10)  # one deploy of a model at a time: the older first
    assert v1.event_id == "e1"
    await journal.complete([_outcome(v1, "retry", error="deployer timed out",
                                     next_attempt_at=time.time())])
    (v2,) = await journal.claim(10)  # due before version 1's retry
    assert v2.event_id == "e2"
    await journal.complete([_outcome(v2, "done", result=DeliveryResult())])
    (again,) = await journal.claim(10)
    assert again.key == v1.key
    reason = await journal.deploy_superseded(v1.key)
    assert reason is not None and "version 2" in reason
    # what the dispatcher does with it: a PermanentError, dead-lettered
    await journal.complete([_outcome(again, "dead", error=f"permanent: {reason}")])
    row = await state(journal, "1")
    assert (row.state, row.reason) == ("superseded", f"permanent: {reason}")
    assert (await state(journal, "2")).state == "deployed"


async def test_deploys_of_one_model_run_one_at_a_time(journal: DeliveryJournal) -> None:
    """Two deploys of one model in flight land in any order, and the last one is live:
    the claim takes one deploy per model, and the next once it has finished."""
    st = stack("auto")
    await accept(journal, st, model_event("e1", "1", {}))
    await accept(journal, st, model_event("e2", "2", {}))
    assert await run_all_but_deploys(journal) == 4  # store, register for each
    (v1,) = await journal.claim(100)
    assert (v1.action, v1.event_id) == ("deploy", "e1")
    assert await journal.claim(100) == []  # version 2 waits while version 1 is in flight
    await journal.complete([_outcome(v1, "done", result=DeliveryResult())])
    (v2,) = await journal.claim(100)
    assert (v2.action, v2.event_id) == ("deploy", "e2")
    await journal.complete([_outcome(v2, "done", result=DeliveryResult())])
    assert [(r.version, r.state) for r in await journal.decisions(name="clf")] == [
        ("2", "deployed"), ("1", "superseded")]


async def test_an_older_deploy_landing_after_a_newer_one_deploys_the_newer_again(
    journal: DeliveryJournal,
) -> None:
    """Version 1's deploy outlives its lease and is run again; version 2 deploys after
    it; then the first, stale attempt of version 1 lands: the endpoint now serves
    version 1. The newest wins: version 2 is deployed again, version 1 is superseded."""
    st = stack("auto")
    await accept(journal, st, model_event("e1", "1", {}))
    await accept(journal, st, model_event("e2", "2", {}))
    await run_all_but_deploys(journal)
    (stale,) = await journal.claim(100, lease_seconds=-1)  # its lease already ran out
    assert await journal.reap_expired_leases() == 1
    (v1,) = await journal.claim(100)
    assert v1.key == stale.key
    await journal.complete([_outcome(v1, "done", result=DeliveryResult())])
    (v2,) = await journal.claim(100)
    await journal.complete([_outcome(v2, "done", result=DeliveryResult())])
    assert (await state(journal, "2")).state == "deployed"
    await journal.complete([_outcome(stale, "done", result=DeliveryResult())])  # lands late
    assert ((await state(journal, "1")).state, (await state(journal, "2")).state) == (
        "superseded", "deploying")
    (redeploy,) = await journal.claim(100)
    assert redeploy.key == v2.key
    await journal.complete([_outcome(redeploy, "done", result=DeliveryResult())])
    assert ((await state(journal, "1")).state, (await state(journal, "2")).state) == (
        "superseded", "deployed")
    assert (await journal.status()).events == {"done": 2}


async def test_model_deploy_does_not_bypass_an_approval(journal: DeliveryJournal) -> None:
    """`model deploy` of a version pending approval, or rejected, is refused unless
    --force, naming the state and the command to use."""
    await accept(journal, stack("on_approval"), model_event("e1", "1", {}),
                 model_event("e2", "2", {}))
    await run_all(journal)
    with pytest.raises(DecisionError, match=r"clf 1 is pending_approval .*"
                       r"`artifact-router model approve clf --version 1`, or pass --force"):
        await journal.decide(action="deploy", name="clf", version="1", by="mallory")
    await journal.decide(action="reject", name="clf", version="2", by="bob")
    with pytest.raises(DecisionError, match=r"clf 2 is rejected .*rejected by bob; pass --force"):
        await journal.decide(action="deploy", name="clf", version="2", by="mallory")
    assert [(r.version, r.state) for r in await journal.decisions(name="clf")] == [
        ("2", "rejected"), ("1", "pending_approval")]
    assert await journal.claim(10) == []
    row = await journal.decide(action="deploy", name="clf", version="2", by="ops", force=True)
    assert (row.state, row.forced) == ("deploying", True)
    assert await run_all(journal) == ["deploy"]


async def test_a_dead_deploy_is_recorded_as_failed(journal: DeliveryJournal) -> None:
    await accept(journal, stack("auto"), model_event("e1", "1", {}))
    await run_all(journal, ok=False)
    row = await state(journal, "1")
    assert row.state == "failed" and row.reason == "deployer down for good"


def _outcome(c: Any, outcome: str, **fields: Any) -> Completion:
    return Completion(key=c.key, event_id=c.event_id, artifact_index=c.artifact_index,
                      sink_id=c.sink_id, action=c.action, outcome=outcome, **fields)


async def test_retrying_a_dependent_brings_its_dead_prerequisite_back(
    journal: DeliveryJournal,
) -> None:
    """The store dies, so register and deploy die unattempted. The operator retries the
    register `status` lists: the dead store must come back with it (a dependent behind
    a dead prerequisite is never due), and the chain then runs to the end."""
    await accept(journal, stack("auto"), model_event("e1", "1", {}))
    (store,) = await journal.claim(100)
    await journal.complete([_outcome(store, "dead", error="permanent: access denied")])
    dead = {d["key"]: d["last_error"] for d in (await journal.status()).dead_letters}
    register = next(k for k in dead if "/register/" in k)
    assert dead[register].startswith("not attempted")
    assert await journal.retry_dead(register) == 3
    assert await run_all(journal) == ["store", "register", "deploy"]
    status = await journal.status()
    assert status.events == {"done": 1} and status.deliveries.dead == 0


async def test_a_deploy_behind_a_dead_register_is_refused_with_the_fix(
    journal: DeliveryJournal,
) -> None:
    """`model deploy` when the version's register delivery is dead would queue a deploy
    that waits for ever: it is refused, naming the dead delivery and the retry."""
    await accept(journal, stack("manual"), model_event("e1", "1", {}))
    (store,) = await journal.claim(100)
    await journal.complete([_outcome(store, "done", result=DeliveryResult(uri="x://s"))])
    (register,) = await journal.claim(100)
    await journal.complete([_outcome(register, "dead", error="permanent: bad model")])
    with pytest.raises(DecisionError, match=f"retry {register.key}"):
        await journal.decide(action="deploy", name="clf", version="1", by="ops")
    assert (await state(journal, "1")).state != "deploying"
    assert await journal.retry_dead(register.key) == 1
    assert await run_all(journal) == ["register"]
    await journal.decide(action="deploy", name="clf", version="1", by="ops")
    assert await run_all(journal) == ["deploy"]
    assert (await state(journal, "1")).state == "deployed"
