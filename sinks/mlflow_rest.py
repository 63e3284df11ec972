"""A small asyncio client for MLflow's REST API, shared by the MLflow sinks.

The `mlflow` package is not a runtime dependency: its client is synchronous and would
block the event loop, so the sinks speak the documented REST API
(`/api/2.0/mlflow/...`) through aiohttp.

Errors follow the sink contract: connection errors, timeouts, 429 and 5xx are
`TransientError` (the dispatcher retries); any other 4xx is `MlflowApiError`, a
`PermanentError` carrying MLflow's `error_code` and message.  Credentials (token,
username/password) never appear in a message, a repr or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections import OrderedDict
from typing import Any, Generic, TypeVar

import aiohttp
from pydantic import Field, SecretStr, field_validator, model_validator
from yarl import URL

from sinks.base import PermanentError, SinkSettings, TransientError

__all__ = [
    "LruCache",
    "MlflowApiError",
    "MlflowConnectionSettings",
    "MlflowRest",
    "filter_literal",
    "short_hash",
]

_MESSAGE_LIMIT = 500


class MlflowConnectionSettings(SinkSettings):
    """Where the MLflow tracking server is and how to authenticate to it."""

    tracking_uri: str = Field(description="http(s) URL of the MLflow tracking server")
    token: SecretStr | None = Field(default=None, description="sent as a Bearer token")
    username: str | None = None
    password: SecretStr | None = None
    request_timeout: float = Field(default=30.0, gt=0, description="seconds per HTTP request")

    @field_validator("tracking_uri")
    @classmethod
    def _http_only(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                "must be the http(s) URL of an MLflow tracking server, "
                "e.g. http://mlflow.internal:5000 (file: and databricks URIs are not supported)"
            )
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_auth_method(self) -> MlflowConnectionSettings:
        if self.token is not None and self.username is not None:
            raise ValueError("set either token or username/password, not both")
        if self.password is not None and self.username is None:
            raise ValueError("password needs a username")
        return self


_SERVER_BUSY = re.compile(
    r"QueuePool limit|connection timed out|database is locked|too many connections",
    re.IGNORECASE,
)


class MlflowApiError(PermanentError):
    """MLflow answered a request with a 4xx that retrying cannot fix."""

    def __init__(self, endpoint: str, status: int, error_code: str, message: str) -> None:
        self.endpoint = endpoint
        self.status = status
        self.error_code = error_code
        self.mlflow_message = message
        super().__init__(f"MLflow {endpoint} answered {status} {error_code}: {message}")


def _clean_message(text: str) -> str:
    """First line of MLflow's message, capped (SQL backends append the whole statement)."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= _MESSAGE_LIMIT else first[:_MESSAGE_LIMIT] + "..."


def filter_literal(value: str) -> str | None:
    """Quote `value` for an MLflow search filter, or None when it cannot be quoted.

    MLflow's filter grammar has no escape sequence: a value may be wrapped in single
    quotes when it holds none, or in double quotes when it holds no double quote.
    """
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


def short_hash(*parts: str, length: int = 32) -> str:
    """A stable hex digest of `parts` (NUL-separated), for tag keys and ids."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A bounded mapping so a long-lived daemon's caches do not grow with every run."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        if key not in self._data:
            return None
        self._data.move_to_end(key)
        return self._data[key]

    def put(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def pop(self, key: K) -> None:
        self._data.pop(key, None)


class MlflowRest:
    """JSON over HTTP to one tracking server; one aiohttp session per sink."""

    def __init__(self, settings: MlflowConnectionSettings) -> None:
        self.settings = settings
        url = URL(settings.tracking_uri)
        # Credentials in the URL (http://user:pass@host) become Basic auth, and are never
        # part of a message: `display` is the URL without them.
        self._url_credentials = (url.user, url.password or "") if url.user is not None else None
        self.display = str(url.with_user(None)).rstrip("/")
        self.base = f"{self.display}/api/2.0/mlflow"
        self._session: aiohttp.ClientSession | None = None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "artifact-router"}
        credentials = self._url_credentials
        if self.settings.username is not None:
            password = self.settings.password
            credentials = (self.settings.username, password.get_secret_value() if password else "")
        if self.settings.token is not None:
            headers["Authorization"] = f"Bearer {self.settings.token.get_secret_value()}"
        elif credentials is not None:
            pair = f"{credentials[0]}:{credentials[1]}".encode()
            headers["Authorization"] = f"Basic {base64.b64encode(pair).decode('ascii')}"
        return headers

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout),
            )
        return self._session

    async def get(self, endpoint: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.request("GET", endpoint, params=params)

    async def post(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", endpoint, body=body)

    async def request(
        self,
        method: str,
        endpoint: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        url = f"{self.base}/{endpoint}"
        where = f"{self.display} {endpoint}"
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        try:
            async with self._get_session().request(
                method, url, json=body, params=query or None
            ) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise TransientError(f"MLflow at {where}: {type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise TransientError(
                f"MLflow at {where}: no answer within {self.settings.request_timeout}s"
            ) from exc
        except aiohttp.InvalidURL as exc:
            raise PermanentError(f"MLflow at {where}: invalid request: {exc}") from exc

        payload: Any
        try:
            payload = json.loads(text) if text.strip() else {}
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            payload = None

        if status == 429 or status >= 500:
            detail = (
                _clean_message(str(payload.get("message", ""))) if payload else _clean_message(text)
            )
            raise TransientError(f"MLflow at {where} answered {status}: {detail}")
        if status >= 400:
            if payload is None:
                raise MlflowApiError(endpoint, status, f"HTTP_{status}", _clean_message(text))
            code = str(payload.get("error_code", f"HTTP_{status}"))
            message = _clean_message(str(payload.get("message", "")))
            if _SERVER_BUSY.search(message):
                # MLflow reports its own overload (SQLAlchemy pool timeouts, a locked
                # SQLite backend) as 400 BAD_REQUEST: nothing is wrong with the request.
                raise TransientError(f"MLflow at {where} is overloaded: {code}: {message}")
            if status in (401, 403):
                message += " (check the sink's token or username/password)"
            raise MlflowApiError(endpoint, status, code, message)
        if payload is None:
            raise PermanentError(
                f"{where} answered {status} with something that is not MLflow JSON; "
                "is tracking_uri the MLflow tracking server's base URL?"
            )
        return dict(payload)

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
            # Let the connector's transports finish closing before the loop moves on.
            await asyncio.sleep(0)
        self._session = None
