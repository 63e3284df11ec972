"""Read-only catalog queries for the client API and the HTTP API (beyond router.catalog).

Every function takes an open connection (`Database.read()`), never writes, and returns
the same `ArtifactRow` / `RunRow` models as `router.catalog`, with locations and
lineage inputs filled in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from router.catalog import ArtifactRow, LocationRow, RunRow, list_runs
from router.db import artifacts, events, lineage, locations

__all__ = [
    "CACHE_KEY",
    "artifact_by_id",
    "bundles_of",
    "cached_artifacts",
    "consumers_of",
    "get_run",
    "query_artifacts",
    "resolve_refs",
]

# The metadata key the SDK writes when a step gives a cache key.
CACHE_KEY = "router.cache_key"


def _row(row: Any) -> ArtifactRow:
    data = dict(row._mapping)
    data["plan_errors"] = data.get("plan_errors") or []
    data["metadata"] = data.get("metadata") or {}
    data["files"] = data.get("files") or []
    return ArtifactRow.model_validate(data)


async def _hydrate(conn: AsyncConnection, rows: list[ArtifactRow]) -> list[ArtifactRow]:
    """Fill locations and lineage inputs of `rows` (two queries, whatever their number)."""
    if not rows:
        return rows
    by_id = {r.id: r for r in rows}
    ids = list(by_id)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        loc_rows = await conn.execute(
            sa.select(locations).where(locations.c.artifact_id.in_(chunk)).order_by(locations.c.id)
        )
        for loc in loc_rows.all():
            by_id[loc.artifact_id].locations.append(LocationRow.model_validate(dict(loc._mapping)))
        edges = await conn.execute(
            sa.select(lineage).where(lineage.c.artifact_id.in_(chunk)).order_by(lineage.c.input_ref)
        )
        for edge in edges.all():
            by_id[edge.artifact_id].inputs.append(edge.input_ref)
    return rows


def _newest_first(query: Any) -> Any:
    return query.order_by(artifacts.c.created_at.desc(), artifacts.c.id.desc())


async def query_artifacts(
    conn: AsyncConnection,
    *,
    pipeline: str | None = None,
    run_id: str | None = None,
    step_name: str | None = None,
    name: str | None = None,
    kind: str | None = None,
    cache_key: str | None = None,
    ids: Sequence[int] | None = None,
    limit: int | None = 10_000,
    offset: int = 0,
) -> list[ArtifactRow]:
    """Artifacts matching every filter given, newest first, with locations and inputs:
    `limit` of them (None: all) after the first `offset`."""
    query = sa.select(artifacts)
    for column, value in (
        (artifacts.c.pipeline, pipeline),
        (artifacts.c.run_id, run_id),
        (artifacts.c.step_name, step_name),
        (artifacts.c.name, name),
        (artifacts.c.kind, kind),
    ):
        if value is not None:
            query = query.where(column == value)
    if ids is not None:
        query = query.where(artifacts.c.id.in_(list(ids)))
    if cache_key is not None:
        query = query.where(artifacts.c.metadata[CACHE_KEY].as_string() == cache_key)
    result = await conn.execute(_newest_first(query).limit(limit).offset(offset or None))
    return await _hydrate(conn, [_row(r) for r in result.all()])


async def artifact_by_id(conn: AsyncConnection, artifact_id: int) -> ArtifactRow | None:
    rows = await query_artifacts(conn, ids=[artifact_id], limit=1)
    return rows[0] if rows else None


async def get_run(conn: AsyncConnection, pipeline: str, run_id: str) -> RunRow | None:
    """One run with its artifact count, or None."""
    found = await list_runs(conn, pipeline=pipeline, run_id=run_id, limit=1)
    return found[0] if found else None


def split_ref(ref: str) -> tuple[str, str, str, str] | None:
    parts = ref.split("/")
    if len(parts) != 4 or not all(parts):
        return None
    return parts[0], parts[1], parts[2], parts[3]


async def resolve_refs(
    conn: AsyncConnection, refs: Iterable[str], as_of: float | None = None
) -> dict[str, ArtifactRow]:
    """Lineage references `pipeline/run_id/step_name/name` -> the newest matching row.

    With `as_of` (the consumer's `created_at`): the newest row catalogued by then, the
    version the consumer was made from, not one re-emitted after it (a step run again);
    if every match came later (the consumer's manifest arrived first), the oldest.
    References that match nothing in the catalog are left out.
    """
    wanted = {ref: parts for ref in dict.fromkeys(refs) if (parts := split_ref(ref))}
    if not wanted:
        return {}
    conditions = [
        sa.and_(
            artifacts.c.pipeline == p,
            artifacts.c.run_id == r,
            artifacts.c.step_name == s,
            artifacts.c.name == n,
        )
        for p, r, s, n in wanted.values()
    ]
    out: dict[str, ArtifactRow] = {}
    later: dict[str, ArtifactRow] = {}  # per ref, the oldest catalogued after `as_of`
    for start in range(0, len(conditions), 200):
        query = _newest_first(sa.select(artifacts).where(sa.or_(*conditions[start : start + 200])))
        for row in (await conn.execute(query)).all():
            art = _row(row)
            ref = f"{art.pipeline}/{art.run_id}/{art.step_name}/{art.name}"
            if as_of is None or art.created_at <= as_of:
                out.setdefault(ref, art)  # newest first: the first one seen wins
            else:
                later[ref] = art  # newest first: the last one seen is the oldest
    out = {**later, **out}
    await _hydrate(conn, list(out.values()))
    return out


async def consumers_of(
    conn: AsyncConnection, refs: Iterable[str], limit: int | None = None
) -> list[ArtifactRow]:
    """Artifacts that name any of `refs` among their lineage inputs, newest first
    (`limit` of them; None: all)."""
    wanted = list(dict.fromkeys(refs))
    if not wanted:
        return []
    # A subquery, not a list of ids: a widely used dataset has more consumers than a
    # statement may bind parameters.
    ids = sa.select(lineage.c.artifact_id).where(lineage.c.input_ref.in_(wanted))
    query = _newest_first(sa.select(artifacts).where(artifacts.c.id.in_(ids)))
    result = await conn.execute(query.limit(limit))
    return await _hydrate(conn, [_row(r) for r in result.all()])


async def cached_artifacts(
    conn: AsyncConnection, pipeline: str, step_name: str, key: str
) -> list[ArtifactRow]:
    """The artifacts of the newest event of (pipeline, step) that recorded cache key `key`."""
    rows = await query_artifacts(
        conn, pipeline=pipeline, step_name=step_name, cache_key=key, limit=10_000
    )
    if not rows:
        return []
    newest_event = rows[0].event_id
    return [r for r in rows if r.event_id == newest_event]


async def bundles_of(conn: AsyncConnection, event_ids: Iterable[str]) -> dict[str, str]:
    """event id -> spool bundle directory name (for artifacts that were not uploaded)."""
    wanted = list(dict.fromkeys(event_ids))
    if not wanted:
        return {}
    query = sa.select(events.c.id, events.c.bundle).where(events.c.id.in_(wanted))
    return {r.id: r.bundle for r in (await conn.execute(query)).all() if r.bundle}
