"""`gcs` artifact store: Google Cloud Storage through gcloud-aio-storage.

Idempotency and conflicts follow the `local` store: one object per file at
`prefix/object_key(target, file)`; an object already there with the same sha256 is a
no-op; different content fails permanently unless the rule says `on_conflict:
overwrite` (replace) or `version` (a `.v<version>` suffix per artifact version).

Every object carries the file's sha256 as custom metadata `sha256`, and the file's
CRC32C is declared in the object resource (`crc32c`) so that GCS refuses to create an
object whose bytes do not hash to it; the CRC32C GCS reports back is checked as well.
CRC32C is what Google recommends for this (every object has one, composite ones
included), and google-crc32c takes it at memory speed: the pass over a large file
before its first byte goes up takes about 0.17 s per GiB, where an MD5 took 1.6 s.

Files below `resumable_threshold` go up in one multipart request with
gcloud-aio-storage's `Storage.upload` (which holds the body in memory: at most the
threshold). Larger files use the resumable protocol directly - gcloud-aio-storage
sends a resumable upload as one request and restarts it from byte 0 on failure -
here each `chunk_size` chunk is read from disk and sent with its Content-Range, so
memory stays at one chunk whatever the file size. The session is remembered, so the
next attempt after a dropped connection resumes from the last byte GCS persisted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import mimetypes
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import aiohttp
import google_crc32c
from pydantic import ByteSize, Field, field_validator

from router.delivery import StagedFile
from sinks.base import (
    BaseSink,
    DeliveryItem,
    DeliveryResult,
    PermanentError,
    SinkSettings,
    StoredObject,
    TransientError,
)
from sinks.stores.claims import KeyClaims
from sinks.stores.files import (
    HASH_CHUNK,
    BufferReader,
    Checksum,
    FileChanged,
    MiB,
    accepted_size,
    hash_file,
    read_into,
    verified_checksum,
)
from sinks.stores.keys import (
    checked_on_conflict,
    clean_prefix,
    file_keys,
    folder_key,
    prefixed,
    upload_result,
)
from sinks.urls import reject_userinfo, without_userinfo

__all__ = ["GCSStore", "GCSStoreSettings"]

log = logging.getLogger(__name__)

CHUNK_UNIT = 256 * 1024  # resumable chunks must be multiples of 256 KiB (but the last)
_MAX_SESSIONS = 1000  # unfinished resumable sessions remembered for resuming
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")
_CHECKSUM_REFUSAL = re.compile(r"md5|crc32c|hash|checksum", re.IGNORECASE)


class GCSStoreSettings(SinkSettings):
    bucket_name: str = Field(min_length=3, max_length=222)
    prefix: str = ""
    project_id: str | None = None
    service_file: Path | None = Field(
        default=None,
        description="service-account JSON; default: GOOGLE_APPLICATION_CREDENTIALS, "
        "gcloud's application default credentials, then the GCE metadata server",
    )
    api_root: str | None = Field(
        default=None,
        description="e.g. http://localhost:9023 for an emulator; default: "
        "STORAGE_EMULATOR_HOST when set, else https://www.googleapis.com",
    )
    emulator: bool | None = Field(
        default=None,
        description="no auth and no TLS verification; default: true when api_root or "
        "STORAGE_EMULATOR_HOST is set (as gcloud-aio-storage does)",
    )
    resumable_threshold: ByteSize = Field(default=ByteSize(8 * MiB), ge=1)
    chunk_size: ByteSize = Field(default=ByteSize(8 * MiB), ge=CHUNK_UNIT)
    timeout: float = Field(default=60.0, gt=0, description="seconds per request")
    connect_timeout: float = Field(default=10.0, gt=0)

    _clean_prefix = field_validator("prefix")(clean_prefix)

    @field_validator("api_root")
    @classmethod
    def _no_userinfo(cls, value: str | None) -> str | None:
        return reject_userinfo(
            value, "api_root",
            "remove it from the URL: GCS credentials go in service_file (or "
            "GOOGLE_APPLICATION_CREDENTIALS)",
        )

    @field_validator("chunk_size")
    @classmethod
    def _chunk_unit(cls, value: ByteSize) -> ByteSize:
        if value % CHUNK_UNIT:
            raise ValueError("chunk_size must be a multiple of 256 KiB (262144 bytes)")
        return value


class _ObjectExists(PermanentError):
    """An upload with ifGenerationMatch=0 found the key taken (412): look at it."""


# Where google-crc32c has no C build (it would warn), its pure-Python CRC32C runs at a
# few MiB/s: the MD5 (hashlib) is declared instead, as GCS checks either.
CHECKSUM_FIELD = "crc32c" if google_crc32c.implementation == "c" else "md5Hash"


@dataclass
class _Declared:
    """What an upload declares the object to be; GCS refuses an object that is not."""

    field: str  # "crc32c" (big-endian) or "md5Hash": the resource field, as GCS gives it
    value: str  # base64
    sha256: str
    size: int

    def __str__(self) -> str:
        return f"{self.size} bytes with {self.field} {self.value}"


def _declared(path: Path, staged: StagedFile) -> _Declared:
    """The file's checksum, once its bytes are known to be the journaled file's."""
    checksum: Checksum = (google_crc32c.Checksum() if CHECKSUM_FIELD == "crc32c"
                          else hashlib.md5(usedforsecurity=False))
    digest = verified_checksum(path, staged, checksum).digest()
    return _Declared(CHECKSUM_FIELD, base64.b64encode(digest).decode("ascii"),
                     staged.sha256, staged.size)


@dataclass
class _Session:
    """A resumable upload in progress, kept so the next attempt can resume it."""

    uri: str
    sha256: str
    size: int


def _read_chunk(fd: int, offset: int, view: memoryview) -> None:
    """Fill `view` with the next resumable chunk from disk (runs in a worker thread)."""
    read_into(fd, offset, view)


class GCSStore(BaseSink):
    Settings = GCSStoreSettings
    settings: GCSStoreSettings

    def __init__(self, sink_id: str, settings: GCSStoreSettings) -> None:
        super().__init__(sink_id, settings)
        self.bucket = settings.bucket_name
        self._storage: Any = None
        self._http: aiohttp.ClientSession | None = None
        self._is_dev = False
        self._api_root = ""
        self._shown_root = ""
        self._lock = asyncio.Lock()
        self._sessions: dict[str, _Session] = {}
        self._claims = KeyClaims()  # one writer per key at a time (see claims.py)

    # -- client -------------------------------------------------------------------

    async def _get_storage(self) -> Any:
        if self._storage is not None:
            return self._storage
        async with self._lock:
            if self._storage is None:
                from gcloud.aio.storage import Storage
                from gcloud.aio.storage.storage import init_api_root

                s = self.settings
                is_dev, api_root = init_api_root(s.api_root, s.emulator)
                if s.emulator is not None:
                    is_dev = s.emulator
                service_file = None
                if s.service_file is not None and not is_dev:
                    service_file = str(await asyncio.to_thread(self._check_service_file))
                http = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=not is_dev),
                    timeout=aiohttp.ClientTimeout(
                        total=None, sock_connect=s.connect_timeout, sock_read=s.timeout
                    ),
                )
                try:
                    storage = Storage(
                        service_file=service_file,
                        session=cast(Any, http),  # typed as requests' under mypy
                        api_root=api_root,
                        api_is_dev=is_dev,
                    )
                except Exception as exc:
                    await http.close()
                    raise PermanentError(
                        f"gcs sink {self.sink_id}: cannot set up GCS credentials: {exc}"
                    ) from exc
                self._http, self._is_dev, self._api_root = http, is_dev, api_root.rstrip("/")
                self._shown_root = without_userinfo(self._api_root)  # for messages
                self._storage = storage
        return self._storage

    def _check_service_file(self) -> Path:
        path = self.settings.service_file
        assert path is not None
        path = path.expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise PermanentError(f"service_file {path} does not exist") from exc
        except (OSError, ValueError) as exc:
            raise PermanentError(f"service_file {path} is not readable JSON: {exc}") from exc
        if not isinstance(data, dict) or "type" not in data:
            raise PermanentError(
                f"service_file {path} is not a Google credentials file (no 'type' field)"
            )
        return path

    async def close(self) -> None:
        storage, http = self._storage, self._http
        self._storage = self._http = None
        if storage is not None:
            await storage.close()
        if http is not None:
            await http.close()

    async def health(self) -> bool:
        try:
            storage = await self._get_storage()
            await storage.get_bucket_metadata(self.bucket, timeout=int(self.settings.timeout))
        except Exception:
            return False
        return True

    async def _auth_headers(self) -> dict[str, str]:
        if self._is_dev:
            return {}
        try:
            token = await self._storage.token.get()
        except aiohttp.ClientResponseError as exc:
            if 400 <= exc.status < 500 and exc.status not in (408, 429):
                raise PermanentError(
                    f"gcs sink {self.sink_id}: the credentials were refused when asking for "
                    f"an access token ({exc.status} {exc.message}); check service_file"
                ) from exc
            raise TransientError(f"gcs sink {self.sink_id}: token request failed: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            raise TransientError(f"gcs sink {self.sink_id}: token request failed: {exc}") from exc
        except Exception as exc:
            raise PermanentError(
                f"gcs sink {self.sink_id}: no usable Google credentials ({exc}); set "
                "service_file or GOOGLE_APPLICATION_CREDENTIALS"
            ) from exc
        return {"Authorization": f"Bearer {token}"}

    # -- errors -------------------------------------------------------------------

    def _uri(self, key: str | None = None) -> str:
        return f"gs://{self.bucket}/{key}" if key else f"gs://{self.bucket}"

    def _status_error(self, status: int, message: str, action: str, key: str | None) -> Exception:
        uri = self._uri(key)
        message = " ".join(message.split())[:500]
        if status in (401, 403):
            return PermanentError(
                f"{action} {uri}: permission denied ({status}: {message}); the credentials "
                f"are wrong or lack storage.objects permissions on bucket {self.bucket!r}"
            )
        if status == 404:
            return PermanentError(
                f"{action} {uri}: bucket {self.bucket!r} does not exist at {self._shown_root} "
                f"(404: {message}); create it or fix bucket_name"
            )
        if status == 412:  # only uploads carry a precondition (ifGenerationMatch=0)
            return _ObjectExists(f"{action} {uri}: another writer created the object first")
        if status in (408, 429) or status >= 500:
            kind = "throttled" if status == 429 else "failed"
            return TransientError(f"{action} {uri} {kind} ({status}: {message})")
        if status == 400 and _CHECKSUM_REFUSAL.search(message):
            return TransientError(
                f"{action} {uri}: GCS refused the data as corrupted in transit "
                f"({status}: {message})"
            )
        return PermanentError(f"{action} {uri} failed ({status}: {message})")

    def _map_error(self, exc: BaseException, action: str, key: str | None) -> Exception:
        if isinstance(exc, TransientError | PermanentError):
            return exc
        if isinstance(exc, aiohttp.ClientResponseError):
            return self._status_error(exc.status, exc.message, action, key)
        text = without_userinfo(str(exc))
        if isinstance(exc, aiohttp.ClientError | TimeoutError | ConnectionError):
            return TransientError(f"{action} {self._uri(key)}: {type(exc).__name__}: {text}")
        return TransientError(f"{action} {self._uri(key)}: unexpected {type(exc).__name__}: {text}")

    # -- delivery -----------------------------------------------------------------

    async def deliver(self, item: DeliveryItem) -> DeliveryResult:
        files = file_keys(item, self.settings.prefix)
        on_conflict = checked_on_conflict(item)
        await self._get_storage()
        objects: list[StoredObject] = []
        unchanged: list[str] = []
        for staged, path, key in files:
            stored, same = await self._deliver_file(path, staged, key, on_conflict)
            objects.append(stored)
            if same:
                unchanged.append(staged.name)
        assert item.target is not None  # checked by file_keys
        folder = self._uri(prefixed(self.settings.prefix, folder_key(item.target)))
        return upload_result(objects, unchanged, folder, self.bucket)

    async def _deliver_file(
        self, path: Path, staged: StagedFile, key: str, on_conflict: str
    ) -> tuple[StoredObject, bool]:
        uri = self._uri(key)
        size = await accepted_size(path, staged, uri)

        async with self._claims.hold(key):
            existing = await self._metadata(key)
            if existing is not None:
                found = await self._look(key, existing, path, staged, on_conflict)
                if found is not None:
                    return found, True
            # A key found free is created only if still free (ifGenerationMatch=0): a
            # writer in another process may have taken it since the look.
            guard = existing is None and on_conflict != "overwrite"
            try:
                resource = await self._upload(path, key, staged, guard)
            except _ObjectExists:
                existing = await self._metadata(key)
                if existing is None:
                    raise TransientError(
                        f"{uri} was created and removed by another writer while this "
                        "delivery wrote it; retrying"
                    ) from None
                found = await self._look(key, existing, path, staged, "fail")
                assert found is not None  # "fail": a different object raised a conflict
                return found, True
        stored = StoredObject(
            file_name=staged.name,
            uri=uri,
            size=size,
            sha256=staged.sha256,
            version_id=str(resource["generation"]) if resource.get("generation") else None,
        )
        return stored, False

    async def _look(
        self, key: str, existing: dict[str, Any], path: Path, staged: StagedFile,
        on_conflict: str,
    ) -> StoredObject | None:
        """The stored object if `existing` already holds this file, None if it is to be
        replaced (overwrite); a conflict is a PermanentError."""
        uri = self._uri(key)
        same, description = await self._same_content(key, existing, path, staged.sha256)
        if same:
            return StoredObject(
                file_name=staged.name,
                uri=uri,
                size=staged.size,
                sha256=staged.sha256,
                version_id=str(existing.get("generation") or "unchanged"),
            )
        if on_conflict != "overwrite":
            raise PermanentError(
                f"conflict: {uri} already holds different content ({description}, this "
                f"artifact sha256 {staged.sha256}); set on_conflict: overwrite or version "
                "on the rule, or add {version} or {run_id} to its path"
            )
        return None

    async def _upload(
        self, path: Path, key: str, staged: StagedFile, if_absent: bool
    ) -> dict[str, Any]:
        """Upload and verify the file; with `if_absent`, _ObjectExists if the key is taken.

        The CRC32C taken here is what the object is verified against, so the bytes sent
        are the ones checked to be the journaled file."""
        size = staged.size
        try:
            digests = await asyncio.to_thread(_declared, path, staged)
            if size >= self.settings.resumable_threshold:
                resource = await self._upload_resumable(path, key, digests, if_absent)
            else:
                resource = await self._upload_simple(path, key, digests, if_absent)
        except FileChanged as exc:
            self._forget_session(key)
            raise PermanentError(
                f"{path} changed after it was accepted ({exc}); emit a new bundle instead of "
                "editing an accepted one"
            ) from exc
        except OSError as exc:  # the local file (network errors are mapped before this)
            raise TransientError(f"cannot read {path}: {exc}") from exc
        await self._verify(key, resource, digests)
        return resource

    async def _metadata(self, key: str) -> dict[str, Any] | None:
        try:
            metadata: dict[str, Any] = await self._storage.download_metadata(
                self.bucket,
                key,
                headers=await self._auth_headers(),
                timeout=int(self.settings.timeout),
            )
        except aiohttp.ClientResponseError as exc:
            if exc.status == 404:  # no such object (or no such bucket: the upload says which)
                return None
            raise self._map_error(exc, "get metadata of", key) from exc
        except Exception as exc:
            raise self._map_error(exc, "get metadata of", key) from exc
        return metadata

    async def _same_content(
        self, key: str, existing: dict[str, Any], path: Path, sha256: str
    ) -> tuple[bool, str]:
        remote_sha = (existing.get("metadata") or {}).get("sha256")
        if remote_sha:
            return remote_sha == sha256, f"sha256 {remote_sha}"
        remote_size = int(existing.get("size", -1))
        if remote_size != (await asyncio.to_thread(os.stat, path)).st_size:
            return False, f"{remote_size} bytes"
        if existing.get("md5Hash"):
            local = await asyncio.to_thread(hash_file, path)
            return local.md5_b64 == existing["md5Hash"], f"md5 {existing['md5Hash']}"
        # A composite object has no MD5: read it back.
        remote = await self._remote_sha256(key)
        return remote == sha256, f"sha256 {remote}"

    async def _remote_sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        try:
            stream = await self._storage.download_stream(
                self.bucket, key, headers=await self._auth_headers()
            )
            while chunk := await stream.read(HASH_CHUNK):
                digest.update(chunk)
        except Exception as exc:
            raise self._map_error(exc, "download", key) from exc
        return digest.hexdigest()

    def _resource(self, key: str, digests: _Declared) -> dict[str, Any]:
        return {
            "name": key,
            "contentType": mimetypes.guess_type(key)[0] or "application/octet-stream",
            # GCS refuses to create the object unless its bytes hash to this.
            digests.field: digests.value,
            "metadata": {"sha256": digests.sha256},
        }

    async def _upload_simple(
        self, path: Path, key: str, digests: _Declared, if_absent: bool = False
    ) -> dict[str, Any]:
        resource = self._resource(key, digests)
        fh = await asyncio.to_thread(open, path, "rb")
        try:
            result: dict[str, Any] = await self._storage.upload(
                self.bucket,
                key,
                fh,
                content_type=resource.pop("contentType"),
                metadata=resource,
                parameters={"ifGenerationMatch": "0"} if if_absent else None,
                headers=await self._auth_headers(),
                force_resumable_upload=False,
                timeout=int(self.settings.timeout),
            )
        except Exception as exc:
            raise self._map_error(exc, "upload", key) from exc
        finally:
            fh.close()
        return result

    # -- resumable protocol ---------------------------------------------------------

    def _forget_session(self, key: str) -> None:
        self._sessions.pop(key, None)

    async def _request(
        self, method: str, url: str, action: str, key: str, **kwargs: Any
    ) -> tuple[int, Any, bytes]:
        """One raw HTTP exchange: (status, headers, body); network errors are transient."""
        assert self._http is not None
        headers = {**kwargs.pop("headers", {}), **await self._auth_headers()}
        try:
            # 308 means "resume incomplete" in this protocol, never a redirect to follow.
            async with self._http.request(
                method, url, headers=headers, allow_redirects=False, **kwargs
            ) as resp:
                body = await resp.read()
                return resp.status, resp.headers, body
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            raise self._map_error(exc, action, key) from exc

    def _raise_for(self, status: int, body: bytes, action: str, key: str) -> None:
        message = body.decode("utf-8", "replace")
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            message = json.loads(message)["error"]["message"]
        raise self._status_error(status, message, action, key)

    async def _upload_resumable(
        self, path: Path, key: str, digests: _Declared, if_absent: bool = False
    ) -> dict[str, Any]:
        session = self._sessions.get(key)
        offset = 0
        if session is not None and (session.sha256, session.size) == (
            digests.sha256,
            digests.size,
        ):
            status = await self._session_status(key, session)
            if isinstance(status, dict):
                self._forget_session(key)
                return status
            if status is None:
                session = None
            else:
                offset = status
        else:
            session = None
        if session is None:
            session = await self._start_session(key, digests, if_absent)
            while len(self._sessions) >= _MAX_SESSIONS:  # forget the oldest unfinished one
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[key] = session

        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        try:
            return await self._send_chunks(fd, key, session, offset)
        except (PermanentError, FileChanged):
            self._forget_session(key)
            await self._cancel_session(key, session)
            raise
        finally:
            os.close(fd)

    async def _start_session(self, key: str, digests: _Declared, if_absent: bool) -> _Session:
        resource = self._resource(key, digests)
        status, headers, body = await self._request(
            "POST",
            f"{self._api_root}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o",
            "start resumable upload of",
            key,
            params={"uploadType": "resumable", "name": key,
                    # GCS checks it when the session starts and when the upload completes.
                    **({"ifGenerationMatch": "0"} if if_absent else {})},
            data=json.dumps(resource).encode("utf-8"),
            headers={
                "Content-Type": "application/json; charset=UTF-8",
                "X-Upload-Content-Type": resource["contentType"],
                "X-Upload-Content-Length": str(digests.size),
            },
        )
        if status >= 400:
            self._raise_for(status, body, "start resumable upload of", key)
        location = headers.get("Location")
        if not location:
            raise TransientError(
                f"start resumable upload of {self._uri(key)}: no session URI in the answer "
                f"({status})"
            )
        return _Session(uri=location, sha256=digests.sha256, size=digests.size)

    async def _session_status(self, key: str, session: _Session) -> int | dict[str, Any] | None:
        """Bytes GCS persisted for a session, its object if complete, None if it is gone."""
        status, headers, body = await self._request(
            "PUT",
            session.uri,
            "query resumable upload of",
            key,
            headers={"Content-Range": f"bytes */{session.size}", "Content-Length": "0"},
        )
        if status == 308:
            return _persisted(headers)
        if status in (200, 201):
            done: dict[str, Any] = json.loads(body)
            return done
        if status in (404, 410) or status == 400:
            self._forget_session(key)
            return None
        self._raise_for(status, body, "query resumable upload of", key)
        return None  # pragma: no cover

    async def _send_chunks(
        self, fd: int, key: str, session: _Session, offset: int
    ) -> dict[str, Any]:
        size = session.size
        chunk_size = int(self.settings.chunk_size)
        buffer = bytearray(min(chunk_size, size))  # one chunk in memory, reused
        action = "upload"
        while True:
            length = min(chunk_size, size - offset)
            view = memoryview(buffer)[:length]
            await asyncio.to_thread(_read_chunk, fd, offset, view)
            last = offset + length - 1
            reader = BufferReader(view)  # sent in small pieces, never copied whole
            try:
                status, headers, body = await self._request(
                    "PUT",
                    session.uri,
                    action,
                    key,
                    data=reader,
                    headers={
                        "Content-Range": f"bytes {offset}-{last}/{size}",
                        "Content-Length": str(length),
                        "Content-Type": "application/octet-stream",
                    },
                )
            finally:
                reader.close()
                with contextlib.suppress(BufferError):
                    view.release()
            if status in (200, 201):
                self._forget_session(key)
                result: dict[str, Any] = json.loads(body)
                return result
            if status == 308:
                persisted = _persisted(headers)
                if persisted <= offset and length:
                    raise TransientError(
                        f"upload {self._uri(key)}: GCS persisted nothing of bytes "
                        f"{offset}-{last}; the next attempt resumes at byte {persisted}"
                    )
                offset = persisted  # GCS may keep less than was sent: resend the rest
                continue
            if status in (404, 410):  # session expired or cancelled: start over next time
                self._forget_session(key)
                raise TransientError(
                    f"upload {self._uri(key)}: the resumable session is gone ({status}); "
                    "the next attempt starts a new one"
                )
            if status == 400:  # refused data (e.g. CRC32C mismatch): the session is dead
                self._forget_session(key)
            self._raise_for(status, body, action, key)

    async def _cancel_session(self, key: str, session: _Session) -> None:
        with contextlib.suppress(Exception):
            await self._request("DELETE", session.uri, "cancel upload of", key)

    async def _verify(self, key: str, resource: dict[str, Any], digests: _Declared) -> None:
        """Check what GCS says it stored against the file."""
        reported = resource.get(digests.field)
        size = int(resource.get("size", -1))
        if (reported and reported != digests.value) or size != digests.size:
            with contextlib.suppress(Exception):
                await self._storage.delete(self.bucket, key, headers=await self._auth_headers())
            raise TransientError(
                f"upload {self._uri(key)}: GCS reports {size} bytes with {digests.field} "
                f"{reported}, the file has {digests}; the object was removed, retry"
            )


def _persisted(headers: Any) -> int:
    """The next byte to send, from a 308 answer's Range header (none: nothing kept)."""
    match = _RANGE.fullmatch(str(headers.get("Range", "")).strip())
    return int(match.group(2)) + 1 if match else 0
