"""The read side for Python users, shaped like Metaflow's client API.

    from router import Flow, Run

    run = Flow("fraud_training").latest_run
    model = run["train"].data.model              # one step's artifact, by name
    everything = run.data                         # every artifact of the run
    art = run["train"]["model"]                   # metadata, checksum, locations, lineage
    Run("fraud_training/run-42").data.evaluation

The catalog is read directly (SQLite or PostgreSQL, from the router config: $ROUTER_CONFIG,
./router.yaml, ...) or, with ROUTER_URL=http://host:port, through the daemon's read-only
HTTP API.  Files are loaded from wherever they landed: `file://` paths directly, `s3://`
and `gs://` with the settings of the store that wrote them (downloaded once into a cache
keyed by checksum, $ROUTER_CACHE_DIR), artifacts that were not uploaded from their spool
bundle; each file is deserialised by the format the SDK recorded (router.sdk).

Everything here is synchronous, as Metaflow's API is: async catalog calls run on a
private event loop in a background thread, so the API also works when called from code
that runs inside an event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from router.catalog import (
    ArtifactRow,
    LocationRow,
    RunRow,
    artifact_checksum,
    file_uri_paths,
)
from router.config import LoadedConfig, load_config, mask_url_passwords
from router.intake import sha256_file
from router.sources import LocalCopies

__all__ = [
    "ArtifactFiles",
    "Client",
    "DataArtifact",
    "DataView",
    "Flow",
    "MergedData",
    "NotFound",
    "Run",
    "Step",
    "cached",
    "default_client",
    "merge_artifacts",
    "read",
]

T = TypeVar("T")
_CHUNK = 1 << 20
_PAGE = 10_000  # rows per read API request: its most (router.http_api.MAX_LIMIT)


class NotFound(LookupError):
    """No such flow, run, step or artifact in the catalog (Metaflow's MetaflowNotFound)."""


# --- a private event loop for the async catalog ----------------------------------------


class _Loop:
    """An event loop in a daemon thread; `run` blocks the caller until a coroutine ends."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=serve, name="router-client", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._start()
        if self._thread is threading.current_thread():
            coro.close()
            raise RuntimeError("the router client cannot be called from its own loop")
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
        return future.result()

    def stop(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()


# --- backends: the catalog directly, or the daemon's HTTP API ----------------------------


class _SqlBackend:
    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self._loop = _Loop()
        self._db: Any = None

    async def _database(self) -> Any:
        if self._db is None:
            from router.db import Database

            self._db = Database(self.url)
        return self._db

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            import sqlalchemy.exc

            db = await self._database()
            try:
                async with db.read() as conn:
                    return await fn(conn, *args, **kwargs)
            except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError) as exc:
                raise NotFound(
                    f"cannot read the catalog at {mask_url_passwords(self.url)} ({exc.orig}); "
                    "point ROUTER_CONFIG at the daemon's config, or set ROUTER_URL"
                ) from None

        return self._loop.run(call())

    def runs(self, pipeline: str | None, limit: int) -> list[RunRow]:
        from router.catalog import list_runs

        result: list[RunRow] = self._run(list_runs, pipeline=pipeline, limit=limit)
        return result

    def run(self, pipeline: str, run_id: str) -> RunRow | None:
        from router.catalog_read import get_run

        result: RunRow | None = self._run(get_run, pipeline, run_id)
        return result

    def artifacts(self, **filters: Any) -> list[ArtifactRow]:
        from router.catalog_read import query_artifacts

        filters.setdefault("limit", None)  # every match: a run is read whole, however big
        result: list[ArtifactRow] = self._run(query_artifacts, **filters)
        return result

    def lineage(self, rows: Sequence[ArtifactRow]) -> tuple[list[ArtifactRow], list[ArtifactRow]]:
        from router.catalog_read import consumers_of, resolve_refs

        inputs: dict[int, ArtifactRow] = {}
        for row in rows:  # each as of its own creation: the versions it was made from
            resolved: dict[str, ArtifactRow] = self._run(
                resolve_refs, row.inputs, as_of=row.created_at)
            for ref in row.inputs:
                if ref in resolved:
                    inputs.setdefault(resolved[ref].id, resolved[ref])
        consumers: list[ArtifactRow] = self._run(consumers_of, [_ref(row) for row in rows])
        return list(inputs.values()), consumers

    def bundles(self, event_ids: Iterable[str]) -> dict[str, str]:
        from router.catalog_read import bundles_of

        result: dict[str, str] = self._run(bundles_of, list(event_ids))
        return result

    def fetch_file(
        self, row: ArtifactRow, file_name: str, dest: Path, sha256: str | None
    ) -> bool:
        return False

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._loop.run(self._db.dispose())
            self._db = None
        self._loop.stop()


class _HttpBackend:
    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.url}/api/v1{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                message = exc.reason
            if exc.code == 404:
                return None
            raise RuntimeError(f"{url}: {exc.code} {message}") from None
        except urllib.error.URLError as exc:
            raise ConnectionError(
                f"cannot reach the router at {self.url} ({exc.reason}); is `router.listen` "
                "set and the daemon running?"
            ) from None

    @staticmethod
    def _quote(value: str) -> str:
        return urllib.parse.quote(value, safe="")

    def runs(self, pipeline: str | None, limit: int) -> list[RunRow]:
        data = self._get("/runs", pipeline=pipeline, limit=limit) or {"runs": []}
        return [RunRow.model_validate(r) for r in data["runs"]]

    def run(self, pipeline: str, run_id: str) -> RunRow | None:
        data = self._get(f"/runs/{self._quote(pipeline)}/{self._quote(run_id)}")
        return None if data is None else RunRow.model_validate(data["run"])

    def artifacts(self, **filters: Any) -> list[ArtifactRow]:
        ids = filters.pop("ids", None)
        if ids is not None:
            rows = []
            for artifact_id in ids:
                data = self._get(f"/artifacts/{int(artifact_id)}")
                if data is not None:
                    rows.append(ArtifactRow.model_validate(data["artifact"]))
            return rows
        # Page by page (the API answers at most _PAGE rows at a time) until no more: a
        # run is read whole, however big. Rows catalogued meanwhile shift the pages
        # (newest first), so a row may come twice: once is kept.
        rows_by_id: dict[int, ArtifactRow] = {}
        offset = 0
        while True:
            data = self._get("/artifacts", **filters, limit=_PAGE, offset=offset or None)
            data = data or {"artifacts": [], "truncated": False}
            for r in data["artifacts"]:
                row = ArtifactRow.model_validate(r)
                rows_by_id.setdefault(row.id, row)
            if not data.get("truncated"):
                return list(rows_by_id.values())
            offset += len(data["artifacts"])

    def lineage(self, rows: Sequence[ArtifactRow]) -> tuple[list[ArtifactRow], list[ArtifactRow]]:
        inputs: dict[int, ArtifactRow] = {}
        consumers: dict[int, ArtifactRow] = {}
        for row in rows:
            data = self._get(f"/artifacts/{row.id}/lineage")
            if data is None:
                continue
            for r in data["inputs"]:
                inputs.setdefault(r["id"], ArtifactRow.model_validate(r))
            for r in data["consumers"]:
                consumers.setdefault(r["id"], ArtifactRow.model_validate(r))
        return list(inputs.values()), list(consumers.values())

    def bundles(self, event_ids: Iterable[str]) -> dict[str, str]:
        return {}

    def fetch_file(
        self, row: ArtifactRow, file_name: str, dest: Path, sha256: str | None
    ) -> bool:
        """Download into `dest`; an OSError, and nothing at `dest`, when the bytes are not
        `sha256` (so another version is never cached under this one's checksum)."""
        url = f"{self.url}/api/v1/artifacts/{row.id}/files/{self._quote(file_name)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                _write_stream(resp, dest, sha256, source=url)
        except urllib.error.HTTPError:
            return False
        return True

    def close(self) -> None:
        return None


def _write_stream(
    stream: Any, dest: Path, sha256: str | None = None, *, source: str = ""
) -> str:
    """Copy a readable stream into `dest` atomically; returns the sha256.  With `sha256`,
    content that differs is discarded before it reaches `dest` (a checksum OSError)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if sha256 and digest.hexdigest() != sha256:
            raise _checksum_error(source or str(dest), digest.hexdigest(), sha256)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _checked_sha256(value: Any, what: str) -> str | None:
    """`value` when it is a sha256 (64 lowercase hex digits) or None; it names a cache
    folder, so anything else (from a remote catalog: `../x`) is refused."""
    if value is None or (isinstance(value, str) and _SHA256.fullmatch(value)):
        return value
    raise ValueError(f"{what}: sha256={value!r} is not 64 lowercase hex digits; the "
                     "catalog entry is corrupt or the server is not an artifact-router")


def _cached(path: Path, sha256: str) -> bool:
    """Whether the cache holds `path` with this content; a file with other bytes
    (corrupt, stale, planted) is discarded so it is fetched again."""
    try:
        if sha256_file(path)[0] == sha256:  # a regular file, not followed through a link
            return True
    except FileNotFoundError:
        return False
    except OSError:
        pass
    with contextlib.suppress(OSError):
        path.unlink()
    return False


def _checksum_error(source: str, got: str, expected: str) -> OSError:
    return OSError(f"{source}: content has sha256 {got[:12]}..., the catalog says "
                   f"{expected[:12]}...; the object changed after it was stored (another "
                   "version written to the same key?)")


def _ref(row: ArtifactRow) -> str:
    return f"{row.pipeline}/{row.run_id}/{row.step_name}/{row.name}"


# --- the client ---------------------------------------------------------------------------


class Client:
    """Where the catalog is and how to fetch files; Flow/Run use the default one.

    `url` (or ROUTER_URL) reads through the daemon's HTTP API; otherwise the catalog
    database named by the config (`config`, else ROUTER_CONFIG and the usual discovery).
    The config also gives the store settings used to download s3:// and gs:// files
    and the spool root for artifacts that were not uploaded.

    `trust_pickle=True` (or ROUTER_TRUST_PICKLE=1 when left None) lets `.data` load
    formats that run code from the file (pickle, joblib, skops, whole torch objects):
    their serializer is recorded in manifest metadata, which anyone who can write to the
    spool or publish a manifest controls, so only opt in when you trust those writers.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        config: str | os.PathLike[str] | None = None,
        database_url: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        trust_pickle: bool | None = None,
    ) -> None:
        self._config_arg = config
        self._loaded: LoadedConfig | None = None
        self._trust_pickle = trust_pickle
        self.cache_dir = Path(
            cache_dir or os.environ.get("ROUTER_CACHE_DIR")
            or Path(tempfile.gettempdir()) / f"artifact-router-cache-{os.getuid()}"
        )
        self._cache_checked = False
        self.backend: _SqlBackend | _HttpBackend
        if url:
            self.backend = _HttpBackend(url)
        else:
            self.backend = _SqlBackend(database_url or self.config.config.router.database_url())
        self._store_loop = _Loop()

    @property
    def trust_pickle(self) -> bool:
        """Whether code-running formats load (read at each load: the default client
        outlives changes to the environment)."""
        if self._trust_pickle is not None:
            return self._trust_pickle
        from router.sdk import TRUST_PICKLE_ENV

        return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")

    def _cache(self) -> Path:
        """The cache dir, created 0700; refused when another user owns it or others can
        write it (a file planted there would be read back)."""
        if not self._cache_checked:
            self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = self.cache_dir.lstat()  # a symlink is refused, not followed
            if st.st_uid != os.getuid() or st.st_mode & 0o022 or not stat.S_ISDIR(st.st_mode):
                raise PermissionError(
                    f"cache dir {self.cache_dir} is not a directory (not a symlink) owned by "
                    f"this user and writable only by it (owner uid {st.st_uid}, mode "
                    f"{st.st_mode & 0o777:o}): another user could plant files in it; "
                    "remove it, or set ROUTER_CACHE_DIR / Client(cache_dir=) elsewhere"
                )
            self._cache_checked = True
        return self.cache_dir

    @property
    def config(self) -> LoadedConfig:
        if self._loaded is None:
            self._loaded = load_config(self._config_arg)
        return self._loaded

    def close(self) -> None:
        self.backend.close()
        self._store_loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading files ----------------------------------------------------------------

    def read(self, uri: str, *, sink_id: str | None = None, sha256: str | None = None) -> Path:
        """A local path holding the object at `uri` (file://, s3://, gs://).

        A `file://` URI is its own path; remote objects are downloaded once into the
        cache (by checksum when known).  Both are verified against `sha256` when given:
        another version's bytes at the same key raise a checksum OSError.
        """
        sha256 = _checked_sha256(sha256, uri)
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme == "file":
            paths = [p for p in file_uri_paths(uri) if p.is_file()]
            if not paths:
                raise FileNotFoundError(f"{uri}: no such file on this machine")
            if not sha256:
                return paths[0]
            got = ""
            for path in paths:
                if (got := sha256_file(path.resolve())[0]) == sha256:
                    return path
            raise _checksum_error(uri, got, sha256)
        if parsed.scheme not in ("s3", "gs"):
            raise ValueError(f"cannot read {uri!r}: only file://, s3:// and gs:// URIs")
        bucket, key = parsed.netloc, urllib.parse.unquote(parsed.path.lstrip("/"))
        name = os.path.basename(key) or "object"
        slot = sha256 or hashlib.sha256(uri.encode()).hexdigest()
        dest = self._cache() / slot / name
        if sha256 and _cached(dest, sha256):
            return dest
        settings = self._store_settings(parsed.scheme, bucket, sink_id)
        if parsed.scheme == "s3":
            got = self._store_loop.run(_download_s3(settings, bucket, key, dest))
        else:
            got = self._store_loop.run(_download_gcs(settings, bucket, key, dest))
        if sha256 and got != sha256:
            dest.unlink(missing_ok=True)
            raise OSError(f"{uri}: downloaded content has sha256 {got[:12]}..., the catalog "
                          f"says {sha256[:12]}...; the object changed after it was stored")
        return dest

    def _store_settings(self, scheme: str, bucket: str, sink_id: str | None) -> dict[str, Any]:
        """Settings of the store that wrote `bucket`: the location's sink first."""
        wanted = "s3" if scheme == "s3" else "gcs"
        try:
            stacks = self.config.config.stacks
        except Exception:
            return {}
        candidates = []
        if sink_id:
            for stack_name, stack in stacks.items():
                if sink_id.startswith(stack_name + "."):
                    comp = stack.component(sink_id[len(stack_name) + 1 :])
                    if comp is not None:
                        candidates.append(comp)
        for stack in stacks.values():
            candidates.extend(c for c in (stack.artifact_store, *stack.artifact_stores.values())
                              if c is not None)
        for comp in candidates:
            settings = comp.settings
            if comp.type == wanted and settings.get("bucket_name") == bucket:
                return settings
        return {}

    def local_file(self, row: ArtifactRow, file_name: str) -> Path:
        """A local path of one file of a catalogued artifact, from wherever it landed."""
        staged = next((f for f in row.files if f.get("name") == file_name), None)
        sha = _checked_sha256(staged.get("sha256") if staged else None,
                              f"files[{file_name!r}] of {_ref(row)}")
        stores = [
            loc for loc in row.locations if loc.action == "store" and loc.file_name == file_name
        ]
        stores.sort(key=lambda loc: not loc.uri.startswith("file://"))
        errors: list[str] = []
        for loc in stores:
            try:
                return self.read(loc.uri, sink_id=loc.sink_id, sha256=loc.sha256 or sha)
            except (OSError, ValueError, ImportError) as exc:
                errors.append(str(exc))
        if staged and staged.get("uri"):  # referenced by URI over MQTT, not copied
            try:
                return self.read(str(staged["uri"]), sha256=sha)
            except (OSError, ValueError, ImportError) as exc:
                errors.append(str(exc))
        dest = self._cache() / (sha or f"artifact-{row.id}") / file_name
        if sha and _cached(dest, sha):
            return dest
        try:
            if self.backend.fetch_file(row, file_name, dest, sha):
                return dest
        except OSError as exc:
            errors.append(str(exc))
        found = self._from_spool(row, staged)
        if found is not None:
            if not sha or (got := sha256_file(found.resolve())[0]) == sha:
                return found
            errors.append(str(_checksum_error(str(found), got, sha)))
        where = "; ".join(errors) or "no store location, and its spool bundle is gone"
        raise FileNotFoundError(f"file {file_name!r} of {_ref(row)} (v{row.version}): {where}")

    def _from_spool(self, row: ArtifactRow, staged: Mapping[str, Any] | None) -> Path | None:
        """A file that was not uploaded, where intake kept it (router.sources.LocalCopies)."""
        if not staged or not staged.get("path"):
            return None
        bundle = self.backend.bundles([row.event_id]).get(row.event_id)
        return LocalCopies.of(self.config.config.router).find(str(staged["path"]), bundle)


async def _download_s3(settings: Mapping[str, Any], bucket: str, key: str, dest: Path) -> str:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    style = settings.get("addressing_style", "auto")
    if style == "auto" and settings.get("endpoint_url"):
        style = "path"
    kwargs: dict[str, Any] = {
        "config": AioConfig(
            s3={"addressing_style": style},
            retries={"max_attempts": 3, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
    }
    for name in ("region", "endpoint_url", "aws_access_key_id", "aws_secret_access_key",
                 "aws_session_token"):
        if settings.get(name):
            kwargs["region_name" if name == "region" else name] = str(settings[name])
    async with get_session().create_client("s3", **kwargs) as client:
        body = (await client.get_object(Bucket=bucket, Key=key))["Body"]
        try:  # not `async with`: some aiobotocore releases yield aiohttp's response there
            return await _write_async_stream(body, dest)
        finally:
            body.close()


async def _download_gcs(settings: Mapping[str, Any], bucket: str, key: str, dest: Path) -> str:
    import aiohttp
    from gcloud.aio.storage import Storage
    from gcloud.aio.storage.storage import init_api_root

    is_dev, api_root = init_api_root(settings.get("api_root"), settings.get("emulator"))
    if settings.get("emulator") is not None:
        is_dev = bool(settings["emulator"])
    service_file = settings.get("service_file") if not is_dev else None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=not is_dev)) as http:
        storage = Storage(
            service_file=str(service_file) if service_file else None,
            session=cast(Any, http),  # typed as requests' session
            api_root=api_root,
            api_is_dev=is_dev,
        )
        stream = await storage.download_stream(bucket, key, timeout=300)
        return await _write_async_stream(stream, dest)


async def _write_async_stream(stream: Any, dest: Path) -> str:
    """Copy an async stream (`await stream.read(n)`) into `dest` atomically; its sha256."""
    digest = hashlib.sha256()
    out, tmp = await asyncio.to_thread(_open_part, dest)
    try:
        with out:
            while chunk := await stream.read(_CHUNK):
                digest.update(chunk)
                await asyncio.to_thread(out.write, chunk)
        await asyncio.to_thread(os.replace, tmp, dest)
    except BaseException:
        await asyncio.to_thread(_unlink, tmp)
        raise
    return digest.hexdigest()


def _open_part(dest: Path) -> tuple[Any, str]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=dest.parent)
    return os.fdopen(fd, "wb"), tmp


def _unlink(path: str) -> None:
    Path(path).unlink(missing_ok=True)


_clients: dict[tuple[str | None, str | None, str], Client] = {}
_clients_lock = threading.Lock()


def default_client() -> Client:
    """The client for the current ROUTER_URL / ROUTER_CONFIG / working directory."""
    key = (os.environ.get("ROUTER_URL") or None, os.environ.get("ROUTER_CONFIG") or None,
           os.getcwd())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = Client(url=key[0])
        return client


@atexit.register
def _close_clients() -> None:
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        with contextlib.suppress(Exception):
            client.close()


def read(uri: str, *, sink_id: str | None = None, sha256: str | None = None) -> Path:
    """A local path for `uri` (file:// as is; s3:// and gs:// downloaded into the cache)."""
    return default_client().read(uri, sink_id=sink_id, sha256=sha256)


# --- artifacts ----------------------------------------------------------------------------

_UNSET = object()


class ArtifactFiles(Mapping[str, Any]):
    """The files of a named artifact, file name -> loaded value (each loaded on first use)."""

    def __init__(self, artifact: DataArtifact) -> None:
        self._artifact = artifact
        self._values: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._artifact.files:
            raise KeyError(
                f"{self._artifact.name!r} has no file {name!r}; it has "
                f"{', '.join(self._artifact.files) or 'none'}"
            )
        if name not in self._values:
            self._values[name] = self._artifact.load_file(name)
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._artifact.files)

    def __len__(self) -> int:
        return len(self._artifact.files)

    def __repr__(self) -> str:
        return f"ArtifactFiles({self._artifact.name!r}: {', '.join(self._artifact.files)})"


class DataArtifact:
    """One artifact (Metaflow's DataArtifact): its data, metadata, checksum, locations,
    version and lineage.  An artifact named the same in several steps of a run (Domino
    Flows' named artifacts) is one DataArtifact whose files come from all of them."""

    def __init__(self, client: Client, parts: Sequence[ArtifactRow]) -> None:
        if not parts:
            raise ValueError("an artifact needs at least one catalog row")
        # Newest first; one row per step (a step that emitted again replaces its files).
        seen: dict[str, ArtifactRow] = {}
        for row in sorted(parts, key=lambda r: (r.created_at, r.id), reverse=True):
            seen.setdefault(row.step_name, row)
        self.parts: list[ArtifactRow] = list(seen.values())
        self._client = client
        self._data: Any = _UNSET
        self._lineage: tuple[list[ArtifactRow], list[ArtifactRow]] | None = None

    @property
    def row(self) -> ArtifactRow:
        """The newest catalog row (for one-step artifacts, the only one)."""
        return self.parts[0]

    # identity
    @property
    def id(self) -> int:
        return self.row.id

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def type(self) -> str:
        return self.row.kind

    kind = type

    @property
    def pipeline(self) -> str:
        return self.row.pipeline

    @property
    def run_id(self) -> str:
        return self.row.run_id

    @property
    def step_name(self) -> str:
        return self.row.step_name

    @property
    def steps(self) -> list[str]:
        return [p.step_name for p in self.parts]

    @property
    def ref(self) -> str:
        """Its lineage reference, `pipeline/run_id/step_name/name` (the newest step)."""
        return _ref(self.row)

    @property
    def artifact_refs(self) -> list[str]:
        return [_ref(p) for p in self.parts]

    @property
    def pathspec(self) -> str:
        return f"{self.pipeline}/{self.run_id}/{self.step_name}/{self.name}"

    # catalog facts
    @property
    def version(self) -> str:
        return self.row.version

    @property
    def created_at(self) -> float:
        return self.row.created_at

    @property
    def metadata(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in reversed(self.parts):
            merged.update(part.metadata)
        return merged

    @property
    def framework(self) -> str | None:
        return self.row.framework

    @property
    def format(self) -> str | None:
        return self.row.format

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def checksum(self) -> str | None:
        """The catalog's checksum; for files from several steps, over all of them."""
        if len(self.parts) == 1:
            return self.row.checksum
        return artifact_checksum(
            [str(f["sha256"]) for name, (_, f) in sorted(self.files.items()) if f.get("sha256")]
        )

    sha = checksum

    @property
    def files(self) -> dict[str, tuple[ArtifactRow, dict[str, Any]]]:
        """file name -> (the row it came from, its staged entry: sha256, size, type)."""
        out: dict[str, tuple[ArtifactRow, dict[str, Any]]] = {}
        for part in self.parts:  # newest first: it wins a name clash
            for entry in part.files:
                out.setdefault(str(entry.get("name")), (part, entry))
        return out

    @property
    def locations(self) -> list[LocationRow]:
        return [loc for part in self.parts for loc in part.locations]

    @property
    def uri(self) -> str | None:
        stores = [loc.uri for loc in self.locations if loc.action == "store"]
        return stores[0] if stores else None

    @property
    def values(self) -> dict[str, Any] | None:
        if all(p.values is None for p in self.parts):
            return None
        merged: dict[str, Any] = {}
        for part in reversed(self.parts):
            merged.update(part.values or {})
        return merged

    @property
    def metric_step(self) -> int | None:
        return self.row.step

    def __repr__(self) -> str:
        return (f"DataArtifact('{self.pathspec}', type={self.type}, version={self.version}, "
                f"steps={self.steps})")

    # data
    def path(self, file_name: str | None = None) -> Path:
        """A local path of one of its files (the only one when `file_name` is left out)."""
        files = self.files
        if file_name is None:
            if len(files) != 1:
                raise ValueError(f"{self.name!r} has {len(files)} files; name one of "
                                 f"{', '.join(files) or '(none)'}")
            file_name = next(iter(files))
        if file_name not in files:
            raise KeyError(f"{self.name!r} has no file {file_name!r}")
        row, _ = files[file_name]
        return self._client.local_file(row, file_name)

    def load_file(self, file_name: str) -> Any:
        from router.sdk import META_FILES, load_file

        row, _ = self.files[file_name]
        recorded = (row.metadata.get(META_FILES) or {}).get(file_name) or {}
        return load_file(self.path(file_name), recorded.get("serializer"),
                         recorded.get("python_type"), trusted=self._client.trust_pickle,
                         what=f"file {file_name!r} of artifact {_ref(row)}")

    @property
    def data(self) -> Any:
        """The artifact's value, loaded (once) as it was written.

        Metrics and parameters: their values (router.Metrics / router.Parameters).  An
        object emitted by the SDK: that object.  Named files (Domino-style artifacts,
        several files): a mapping of file name -> loaded value.  One file written by
        another emitter: its data if it is parquet/npy/json/text, else its local Path.
        Formats that can run code when loaded (pickle, joblib, ...) need the client's
        `trust_pickle` (router.sdk.UntrustedFileError otherwise; `.path()` still works).
        """
        if self._data is _UNSET:
            self._data = self._load()
        return self._data

    def _load(self) -> Any:
        from router.sdk import META_LAYOUT, Metrics, Parameters

        if self.type in ("metrics", "parameters"):
            values = self.values or {}
            if self.type == "metrics":
                return Metrics(values, name=self.name, metadata=self.row.metadata,
                               step=self.row.step, version=self.version)
            return Parameters(values, name=self.name, metadata=self.row.metadata,
                              version=self.version)
        files = self.files
        layout = self.row.metadata.get(META_LAYOUT)
        if not files:
            return self.values
        if len(files) == 1 and layout != "files":
            return self.load_file(next(iter(files)))
        return ArtifactFiles(self)

    # lineage and versions
    def _lineage_rows(self) -> tuple[list[ArtifactRow], list[ArtifactRow]]:
        if self._lineage is None:
            self._lineage = self._client.backend.lineage(self.parts)
        return self._lineage

    @property
    def input_refs(self) -> list[str]:
        return list(dict.fromkeys(r for p in self.parts for r in p.inputs))

    @property
    def inputs(self) -> list[DataArtifact]:
        """The catalogued artifacts this one was made from (its manifest's `inputs`)."""
        return [DataArtifact(self._client, [r]) for r in self._lineage_rows()[0]]

    @property
    def consumers(self) -> list[DataArtifact]:
        """The artifacts whose manifests name this one among their inputs."""
        return [DataArtifact(self._client, [r]) for r in self._lineage_rows()[1]]

    def versions(self) -> list[DataArtifact]:
        """Every catalogued version of this artifact in its pipeline, newest first."""
        rows = self._client.backend.artifacts(pipeline=self.pipeline, name=self.name)
        return [DataArtifact(self._client, [r]) for r in rows]


def _attr_key(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


class DataView:
    """Attribute and item access to artifacts' values: `view.model`, `view["My Model"]`.

    Names that are not identifiers are reachable as attributes with '_' for each other
    character (`view.My_Model`)."""

    def __init__(self, artifacts: Mapping[str, DataArtifact]) -> None:
        self._artifacts = dict(artifacts)

    def _lookup(self, name: str) -> DataArtifact | None:
        if name in self._artifacts:
            return self._artifacts[name]
        matches = [a for n, a in self._artifacts.items() if _attr_key(n) == name]
        return matches[0] if len(matches) == 1 else None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        found = self._lookup(name)
        if found is None:
            raise AttributeError(
                f"no artifact {name!r}; there are: {', '.join(self._artifacts) or 'none'}"
            )
        return found.data

    def __getitem__(self, name: str) -> Any:
        found = self._lookup(name)
        if found is None:
            raise KeyError(name)
        return found.data

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._artifacts)

    def __len__(self) -> int:
        return len(self._artifacts)

    def keys(self) -> list[str]:
        return list(self._artifacts)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *(_attr_key(n) for n in self._artifacts)})

    def __repr__(self) -> str:
        return f"<DataView: {', '.join(self._artifacts)}>"


def _group(client: Client, rows: Iterable[ArtifactRow]) -> dict[str, DataArtifact]:
    """Rows -> one DataArtifact per name (files of one named artifact from any step)."""
    by_name: dict[str, list[ArtifactRow]] = {}
    for row in sorted(rows, key=lambda r: (r.created_at, r.id)):
        by_name.setdefault(row.name, []).append(row)
    return {name: DataArtifact(client, parts) for name, parts in by_name.items()}


# --- Flow / Run / Step ------------------------------------------------------------------


class Step:
    """One step of a run: `run["train"].data.model`, `run["train"]["model"].checksum`."""

    def __init__(self, client: Client, pipeline: str, run_id: str, name: str,
                 rows: Sequence[ArtifactRow]) -> None:
        self._client = client
        self.pipeline, self.run_id, self.name = pipeline, run_id, name
        self._by_name = _group(client, rows)

    @property
    def id(self) -> str:
        return self.name

    @property
    def pathspec(self) -> str:
        return f"{self.pipeline}/{self.run_id}/{self.name}"

    @property
    def task(self) -> Step:
        """Metaflow compatibility: a step here has exactly one task, itself."""
        return self

    @property
    def artifacts(self) -> list[DataArtifact]:
        return list(self._by_name.values())

    @property
    def data(self) -> DataView:
        return DataView(self._by_name)

    @property
    def artifact_refs(self) -> list[str]:
        return [r for a in self._by_name.values() for r in a.artifact_refs]

    @property
    def created_at(self) -> float:
        return min((a.created_at for a in self._by_name.values()), default=0.0)

    def __getitem__(self, name: str) -> DataArtifact:
        try:
            return self._by_name[name]
        except KeyError:
            raise NotFound(f"step {self.pathspec} has no artifact {name!r}; it has "
                           f"{', '.join(self._by_name) or 'none'}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[DataArtifact]:
        return iter(self._by_name.values())

    def __repr__(self) -> str:
        return f"Step('{self.pathspec}')"


class Run:
    """One run of a pipeline: `Run("fraud_training/run-42")`."""

    def __init__(self, pathspec: str, *, client: Client | None = None,
                 _row: RunRow | None = None) -> None:
        parts = pathspec.split("/")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"a run's pathspec is 'pipeline/run_id', not {pathspec!r}")
        self._client = client or default_client()
        self.pipeline, self.id = parts
        row = _row or self._client.backend.run(self.pipeline, self.id)
        if row is None:
            raise NotFound(f"no run {pathspec!r} in the catalog")
        self._row = row
        self._rows: list[ArtifactRow] | None = None

    @property
    def run_id(self) -> str:
        return self.id

    @property
    def pathspec(self) -> str:
        return f"{self.pipeline}/{self.id}"

    @property
    def created_at(self) -> float:
        return self._row.created_at

    @property
    def updated_at(self) -> float:
        return self._row.updated_at

    @property
    def status(self) -> str | None:
        """finished, failed or killed once a step said the run ended; None while open."""
        return self._row.status

    @property
    def finished(self) -> bool:
        """Whether a step said the run ended, however it ended (as Metaflow's)."""
        return self._row.status is not None

    @property
    def successful(self) -> bool:
        """Whether the run ended with status finished (as Metaflow's)."""
        return self._row.status == "finished"

    @property
    def finished_at(self) -> float | None:
        return self._row.ended_at

    def _artifact_rows(self) -> list[ArtifactRow]:
        if self._rows is None:
            self._rows = self._client.backend.artifacts(pipeline=self.pipeline, run_id=self.id)
        return self._rows

    def refresh(self) -> Run:
        """Forget what was read, so the next access sees artifacts routed since."""
        self._rows = None
        return self

    def steps(self) -> list[Step]:
        """Its steps, in the order they first emitted."""
        first: dict[str, tuple[float, int]] = {}
        for r in self._artifact_rows():
            first[r.step_name] = min(first.get(r.step_name, (r.created_at, r.id)),
                                     (r.created_at, r.id))
        return [self[name] for name in sorted(first, key=first.__getitem__)]

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps())

    def __getitem__(self, step_name: str) -> Step:
        rows = [r for r in self._artifact_rows() if r.step_name == step_name]
        if not rows:
            known = sorted({r.step_name for r in self._artifact_rows()})
            raise NotFound(f"run {self.pathspec} has no step {step_name!r}; it has "
                           f"{', '.join(known) or 'none'}")
        return Step(self._client, self.pipeline, self.id, step_name, rows)

    def __contains__(self, step_name: object) -> bool:
        return any(r.step_name == step_name for r in self._artifact_rows())

    @property
    def artifacts(self) -> list[DataArtifact]:
        """Every artifact of the run, one per name (files of a named artifact gathered
        across steps)."""
        return list(_group(self._client, self._artifact_rows()).values())

    @property
    def data(self) -> DataView:
        """Every artifact's value by name, across all steps of the run."""
        return DataView(_group(self._client, self._artifact_rows()))

    @property
    def artifact_refs(self) -> list[str]:
        return [_ref(r) for r in self._artifact_rows()]

    def __repr__(self) -> str:
        return f"Run('{self.pathspec}')"


class Flow:
    """A pipeline: `Flow("fraud_training").latest_run`, `.runs()` newest first."""

    def __init__(self, name: str, *, client: Client | None = None) -> None:
        if not name or "/" in name:
            raise ValueError(f"a flow is a pipeline name, not {name!r}")
        self.name = name
        self._client = client or default_client()

    @property
    def id(self) -> str:
        return self.name

    @property
    def pathspec(self) -> str:
        return self.name

    def runs(self, limit: int = 1000) -> list[Run]:
        """Its runs, newest first."""
        rows = self._client.backend.runs(self.name, limit)
        return [Run(f"{self.name}/{r.run_id}", client=self._client, _row=r) for r in rows]

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs())

    def __getitem__(self, run_id: str) -> Run:
        return Run(f"{self.name}/{run_id}", client=self._client)

    @property
    def latest_run(self) -> Run | None:
        runs = self.runs(limit=1)
        return runs[0] if runs else None

    def __repr__(self) -> str:
        return f"Flow('{self.name}')"


# --- joins and caching ----------------------------------------------------------------------


class MergedData:
    """`merge_artifacts` result: each name -> the list of its values, one per branch."""

    def __init__(self, values: Mapping[str, list[Any]]) -> None:
        self._values = dict(values)

    def _lookup(self, name: str) -> str | None:
        if name in self._values:
            return name
        matches = [n for n in self._values if _attr_key(n) == name]
        return matches[0] if len(matches) == 1 else None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        key = self._lookup(name)
        if key is None:
            raise AttributeError(f"no merged artifact {name!r}; there are: "
                                 f"{', '.join(self._values) or 'none'}")
        return self._values[key]

    def __getitem__(self, name: str) -> Any:
        key = self._lookup(name)
        if key is None:
            raise KeyError(name)
        return self._values[key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._values)

    def items(self) -> list[tuple[str, list[Any]]]:
        return list(self._values.items())

    def __dir__(self) -> list[str]:
        return sorted({*object.__dir__(self), *(_attr_key(n) for n in self._values)})

    def __repr__(self) -> str:
        return f"<MergedData: {', '.join(f'{k}[{len(v)}]' for k, v in self._values.items())}>"


def _branch_artifacts(branch: Any) -> dict[str, DataArtifact]:
    if isinstance(branch, str | bytes):  # iterable, and each character is one too
        raise TypeError(f"cannot merge the string {branch!r}: pass the branches "
                        "themselves, e.g. merge_artifacts([run['a'], run['b']])")
    if isinstance(branch, Step | Run):
        return {a.name: a for a in branch.artifacts}
    if isinstance(branch, DataView):
        return dict(branch._artifacts)
    if isinstance(branch, DataArtifact):
        return {branch.name: branch}
    if isinstance(branch, Iterable):
        out: dict[str, DataArtifact] = {}
        for item in branch:
            out.update(_branch_artifacts(item))
        return out
    raise TypeError(f"cannot merge {type(branch).__name__}: pass Steps, Runs or DataArtifacts")


def merge_artifacts(
    inputs: Iterable[Any],
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> MergedData:
    """Gather same-named artifacts of parallel branches, as Metaflow's join step does.

    `inputs` are the branches (Steps, Runs, DataViews or DataArtifacts); the result maps
    each artifact name to the list of its values, one per branch that has it, in branch
    order: `merge_artifacts([run["a"], run["b"], run["c"]]).score -> [s_a, s_b, s_c]`.
    """
    branches = [_branch_artifacts(b) for b in inputs]
    wanted = None if include is None else set(include)
    skip = set(exclude)
    names: list[str] = []
    for branch in branches:
        names.extend(n for n in branch if n not in names)
    if wanted is not None:
        missing = wanted - set(names)
        if missing:
            raise NotFound(f"no branch has artifact(s) {', '.join(sorted(missing))}")
    merged: dict[str, list[Any]] = {}
    for name in names:
        if name in skip or (wanted is not None and name not in wanted):
            continue
        merged[name] = [b[name].data for b in branches if name in b]
    return MergedData(merged)


def cached(pipeline: str, step: str, key: str, *, client: Client | None = None) -> Step | None:
    """The artifacts an earlier run of `step` emitted with cache key `key`, or None.

    Steps record the key with `emit(..., cache_key=key)` or `@step(cache_key=...)`;
    the newest matching emission wins, from whichever run it came.
    """
    client = client or default_client()
    rows = client.backend.artifacts(pipeline=pipeline, step_name=step, cache_key=key)
    if not rows:
        return None
    newest = rows[0].event_id
    hit = [r for r in rows if r.event_id == newest]
    return Step(client, pipeline, hit[0].run_id, step, hit)

