"""The catalog: runs, artifacts, versions, locations and lineage.

Writes happen inside the journal's transactions (an artifact is catalogued in the same
commit that journals its event, a location in the same commit that marks its delivery
done); reads serve the CLI and the client API.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlparse

import sqlalchemy as sa
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from router.approvals import record_decision
from router.db import artifacts, execute_many, lineage, locations, runs, version_counters
from router.delivery import DeliveryResult, StoredObject
from router.intake import AcceptedEvent
from router.rules import RoutePlan

__all__ = [
    "ArtifactRow",
    "LocationRow",
    "RunRow",
    "artifact_checksum",
    "file_uri_paths",
    "list_runs",
    "raise_version_counter",
    "record_events",
    "record_locations_batch",
    "reserve_versions",
    "whole_version",
]


class LocationRow(BaseModel):
    sink_id: str
    action: str
    file_name: str | None = None
    uri: str
    sha256: str | None = None
    size: int | None = None
    version_id: str | None = None


def file_uri_paths(uri: str) -> list[Path]:
    """The paths a file:// location may name: percent-decoded (`Path.as_uri()`), then as
    written (the local store used to write `file://{dest}` unencoded)."""
    raw = [unquote(urlparse(uri).path), uri[len("file://"):]]
    return [Path(p) for p in dict.fromkeys(raw)]


class ArtifactRow(BaseModel):
    id: int
    event_id: str
    pipeline: str
    run_id: str
    step_name: str
    name: str
    kind: str
    version: str
    upload: bool
    framework: str | None = None
    format: str | None = None
    checksum: str | None = None
    size: int = 0
    metadata: dict[str, Any] = Field(default_factory=dict)
    values: dict[str, Any] | None = None
    step: int | None = None
    files: list[dict[str, Any]] = Field(default_factory=list)
    decision: dict[str, Any] | None = None
    plan_errors: list[str] = Field(default_factory=list)
    created_at: float
    locations: list[LocationRow] = Field(default_factory=list)
    inputs: list[str] = Field(default_factory=list)


class RunRow(BaseModel):
    pipeline: str
    run_id: str
    created_at: float
    updated_at: float
    artifacts: int = 0
    status: str | None = Field(
        default=None, description="finished, failed or killed once a step said the run "
        "ended (its manifest's run_status); null while the run is open")
    ended_at: float | None = Field(
        default=None, description="when the catalog recorded that step (its clock, as "
        "created_at's)")


def artifact_checksum(file_hashes: list[str]) -> str | None:
    """One file: its sha256.  Several: sha256 over their hashes in manifest order."""
    if not file_hashes:
        return None
    if len(file_hashes) == 1:
        return file_hashes[0]
    return hashlib.sha256("\n".join(file_hashes).encode()).hexdigest()


def reserve_versions(
    conn: sa.Connection, pipeline: str, name: str, count: int
) -> list[str]:
    """The next `count` integer versions of (pipeline, name), atomically on both backends."""
    counter = {"p": pipeline, "n": name, "count": count}
    last = conn.execute(_BUMP_COUNTER, counter).scalar()
    if last is None:
        if conn.execute(_new_counter(conn.dialect.name), counter).rowcount == 1:
            last = count
        else:  # another daemon created the counter in between
            last = conn.execute(_BUMP_COUNTER, counter).scalar_one()
    return [str(v) for v in range(last - count + 1, last + 1)]


# Explicit versions up to this raise the counter; larger ones (timestamps such as
# 1733390000) would push every later automatic version past them, and near the
# column's 32-bit limit.
_MAX_COUNTED_VERSION = 10**9


def whole_version(version: str) -> int | None:
    """An explicit version that is a whole number ("3", "007"), as one; else None."""
    if version.isascii() and version.isdigit() and int(version) <= _MAX_COUNTED_VERSION:
        return int(version)
    return None


def raise_version_counter(conn: sa.Connection, pipeline: str, name: str, floor: int) -> None:
    """Make the next automatic version of (pipeline, name) at least `floor + 1`."""
    conn.execute(_raise_counter(conn.dialect.name), {"p": pipeline, "n": name, "floor": floor})


# Statements of the journal's hot transactions, built once (see router/journal.py).
_BUMP_COUNTER = (
    sa.update(version_counters)
    .where(version_counters.c.pipeline == sa.bindparam("p"),
           version_counters.c.name == sa.bindparam("n"))
    .values(last=version_counters.c.last + sa.bindparam("count", type_=sa.Integer))
    .returning(version_counters.c.last)
)
_INSERT_ARTIFACTS = sa.insert(artifacts)
_INSERT_LINEAGE = sa.insert(lineage)
_ARTIFACT_IDS = sa.select(artifacts.c.id, artifacts.c.event_id, artifacts.c.artifact_index).where(
    artifacts.c.event_id.in_(sa.bindparam("ids", expanding=True))
)


def _insert(dialect: str, table: sa.Table) -> Any:
    """INSERT with the dialect's ON CONFLICT clauses."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


@functools.cache
def _new_counter(dialect: str) -> Any:
    return _insert(dialect, version_counters).values(
        pipeline=sa.bindparam("p"), name=sa.bindparam("n"), last=sa.bindparam("count"),
    ).on_conflict_do_nothing()


@functools.cache
def _raise_counter(dialect: str) -> Any:
    upsert = _insert(dialect, version_counters).values(
        pipeline=sa.bindparam("p"), name=sa.bindparam("n"), last=sa.bindparam("floor"),
    )
    last, floor = version_counters.c.last, upsert.excluded.last
    return upsert.on_conflict_do_update(
        index_elements=["pipeline", "name"], set_={"last": sa.case((last < floor, floor),
                                                                   else_=last)},
    )


@functools.cache
def _touch_runs(dialect: str) -> Any:
    upsert = _insert(dialect, runs)
    return upsert.on_conflict_do_update(
        index_elements=["pipeline", "run_id"], set_={"updated_at": upsert.excluded.updated_at},
    )


_END_RUN = (
    runs.update()
    .where(runs.c.pipeline == sa.bindparam("p"), runs.c.run_id == sa.bindparam("r"))
    .values(status=sa.bindparam("s"), ended_at=sa.bindparam("e"))
)


@functools.cache
def _add_locations(dialect: str) -> Any:
    return _insert(dialect, locations).on_conflict_do_nothing()


def _artifact_row(event: AcceptedEvent, plan: RoutePlan, index: int, now: float) -> dict[str, Any]:
    m = event.manifest
    artifact = m.artifacts[index]
    staged = event.files[index]
    detected = event.detected[index] if index < len(event.detected) else {}
    art_plan = plan.artifacts[index]
    # Fields of some kinds only, read from the model's __dict__: a getattr default
    # goes through pydantic's __getattr__ and an AttributeError for the other kinds.
    fields = artifact.__dict__
    return {
        "event_id": event.event_id,
        "artifact_index": index,
        "pipeline": m.pipeline,
        "run_id": m.run_id,
        "step_name": m.step_name,
        "name": artifact.name,
        "kind": artifact.kind.value,
        "version": art_plan.version,
        "upload": art_plan.upload,
        "framework": fields.get("framework") or detected.get("framework"),
        "format": fields.get("format") or detected.get("format"),
        "checksum": artifact_checksum([f.sha256 for f in staged]),
        "size": sum(f.size for f in staged),
        "metadata": artifact.metadata,
        "values": fields.get("values"),
        "step": fields.get("step"),
        "files": [f.model_dump(mode="json") for f in staged],
        "decision": art_plan.decision.model_dump(mode="json") if art_plan.decision else None,
        "plan_errors": art_plan.errors or None,
        "created_at": now,
    }


def record_events(
    conn: sa.Connection, accepted: list[tuple[AcceptedEvent, RoutePlan]], now: float
) -> None:
    """Catalog every artifact of a batch of just-journaled events, with lineage.

    A handful of multi-row statements per batch, whatever its size: per-statement
    overhead, not fsync, is what limits intake throughput.
    """
    if not accepted:
        return
    run_keys = sorted({(e.manifest.pipeline, e.manifest.run_id) for e, _ in accepted})
    execute_many(
        conn, _touch_runs(conn.dialect.name),
        [{"pipeline": p, "run_id": r, "created_at": now, "updated_at": now} for p, r in run_keys],
    )
    ended = [
        {"p": e.manifest.pipeline, "r": e.manifest.run_id, "s": e.manifest.run_status,
         "e": now}  # the catalog's clock, as created_at and updated_at
        for e, _ in accepted if e.manifest.run_status is not None
    ]
    if ended:
        conn.execute(_END_RUN, ended)
    rows = [
        _artifact_row(event, plan, index, now)
        for event, plan in accepted
        for index in range(len(event.manifest.artifacts))
    ]
    # executemany without RETURNING: with it (ids in row order), SQLAlchemy inserts
    # SQLite rows one statement each. Most events (metrics, no inputs) need no ids.
    execute_many(conn, _INSERT_ARTIFACTS, rows)
    referring = [
        (event, plan) for event, plan in accepted
        if event.manifest.inputs or any(a.decision is not None for a in plan.artifacts)
    ]
    if not referring:
        return
    found = cast("Sequence[tuple[int, str, int]]", conn.execute(
        _ARTIFACT_IDS, {"ids": [e.event_id for e, _ in referring]}).all())
    ids = {(event_id, index): artifact_id for artifact_id, event_id, index in found}
    edges = []
    for event, plan in referring:
        m = event.manifest
        for index in range(len(m.artifacts)):
            artifact_id = ids[(event.event_id, index)]
            art_plan = plan.artifacts[index]
            if art_plan.decision is not None:
                record_decision(
                    conn, artifact_id=artifact_id, event_id=event.event_id,
                    pipeline=m.pipeline, stack=plan.stack, plan=art_plan, now=now,
                )
            edges += [{"artifact_id": artifact_id, "input_ref": ref}
                      for ref in dict.fromkeys(m.inputs)]
    if edges:
        execute_many(conn, _INSERT_LINEAGE, edges)


def record_locations_batch(
    conn: sa.Connection, items: list[tuple[str, int, str, str, str, DeliveryResult]], now: float
) -> None:
    """Locations of many completed deliveries: (event_id, index, key, sink, action, result)."""
    if not items:
        return
    event_ids = {event_id for event_id, *_ in items}
    found = conn.execute(_ARTIFACT_IDS, {"ids": list(event_ids)})
    ids = {(event_id, index): artifact_id for artifact_id, event_id, index in found}
    rows = []
    for event_id, index, key, sink_id, action, result in items:
        artifact_id = ids.get((event_id, index))
        if artifact_id is None:
            continue
        objects = result.objects or (
            [StoredObject(file_name="", uri=result.uri, size=0, sha256="")] if result.uri else []
        )
        rows += [
            {
                "artifact_id": artifact_id,
                "delivery_key": key,
                "sink_id": sink_id,
                "action": action,
                "file_name": obj.file_name,
                "uri": obj.uri,
                "sha256": obj.sha256 or None,
                "size": obj.size if obj.file_name else None,
                "version_id": obj.version_id if obj.version_id != "unchanged" else None,
                "created_at": now,
            }
            for obj in objects
        ]
    execute_many(conn, _add_locations(conn.dialect.name), rows)


async def list_runs(
    conn: AsyncConnection, *, pipeline: str | None = None, run_id: str | None = None,
    limit: int = 200,
) -> list[RunRow]:
    """Runs, newest first, with their artifact counts. The filters narrow the counting
    too (by the artifacts' run index), not only the runs listed."""
    counted = sa.select(artifacts.c.pipeline, artifacts.c.run_id, sa.func.count().label("n"))
    listed: sa.ColumnElement[bool] = sa.true()
    for artifact_column, run_column, value in (
        (artifacts.c.pipeline, runs.c.pipeline, pipeline),
        (artifacts.c.run_id, runs.c.run_id, run_id),
    ):
        if value is not None:
            counted = counted.where(artifact_column == value)
            listed = sa.and_(listed, run_column == value)
    counts = counted.group_by(artifacts.c.pipeline, artifacts.c.run_id).subquery()
    query = (
        sa.select(runs, sa.func.coalesce(counts.c.n, 0).label("artifacts"))
        .select_from(
            runs.outerjoin(
                counts,
                sa.and_(counts.c.pipeline == runs.c.pipeline, counts.c.run_id == runs.c.run_id),
            )
        )
        .where(listed)
        .order_by(runs.c.created_at.desc())
        .limit(limit)
    )
    return [RunRow.model_validate(dict(r._mapping)) for r in (await conn.execute(query)).all()]


def now() -> float:
    return time.time()
