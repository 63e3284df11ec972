"""What S3 and SageMaker errors mean for the sink contract: the vocabulary both share.

botocore raises a `ClientError` when the service answered (its code and HTTP status say
whether to retry) and other exceptions when it did not (credentials, a request botocore
refuses to send, the network). Each sink words the answered case itself; the rest reads
the same everywhere and lives here once.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from sinks.base import PermanentError, TransientError
from sinks.urls import without_userinfo

__all__ = ["THROTTLING", "TRANSIENT_CODES", "error_code", "unanswered_error"]

# Error codes worth retrying: throttling, server trouble, a transfer garbled in transit,
# and an upload the server gave up on (it is restarted from scratch on the next attempt).
THROTTLING = frozenset({
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "BandwidthLimitExceeded",
})
TRANSIENT_CODES = THROTTLING | {
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "BadDigest",
    "InvalidDigest",
    "XAmzContentSHA256Mismatch",
    "IncompleteBody",
    "NoSuchUpload",
    "RequestTimeTooSkewed",
    "OperationAborted",
    "ConditionalRequestConflict",  # a concurrent conditional write to the key: retry
}


def error_code(exc: BaseException | None) -> tuple[str, int | None, str]:
    """(error code, HTTP status, message) of a botocore ClientError; empty otherwise."""
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    error = response.get("Error") or {}
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return str(error.get("Code", "")), status, str(error.get("Message", "") or "")


def unanswered_error(exc: BaseException, doing: str, where: str) -> Exception:
    """A failure without an answer from the service (not a ClientError), in plain words.

    `doing` names the call and its object ("PutObject s3://b/k"), `where` the endpoint.
    botocore quotes the request URL in some errors: any `user:password@` in it is cut.
    """
    error = _unanswered(exc, doing, where)
    return type(error)(without_userinfo(str(error)))


def _unanswered(exc: BaseException, doing: str, where: str) -> Exception:
    from botocore.exceptions import (
        BotoCoreError,
        NoCredentialsError,
        NoRegionError,
        ParamValidationError,
        PartialCredentialsError,
    )

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return PermanentError(
            f"{doing}: no usable AWS credentials ({exc}); set aws_access_key_id and "
            "aws_secret_access_key or configure the AWS credential chain"
        )
    if isinstance(exc, NoRegionError):
        return PermanentError(
            f"{doing}: no AWS region; set `region` on the component or AWS_REGION"
        )
    if isinstance(exc, ParamValidationError):
        return PermanentError(f"{doing}: invalid request ({exc})")
    if isinstance(exc, BotoCoreError | aiohttp.ClientError | TimeoutError | ConnectionError):
        # Endpoint unreachable, connection reset, read/connect timeouts.
        return TransientError(f"{doing} at {where}: {type(exc).__name__}: {exc}")
    return TransientError(f"{doing}: unexpected {type(exc).__name__}: {exc}")
