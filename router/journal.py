"""DeliveryJournal: the durable record of every accepted event and every delivery.

The journal is the only source of truth for what still has to happen: an event is
committed here (with its whole RoutePlan) before its bundle moves or its MQTT message
is acknowledged, and a delivery is marked done in the same commit that catalogues
where it landed.  Batches amortise the fsync: one commit per intake batch, one per
burst of completions.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import sqlalchemy as sa
import structlog
from pydantic import BaseModel, Field

from router import approvals, catalog
from router.db import Database, deliveries, events, execute_many, held_messages
from router.delivery import Action, DeliveryResult
from router.errors import Problem
from router.intake import AcceptedEvent, Rejection
from router.rules import SNAPSHOT_SLOT, RoutePlan

__all__ = [
    "AcceptOutcome",
    "ClaimSlots",
    "ClaimedDelivery",
    "Completion",
    "DeliveryJournal",
    "FinishedEvent",
    "Handoff",
    "StatusReport",
]

log = structlog.get_logger("router.journal")

# Snapshot counters share the version counters table under this reserved pipeline name.
DATASET_SNAPSHOTS = "(dataset snapshots)"

Planner = Callable[[AcceptedEvent, list[str]], RoutePlan]

TERMINAL = ("done", "dead")


# The hot transactions' statements are built once, with bind parameters for what
# changes: building a statement and computing its cache key on every call cost about
# 80 us a statement, a third of a small transaction's CPU (bench/RESULTS.md, session 13).
def _each(name: str) -> sa.BindParameter[Any]:
    """An `IN` list filled at execution."""
    return sa.bindparam(name, expanding=True)


_NOW = sa.bindparam("now", type_=sa.Float)
_PREREQ = deliveries.alias("prereq")
_EXISTING_EVENTS = sa.select(events.c.id, events.c.state, events.c.digest).where(
    events.c.id.in_(_each("ids"))
)
_INSERT_EVENTS = sa.insert(events)
_INSERT_DELIVERIES = sa.insert(deliveries)
_MARK_MOVED = sa.update(events).where(events.c.id.in_(_each("ids"))).values(moved=True)
# An outcome counts only from the attempt that holds the row, (owner, attempts): one
# whose lease expired and was taken over (by a peer, or by this same daemon claiming it
# again) must not reset the new holder's attempt. A completion without an attempt
# number (`attempts` None) matches whichever attempt this owner holds.
_OWN_ATTEMPT = (deliveries.c.key == sa.bindparam("k"), deliveries.c.state == "in_flight",
                deliveries.c.owner == sa.bindparam("o"),
                deliveries.c.attempts == sa.func.coalesce(
                    sa.bindparam("a", type_=sa.Integer), deliveries.c.attempts))
# Who holds a burst's rows, locked (PostgreSQL: FOR UPDATE, so a reaper cannot release
# them between this and the updates; SQLite renders none, BEGIN IMMEDIATE already
# serializes writers). Read only for bursts with side effects beyond their own rows
# (see _complete_in). By key alone: with state and owner in the WHERE too, SQLite
# chose the (state, next_attempt_at) index over the primary key for more than a few
# keys and walked every in-flight row (32 keys among 2000 in flight: 280 us; by
# key alone, 90 us).
_HOLDERS = (
    sa.select(deliveries.c.key, deliveries.c.state, deliveries.c.owner,
              deliveries.c.attempts)
    .where(deliveries.c.key.in_(_each("keys")))
    .order_by(deliveries.c.key)
    .with_for_update()
)
_CLEARED = {"updated_at": _NOW, "owner": None, "lease_until": None}
_MARK_DONE = sa.update(deliveries).where(*_OWN_ATTEMPT).values(
    state="done", result=sa.bindparam("r"), last_error=None, **_CLEARED)
_MARK_RETRY = sa.update(deliveries).where(*_OWN_ATTEMPT).values(
    state="pending", next_attempt_at=sa.bindparam("n"), last_error=sa.bindparam("e"),
    **_CLEARED)
_MARK_DEAD = sa.update(deliveries).where(*_OWN_ATTEMPT).values(
    state="dead", last_error=sa.bindparam("e"), **_CLEARED)
_KILL_WAITING = (
    sa.update(deliveries)
    .where(deliveries.c.after.in_(_each("keys")), deliveries.c.state == "pending")
    .values(state="dead", last_error=sa.bindparam("why"), updated_at=_NOW)
    .returning(deliveries.c.key)
)
_CLAIM = (
    sa.update(deliveries)
    .where(deliveries.c.key.in_(_each("keys")), deliveries.c.state == "pending")
    .values(
        state="in_flight", attempts=deliveries.c.attempts + 1,
        owner=sa.bindparam("claimer"), lease_until=sa.bindparam("lease"), updated_at=_NOW,
    )
    # what the dispatcher needs, read in the same statement (a select after it, by key,
    # cost as much again)
    .returning(
        deliveries.c.key, deliveries.c.event_id, deliveries.c.artifact_index,
        deliveries.c.action, deliveries.c.stack, deliveries.c.component,
        deliveries.c.sink_id, deliveries.c.target, deliveries.c.params,
        deliveries.c.attempts, deliveries.c.created_at, deliveries.c.after,
    )
)
# A delivery's prerequisite's result, handed to it as `upstream` (register after store).
_RESULTS = sa.select(deliveries.c.key, deliveries.c.result).where(
    deliveries.c.key.in_(_each("keys")))
_RECORDS = sa.select(events.c.id, events.c.record).where(events.c.id.in_(_each("ids")))

# Records of events this daemon accepted and has not seen finish, for the claims of
# their deliveries: under a burst most deliveries are claimed by a later dispatcher
# tick, and reading each one's record back (JSON decoded once per delivery) cost a
# tenth of a tick. Oldest evicted first; events with many files are not kept, so the
# memory stays small (a miss reads the database, as before).
_RECORDS_KEPT = 4096
_RECORD_FILES_KEPT = 64


@functools.cache
def _due(locking: bool, excluding: bool) -> sa.Select[Any]:
    """Due rows whose prerequisite (if any) is done, oldest first; `now` and `window`
    bound at execution, and `excluded` (saturated sinks) when `excluding`."""
    query = (
        sa.select(
            deliveries.c.key, deliveries.c.sink_id, deliveries.c.stack, deliveries.c.component,
            deliveries.c.action,
        )
        .select_from(deliveries.outerjoin(_PREREQ, deliveries.c.after == _PREREQ.c.key))
        .where(
            deliveries.c.state == "pending",
            deliveries.c.next_attempt_at <= _NOW,
            sa.or_(deliveries.c.after.is_(None), _PREREQ.c.state == "done"),
        )
        .order_by(deliveries.c.next_attempt_at)
        .limit(sa.bindparam("window"))
    )
    if excluding:  # saturated sinks: leave the window to the others
        query = query.where(deliveries.c.sink_id.not_in(_each("excluded")))
    if locking:
        query = query.with_for_update(of=deliveries, skip_locked=True)
    return query


class ClaimSlots(Protocol):
    """The dispatcher's in-flight limits, as a claim uses them inside its transaction.

    `take` holds one slot of a sink for a row about to be claimed (False: the sink, or
    the dispatcher, is full); `give_back` frees slots of rows that ended up not claimed.
    Claims run on the journal's writer thread, so implementations must be thread-safe.
    """

    lease_seconds: float

    def take(self, sink_id: str, stack: str, component: str) -> bool: ...

    def give_back(self, sink_ids: Sequence[str]) -> None: ...


# The hand-offs between the journal and the dispatcher or a source below are slotted
# dataclasses, not pydantic models: every field comes from the journal's own rows or
# the dispatcher, nothing from outside to validate, and a metrics message makes one of
# each (a pydantic __init__ cost 2-4 us apiece, a dataclass 0.3-0.6).


@dataclass(slots=True)
class ClaimedDelivery:
    key: str
    event_id: str
    artifact_index: int
    action: str
    stack: str
    component: str
    sink_id: str
    target: str | None
    params: dict[str, Any]
    attempts: int
    created_at: float
    upstream: DeliveryResult | None = None
    record: dict[str, Any] | None = field(default=None, repr=False)
    # Whether other deliveries wait for this one (`after`): when it is done, a claim
    # tick has new work. Unknown, so assumed, for rows claimed by a tick.
    has_dependents: bool = True


@dataclass(slots=True)
class AcceptOutcome:
    event_id: str
    # refused: the journal cannot record this event (a value its database cannot hold);
    # the others in its batch are journaled without it.
    outcome: Literal["accepted", "duplicate", "conflict", "refused"]
    deliveries: int = 0
    detail: str | None = None
    # Why a conflict or a refusal is rejected, for the source's rejection record.
    problem: Problem | None = None
    # Deliveries claimed in the accept transaction itself (see DeliveryJournal.accept):
    # the caller hands them to the dispatcher, which starts them without a claim tick.
    claimed: list[ClaimedDelivery] = field(default_factory=list, repr=False)


class Handoff(Protocol):
    """Where intake hands its accepted work (the Dispatcher): told after every accepted
    batch what was claimed for it, and whether deliveries were left for a claim tick."""

    def slots_for_intake(self) -> ClaimSlots | None: ...

    def adopt(self, claimed: list[ClaimedDelivery], waiting: bool) -> None: ...


Outcome = Literal["done", "retry", "dead"]


@dataclass(slots=True)
class Completion:
    """What the dispatcher learned from one attempt."""

    key: str
    event_id: str
    artifact_index: int
    sink_id: str
    action: str
    outcome: Outcome
    result: DeliveryResult | None = None
    error: str | None = None
    next_attempt_at: float | None = None
    # The claim's attempt number (ClaimedDelivery.attempts): with the owner, it tells
    # this attempt from an earlier one whose lease expired. None: not checked, the
    # outcome counts for whichever attempt this daemon holds (the dispatcher sets it).
    attempts: int | None = None


@dataclass(slots=True)
class FinishedEvent:
    event_id: str
    bundle: str | None
    source: str
    state: Literal["done", "failed"]
    reply_to: dict[str, str] | None = None


class SinkCounts(BaseModel):
    pending: int = 0
    in_flight: int = 0
    done: int = 0
    dead: int = 0


class StatusReport(BaseModel):
    events: dict[str, int] = Field(default_factory=dict)
    deliveries: SinkCounts = Field(default_factory=SinkCounts)
    sinks: dict[str, SinkCounts] = Field(default_factory=dict)
    oldest_pending_age_seconds: float | None = None
    dead_letters: list[dict[str, Any]] = Field(default_factory=list)
    rejected: list[dict[str, Any]] = Field(default_factory=list)
    # MQTT messages acknowledged and held while a large file:// file is hashed: events
    # once hashed (router/sources/mqtt.py).
    held_messages: int = 0


class DeliveryJournal:
    def __init__(self, db: Database, owner: str = "router") -> None:
        self.db = db
        self.owner = owner
        # Bundles already moved whose `moved` flag is not written yet: it rides along
        # with the next dispatcher tick instead of costing a transaction of its own.
        self._moved_backlog: list[str] = []
        self._records: dict[str, dict[str, Any]] = {}  # see _RECORDS_KEPT

    # --- intake -------------------------------------------------------------------

    async def accept(
        self, batch: Sequence[AcceptedEvent], planner: Planner, handoff: Handoff | None = None
    ) -> list[AcceptOutcome]:
        """Journal a batch of events with their plans and catalog rows: one commit.

        With a `handoff` (the dispatcher) that has slots free, deliveries that can start
        at once (no prerequisite, a free slot in their sink) are journaled already
        claimed by this daemon and handed to it after the commit: a new event then costs
        no claim transaction and waits for no dispatcher tick. They are also listed in
        each outcome's `claimed`.
        """
        slots = handoff.slots_for_intake() if handoff is not None else None
        held: list[str] = []
        records: dict[str, dict[str, Any]] = {}
        try:
            outcomes = await self.db.run_write(
                self._accept_tx, batch, planner, slots, held, records)
        except Exception as exc:
            if slots is not None and held:
                slots.give_back(held)  # rolled back: nothing was claimed
            if not _bad_data(exc):
                raise  # the database's trouble (down, locked, full): the batch waits
            return await self._accept_apart(batch, planner, handoff, exc)
        except BaseException:
            if slots is not None and held:
                slots.give_back(held)
            raise
        if handoff is not None:
            handoff.adopt(
                [c for o in outcomes for c in o.claimed],
                waiting=any(o.deliveries > len(o.claimed) for o in outcomes),
            )
        self._keep_records(records, outcomes)
        return outcomes

    def _keep_records(self, records: dict[str, dict[str, Any]],
                      outcomes: list[AcceptOutcome]) -> None:
        """Keep the records of newly journaled events whose deliveries wait for a claim."""
        for o in outcomes:
            record = records.get(o.event_id)
            if (o.outcome == "accepted" and o.deliveries > len(o.claimed)
                    and record is not None
                    and sum(map(len, record["files"])) <= _RECORD_FILES_KEPT):
                self._records[o.event_id] = record
        while len(self._records) > _RECORDS_KEPT:
            # The writer thread pops finished events meanwhile (never iterates): a pop
            # between iter() and next() ends this one, and the loop tries again.
            with contextlib.suppress(RuntimeError, StopIteration):
                self._records.pop(next(iter(self._records)), None)

    async def _accept_apart(
        self, batch: Sequence[AcceptedEvent], planner: Planner, handoff: Handoff | None,
        exc: Exception,
    ) -> list[AcceptOutcome]:
        """A batch the database refused for a value it cannot hold: journal it in halves
        until the events at fault stand alone, and refuse those. Retrying the batch whole
        would fail again at every attempt, and hold up all intake behind it."""
        if len(batch) > 1:
            half = len(batch) // 2
            return [*await self.accept(batch[:half], planner, handoff),
                    *await self.accept(batch[half:], planner, handoff)]
        event = batch[0]
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:300]
        log.error("event refused: the journal cannot record it", event_id=event.event_id,
                  error=reason)
        return [AcceptOutcome(
            event_id=event.event_id, outcome="refused", detail=reason,
            problem=Problem(
                field="manifest", value=event.event_id,
                message=f"the journal cannot record this event ({reason}); a value in "
                "it is out of the range the catalog holds: check the numbers in it"),
        )]

    def _accept_tx(
        self, conn: sa.Connection, batch: Sequence[AcceptedEvent], planner: Planner,
        slots: ClaimSlots | None = None, held: list[str] | None = None,
        records: dict[str, dict[str, Any]] | None = None,
    ) -> list[AcceptOutcome]:
        """A fixed number of multi-row statements whatever the batch size; `records`,
        if given, gets each new event's record (for _keep_records, after the commit)."""
        outcomes: dict[str, AcceptOutcome] = {}
        order: list[tuple[str, AcceptOutcome | None]] = []
        now = time.time()  # after the lock: commit-near
        ids = list({e.event_id for e in batch})
        existing = {row.id: row for row in conn.execute(_EXISTING_EVENTS, {"ids": ids})}
        fresh: list[AcceptedEvent] = []
        seen: dict[str, str] = {}
        replaced: list[str] = []
        for event in batch:
            prior = existing.get(event.event_id)
            if event.event_id in seen or (prior is not None and prior.state != "rejected"):
                digest = seen.get(event.event_id) or (prior.digest if prior else None)
                same = digest == event.digest
                detail = None if same else (
                    f"event id {event.event_id!r} was already accepted with a different "
                    "manifest; give the new manifest its own 'id'")
                order.append((event.event_id, AcceptOutcome(
                    event_id=event.event_id,
                    outcome="duplicate" if same else "conflict",
                    detail=detail,
                    problem=None if same
                    else Problem(field="id", value=event.event_id, message=detail or ""),
                )))
                continue
            if prior is not None:  # a rejected attempt, now fixed: replace it
                replaced.append(event.event_id)
            seen[event.event_id] = event.digest
            fresh.append(event)
            order.append((event.event_id, None))
        if replaced:
            conn.execute(sa.delete(events).where(events.c.id.in_(replaced)))

        versions = self._versions(conn, fresh)
        planned: list[tuple[AcceptedEvent, RoutePlan]] = []
        event_rows: list[dict[str, Any]] = []
        delivery_rows: list[dict[str, Any]] = []
        new_records: dict[str, dict[str, Any]] = {}
        for event in fresh:
            m = event.manifest
            plan = planner(event, versions[event.event_id])
            planned.append((event, plan))
            record = event.model_dump(mode="json")
            record["versions"] = versions[event.event_id]
            event_rows.append({
                "id": event.event_id, "source": event.source, "bundle": event.bundle,
                "state": "accepted" if plan.deliveries else "done", "stack": plan.stack,
                "pipeline": m.pipeline, "run_id": m.run_id, "step_name": m.step_name,
                "digest": event.digest, "record": record, "error": None,
                "received_at": event.received_at,
                "finished_at": None if plan.deliveries else now, "moved": False,
            })
            rows = [
                {
                    "key": d.key, "event_id": event.event_id,
                    "artifact_index": d.artifact_index, "action": d.action.value,
                    "stack": d.stack, "component": d.component, "sink_id": d.sink_id,
                    "target": d.target, "params": d.params, "after": d.after,
                    "state": "pending", "attempts": 0, "next_attempt_at": now,
                    "created_at": now, "updated_at": now,
                    "owner": None, "lease_until": None,
                }
                for d in plan.deliveries
            ]
            delivery_rows += rows
            new_records[event.event_id] = record
            outcomes[event.event_id] = AcceptOutcome(
                event_id=event.event_id,
                outcome="accepted",
                deliveries=len(plan.deliveries),
                detail="; ".join(e for a in plan.artifacts for e in a.errors) or None,
            )
        if event_rows:
            execute_many(conn, _INSERT_EVENTS, event_rows)
        for row in delivery_rows:
            if row["action"] == Action.EXPORT.value:
                self._number_snapshot(conn, row)
        if slots is not None and held is not None:
            awaited = {row["after"] for row in delivery_rows if row["after"]}
            for row in delivery_rows:
                if row["after"] is None and slots.take(
                        row["sink_id"], row["stack"], row["component"]):
                    held.append(row["sink_id"])
                    row.update(state="in_flight", attempts=1, owner=self.owner,
                               lease_until=now + slots.lease_seconds)
                    outcomes[row["event_id"]].claimed.append(ClaimedDelivery(
                        key=row["key"], event_id=row["event_id"],
                        artifact_index=row["artifact_index"], action=row["action"],
                        stack=row["stack"], component=row["component"],
                        sink_id=row["sink_id"], target=row["target"],
                        params=row["params"], attempts=1, created_at=now,
                        record=new_records[row["event_id"]], has_dependents=row["key"] in awaited,
                    ))
        if delivery_rows:
            execute_many(conn, _INSERT_DELIVERIES, delivery_rows)
        catalog.record_events(conn, planned, now)
        if records is not None:
            records.update(new_records)
        return [o if o is not None else outcomes[i] for i, o in order]

    @staticmethod
    def _number_snapshot(conn: sa.Connection, row: dict[str, Any]) -> None:
        """The next snapshot number of the named dataset, fixed when the event is journaled."""
        export = dict(row["params"]["export"])
        (snapshot,) = catalog.reserve_versions(conn, DATASET_SNAPSHOTS, export["dataset"], 1)
        export["snapshot"] = snapshot
        row["params"] = {**row["params"], "export": export}
        row["target"] = str(row["target"]).replace(SNAPSHOT_SLOT, snapshot)

    @staticmethod
    def _versions(conn: sa.Connection, fresh: Sequence[AcceptedEvent]) -> dict[str, list[str]]:
        """Explicit versions as given; the rest reserved per (pipeline, name) in one go.

        A whole-number explicit version raises its counter first, so that no later
        automatic version repeats it (an explicit "3", then automatic "4").
        """
        wanted: dict[tuple[str, str], int] = {}
        floors: dict[tuple[str, str], int] = {}
        for event in fresh:
            for artifact in event.manifest.artifacts:
                key = (event.manifest.pipeline, artifact.name)
                if not artifact.version:
                    wanted[key] = wanted.get(key, 0) + 1
                elif (number := catalog.whole_version(artifact.version)) is not None:
                    floors[key] = max(floors.get(key, 0), number)
        for key, floor in sorted(floors.items()):
            catalog.raise_version_counter(conn, key[0], key[1], floor)
        pools = {
            key: iter(catalog.reserve_versions(conn, key[0], key[1], count))
            for key, count in sorted(wanted.items())
        }
        return {
            event.event_id: [
                a.version or next(pools[(event.manifest.pipeline, a.name)])
                for a in event.manifest.artifacts
            ]
            for event in fresh
        }

    async def reject(self, rejection: Rejection) -> None:
        """Record a refused input so `status` and `artifacts --rejected` can show it."""
        await self.db.run_write(_reject_tx, rejection)

    async def hold(self, holder: str, record: dict[str, Any]) -> int:
        """Keep acknowledged messages that are not events yet (see db.held_messages)."""
        return await self.db.run_write(_hold_tx, holder, record)

    async def held(self, holder: str) -> list[tuple[int, dict[str, Any]]]:
        """`holder`'s held messages, oldest first."""
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(held_messages.c.id, held_messages.c.record)
                .where(held_messages.c.holder == holder).order_by(held_messages.c.id)
            )
            return [(r.id, dict(r.record)) for r in rows]

    async def adopt_held(self, holder: str, adopter: str) -> list[tuple[int, dict[str, Any]]]:
        """A departed pool member's held messages become `adopter`'s, oldest first."""
        return await self.db.run_write(_adopt_held_tx, holder, adopter)

    async def release(self, held_id: int) -> None:
        """Held messages now journaled as events (or rejected)."""
        await self.db.run_write(_release_tx, held_id)

    async def known_events(self, ids: Iterable[str]) -> dict[str, str]:
        """State of each id the journal already holds (to skip re-reading bundles)."""
        ids = list(ids)
        if not ids:
            return {}
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(events.c.id, events.c.state).where(events.c.id.in_(ids))
            )
            return {r.id: r.state for r in rows}

    async def event_record(self, event_id: str) -> dict[str, Any]:
        async with self.db.read() as conn:
            record: dict[str, Any] = (
                await conn.execute(sa.select(events.c.record).where(events.c.id == event_id))
            ).scalar_one()
        return dict(record)

    # --- dispatch -----------------------------------------------------------------

    async def recover(self) -> int:
        """Deliveries this daemon left in flight when it died go back to pending."""
        return await self.db.run_write(_release_in_flight, sa.or_(
            deliveries.c.owner == self.owner, deliveries.c.owner.is_(None)))

    async def reap_expired_leases(self) -> int:
        """Another daemon died mid-delivery (shared PostgreSQL): take its work over."""
        return await self.db.run_write(
            _release_in_flight, deliveries.c.lease_until < time.time())

    async def renew_leases(self, lease_seconds: float, keys: Sequence[str]) -> None:
        """Extend the leases of the deliveries this daemon is running (`keys`) only: a row
        it claimed but never started (the commit's answer was lost) must expire, so
        that it is taken over instead of being renewed for ever."""
        if keys:
            await self.db.run_write(_renew_leases_tx, self.owner, lease_seconds, list(keys))

    async def claim(
        self,
        limit: int,
        *,
        slots: ClaimSlots | None = None,
        exclude_sinks: Iterable[str] = (),
        lease_seconds: float = 120.0,
    ) -> list[ClaimedDelivery]:
        """Take up to `limit` ready deliveries (due, prerequisites done) for this daemon."""
        _, claimed = await self.cycle(
            [], limit, slots=slots, exclude_sinks=exclude_sinks, lease_seconds=lease_seconds,
        )
        return claimed

    async def complete(self, completions: Sequence[Completion]) -> list[FinishedEvent]:
        """Record a burst of attempt outcomes in one commit; return events now finished."""
        if not completions:
            return []
        finished, _ = await self.cycle(completions, 0)
        return finished

    async def cycle(
        self,
        completions: Sequence[Completion],
        limit: int,
        *,
        slots: ClaimSlots | None = None,
        exclude_sinks: Iterable[str] = (),
        lease_seconds: float = 120.0,
    ) -> tuple[list[FinishedEvent], list[ClaimedDelivery]]:
        """One dispatcher tick in one transaction: record outcomes, then claim new work.

        Merging the two halves the commits per delivery and, on SQLite, the time spent
        queueing for the single writer.  Pending `moved` flags ride along.
        """
        moved, self._moved_backlog = self._moved_backlog, []
        held: list[str] = []
        try:
            return await self.db.run_write(
                self._cycle_tx, moved, completions, limit, slots, held, list(exclude_sinks),
                lease_seconds,
            )
        except BaseException:
            self._moved_backlog[:0] = moved  # not written: keep them for the next one
            if slots is not None and held:
                slots.give_back(held)
            raise

    def _cycle_tx(
        self,
        conn: sa.Connection,
        moved: list[str],
        completions: Sequence[Completion],
        limit: int,
        slots: ClaimSlots | None,
        held: list[str],
        excluded: list[str],
        lease_seconds: float,
    ) -> tuple[list[FinishedEvent], list[ClaimedDelivery]]:
        now = time.time()  # after the lock: finished_at is when it really commits
        for start in range(0, len(moved), 500):
            conn.execute(_MARK_MOVED, {"ids": moved[start:start + 500]})
        finished = _complete_in(conn, completions, now, self.owner) if completions else []
        for event in finished:
            self._records.pop(event.event_id, None)
        claimed = (
            self._claim_in(conn, limit, slots, held, excluded, lease_seconds, now)
            if limit > 0 else []
        )
        return finished, claimed

    def _claim_in(
        self,
        conn: sa.Connection,
        limit: int,
        slots: ClaimSlots | None,
        held: list[str],
        excluded: list[str],
        lease_seconds: float,
        now: float,
    ) -> list[ClaimedDelivery]:
        """Claim up to `limit` due rows; `slots` (if any) are taken row by row, and the
        sink ids they were taken for are listed in `held` until the commit.

        Due rows are read a window at a time, oldest first. When a window fills with
        rows of sinks found full (a slow sink's backlog), the next window leaves those
        sinks out: one sink's backlog never hides another sink's due work. Each pass
        leaves out at least one more sink, so there are few.
        """
        excluded = list(excluded)
        claimed: list[Any] = []
        deploying: set[tuple[str, str, str]] = set()  # models whose deploy this claim takes
        while len(claimed) < limit:
            params: dict[str, Any] = {"now": now, "window": limit - len(claimed) + 64}
            if excluded:
                params["excluded"] = excluded
            query = _due(locking=not self.db.is_sqlite, excluding=bool(excluded))
            rows = cast("Sequence[tuple[str, str, str, str, str]]",
                        conn.execute(query, params).all())
            picked: list[tuple[str, str]] = []  # (key, sink_id)
            crowding: set[str] = set()
            for key, sink_id, stack, component, action in rows:
                if len(claimed) + len(picked) >= limit:
                    break
                if action == Action.DEPLOY.value and not approvals.deploy_may_start(
                        conn, key, deploying):
                    continue  # another deploy of this model is in flight: one at a time
                if slots is not None:
                    if not slots.take(sink_id, stack, component):
                        crowding.add(sink_id)
                        continue  # this sink is saturated; others still get their turn
                    held.append(sink_id)
                picked.append((key, sink_id))
            claimed += self._claim_rows(conn, picked, slots, held, lease_seconds, now)
            crowding.difference_update(excluded)
            if len(rows) < params["window"] or not crowding:
                break  # every due row was seen, or no full sink crowded the window
            excluded += sorted(crowding)
        if not claimed:
            return []
        # Rows read as tuples, in _CLAIM's RETURNING order: a Row's attribute access
        # costs ten times its index (SQLAlchemy's Row formats an AttributeError first).
        records = {row[1]: self._records.get(row[1]) for row in claimed}
        missing = [event_id for event_id, record in records.items() if record is None]
        for start in range(0, len(missing), 500):
            records.update(conn.execute(_RECORDS, {"ids": missing[start:start + 500]}).all())
        awaited = list({row[-1] for row in claimed if row[-1] is not None})
        upstream: dict[str, Any] = {}
        for start in range(0, len(awaited), 500):
            upstream.update(conn.execute(_RESULTS, {"keys": awaited[start:start + 500]}).all())
        return [
            ClaimedDelivery(
                key=key,
                event_id=event_id,
                artifact_index=artifact_index,
                action=action,
                stack=stack,
                component=component,
                sink_id=sink_id,
                target=target,
                params=params or {},
                attempts=attempts,
                created_at=created_at,
                upstream=(DeliveryResult.model_validate(upstream[after])
                          if after is not None and upstream.get(after) else None),
                record=records[event_id],
            )
            for (key, event_id, artifact_index, action, stack, component, sink_id, target,
                 params, attempts, created_at, after) in claimed
        ]

    def _claim_rows(
        self,
        conn: sa.Connection,
        picked: list[tuple[str, str]],
        slots: ClaimSlots | None,
        held: list[str],
        lease_seconds: float,
        now: float,
    ) -> list[Any]:
        """Mark `picked` in flight for this daemon; the rows it got, as they are now
        (another daemon may have taken some first: their slots are given back)."""
        if not picked:
            return []
        claimed: list[Any] = list(conn.execute(_CLAIM, {
            "keys": [key for key, _ in picked], "claimer": self.owner,
            "lease": now + lease_seconds, "now": now,
        }))
        if slots is not None and len(claimed) < len(picked):
            got = {row[0] for row in claimed}
            lost = [sink_id for key, sink_id in picked if key not in got]
            slots.give_back(lost)
            for sink_id in lost:
                held.remove(sink_id)
        return claimed

    async def unmoved(self, source: str) -> list[FinishedEvent]:
        """Finished events of `source` whose follow-up (a receipt) was not confirmed."""
        await self.flush_moved()
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(
                    events.c.id, events.c.bundle, events.c.source, events.c.state,
                    _REPLY_TO,
                ).where(
                    events.c.moved.is_(False),
                    events.c.state.in_(("done", "failed")),
                    events.c.source == source,
                )
            )
            return [
                FinishedEvent(
                    event_id=r.id, bundle=r.bundle, source=r.source, state=r.state,
                    reply_to=r.reply_to,
                )
                for r in rows
            ]

    async def bundle_states(self, bundles: Sequence[str]) -> dict[str, str]:
        """State of the spool event each bundle directory belongs to (crash recovery).

        A name is free again once its bundle is pruned from done/, so older events may
        carry it too: the newest one is the directory's."""
        found: dict[str, str] = {}
        async with self.db.read() as conn:
            for start in range(0, len(bundles), 500):
                rows = await conn.execute(
                    sa.select(events.c.bundle, events.c.state).where(
                        events.c.source == "spool",
                        events.c.bundle.in_(bundles[start:start + 500]),
                        events.c.state != "rejected",
                    ).order_by(events.c.received_at)  # the newest last, so it wins
                )
                found.update({r.bundle: r.state for r in rows})
        return found

    async def mark_moved(self, ids: Iterable[str]) -> None:
        """Note bundles as moved; written with the next transaction (or flush_moved).

        Losing them in a crash only means the move is checked again at start (a no-op).
        """
        self._moved_backlog.extend(ids)

    async def flush_moved(self) -> None:
        if self._moved_backlog:
            await self.cycle([], 0)

    # --- operator actions ----------------------------------------------------------

    async def retry_dead(self, key: str | None = None) -> int:
        """Re-queue dead deliveries: all, one delivery key, or every one of an event id.

        Deliveries that were never attempted because this one died come back with it.
        """
        return await self.db.run_write(_retry_dead_tx, key)

    async def decide(self, **kwargs: Any) -> approvals.DecisionRow:
        """`model deploy|approve|reject`: one transaction, acting through deliveries."""
        return await self.db.run_write(approvals.decide, **kwargs)

    async def decisions(self, **kwargs: Any) -> list[approvals.DecisionRow]:
        async with self.db.read() as conn:
            return await conn.run_sync(approvals.list_decisions, **kwargs)

    async def deploy_superseded(self, key: str) -> str | None:
        async with self.db.read() as conn:
            return await approvals.deploy_superseded(conn, key)

    async def status(self, dead_limit: int = 50) -> StatusReport:
        report = StatusReport()
        async with self.db.read() as conn:
            for state, n in (
                await conn.execute(
                    sa.select(events.c.state, sa.func.count().label("n")).group_by(events.c.state)
                )
            ).all():
                report.events[str(state)] = int(str(n))
            for sink_id, state, n in (
                await conn.execute(
                    sa.select(deliveries.c.sink_id, deliveries.c.state, sa.func.count()).group_by(
                        deliveries.c.sink_id, deliveries.c.state
                    )
                )
            ).all():
                state_name = str(state)
                counts = report.sinks.setdefault(str(sink_id), SinkCounts())
                count = int(str(n))
                setattr(counts, state_name, count)
                setattr(report.deliveries, state_name,
                        getattr(report.deliveries, state_name) + count)
            oldest = (
                await conn.execute(
                    sa.select(sa.func.min(deliveries.c.created_at)).where(
                        deliveries.c.state.in_(("pending", "in_flight"))
                    )
                )
            ).scalar()
            if oldest is not None:
                report.oldest_pending_age_seconds = round(max(0.0, time.time() - oldest), 3)
            for row in (
                await conn.execute(
                    sa.select(
                        deliveries.c.key,
                        deliveries.c.sink_id,
                        deliveries.c.attempts,
                        deliveries.c.last_error,
                    )
                    .where(deliveries.c.state == "dead")
                    .order_by(deliveries.c.updated_at.desc())
                    .limit(dead_limit)
                )
            ).all():
                report.dead_letters.append(dict(row._mapping))
            for row in (
                await conn.execute(
                    sa.select(events.c.id, events.c.source, events.c.bundle, events.c.error)
                    .where(events.c.state == "rejected")
                    .order_by(events.c.received_at.desc())
                    .limit(dead_limit)
                )
            ).all():
                report.rejected.append(dict(row._mapping))
            records: Iterable[dict[str, Any]] = (
                await conn.execute(sa.select(held_messages.c.record))).scalars()
            report.held_messages = sum(len(r["messages"]) for r in records)
        return report


# --- transactions that need nothing from the journal object ---------------------------


def _reject_tx(conn: sa.Connection, rejection: Rejection) -> None:
    event_id = rejection.event_id or f"rejected-{time.time_ns()}"
    prior = conn.execute(sa.select(events.c.state).where(events.c.id == event_id)).scalar()
    if prior is not None and prior != "rejected":
        event_id = f"{event_id}#rejected-{time.time_ns()}"
    elif prior is not None:
        conn.execute(sa.delete(events).where(events.c.id == event_id))
    now = time.time()
    conn.execute(
        sa.insert(events).values(
            id=event_id,
            source=rejection.source,
            bundle=rejection.bundle,
            state="rejected",
            record=rejection.model_dump(mode="json"),
            error=rejection.summary,
            received_at=now,
            finished_at=now,
            moved=True,
        )
    )


def _release_in_flight(conn: sa.Connection, which: sa.ColumnElement[bool]) -> int:
    """In-flight deliveries matching `which` go back to pending; how many."""
    result = conn.execute(
        sa.update(deliveries)
        .where(deliveries.c.state == "in_flight", which)
        .values(state="pending", owner=None, lease_until=None)
    )
    return int(result.rowcount or 0)


def _renew_leases_tx(
    conn: sa.Connection, owner: str, lease_seconds: float, keys: list[str]
) -> None:
    until = time.time() + lease_seconds
    for start in range(0, len(keys), 500):
        conn.execute(
            sa.update(deliveries)
            .where(deliveries.c.state == "in_flight", deliveries.c.owner == owner,
                   deliveries.c.key.in_(keys[start:start + 500]))
            .values(lease_until=until)
        )


def _bad_data(exc: BaseException) -> bool:
    """Whether a write failed on a value the database cannot hold, so that the same rows
    fail at every retry: one its driver cannot convert (an integer over the column's
    range: SQLite's OverflowError, PostgreSQL's class 22 "data exception"), or that
    fails on the way there (a JSON column's serializer: orjson holds 64-bit integers at
    most). Not a failure of the database itself (down, locked, full), which a retry
    outlasts."""
    if isinstance(exc, sa.exc.StatementError) and not isinstance(exc, sa.exc.DBAPIError):
        return True  # raised while binding the parameters, before the database saw them
    cause: BaseException | None = exc
    for _ in range(4):  # sqlalchemy's error -> the DBAPI adapter's -> the driver's
        if cause is None:
            return False
        if isinstance(cause, OverflowError | sa.exc.DataError | sqlite3.DataError):
            return True
        if str(getattr(cause, "sqlstate", "") or "").startswith("22"):
            return True
        cause = getattr(cause, "orig", None) or cause.__cause__
    return False


def _has_side_effects(c: Completion) -> bool:
    """Whether recording `c` writes more than its own row, for its attempt only: a done
    delivery's catalog locations; a dead one's dependents killed, or its deploy failed."""
    if c.outcome == "dead":
        return True
    return c.outcome == "done" and c.result is not None and bool(
        c.result.objects or c.result.uri)


def _held_only(
    conn: sa.Connection, completions: Sequence[Completion], owner: str
) -> list[Completion]:
    """The completions of attempts this transaction holds (row in flight, this owner,
    this attempt number), their rows locked until the commit. The others are stale:
    attempts whose lease expired and that were taken over (by a peer, or by this daemon
    claiming again); each is logged once, at info."""
    keys = list({c.key for c in completions})
    held: dict[str, int] = {}
    for start in range(0, len(keys), 500):
        rows = cast("Sequence[tuple[str, str, str | None, int]]",
                    conn.execute(_HOLDERS, {"keys": keys[start:start + 500]}).all())
        held.update((key, attempts) for key, state, row_owner, attempts in rows
                    if state == "in_flight" and row_owner == owner)
    kept = []
    for c in completions:
        attempt = held.get(c.key)
        if attempt is not None and c.attempts in (None, attempt):
            kept.append(c)
            continue
        log.info("outcome of an attempt whose lease was taken over: left to the new "
                 "holder", key=c.key, attempt=c.attempts, outcome=c.outcome,
                 deploy_recorded=c.action == "deploy" and c.outcome == "done")
    return kept


def _complete_in(
    conn: sa.Connection, completions: Sequence[Completion], now: float, owner: str
) -> list[FinishedEvent]:
    """Outcomes of a burst of attempts; a done delivery's locations in the same commit.

    An outcome counts only from the attempt that holds its row (owner and attempt
    number): the row updates check that themselves (_OWN_ATTEMPT). When the burst also
    writes elsewhere (a done delivery's locations, a dead one's dependents, a deploy's
    decision), the held attempts are read first (locked) and only theirs have those
    effects: a stale "dead" must not kill the dependents the new holder's attempt is
    about to unblock, nor a stale "done" catalog a location in place of the new
    holder's. Bursts without such effects (retries) skip that read: this transaction
    is on the hot path.

    One exception: a deploy that landed ("done") is recorded on the model's decision
    whichever attempt it came from, since the endpoint now serves that version; if a
    newer one was deployed meanwhile, that one is deployed again (the newest wins).
    """
    touched = {c.event_id for c in completions}
    held = completions
    if any(_has_side_effects(c) for c in completions):
        held = _held_only(conn, completions, owner)
    done = [c for c in held if c.outcome == "done"]
    retry = [c for c in held if c.outcome == "retry"]
    dead = [c for c in held if c.outcome == "dead"]
    if done:
        execute_many(conn, _MARK_DONE, [
            {"k": c.key, "r": c.result.model_dump(mode="json") if c.result else None,
             "now": now, "o": owner, "a": c.attempts}
            for c in done
        ])
        catalog.record_locations_batch(
            conn,
            [(c.event_id, c.artifact_index, c.key, c.sink_id, c.action, c.result)
             for c in done if c.result is not None],
            now,
        )
    if retry:
        execute_many(conn, _MARK_RETRY, [
            {"k": c.key, "n": c.next_attempt_at or now, "e": c.error, "now": now, "o": owner,
             "a": c.attempts}
            for c in retry
        ])
    if dead:
        execute_many(conn, _MARK_DEAD, [
            {"k": c.key, "e": c.error, "now": now, "o": owner, "a": c.attempts}
            for c in dead])
        for c in dead:
            _kill_dependents(conn, c.key, now)
    deploys = [c for c in completions if c.action == "deploy" and c.outcome != "retry"]
    if deploys:
        counted = {id(c) for c in held}
        for c in deploys:
            if c.outcome == "done" or id(c) in counted:
                approvals.record_deploy_outcome(
                    conn, c.key, c.outcome == "done", c.error, now)
    return _finish_events(conn, touched, now)


def _kill_dependents(conn: sa.Connection, key: str, now: float) -> None:
    frontier = [key]
    while frontier:
        frontier = list(conn.execute(_KILL_WAITING, {
            "keys": frontier, "why": f"not attempted: prerequisite {key} is dead", "now": now,
        }).scalars())


# Only the receipt address of a finished event's record, extracted by the database
# (json_extract / ->): decoding each whole record (manifest and all) cost more.
_REPLY_TO = events.c.record["reply_to"].label("reply_to")


def _deliveries_of_event(*where: sa.ColumnElement[bool]) -> sa.Exists:
    return sa.exists().where(deliveries.c.event_id == events.c.id, *where)


# An event finishes when none of its deliveries is open: failed if one died, else done.
# One statement decides and returns which (a count per event first cost a third more).
_OUTCOME = sa.case((_deliveries_of_event(deliveries.c.state == "dead"), "failed"),
                   else_="done")
_FINISH = (
    sa.update(events)
    .where(events.c.id.in_(_each("ids")),
           ~_deliveries_of_event(deliveries.c.state.not_in(TERMINAL)),
           events.c.state != _OUTCOME)
    .values(state=_OUTCOME, finished_at=_NOW, moved=False)
    .returning(events.c.id, events.c.bundle, events.c.source, events.c.state, _REPLY_TO)
)


def _finish_events(conn: sa.Connection, ids: set[str], now: float) -> list[FinishedEvent]:
    if not ids:
        return []
    rows = cast("Sequence[tuple[str, str | None, str, Literal['done', 'failed'], Any]]",
                conn.execute(_FINISH, {"ids": list(ids), "now": now}).all())
    return [
        FinishedEvent(event_id=event_id, bundle=bundle, source=source, state=state,
                      reply_to=reply_to)
        for event_id, bundle, source, state, reply_to in rows
    ]


def _retry_dead_tx(conn: sa.Connection, key: str | None) -> int:
    now = time.time()
    query = sa.update(deliveries).where(deliveries.c.state == "dead")
    if key is not None:
        event_of_key = (
            sa.select(deliveries.c.event_id).where(deliveries.c.key == key).scalar_subquery()
        )
        query = query.where(
            sa.or_(
                deliveries.c.key == key,
                deliveries.c.event_id == key,
                sa.and_(
                    deliveries.c.event_id == event_of_key,
                    deliveries.c.last_error.like("not attempted:%"),
                ),
            )
        )
    revive = {"state": "pending", "attempts": 0, "next_attempt_at": now, "created_at": now,
              "updated_at": now}
    back = conn.execute(query.values(**revive).returning(
        deliveries.c.key, deliveries.c.event_id)).all()
    revived = list(back)
    # A revived delivery whose prerequisite stays dead would never be due: bring the
    # prerequisites back too, up the chain (`retry` of a register whose store died).
    while back:
        prereqs = sa.select(deliveries.c.after).where(
            deliveries.c.key.in_([r.key for r in back]), deliveries.c.after.is_not(None))
        back = conn.execute(
            sa.update(deliveries)
            .where(deliveries.c.state == "dead", deliveries.c.key.in_(prereqs))
            .values(**revive).returning(deliveries.c.key, deliveries.c.event_id)
        ).all()
        revived += back
    if revived:
        conn.execute(
            sa.update(events)
            .where(events.c.id.in_({r.event_id for r in revived}))
            .values(state="accepted", finished_at=None)
        )
    return len(revived)


def _hold_tx(conn: sa.Connection, holder: str, record: dict[str, Any]) -> int:
    result = conn.execute(sa.insert(held_messages).values(
        holder=holder, held_at=time.time(), record=record))
    assert result.inserted_primary_key is not None
    return int(result.inserted_primary_key[0])


def _release_tx(conn: sa.Connection, held_id: int) -> None:
    conn.execute(sa.delete(held_messages).where(held_messages.c.id == held_id))


def _adopt_held_tx(conn: sa.Connection, holder: str, adopter: str
                   ) -> list[tuple[int, dict[str, Any]]]:
    rows = conn.execute(sa.select(held_messages.c.id, held_messages.c.record)
                        .where(held_messages.c.holder == holder)
                        .order_by(held_messages.c.id)).all()
    if rows:
        conn.execute(sa.update(held_messages).where(held_messages.c.id.in_([r.id for r in rows]))
                     .values(holder=adopter))
    return [(r.id, dict(r.record)) for r in rows]
