"""The store's two most frequent S3 calls without botocore's per-request pipeline.

Through aiobotocore a 16 KiB PutObject costs about 1.7 ms of CPU on the bench machine:
parameter validation, serialisation, the endpoint rule set, a dozen event hooks and
response parsing cost three times what signing and sending the request do (0.55 ms),
and parsing a 100-key ListObjectsV2 page costs about 5 ms more. Routing many small
files is bound by that CPU. `SignedS3` builds those two requests itself (a PutObject
of a body held in memory; the keys of one ListObjectsV2 page), signs them with
botocore's own SigV4 signer and credentials, sends them on an aiohttp session of its
own, and turns an error answer into the `ClientError` botocore would have raised, so
the store treats both paths alike.

It is used where the request URL is plain to build: an `endpoint_url` with path-style
addressing (MinIO, Ceph, rclone and other S3-compatible servers). AWS's own endpoints
(virtual-hosted buckets, regional and FIPS variants) keep going through botocore.
"""

from __future__ import annotations

import asyncio
import http.client
import random
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote_plus

import aiohttp
from yarl import URL

from sinks.aws_errors import THROTTLING
from sinks.stores.files import BufferReader

__all__ = ["SignedS3"]

# put_object's keyword arguments the store uses, as the headers they become.
_HEADERS = {
    "ContentMD5": "Content-MD5",
    "IfNoneMatch": "If-None-Match",
    "ServerSideEncryption": "x-amz-server-side-encryption",
    "SSEKMSKeyId": "x-amz-server-side-encryption-aws-kms-key-id",
    "StorageClass": "x-amz-storage-class",
}
# What botocore's standard retry mode retries, besides throttling and the network.
_RETRIED_CODES = frozenset({"RequestTimeout", "RequestTimeoutException",
                            "PriorRequestNotComplete"})
_RETRIED_STATUS = frozenset({429, 500, 502, 503, 504})
_MAX_BACKOFF = 20.0  # seconds, as botocore's standard mode


class SignedS3:
    """`put_object` (bodies held in memory) and `list_objects_v2` (keys only) with
    botocore's keyword arguments, signed SigV4.

    `credentials` is botocore's (refreshable or not): each request signs with a frozen
    copy, so a refreshed session token is picked up as botocore would. Error answers
    and retries follow botocore's standard mode with `max_attempts` attempts.
    """

    def __init__(
        self, http_session: aiohttp.ClientSession, endpoint_url: str, region: str,
        credentials: Any, max_attempts: int,
    ) -> None:
        from botocore.config import Config

        self._http = http_session
        self._base = endpoint_url.rstrip("/")
        self._region = region
        self._credentials = credentials
        self._max_attempts = max_attempts
        # The Content-MD5 is signed and checked by the server: no sha256 of the payload
        # (as botocore's store path, see s3._unsigned_when_md5).
        self._context = {"client_config": Config(s3={"payload_signing_enabled": False})}

    async def put_object(
        self, *, Bucket: str, Key: str, Body: bytes | BufferReader,
        ContentLength: int | None = None, Metadata: dict[str, str] | None = None,
        **fields: str,
    ) -> dict[str, Any]:
        body = Body.view if isinstance(Body, BufferReader) else Body
        if ContentLength is not None and ContentLength != len(body):
            raise ValueError(f"ContentLength {ContentLength} but the body has {len(body)} bytes")
        headers = {_HEADERS[name]: value for name, value in fields.items()}
        for name, value in (Metadata or {}).items():
            headers[f"x-amz-meta-{name}"] = value
        url = f"{self._base}/{quote(Bucket, safe='')}/{quote(Key, safe='/~')}"
        answer, _ = await self._send("PutObject", "PUT", url, headers, body)
        return {"ETag": answer.get("ETag", ""), "VersionId": answer.get("x-amz-version-id")}

    async def list_objects_v2(
        self, *, Bucket: str, Prefix: str, MaxKeys: int, StartAfter: str | None = None,
    ) -> dict[str, Any]:
        """The keys of one page, and whether it is truncated; nothing else of the answer.

        Keys are asked for URL-encoded, as botocore does, so that any byte survives XML.
        """
        query = {"list-type": "2", "encoding-type": "url", "max-keys": str(MaxKeys),
                 "prefix": Prefix, **({"start-after": StartAfter} if StartAfter else {})}
        url = f"{self._base}/{quote(Bucket, safe='')}?" + "&".join(
            f"{name}={quote(value, safe='-_.~')}" for name, value in sorted(query.items()))
        _, payload = await self._send("ListObjectsV2", "GET", url, {}, b"")
        root = ET.fromstring(payload)
        return {
            "Contents": [{"Key": unquote_plus(key.text or "")}
                         for key in root.iterfind("{*}Contents/{*}Key")],
            "IsTruncated": root.findtext("{*}IsTruncated") == "true",
        }

    async def _send(
        self, operation: str, method: str, url: str, headers: dict[str, str],
        body: bytes | memoryview,
    ) -> tuple[Mapping[str, str], bytes]:
        """(headers, body) of a 2xx answer; otherwise the ClientError, after retries."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        attempt = 0
        while True:
            attempt += 1
            frozen = await self._frozen_credentials()
            request = AWSRequest(method, url, headers=dict(headers))
            request.context = self._context
            S3SigV4Auth(frozen, "s3", self._region).add_auth(request)
            try:
                async with self._http.request(
                    method, URL(url, encoded=True), data=None if method == "GET" else body,
                    headers=dict(request.headers.items()), skip_auto_headers=("Content-Type",),
                ) as response:
                    payload = await response.read()
                    if response.status < 300:
                        return response.headers, payload
                    error = _client_error(operation, response.status, payload)
            except (aiohttp.ClientConnectionError, TimeoutError):
                if attempt >= self._max_attempts:
                    raise
            else:
                if attempt >= self._max_attempts or not _retried(error):
                    raise error
            await asyncio.sleep(min(_MAX_BACKOFF, random.random() * 2 ** (attempt - 1)))

    async def _frozen_credentials(self) -> Any:
        from botocore.exceptions import NoCredentialsError

        if self._credentials is None:
            raise NoCredentialsError()
        frozen = self._credentials.get_frozen_credentials()
        return await frozen if asyncio.iscoroutine(frozen) else frozen


def _client_error(operation: str, status: int, payload: bytes) -> Exception:
    """The ClientError botocore raises for this answer: code and message from the XML."""
    from botocore.exceptions import ClientError

    code, message = str(status), http.client.responses.get(status, "")
    if payload:
        try:
            root = ET.fromstring(payload)
        except ET.ParseError:
            pass
        else:
            code = root.findtext("Code") or code
            message = root.findtext("Message") or message
    return ClientError(
        {"Error": {"Code": code, "Message": message},
         "ResponseMetadata": {"HTTPStatusCode": status}},
        operation,
    )


def _retried(error: Exception) -> bool:
    response: dict[str, Any] = getattr(error, "response", {})
    code = response["Error"]["Code"]
    status = response["ResponseMetadata"]["HTTPStatusCode"]
    return status in _RETRIED_STATUS or code in THROTTLING or code in _RETRIED_CODES
