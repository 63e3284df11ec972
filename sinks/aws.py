"""Shared pieces of the AWS sinks: the connection settings every one of them takes
(`AwsSettings`: region, endpoint, credentials, timeouts; the `s3` store's too), and for
the SageMaker sinks the aiobotocore client and the error mapping.

Both `sagemaker_model_registry` and `sagemaker_endpoint` speak to the SageMaker API
through one aiobotocore client per sink (created on first use, closed by `close()`),
and map every failure onto the sink contract the way the `s3` store does (both use
`sinks/aws_errors.py`):

* throttling (`ThrottlingException`, ...), HTTP 429 and 5xx, connection errors and
  timeouts are `TransientError`: the dispatcher retries them with backoff;
* `ValidationException`, `AccessDenied*`, unknown credentials, a request botocore
  refuses to send, and any other 4xx are `PermanentError`, carrying SageMaker's
  message and the operation that failed.

SageMaker names (model package groups, models, endpoint configs, endpoints) must
match `[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}`; `entity_name` makes one from free text,
deterministically, so a replay computes the same name.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import re
import unicodedata
from collections.abc import Awaitable
from typing import Any, Self, TypeVar

from pydantic import Field, SecretStr, field_validator, model_validator

from sinks.aws_errors import THROTTLING, TRANSIENT_CODES, error_code, unanswered_error
from sinks.base import PermanentError, SinkSettings, TransientError
from sinks.urls import reject_userinfo

__all__ = [
    "AwsSettings",
    "SageMakerClient",
    "SageMakerSettings",
    "entity_name",
    "is_already_exists",
    "is_not_found",
    "map_sagemaker_error",
    "metadata_value",
]

_T = TypeVar("_T")

ENTITY_MAX = 63
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]+")
# CustomerMetadataProperties and tag values: \p{L}\p{Z}\p{N}_.:/=+-@ (botocore's model).
_METADATA_BAD = re.compile(r"[^\w .:/=+\-@]", re.UNICODE)
_NOT_FOUND = re.compile(r"could not find|does not exist|not found", re.IGNORECASE)
_ALREADY_EXISTS = re.compile(r"already exist", re.IGNORECASE)
_IN_PROGRESS = re.compile(r"in-progress|in progress", re.IGNORECASE)
_XML_CODE = re.compile(r"<Code>([^<]*)</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
_AUTH_CODES = {
    "AccessDenied",
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "ExpiredTokenException",
    "MissingAuthenticationToken",
    "IncompleteSignature",
}
_RETRYABLE_CODES = TRANSIENT_CODES | {
    "ServiceUnavailableException",
    "InternalFailure",
    "InternalServerError",
    "ConflictException",
    "ResourceInUse",
}
_MESSAGE_LIMIT = 400


class AwsSettings(SinkSettings):
    """Where an AWS service is and how to authenticate: the S3 store and both SageMaker
    sinks take the same keys, checked the same way."""

    region: str | None = Field(
        default=None, description="AWS region; default: the AWS chain (AWS_REGION, profile)"
    )
    endpoint_url: str | None = Field(
        default=None, description="an S3-compatible server or moto_server, e.g. "
        "http://127.0.0.1:5000"
    )
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(
        default=3, ge=1, le=20, description="attempts per request inside one delivery"
    )

    @field_validator("endpoint_url")
    @classmethod
    def _no_userinfo(cls, value: str | None) -> str | None:
        # botocore signs requests itself: userinfo never authenticates, only leaks.
        return reject_userinfo(
            value, "endpoint_url",
            "remove it from the URL: AWS credentials go in aws_access_key_id and "
            "aws_secret_access_key (or the standard AWS credential chain)",
        )

    @model_validator(mode="after")
    def _credentials_pair(self) -> Self:
        if (self.aws_access_key_id is None) != (self.aws_secret_access_key is None):
            raise ValueError(
                "set both aws_access_key_id and aws_secret_access_key, or neither to use "
                "the standard AWS credential chain"
            )
        return self


class SageMakerSettings(AwsSettings):
    """Where SageMaker is and how to authenticate; shared by both SageMaker sinks."""


def entity_name(*parts: str, fallback: str = "model") -> str:
    """A SageMaker entity name (`[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}`) made from `parts`.

    Runs of other characters become one hyphen. A name longer than 63 characters is
    cut and ends with 8 hex digits of the whole name's sha256, so two long names
    that share a prefix stay distinct, and the same input always gives the same name.
    """
    text = "-".join(p for p in parts if p)
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    name = _NOT_ALNUM.sub("-", ascii_text).strip("-") or fallback
    if len(name) > ENTITY_MAX:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        name = f"{name[: ENTITY_MAX - 9].rstrip('-')}-{digest}"
    return name


def metadata_value(value: object, limit: int = 256) -> str:
    """`value` as a CustomerMetadataProperties / tag value SageMaker accepts."""
    text = _METADATA_BAD.sub("_", str(value))
    return text[:limit] or "_"


def _clean_message(message: str) -> str:
    text = message.strip()
    if text.startswith("<"):  # an HTML error page (a proxy, or moto's Werkzeug 500)
        return "the server answered with an HTML error page"
    first = text.splitlines()[0] if text else ""
    return first if len(first) <= _MESSAGE_LIMIT else first[:_MESSAGE_LIMIT] + "..."


def _code_and_message(exc: Exception) -> tuple[str, int | None, str]:
    """(error code, HTTP status, message); also from an XML body botocore could not parse."""
    code, status, message = error_code(exc)
    if message.lstrip().startswith("<"):
        found_code = _XML_CODE.search(message)
        found_message = _XML_MESSAGE.search(message)
        if found_code:
            code = html.unescape(found_code.group(1))
            message = html.unescape(found_message.group(1)) if found_message else code
    return code, status, message


def is_not_found(exc: Exception) -> bool:
    """SageMaker's answer to Describe* of something missing (a ValidationException)."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code, _, message = _code_and_message(exc)
    return code in ("ValidationException", "ResourceNotFound") and bool(_NOT_FOUND.search(message))


def is_already_exists(exc: Exception) -> bool:
    """SageMaker's answer to Create* of a name that is taken (a ValidationException)."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code, _, message = _code_and_message(exc)
    return code in ("ValidationException", "ResourceInUse") and bool(
        _ALREADY_EXISTS.search(message)
    )


def map_sagemaker_error(exc: BaseException, operation: str, what: str, where: str) -> Exception:
    """A botocore / aiohttp error as TransientError or PermanentError, in plain words."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code, status, raw = _code_and_message(exc)
        message = _clean_message(raw)
        detail = f"{code or status}" + (f": {message}" if message and message != code else "")
        if code in _AUTH_CODES or (status == 403 and code not in _RETRYABLE_CODES):
            # A retryable code can come as a 403 too (AWS's RequestTimeTooSkewed: a clock
            # that NTP fixes), so the code decides before the status.
            return PermanentError(
                f"SageMaker {operation} {what} at {where}: access denied ({detail}); the "
                "credentials are wrong or lack permission for this call"
            )
        if code == "ValidationException" and _IN_PROGRESS.search(raw):
            return TransientError(
                f"SageMaker {operation} {what}: busy with an earlier change ({detail}); retried"
            )
        if code in THROTTLING or status == 429:
            return TransientError(f"SageMaker {operation} {what} throttled ({detail})")
        if code in _RETRYABLE_CODES or (status or 0) >= 500:
            return TransientError(
                f"SageMaker {operation} {what} failed with HTTP {status} ({detail}) at {where}"
            )
        if code == "ResourceLimitExceeded":
            return PermanentError(
                f"SageMaker {operation} {what}: a SageMaker quota is exhausted ({detail}); "
                "free resources or ask AWS for a higher limit, then `artifact-router retry`"
            )
        return PermanentError(f"SageMaker {operation} {what} refused ({detail})")
    return unanswered_error(exc, f"SageMaker {operation} {what}", where)


class SageMakerClient:
    """One aiobotocore SageMaker client for a sink, created on first use."""

    def __init__(self, sink_id: str, settings: SageMakerSettings) -> None:
        self.sink_id = sink_id
        self.settings = settings
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._stack = contextlib.AsyncExitStack()

    @property
    def where(self) -> str:
        s = self.settings
        return s.endpoint_url or (f"AWS region {s.region}" if s.region else "AWS")

    async def client(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                from aiobotocore.config import AioConfig
                from aiobotocore.session import get_session

                s = self.settings
                config = AioConfig(
                    connect_timeout=s.connect_timeout,
                    read_timeout=s.read_timeout,
                    retries={"max_attempts": s.max_attempts, "mode": "standard"},
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
                try:
                    client_cm = get_session().create_client("sagemaker", **kwargs)
                    self._client = await self._stack.enter_async_context(client_cm)
                except Exception as exc:  # no region, bad endpoint: nothing a retry fixes
                    raise PermanentError(
                        f"sink {self.sink_id}: cannot create a SageMaker client for "
                        f"{self.where}: {exc}"
                    ) from exc
        return self._client

    def error(self, exc: BaseException, operation: str, what: str) -> Exception:
        return map_sagemaker_error(exc, operation, what, self.where)

    async def call(self, operation: str, what: str, awaitable: Awaitable[_T]) -> _T:
        """Await one SageMaker call, mapping its failure onto the sink contract."""
        try:
            return await awaitable
        except Exception as exc:
            raise self.error(exc, operation, what) from exc

    async def describe(
        self, operation: str, what: str, awaitable: Awaitable[dict[str, Any]]
    ) -> dict[str, Any] | None:
        """A Describe* call; None when SageMaker says the thing does not exist."""
        try:
            return await awaitable
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise self.error(exc, operation, what) from exc

    async def create(self, operation: str, what: str, awaitable: Awaitable[Any]) -> bool:
        """A Create* call; False when the name is taken already (a racing creator)."""
        try:
            await awaitable
        except Exception as exc:
            if is_already_exists(exc):
                return False
            raise self.error(exc, operation, what) from exc
        return True

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None
