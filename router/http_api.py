"""Read-only JSON API over the catalog, for `router.client` with ROUTER_URL and for people.

    GET /api/v1/runs?pipeline=&limit=                         {"runs": [...], "truncated"}
    GET /api/v1/runs/{pipeline}/{run_id}                       {"run": {...}, "artifacts": [...],
                                                                "truncated"}
    GET /api/v1/artifacts?pipeline=&run_id=&step_name=&name=&kind=&cache_key=&limit=
                                                               {"artifacts": [...], "truncated"}
    GET /api/v1/artifacts/{id}                                 {"artifact": {...}}
    GET /api/v1/artifacts/{id}/lineage                         {"artifact", "inputs",
                                                                "unresolved_inputs", "consumers"}
    GET /api/v1/artifacts/{id}/files/{file_name}               the file's bytes

Artifacts carry metadata, checksum, version, files, locations and lineage inputs, as
`artifact-router artifacts --json` prints them.  The file endpoint serves only what the
catalog says the router itself wrote or accepted: a `file://` store location, the file
in the artifact's spool bundle, or for MQTT the inline file intake wrote (also once
retired to mqtt-done) or the `file://` file it accepted under `router.mqtt.allowed_roots`
(re-checked, symlinks resolved, on every request); a store location only under a local
store root (`store_roots`), and any file only while its content has the catalog's sha256
(else the next place, else 404).  Errors are JSON: {"error": "..."}.

Parameters are checked before the catalog is read: an unknown or repeated query
parameter, a `limit` outside 1..10,000 (`MAX_LIMIT`; default 200 runs, 1,000 artifacts),
an unknown `kind` (any case; `data` is `dataset`, as in manifests) or an `{id}` that is
not an integer from 1 to 2**31 - 1 is a 400 whose body is
{"error": "<sentence>", "field": "<parameter>", "value": "<as given>", "fix": "<what to do>"}.
`truncated` is true when more rows matched than were returned (the limit, or 10,000
artifacts of a run): there is no paging, so narrow the filters to see the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from aiohttp import web

from router.catalog import ArtifactRow, file_uri_paths, list_runs
from router.catalog_read import (
    artifact_by_id,
    bundles_of,
    consumers_of,
    get_run,
    query_artifacts,
    resolve_refs,
)
from router.config import RouterConfig
from router.db import Database
from router.errors import did_you_mean
from router.manifest import ArtifactKind
from router.sources import LocalCopies

__all__ = ["API_PREFIX", "MAX_LIMIT", "LocalCopies", "add_routes", "local_store_roots"]

API_PREFIX = "/api/v1"
# limit=100000 held the event loop ~4 s (rows are hydrated and serialised on it).
MAX_LIMIT = 10_000
# `artifacts.id` is INTEGER: 32 bits on PostgreSQL; a larger id overflowed the driver (500).
_MAX_ID = 2**31 - 1
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: int() also takes "+1", "1_0", " 1", "\u0661"
_CHUNK = 1 << 20

_RUNS_PARAMS = ("pipeline", "limit")
_ARTIFACTS_PARAMS = ("pipeline", "run_id", "step_name", "name", "kind", "cache_key", "limit",
                     "offset")
# As manifests spell them (router.manifest): any case, DATA (Domino Flows) for dataset.
_KINDS = {k.value: k.value for k in ArtifactKind} | {"data": ArtifactKind.DATASET.value}
_KIND_FIX = ("use one of model, dataset (or data), metrics, parameters, report, artifact "
             "(any case), or leave kind out")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _bad_request(
    field: str, value: str, problem: str, fix: str, *, where: str = "query parameter"
) -> web.HTTPBadRequest:
    """A 400 naming the parameter, the value as given and the fix, for the caller to raise.

    The body is json.dumps of a dict: a value holding quotes or newlines stays a value.
    """
    body = {"error": f"{where} {field}={value!r} {problem}; {fix}", "field": field,
            "value": value, "fix": fix}
    return web.HTTPBadRequest(text=json.dumps(body), content_type="application/json")


def _params(request: web.Request, accepted: Sequence[str]) -> dict[str, str]:
    """The query parameters, each at most once and each one of `accepted`.

    A typo (`?pipline=`) or a second value would otherwise be dropped silently, and the
    answer would look like the one asked for.
    """
    out: dict[str, str] = {}
    for key, value in request.query.items():
        if key not in accepted:
            fix = (f"use {', '.join(accepted)}" if accepted
                   else "remove it: this endpoint takes no query parameters")
            raise _bad_request(key, value, f"is unknown to {request.path}"
                               f"{did_you_mean(key, accepted)}", fix)
        if key in out:
            raise _bad_request(key, value, f"is given more than once (first {out[key]!r})",
                               f"give {key} once")
        out[key] = value
    return out


def _bounded_int(raw: str, top: int) -> int | None:
    """`raw` as an integer from 1 to `top`, or None (digits only, never a huge int())."""
    if not _DIGITS.fullmatch(raw) or len(raw.lstrip("0")) > len(str(top)):
        return None
    value = int(raw)
    return value if 1 <= value <= top else None


def _limit(params: dict[str, str], default: int) -> int:
    """`limit`, capped: each row is hydrated and serialised on the event loop."""
    raw = params.get("limit")
    if raw is None:
        return default
    value = _bounded_int(raw, MAX_LIMIT)
    if value is None:
        above = _DIGITS.fullmatch(raw) is not None and raw.lstrip("0") != ""
        raise _bad_request(
            "limit", raw,
            f"is above the maximum, {MAX_LIMIT}" if above
            else f"is not an integer from 1 to {MAX_LIMIT}",
            f"use limit=1 to {MAX_LIMIT} (default {default}); a response cut at the limit "
            'says "truncated": true, narrow the filters to see the rest',
        )
    return value


def _offset(params: dict[str, str]) -> int:
    """`offset`: rows to skip, the next page of a list that said `truncated`."""
    raw = params.get("offset")
    if not raw or (_DIGITS.fullmatch(raw) and raw.strip("0") == ""):
        return 0  # absent, empty or zero: the first page
    value = _bounded_int(raw, _MAX_ID)
    if value is None:
        raise _bad_request("offset", raw, f"is not an integer from 0 to {_MAX_ID}",
                           "use offset=0 for the first page, then add the rows each page "
                           "returned while it says \"truncated\": true")
    return value


def _kind(params: dict[str, str]) -> str | None:
    """The catalog's spelling of `kind`: a case slip would otherwise match nothing."""
    raw = params.get("kind") or None
    if raw is None:
        return None
    wanted = raw.strip().lower()
    if wanted not in _KINDS:
        raise _bad_request("kind", raw, f"is not an artifact type{did_you_mean(wanted, _KINDS)}",
                           _KIND_FIX)
    return _KINDS[wanted]


def _artifact_id(request: web.Request) -> int:
    """The `{id}` path parameter, checked so it never reaches (and overflows) the database."""
    raw = request.match_info["id"]
    value = _bounded_int(raw, _MAX_ID)
    if value is None:
        raise _bad_request(
            "id", raw, "is not an artifact id",
            f"use an integer from 1 to {_MAX_ID}, as {API_PREFIX}/artifacts lists them",
            where="path parameter",
        )
    return value


def _cut(rows: list[Any], limit: int) -> tuple[list[Any], bool]:
    """The first `limit` of `rows` (fetched with one extra) and whether any were left."""
    return rows[:limit], len(rows) > limit


def _dump(rows: list[Any]) -> list[dict[str, Any]]:
    return [r.model_dump(mode="json") for r in rows]


def local_store_roots(config: RouterConfig) -> list[Path]:
    """The roots of every `local` store in `config` (resolved as the store resolves them)."""
    return [
        Path(str(comp.settings["path"])).expanduser().resolve()
        for stack in config.stacks.values()
        for _, comp in stack.components()
        if comp.type == "local" and comp.settings.get("path")
    ]


def _store_paths(uri: str, roots: Sequence[Path] | None) -> Iterator[Path]:
    """The paths a file:// store location may name, symlinks resolved, under `roots`.

    The local store wrote `file://{dest}` unencoded and now writes `dest.as_uri()`
    (percent-encoded): both readings are tried; the checks, and the sha256 check when
    the file is served, decide.  Without `roots` (an app that passed none) a path with
    `..` is still refused.
    """
    if not uri.startswith("file://"):
        return
    for path in file_uri_paths(uri):
        if not path.is_absolute() or ".." in path.parts:
            continue
        resolved = path.resolve()
        if roots is not None and not any(r == resolved or r in resolved.parents for r in roots):
            continue
        if resolved.is_file():
            yield resolved


def _local_files(
    row: ArtifactRow, name: str, bundles: dict[str, str], copies: LocalCopies,
    store_roots: Sequence[Path] | None = None,
) -> Iterator[Path]:
    """The file on this machine: file:// store locations, then the copy intake kept."""
    for loc in row.locations:
        if loc.action == "store" and loc.file_name == name:
            yield from _store_paths(loc.uri, store_roots)
    staged = next((f for f in row.files if f.get("name") == name), None)
    if staged and staged.get("path"):
        found = copies.find(str(staged["path"]), bundles.get(row.event_id))
        if found is not None:
            yield found


def _local_file(
    row: ArtifactRow, name: str, bundles: dict[str, str], copies: LocalCopies,
    store_roots: Sequence[Path] | None = None,
) -> Path | None:
    """The first candidate of `_local_files`, unverified (the endpoint verifies)."""
    return next(_local_files(row, name, bundles, copies, store_roots), None)


def _catalog_sha256(row: ArtifactRow, name: str) -> set[str]:
    """The checksums the catalog holds for file `name` of `row`."""
    shas = {f.get("sha256") for f in row.files if f.get("name") == name}
    shas |= {loc.sha256 for loc in row.locations
             if loc.action == "store" and loc.file_name == name}
    return {s for s in shas if isinstance(s, str) and s}


def _open_verified(
    row: ArtifactRow, name: str, bundles: dict[str, str], copies: LocalCopies,
    store_roots: Sequence[Path] | None,
) -> tuple[BinaryIO, int] | None:
    """An open file (and its size) whose content has the catalog's sha256, else None.

    The file is hashed through the handle that is then served, so a file replaced in
    between (another version written to the same key) is never sent as this one.
    """
    expected = _catalog_sha256(row, name)
    if not expected:
        return None
    for path in _local_files(row, name, bundles, copies, store_roots):
        try:
            fh = open(path, "rb")  # noqa: SIM115 - handed to the response, closed there
        except OSError:
            continue
        digest = hashlib.sha256()
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
        if digest.hexdigest() in expected:
            fh.seek(0)
            return fh, os.fstat(fh.fileno()).st_size
        fh.close()
    return None


async def _send(request: web.Request, fh: BinaryIO, size: int) -> web.StreamResponse:
    """Stream an open file (already verified) and close it."""
    with fh:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        while chunk := await asyncio.to_thread(fh.read, _CHUNK):
            await resp.write(chunk)
        await resp.write_eof()
    return resp


def add_routes(
    app: web.Application, db: Database, *, spool: str | Path | None = None,
    copies: LocalCopies | None = None,
    store_roots: Callable[[], Iterable[Path]] | None = None,
) -> None:
    """Register the read-only catalog endpoints on `app` (GET only).

    `copies` (or just `spool`, the daemon's spool root) lets the file endpoint serve
    files of artifacts that were not uploaded to a store, where intake kept them.
    `store_roots` (called per request, so a reloaded config counts: the daemon passes
    `lambda: local_store_roots(config)`) limits file:// store locations to those roots.
    Whatever the path, a file is served only when its sha256 is the catalog's.
    """
    copies = copies or LocalCopies(spool=Path(spool) if spool is not None else None)

    async def runs(request: web.Request) -> web.StreamResponse:
        params = _params(request, _RUNS_PARAMS)
        limit = _limit(params, 200)
        async with db.read() as conn:
            rows = await list_runs(conn, pipeline=params.get("pipeline") or None, limit=limit + 1)
        shown, truncated = _cut(rows, limit)
        return web.json_response({"runs": _dump(shown), "truncated": truncated})

    async def run(request: web.Request) -> web.StreamResponse:
        _params(request, ())
        pipeline, run_id = request.match_info["pipeline"], request.match_info["run_id"]
        async with db.read() as conn:
            row = await get_run(conn, pipeline, run_id)
            if row is None:
                return _error(404, f"no run {run_id!r} of pipeline {pipeline!r} in the catalog")
            rows = await query_artifacts(conn, pipeline=pipeline, run_id=run_id,
                                         limit=MAX_LIMIT + 1)
        shown, truncated = _cut(rows, MAX_LIMIT)
        return web.json_response({"run": row.model_dump(mode="json"), "artifacts": _dump(shown),
                                  "truncated": truncated})

    async def artifacts(request: web.Request) -> web.StreamResponse:
        q = _params(request, _ARTIFACTS_PARAMS)
        limit, kind = _limit(q, 1000), _kind(q)
        async with db.read() as conn:
            rows = await query_artifacts(
                conn,
                pipeline=q.get("pipeline") or None,
                run_id=q.get("run_id") or None,
                step_name=q.get("step_name") or None,
                name=q.get("name") or None,
                kind=kind,
                cache_key=q.get("cache_key") or None,
                limit=limit + 1,
                offset=_offset(q),
            )
        shown, truncated = _cut(rows, limit)
        return web.json_response({"artifacts": _dump(shown), "truncated": truncated})

    async def artifact(request: web.Request) -> web.StreamResponse:
        _params(request, ())
        artifact_id = _artifact_id(request)
        async with db.read() as conn:
            row = await artifact_by_id(conn, artifact_id)
        if row is None:
            return _error(404, f"no artifact {artifact_id} in the catalog")
        return web.json_response({"artifact": row.model_dump(mode="json")})

    async def lineage(request: web.Request) -> web.StreamResponse:
        _params(request, ())
        artifact_id = _artifact_id(request)
        async with db.read() as conn:
            row = await artifact_by_id(conn, artifact_id)
            if row is None:
                return _error(404, f"no artifact {artifact_id} in the catalog")
            resolved = await resolve_refs(conn, row.inputs, as_of=row.created_at)
            ref = f"{row.pipeline}/{row.run_id}/{row.step_name}/{row.name}"
            consumers = await consumers_of(conn, [ref], limit=MAX_LIMIT + 1)
        shown, truncated = _cut(consumers, MAX_LIMIT)
        return web.json_response(
            {
                "artifact": row.model_dump(mode="json"),
                "inputs": _dump([resolved[r] for r in row.inputs if r in resolved]),
                "unresolved_inputs": [r for r in row.inputs if r not in resolved],
                "consumers": _dump(shown),
                "consumers_truncated": truncated,
            }
        )

    async def file(request: web.Request) -> web.StreamResponse:
        _params(request, ())
        name, artifact_id = request.match_info["file_name"], _artifact_id(request)
        async with db.read() as conn:
            row = await artifact_by_id(conn, artifact_id)
            bundles = await bundles_of(conn, [row.event_id]) if row is not None else {}
        if row is None:
            return _error(404, f"no artifact {artifact_id} in the catalog")
        roots = list(store_roots()) if store_roots is not None else None
        opened = await asyncio.to_thread(_open_verified, row, name, bundles, copies, roots)
        if opened is not None:
            return await _send(request, *opened)
        remote = [loc.uri for loc in row.locations if loc.file_name == name]
        return _error(
            404,
            f"file {name!r} of artifact {row.id} is not on this server's disk"
            + (f"; read it from {', '.join(remote)}" if remote else ""),
        )

    prefix = API_PREFIX
    app.router.add_get(f"{prefix}/runs", runs)
    app.router.add_get(f"{prefix}/runs/{{pipeline}}/{{run_id}}", run)
    app.router.add_get(f"{prefix}/artifacts", artifacts)
    app.router.add_get(f"{prefix}/artifacts/{{id}}", artifact)
    app.router.add_get(f"{prefix}/artifacts/{{id}}/lineage", lineage)
    app.router.add_get(f"{prefix}/artifacts/{{id}}/files/{{file_name}}", file)
