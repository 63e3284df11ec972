"""`s3` artifact store: any S3-compatible object store, through aiobotocore (small puts
and listings to a path-style endpoint signed and sent directly: s3_signed.py).

Idempotency and conflicts follow the `local` store: one object per file at
`prefix/object_key(target, file)`; an object already there with the same sha256 is a
no-op; different content fails permanently unless the rule says `on_conflict:
overwrite` (replace) or `version` (a `.v<version>` suffix per artifact version).

Every object carries the file's sha256 (computed at intake) as user metadata
`sha256`. Uploads are verified by the server: a single `PutObject` with the file's
Content-MD5, or a multipart upload with a Content-MD5 per part. Those bodies are sent
as `UNSIGNED-PAYLOAD` over http too, as botocore already does over https: the signed
Content-MD5 protects them, and SigV4's payload hash would be one more sha256 of every
byte, on the event loop (`_unsigned_when_md5`). Files of at least
`multipart_threshold` bytes go up in parts of `part_size`, at most `max_concurrency`
in flight, each read from disk when its turn comes, so memory stays bounded by
`part_size * max_concurrency` whatever the file size. A multipart upload that fails
is aborted before the error propagates; one left behind by a crashed process is
aborted when the same key is next delivered. The parts read must be the file whose
sha256 was journaled: proved by its stat where the intake recorded a settled identity
(`FileIdentity`), else by hashing it again in the same pass. For such a settled file,
the MD5s of the first parts were usually taken at intake, on the core its sha256 left
idle (`router.block_digests`; the store asks for its `part_size`, from its
`multipart_threshold`, when it opens): those parts are only read, and a part the
server refuses drops them for the retry.

Deliveries come in batches (`max_batch`). Where the server does not honour
`If-None-Match` (rclone), the conflict check needs to know whether each key is taken:
a `ListObjectsV2` over the batch's key range (usually one) answers that for the whole
batch, and only keys found taken get a `HEAD` (to read their sha256). Each item still
uploads, succeeds and fails on its own. Two deliveries of one key in this process (one
batch or two) never both take it as free: each file is written under the key's claim
(claims.py), and a listing vouches only for keys nobody here wrote since it began.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import math
import os
import re
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Literal, TypeVar

import aiohttp
from pydantic import ByteSize, Field, field_validator, model_validator

import router
from router import block_digests
from router.delivery import StagedFile
from sinks.aws import AwsSettings
from sinks.aws_errors import THROTTLING, TRANSIENT_CODES, error_code, unanswered_error
from sinks.base import (
    BaseBatchSink,
    DeliveryItem,
    DeliveryResult,
    PermanentError,
    StoredObject,
    TransientError,
)
from sinks.stores.claims import KeyClaims
from sinks.stores.files import (
    HASH_CHUNK,
    BufferReader,
    FileChanged,
    MiB,
    accepted_size,
    hash_file,
    read_into,
    read_small,
    verified_digests,
)
from sinks.stores.keys import (
    checked_on_conflict,
    clean_prefix,
    file_keys,
    folder_key,
    prefixed,
    upload_result,
)
from sinks.stores.s3_signed import SignedS3
from sinks.urls import without_userinfo

__all__ = ["S3Store", "S3StoreSettings", "content_md5"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

GiB = 1024 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's floor for every part but the last
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
MAX_SINGLE_PUT = 5 * GiB
_USER_AGENT = f"artifact-router/{router.__version__}"
PROBE_KEY = ".artifact-router-probe"  # see S3Store._probe_conditional_puts
SMALL_FILE = MiB  # single puts up to this size are read whole: one thread hop, no file I/O
LIST_CALLS = 4  # listings a batch's presence check may make before its keys fall back to HEADs
LIST_PAGE_KEYS = 100  # keys per listing: parsing a page costs about what a HEAD does

_UNSUPPORTED_CODES = {"NotImplemented", "Unimplemented", "MethodNotAllowed", "501", "405"}
_MD5_ETAG = re.compile(r"[0-9a-f]{32}")
_MULTIPART_ETAG = re.compile(r"([0-9a-f]{32})-(\d+)")
# AWS says RequestTimeTooSkewed (403); rclone and some others AccessDenied with this text.
_CLOCK_SKEW = re.compile(r"difference between the request time and", re.IGNORECASE)


class S3StoreSettings(AwsSettings):
    bucket_name: str = Field(min_length=3, max_length=255)
    prefix: str = ""
    sse: Literal["AES256", "aws:kms", "aws:kms:dsse"] | None = Field(
        default=None, description="server-side encryption"
    )
    kms_key_id: str | None = None
    storage_class: str | None = None
    multipart_threshold: ByteSize = Field(default=ByteSize(64 * MiB), ge=1, le=MAX_SINGLE_PUT)
    part_size: ByteSize = Field(default=ByteSize(8 * MiB), ge=MIN_PART_SIZE, le=MAX_PART_SIZE)
    max_concurrency: int = Field(default=8, ge=1, le=64, description="parts in flight")
    max_multipart_uploads: int = Field(
        default=2, ge=1, le=64,
        description="multipart uploads at once per sink: memory stays under "
        "max_multipart_uploads x max_concurrency x part_size whatever else is in flight",
    )
    conditional_writes: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="put new objects with If-None-Match: * (one request, and an atomic "
        "conflict check) instead of a HEAD then a PUT; auto asks the server once whether "
        "it honours the condition (AWS S3, MinIO and moto do; rclone ignores it)",
    )
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto", description="auto means path style when endpoint_url is set"
    )

    _clean_prefix = field_validator("prefix")(clean_prefix)

    @model_validator(mode="after")
    def _kms_needs_sse(self) -> S3StoreSettings:
        if self.kms_key_id is not None and self.sse not in ("aws:kms", "aws:kms:dsse"):
            raise ValueError("kms_key_id needs sse: aws:kms (or aws:kms:dsse)")
        return self


def content_md5(digest: bytes) -> str:
    """The Content-MD5 header value for an MD5 digest."""
    return base64.b64encode(digest).decode("ascii")


def _router_written(head: dict[str, Any]) -> bool:
    """Objects this sink writes carry their sha256 as metadata."""
    return any(k.lower() == "sha256" for k in (head.get("Metadata") or {}))


def _multipart_etag(path: Path, part_size: int) -> str:
    """The ETag S3 gives a multipart upload of `path` in parts of `part_size`."""
    digests = []
    with open(path, "rb") as fh:
        while True:
            md5 = hashlib.md5(usedforsecurity=False)
            left = part_size
            while left and (chunk := fh.read(min(left, HASH_CHUNK))):
                md5.update(chunk)
                left -= len(chunk)
            if left == part_size:
                break
            digests.append(md5.digest())
    joined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
    return f"{joined}-{len(digests)}"


class _ObjectExists(Exception):
    """A conditional put found the key taken: look at what is there."""


@dataclass(eq=False)
class _Listing:
    """A batch's listing: keys it found free, less those written since it began."""

    free: set[str] = field(default_factory=set)
    written: set[str] = field(default_factory=set)

    def vouches(self, key: str) -> bool:
        return key in self.free and key not in self.written


class S3Store(BaseBatchSink):
    Settings = S3StoreSettings
    settings: S3StoreSettings
    # Half the default sink concurrency: two batches in flight, so one batch's slowest
    # upload never leaves the sink idle.
    max_batch: ClassVar[int] = 16

    def __init__(self, sink_id: str, settings: S3StoreSettings) -> None:
        super().__init__(sink_id, settings)
        self.bucket = settings.bucket_name
        self._client: Any = None
        self._client_lock = asyncio.Lock()
        self._stack = contextlib.AsyncExitStack()
        self._listing_unsupported = False  # ListMultipartUploads
        self._cannot_list_objects = False  # ListObjectsV2 (see _free_keys)
        self._multipart_slots = asyncio.Semaphore(settings.max_multipart_uploads)
        self._conditional: bool | None = {"always": True, "never": False}.get(
            settings.conditional_writes
        )
        self._probe_lock = asyncio.Lock()
        self._claims = KeyClaims()  # one writer per key at a time (see claims.py)
        self._signed: SignedS3 | None = None  # small puts, listings: botocore skipped
        self._wants_digests = False  # see router.block_digests

    # -- client -------------------------------------------------------------------

    async def _get_client(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                from aiobotocore.config import AioConfig
                from aiobotocore.session import get_session

                s = self.settings
                style = s.addressing_style
                if style == "auto" and s.endpoint_url:
                    style = "path"
                config = AioConfig(
                    connect_timeout=s.connect_timeout,
                    read_timeout=s.read_timeout,
                    retries={"max_attempts": s.max_attempts, "mode": "standard"},
                    s3={"addressing_style": style},
                    max_pool_connections=max(10, 2 * s.max_concurrency),
                    # We send Content-MD5 ourselves; no aws-chunked CRC trailers.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    # A fixed string: names us in server logs, and spares botocore
                    # rebuilding its component user agent for every request.
                    user_agent=_USER_AGENT,
                )
                kwargs: dict[str, Any] = {"config": config}
                if s.region:
                    kwargs["region_name"] = s.region
                if s.endpoint_url:
                    kwargs["endpoint_url"] = s.endpoint_url
                if s.aws_access_key_id and s.aws_secret_access_key:
                    kwargs["aws_access_key_id"] = s.aws_access_key_id
                    kwargs["aws_secret_access_key"] = s.aws_secret_access_key.get_secret_value()
                    if s.aws_session_token:
                        kwargs["aws_session_token"] = s.aws_session_token.get_secret_value()
                session = get_session()
                # Timestamps stay the strings the server sent: the sink reads none, and
                # botocore's dateutil parse was 60 of the 100 us each listed object cost.
                session.get_component("response_parser_factory").set_parser_defaults(
                    timestamp_parser=str
                )
                try:
                    client_cm = session.create_client("s3", **kwargs)
                    self._client = await self._stack.enter_async_context(client_cm)
                    self._client.meta.events.register(
                        "before-sign.s3",
                        functools.partial(_unsigned_when_md5, _without_payload_signing(config)),
                    )
                except Exception as exc:  # bad region / endpoint: nothing a retry fixes
                    raise PermanentError(
                        f"s3 sink {self.sink_id}: cannot create an S3 client for bucket "
                        f"{self.bucket!r}: {without_userinfo(str(exc))}"
                    ) from exc
                if s.endpoint_url and style == "path" and not _proxied(s.endpoint_url):
                    self._signed = await self._signed_requests(session, kwargs)
        return self._client

    async def _signed_requests(self, session: Any, kwargs: dict[str, Any]) -> SignedS3:
        """Small puts past botocore's pipeline (s3_signed.py), same endpoint and keys."""
        from botocore.credentials import Credentials

        s = self.settings
        if "aws_access_key_id" in kwargs:
            credentials = Credentials(
                kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"],
                kwargs.get("aws_session_token"),
            )
        else:
            credentials = await session.get_credentials()
        http_session = await self._stack.enter_async_context(aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(10, 2 * s.max_concurrency)),
            timeout=aiohttp.ClientTimeout(sock_connect=s.connect_timeout,
                                          sock_read=s.read_timeout),
            headers={"User-Agent": _USER_AGENT},
        ))
        assert s.endpoint_url is not None
        return SignedS3(http_session, s.endpoint_url, self._client.meta.region_name,
                         credentials, s.max_attempts)

    async def open(self) -> None:
        if not self._wants_digests:
            block_digests.want(*self._digest_sizes())
            self._wants_digests = True
        client = await self._get_client()
        if self.settings.conditional_writes == "auto":
            await self._conditional_puts(client)

    async def close(self) -> None:
        if self._wants_digests:
            block_digests.unwant(*self._digest_sizes())
            self._wants_digests = False
        await self._stack.aclose()
        self._client = None
        self._signed = None

    def _digest_sizes(self) -> tuple[int, int, int]:
        """The part MD5s intake may take for this store (router.block_digests): of the
        files it uploads in parts of `part_size` (see _part_size_for)."""
        part = int(self.settings.part_size)
        return part, int(self.settings.multipart_threshold), part * MAX_PARTS

    async def health(self) -> bool:
        try:
            client = await self._get_client()
            await client.head_bucket(Bucket=self.bucket)
        except Exception:
            return False
        return True

    # -- errors -------------------------------------------------------------------

    def _uri(self, key: str | None = None) -> str:
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def _where(self) -> str:
        if self.settings.endpoint_url:
            return without_userinfo(self.settings.endpoint_url)
        return (
            f"AWS region {self.settings.region}" if self.settings.region else "AWS"
        )

    def _map_error(self, exc: BaseException, action: str, key: str | None) -> Exception:
        """A botocore / aiohttp error as TransientError or PermanentError, in plain words."""
        uri = self._uri(key)
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code, status, message = error_code(exc)
            detail = f"{code or status}" + (f": {message}" if message and message != code else "")
            if code == "NoSuchBucket" or (action == "HeadBucket" and status == 404):
                return PermanentError(
                    f"bucket {self.bucket!r} does not exist at {self._where()} (NoSuchBucket) "
                    f"while trying {action} on {uri}; create it or fix bucket_name"
                )
            if code == "InvalidAccessKeyId":
                return PermanentError(
                    f"{action} {uri}: the access key id is not known to {self._where()} "
                    "(InvalidAccessKeyId); check aws_access_key_id / the AWS credential chain"
                )
            if code == "SignatureDoesNotMatch":
                return PermanentError(
                    f"{action} {uri}: the secret key does not match the access key id "
                    "(SignatureDoesNotMatch); check aws_secret_access_key"
                )
            if code == "RequestTimeTooSkewed" or _CLOCK_SKEW.search(message):
                # Before the 403 rule: AWS sends it as a 403, yet NTP (or an operator)
                # fixes the clock, and then the retry goes through.
                return TransientError(
                    f"{action} {uri}: this host's clock is too far from the server's "
                    f"({detail}); check the clock (NTP); retrying"
                )
            if code == "NoSuchUpload":
                return TransientError(
                    f"{action} {uri}: the server dropped the multipart upload (NoSuchUpload): "
                    "it refused a part (e.g. its Content-MD5 did not match) or the upload "
                    "expired; the next attempt starts a new upload"
                )
            if code in ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"):
                return TransientError(
                    f"{action} {uri}: the server refused the data as corrupted in transit "
                    f"({detail})"
                )
            if code in TRANSIENT_CODES or status == 429 or (status or 0) >= 500:
                # Codes first: some retryable ones come with a 403 status.
                kind = "throttled" if code in THROTTLING or status == 429 else "failed"
                return TransientError(f"{action} {uri} {kind} ({detail})")
            if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
                return PermanentError(
                    f"{action} {uri}: access denied ({detail}); the credentials are wrong or "
                    f"lack permission for {action} on bucket {self.bucket!r}"
                )
            if code in ("InvalidBucketName",):
                return PermanentError(f"{action} {uri}: invalid bucket name ({detail})")
            return PermanentError(f"{action} {uri} failed ({detail})")
        return unanswered_error(exc, f"{action} {uri}", self._where())

    async def _call(self, action: str, key: str | None, awaitable: Awaitable[_T]) -> _T:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await awaitable
        except (
            ClientError,
            BotoCoreError,
            aiohttp.ClientError,
            TimeoutError,
            ConnectionError,
        ) as e:
            raise self._map_error(e, action, key) from e

    # -- delivery -----------------------------------------------------------------

    async def deliver_batch(
        self, items: list[DeliveryItem]
    ) -> list[DeliveryResult | Exception]:
        client = await self._get_client()
        planned: list[list[tuple[StagedFile, Path, str]] | Exception] = []
        for item in items:
            try:
                planned.append(file_keys(item, self.settings.prefix))
            except PermanentError as exc:
                planned.append(exc)
        # Keys whose conflict check would need a HEAD: with three or more, one listing
        # tells which are free (those go straight to a PUT).
        looks = [
            key
            for item, files in zip(items, planned, strict=True)
            if not isinstance(files, Exception)
            for staged, _, key in files
            if not await self._puts_first(
                client, item.params.get("on_conflict", "fail"), item.attempt > 1, staged.size)
        ]
        with self._claims.watch() as written:
            # Watched from before the listing: a key this sink writes meanwhile (another
            # item of this batch, another batch) is no longer vouched for as free.
            listing = _Listing(written=written)
            if len(looks) >= 3:
                listing.free = await self._free_keys(client, looks)
            outcomes = await asyncio.gather(
                *(
                    self._deliver_item(client, item, files, listing)
                    for item, files in zip(items, planned, strict=True)
                    if not isinstance(files, Exception)
                ),
                return_exceptions=True,
            )
        results = iter(outcomes)
        out: list[DeliveryResult | Exception] = []
        for files in planned:
            outcome = files if isinstance(files, Exception) else next(results)
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome  # cancelled: the dispatcher leaves the batch in flight
            out.append(outcome)
        return out

    async def _puts_first(
        self, client: Any, on_conflict: str, retrying: bool, size: int
    ) -> bool:
        """Whether a file goes up in one request, with no look at the key first.

        On a first attempt with on_conflict: overwrite there is nothing to look at (a
        replay of a delivery cut off after its PUT is a retry, and retries look); where
        the server honours If-None-Match, a single put refuses a taken key by itself.
        Everything else looks first (replay, conflict, torn object)."""
        if on_conflict == "overwrite" and not retrying:
            return True
        single = size < self.settings.multipart_threshold or size == 0
        return single and await self._conditional_puts(client)

    async def _deliver_item(
        self, client: Any, item: DeliveryItem, files: list[tuple[StagedFile, Path, str]],
        listing: _Listing,
    ) -> DeliveryResult:
        on_conflict = checked_on_conflict(item)
        objects: list[StoredObject] = []
        unchanged: list[str] = []
        for staged, path, key in files:
            stored, same = await self._deliver_file(
                client, path, staged, key, on_conflict, retrying=item.attempt > 1,
                listing=listing,
            )
            objects.append(stored)
            if same:
                unchanged.append(staged.name)
        assert item.target is not None  # checked by file_keys
        folder = self._uri(prefixed(self.settings.prefix, folder_key(item.target)))
        return upload_result(objects, unchanged, folder, self.bucket)

    async def _free_keys(self, client: Any, keys: list[str]) -> set[str]:
        """Which of `keys` hold no object, from listings of their key range.

        Each listing starts just before the first key not yet known and reads one page
        of LIST_PAGE_KEYS: a page covers the keys up to the last one it shows (all of
        them when it is not truncated). The next listing skips ahead to the first key
        past that, so other objects crowding the range cost a page, not a walk through
        them. After LIST_CALLS listings, or when listing fails, the keys left are not
        vouched for: their delivery looks with a HEAD, as before. Keys this sink writes
        while the batch runs drop out of what the listing vouches for (_Listing);
        writers in other processes race a listing as they race a HEAD.
        """
        if self._cannot_list_objects:
            return set()
        left = sorted(set(keys))
        free: set[str] = set()
        try:
            for _ in range(LIST_CALLS):
                if not left:
                    break
                kwargs: dict[str, Any] = {
                    "Bucket": self.bucket, "MaxKeys": LIST_PAGE_KEYS,
                    # An S3 prefix is any leading string, not whole path segments.
                    "Prefix": os.path.commonprefix([left[0], left[-1]]),  # noqa: RUF071
                }
                if left[0][:-1]:
                    kwargs["StartAfter"] = left[0][:-1]  # sorts just before left[0]
                page = await (self._signed or client).list_objects_v2(**kwargs)
                contents = page.get("Contents") or []
                taken = {str(o["Key"]) for o in contents}
                covered_to = str(contents[-1]["Key"]) if page.get("IsTruncated") else left[-1]
                free.update(k for k in left if k <= covered_to and k not in taken)
                left = [k for k in left if k > covered_to]
        except Exception as exc:
            code, status, _ = error_code(exc)
            if code in _UNSUPPORTED_CODES or status in (403, 405, 501):
                self._cannot_list_objects = True
                log.info("s3 sink %s: cannot list %s (%s); a HEAD before each PUT instead",
                         self.sink_id, self._uri(), code or status)
        return free

    async def _deliver_file(
        self, client: Any, path: Path, staged: StagedFile, key: str, on_conflict: str,
        retrying: bool = False, listing: _Listing | None = None,
    ) -> tuple[StoredObject, bool]:
        """Upload one file, alone among this sink's writers of `key` (see claims.py)."""
        uri = self._uri(key)
        size = await accepted_size(path, staged, uri)

        async with self._claims.hold(key):
            # A listing found the key free and nothing wrote it since: no HEAD needed.
            free = listing is not None and listing.vouches(key)
            if await self._puts_first(client, on_conflict, retrying, size):
                blind = on_conflict == "overwrite" and not retrying
                try:
                    version_id = await self._upload(client, path, key, staged,
                                                    if_absent=not blind)
                except _ObjectExists:
                    free = False
                else:
                    return self._stored(staged, uri, size, version_id), False

            head = None if free else await self._head(client, key)
            if head is not None:
                found = await self._look(client, key, head, path, staged, on_conflict,
                                         retrying)
                if found is not None:
                    return found, True
            # Where the server honours If-None-Match, a key found free stays guarded
            # against writers in other processes (multipart: on the completion).
            guard = (head is None and on_conflict != "overwrite"
                     and await self._conditional_puts(client))
            try:
                version_id = await self._upload(client, path, key, staged, if_absent=guard)
            except _ObjectExists:
                head = await self._head(client, key)
                if head is None:
                    raise TransientError(
                        f"{uri} was created and removed by another writer while this "
                        "delivery wrote it; retrying"
                    ) from None
                found = await self._look(client, key, head, path, staged, "fail", False)
                assert found is not None  # "fail": a different object raised a conflict
                return found, True
            return self._stored(staged, uri, size, version_id), False

    async def _look(
        self, client: Any, key: str, head: dict[str, Any], path: Path, staged: StagedFile,
        on_conflict: str, retrying: bool,
    ) -> StoredObject | None:
        """What to do about the object at `key`: the stored object if it already holds
        this file, None if it is to be replaced; a conflict is a PermanentError."""
        uri = self._uri(key)
        same, existing = await self._same_content(client, key, head, path, staged.sha256)
        if same:
            version = head.get("VersionId")
            return StoredObject(
                file_name=staged.name,
                uri=uri,
                size=staged.size,
                sha256=staged.sha256,
                version_id=version if version and version != "null" else "unchanged",
            )
        if on_conflict == "overwrite":
            return None
        if retrying and await self._own_partial_write(client, key, head, path, staged.size):
            # Our own earlier attempt was cut off, and this server (unlike AWS S3) left
            # a partial object: no sha256 metadata, shorter than the file, and its bytes
            # are the file's first ones. Anything else is someone else's object.
            log.warning("s3 sink %s: replacing a partial object at %s left by an earlier "
                        "attempt", self.sink_id, uri)
            return None
        raise PermanentError(
            f"conflict: {uri} already holds different content ({existing}, this "
            f"artifact sha256 {staged.sha256}); set on_conflict: overwrite or version "
            "on the rule, or add {version} or {run_id} to its path"
        )

    async def _own_partial_write(
        self, client: Any, key: str, head: dict[str, Any], path: Path, size: int
    ) -> bool:
        """Whether the object could be a cut-off upload of `path`: written without our
        metadata, shorter than the file, and equal to its first bytes (one ranged GET)."""
        remote_size = head.get("ContentLength")
        if _router_written(head) or remote_size is None or not 0 <= remote_size < size:
            return False
        if remote_size == 0:
            return True  # created, then cut off before the first byte
        remote = await self._remote_sha256(client, key, first_bytes=remote_size)
        return remote == await asyncio.to_thread(_prefix_sha256, path, remote_size)

    async def _upload(
        self, client: Any, path: Path, key: str, staged: StagedFile, if_absent: bool = False
    ) -> Any:
        """Put the file (multipart from `multipart_threshold` on); return its version id."""
        size = staged.size
        try:
            if size >= self.settings.multipart_threshold and size > 0:
                async with self._multipart_slots:
                    return await self._put_multipart(client, path, key, staged, if_absent)
            return await self._put_single(client, path, key, staged, if_absent)
        except FileChanged as exc:
            raise PermanentError(
                f"{path} changed after it was accepted ({exc}); emit a new bundle instead of "
                "editing an accepted one"
            ) from exc
        except OSError as exc:  # the local file, not the network (those are mapped above)
            raise TransientError(f"cannot read {path}: {exc}") from exc

    @staticmethod
    def _stored(staged: StagedFile, uri: str, size: int, version_id: Any) -> StoredObject:
        return StoredObject(
            file_name=staged.name,
            uri=uri,
            size=size,
            sha256=staged.sha256,
            version_id=version_id if version_id and version_id != "null" else None,
        )

    async def _conditional_puts(self, client: Any) -> bool:
        """Whether this server honours If-None-Match on PutObject (asked once)."""
        if self._conditional is not None:
            return self._conditional
        async with self._probe_lock:
            if self._conditional is None:
                answer = await self._probe_conditional_puts(client)
                if answer is None:
                    return False  # no answer this time (server down?): ask again later
                self._conditional = answer
                log.info("s3 sink %s: conditional writes %s", self.sink_id,
                         "supported" if answer else "not honoured; HEAD before each PUT")
        return self._conditional

    async def _probe_conditional_puts(self, client: Any) -> bool | None:
        """Put a probe object, then again with If-None-Match: *; that must be refused.

        One fixed key under the prefix: a daemon killed mid-probe leaves at most that one
        object, which the next probe overwrites and removes. Pool members probing at
        once may conclude "not honoured", which only costs them a HEAD per put.
        """
        from botocore.exceptions import ClientError

        key = prefixed(self.settings.prefix, PROBE_KEY)
        try:
            await client.put_object(Bucket=self.bucket, Key=key, Body=b"")
            try:
                await client.put_object(Bucket=self.bucket, Key=key, Body=b"", IfNoneMatch="*")
            except ClientError as exc:
                return error_code(exc)[1] == 412
            return False  # the condition was ignored
        except Exception:
            return None  # the delivery itself will report what is wrong
        finally:
            await self._discard(client, key)

    async def _head(self, client: Any, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            head: dict[str, Any] = await client.head_object(Bucket=self.bucket, Key=key)
            return head
        except ClientError as exc:
            code, status, _ = error_code(exc)
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                return None
            if status == 403:
                # A HEAD answer has no body, so the reason is lost: ask again with a GET.
                raise await self._explain_forbidden(client, key, exc) from exc
            raise self._map_error(exc, "HeadObject", key) from exc
        except Exception as exc:
            raise self._map_error(exc, "HeadObject", key) from exc

    async def _explain_forbidden(self, client: Any, key: str, exc: Exception) -> Exception:
        from botocore.exceptions import ClientError

        try:
            response = await client.get_object(Bucket=self.bucket, Key=key, Range="bytes=0-0")
            response["Body"].close()
        except ClientError as probe:
            code, _, _ = error_code(probe)
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
                return self._map_error(probe, "HeadObject", key)
        except Exception:
            pass
        return self._map_error(exc, "HeadObject", key)

    async def _same_content(
        self, client: Any, key: str, head: dict[str, Any], path: Path, sha256: str
    ) -> tuple[bool, str]:
        """Whether the object at `key` holds this file, and a description of what it holds."""
        meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        if meta.get("sha256"):
            return meta["sha256"] == sha256, f"sha256 {meta['sha256']}"
        # Written by someone else (or by a server that forgot its metadata): decide from
        # size, then the ETag when it is an MD5, and only then by reading the object back.
        remote_size = head.get("ContentLength")
        if (
            remote_size is not None
            and remote_size != (await asyncio.to_thread(os.stat, path)).st_size
        ):
            return False, f"{remote_size} bytes"
        etag = str(head.get("ETag", "")).strip('"')
        encrypted = head.get("ServerSideEncryption") in ("aws:kms", "aws:kms:dsse") or bool(
            head.get("SSECustomerAlgorithm")
        )
        if not encrypted and _MD5_ETAG.fullmatch(etag):
            local = await asyncio.to_thread(hash_file, path)
            return local.md5.hex() == etag, f"md5 {etag}"
        if not encrypted and (match := _MULTIPART_ETAG.fullmatch(etag)):
            part_size = self._part_size_for(int(remote_size or 0))
            if math.ceil(int(remote_size or 0) / part_size) == int(match.group(2)):
                local_etag = await asyncio.to_thread(_multipart_etag, path, part_size)
                if local_etag == etag:
                    return True, f"etag {etag}"
        remote = await self._remote_sha256(client, key)
        return remote == sha256, f"sha256 {remote}"

    async def _remote_sha256(self, client: Any, key: str, first_bytes: int | None = None) -> str:
        """The object's sha256, read back; of its first `first_bytes` bytes if given."""
        span = {"Range": f"bytes=0-{first_bytes - 1}"} if first_bytes else {}
        response = await self._call(
            "GetObject", key, client.get_object(Bucket=self.bucket, Key=key, **span)
        )
        digest = hashlib.sha256()
        body = response["Body"]
        try:
            async for chunk in body.iter_chunks(HASH_CHUNK):
                digest.update(chunk)
        except Exception as exc:
            raise self._map_error(exc, "GetObject", key) from exc
        finally:
            body.close()
        return digest.hexdigest()

    def _extra_args(self, sha256: str) -> dict[str, Any]:
        args: dict[str, Any] = {"Metadata": {"sha256": sha256}}
        if self.settings.sse:
            args["ServerSideEncryption"] = self.settings.sse
        if self.settings.kms_key_id:
            args["SSEKMSKeyId"] = self.settings.kms_key_id
        if self.settings.storage_class:
            args["StorageClass"] = self.settings.storage_class
        return args

    def _etag_is_md5(self) -> bool:
        return self.settings.sse not in ("aws:kms", "aws:kms:dsse")

    async def _put_single(
        self, client: Any, path: Path, key: str, staged: StagedFile, if_absent: bool = False
    ) -> Any:
        """One PutObject; with `if_absent`, raise _ObjectExists if the key holds anything."""
        size, sha256 = staged.size, staged.sha256
        if size <= SMALL_FILE:
            # One thread hop reads and hashes it; the put is sent from memory.
            data, digests = await asyncio.to_thread(read_small, path, SMALL_FILE)
            if digests.sha256 != sha256 or digests.size != size:
                raise FileChanged(
                    f"sha256 now {digests.sha256[:12]}..., journaled {sha256[:12]}..."
                )
            fh: BufferReader | BinaryIO = BufferReader(data)
        else:
            # Sent from the file: a change after this check fails the Content-MD5.
            digests = await asyncio.to_thread(verified_digests, path, staged)
            fh = await asyncio.to_thread(path.open, "rb")
        # An in-memory body skips botocore where the endpoint allows (s3_signed.py).
        putter: Any = self._signed if self._signed and isinstance(fh, BufferReader) else client
        try:
            response = await self._call(
                "PutObject",
                key,
                putter.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=fh,
                    ContentLength=size,
                    ContentMD5=content_md5(digests.md5),
                    **self._extra_args(sha256),
                    **({"IfNoneMatch": "*"} if if_absent else {}),
                ),
            )
        except PermanentError as exc:
            if if_absent and error_code(exc.__cause__)[1] == 412:
                raise _ObjectExists(key) from None
            raise
        finally:
            fh.close()
        etag = str(response.get("ETag", "")).strip('"')
        if self._etag_is_md5() and _MD5_ETAG.fullmatch(etag) and etag != digests.md5.hex():
            await self._discard(client, key)
            raise TransientError(
                f"PutObject {self._uri(key)}: the server stored MD5 {etag}, the file has "
                f"{digests.md5.hex()}; the object was removed, retry"
            )
        return response.get("VersionId")

    def _part_size_for(self, size: int) -> int:
        part = int(self.settings.part_size)
        if math.ceil(size / part) > MAX_PARTS:
            # S3 allows 10,000 parts: grow the part size (in whole MiB) to fit.
            part = math.ceil(size / MAX_PARTS / MiB) * MiB
        return part

    async def _put_multipart(
        self, client: Any, path: Path, key: str, staged: StagedFile, if_absent: bool = False
    ) -> Any:
        """A multipart upload; with `if_absent`, completed with If-None-Match: * (the
        upload is then aborted and _ObjectExists raised if the key holds anything)."""
        size, sha256 = staged.size, staged.sha256
        part_size = self._part_size_for(size)
        await self._abort_stale_uploads(client, key)
        created = await self._call(
            "CreateMultipartUpload",
            key,
            client.create_multipart_upload(Bucket=self.bucket, Key=key, **self._extra_args(sha256)),
        )
        upload_id: str = created["UploadId"]
        completed = False
        try:
            parts = await self._upload_parts(client, path, key, upload_id, staged, part_size)
            try:
                response = await self._call(
                    "CompleteMultipartUpload",
                    key,
                    client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        MultipartUpload={
                            "Parts": [{"PartNumber": n, "ETag": etag} for n, etag, _ in parts]
                        },
                        **({"IfNoneMatch": "*"} if if_absent else {}),
                    ),
                )
            except PermanentError as exc:
                if if_absent and error_code(exc.__cause__)[1] == 412:
                    raise _ObjectExists(key) from None
                raise
            completed = True
        finally:
            if not completed:
                await asyncio.shield(self._abort(client, key, upload_id))
        expected = hashlib.md5(b"".join(md5 for _, _, md5 in parts), usedforsecurity=False)
        expected_etag = f"{expected.hexdigest()}-{len(parts)}"
        etag = str(response.get("ETag", "")).strip('"')
        if self._etag_is_md5() and _MULTIPART_ETAG.fullmatch(etag) and etag != expected_etag:
            await self._discard(client, key)
            raise TransientError(
                f"CompleteMultipartUpload {self._uri(key)}: the server assembled ETag {etag}, "
                f"the parts sent give {expected_etag}; the object was removed, retry"
            )
        return response.get("VersionId")

    async def _upload_parts(
        self, client: Any, path: Path, key: str, upload_id: str, staged: StagedFile,
        part_size: int,
    ) -> list[tuple[int, str, bytes]]:
        """Upload every part, reading each from disk only once a buffer is free; raise
        FileChanged if what was read is not the file journaled.

        Parts are read in order into a pool of at most `max_concurrency` part buffers,
        allocated once per upload and reused: memory is `part_size * max_concurrency`
        and does not churn the allocator. What was read is proved to be the journaled
        file by its identity (the same stat before and after, see FileIdentity) or,
        without one, by hashing it again with sha256 in the same pass.
        """
        size = staged.size
        count = max(1, math.ceil(size / part_size))
        limit = min(self.settings.max_concurrency, count)
        free: asyncio.Queue[bytearray] = asyncio.Queue()
        allocated = 0
        done: dict[int, tuple[str, bytes]] = {}
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        try:
            identity = staged.identity
            trusted = identity is not None and identity.matches(os.fstat(fd))
            whole = None if trusted else hashlib.sha256()
            # MD5s intake's companion took (router.block_digests), trusted with the stat.
            known = block_digests.lookup(identity, part_size) if trusted and identity else ()
            async with asyncio.TaskGroup() as group:
                for number in range(1, count + 1):
                    if free.empty() and allocated < limit:
                        buffer = bytearray(min(part_size, size))
                        allocated += 1
                    else:
                        buffer = await free.get()
                    offset = (number - 1) * part_size
                    length = min(part_size, size - offset)
                    md5 = await asyncio.to_thread(
                        _load_part, fd, offset, memoryview(buffer)[:length], whole,
                        known[number - 1] if number <= len(known) else None,
                    )
                    group.create_task(
                        self._send_part(
                            client, key, upload_id, number, buffer, length, md5, free, done
                        )
                    )
                    del buffer
            if identity is not None and trusted and not identity.matches(os.fstat(fd)):
                raise FileChanged("its size or times changed while it was uploaded")
        except BaseExceptionGroup as group_error:
            if known and identity is not None:  # were they the bytes? the retry hashes anew
                block_digests.forget(identity, part_size)
            raise _first_error(group_error) from None
        finally:
            os.close(fd)
        if whole is not None and (local_sha := whole.hexdigest()) != staged.sha256:
            raise FileChanged(
                f"sha256 now {local_sha[:12]}..., journaled {staged.sha256[:12]}..."
            )
        return [(n, done[n][0], done[n][1]) for n in range(1, count + 1)]

    async def _send_part(
        self,
        client: Any,
        key: str,
        upload_id: str,
        number: int,
        buffer: bytearray,
        length: int,
        md5: bytes,
        free: asyncio.Queue[bytearray],
        done: dict[int, tuple[str, bytes]],
    ) -> None:
        body = BufferReader(memoryview(buffer)[:length])
        try:
            response = await self._call(
                f"UploadPart {number}",
                key,
                client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                    ContentLength=length,
                    ContentMD5=content_md5(md5),
                ),
            )
            etag = str(response.get("ETag", "")).strip('"')
            if self._etag_is_md5() and _MD5_ETAG.fullmatch(etag) and etag != md5.hex():
                raise TransientError(
                    f"UploadPart {number} of {self._uri(key)}: the server stored MD5 {etag}, "
                    f"the part has {md5.hex()}"
                )
            done[number] = (response["ETag"], md5)
        finally:
            body.close()
            free.put_nowait(buffer)  # the next part reuses it

    async def _abort(self, client: Any, key: str, upload_id: str) -> None:
        try:
            await client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:
            code, _, _ = error_code(exc)
            if code == "NoSuchUpload":  # already failed or expired on the server side
                return
            log.warning(
                "s3 sink %s: could not abort multipart upload %s of %s (%s); it will be "
                "aborted when this key is next delivered",
                self.sink_id,
                upload_id,
                self._uri(key),
                exc,
            )

    async def _abort_stale_uploads(self, client: Any, key: str) -> None:
        """Abort multipart uploads of `key` left by an earlier attempt that died."""
        if self._listing_unsupported:
            return
        from botocore.exceptions import ClientError

        stale: list[str] = []
        try:
            paginator = client.get_paginator("list_multipart_uploads")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=key):
                stale.extend(
                    u["UploadId"] for u in page.get("Uploads") or [] if u.get("Key") == key
                )
        except ClientError as exc:
            code, status, _ = error_code(exc)
            if code == "NoSuchUpload":  # rclone's answer when there are none
                return
            if code in _UNSUPPORTED_CODES or status in (405, 501):
                self._listing_unsupported = True
                log.info("s3 sink %s: server cannot list multipart uploads", self.sink_id)
                return
            if code in ("AccessDenied", "403") or status == 403:
                log.warning(
                    "s3 sink %s: not allowed to list multipart uploads in %s; stale uploads "
                    "are left to the bucket's lifecycle rules",
                    self.sink_id,
                    self._uri(),
                )
                return
            raise self._map_error(exc, "ListMultipartUploads", key) from exc
        except Exception as exc:
            raise self._map_error(exc, "ListMultipartUploads", key) from exc
        for upload_id in stale:
            log.info("s3 sink %s: aborting stale multipart upload %s", self.sink_id, upload_id)
            await self._abort(client, key, upload_id)

    async def _discard(self, client: Any, key: str) -> None:
        with contextlib.suppress(Exception):
            await client.delete_object(Bucket=self.bucket, Key=key)


def _proxied(url: str) -> bool:
    """Whether botocore would send requests to `url` through an HTTP(S)_PROXY."""
    from botocore.utils import get_environ_proxies

    return bool(get_environ_proxies(url))


def _prefix_sha256(path: Path, length: int) -> str:
    """The sha256 of the first `length` bytes of `path` (fewer if it is shorter)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while length > 0 and (chunk := fh.read(min(length, HASH_CHUNK))):
            digest.update(chunk)
            length -= len(chunk)
    return digest.hexdigest()


def _load_part(
    fd: int, offset: int, view: memoryview, whole: Any | None, md5: bytes | None
) -> bytes:
    """Read one part into its buffer and add it to the file's sha256; return its MD5
    (`md5` if it was taken at intake)."""
    read_into(fd, offset, view)
    if whole is not None:
        whole.update(view)
    return md5 if md5 is not None else hashlib.md5(view, usedforsecurity=False).digest()


def _without_payload_signing(config: Any) -> Any:
    """`config` with SigV4 payload signing off, for requests `_unsigned_when_md5` picks."""
    from botocore.config import Config

    return config.merge(Config(s3={**(config.s3 or {}), "payload_signing_enabled": False}))


def _unsigned_when_md5(unsigned_config: Any, request: Any, **_: Any) -> None:
    """Send bodies that carry a Content-MD5 as `UNSIGNED-PAYLOAD`, over http as well.

    Over https botocore already does so for uploads with a checksum. Over plain http it
    signs the payload's sha256, reading the whole body again synchronously on the event
    loop: 5 ms per 8 MiB part here, during which no other delivery moves, on top of the
    two hashes the upload already makes (the file's sha256 and each part's MD5). The
    Content-MD5 header is itself signed and the server checks the body against it, so
    a changed body is still refused. Bodies without one (CompleteMultipartUpload's
    part list) keep their signed payload. botocore reads the choice from the request's
    client config, hence the swap for this request only.
    """
    if "Content-MD5" in request.headers:
        request.context["client_config"] = unsigned_config


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The error to report from a failed part group: the sink's own errors first."""
    flat: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            flat.append(exc)

    walk(group)
    for wanted in (PermanentError, FileChanged, TransientError):
        for exc in flat:
            if isinstance(exc, wanted):
                return exc
    return flat[0] if flat else group
