"""Shared pieces of the Vertex AI sinks: settings, a REST client, long-running operations.

Both `vertex_model_registry` and `vertex_endpoint` speak Vertex AI's documented REST
API (`https://{location}-aiplatform.googleapis.com/v1/...`) through aiohttp, with
OAuth tokens from gcloud-aio-auth (`service_file`, else GOOGLE_APPLICATION_CREDENTIALS,
gcloud's application default credentials, then the GCE metadata server) or a static
`access_token`.

Errors follow the sink contract: connection errors, timeouts, 408, 429 and 5xx are
`TransientError`; any other 4xx is `VertexApiError` (a `PermanentError` carrying the
HTTP status, Google's status name such as INVALID_ARGUMENT, and the message).
Mutations answer with a long-running `Operation`; `wait` polls `operations.get`
until `done`, and maps an operation's `error` by its google.rpc code (UNAVAILABLE,
INTERNAL, ABORTED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED are transient). An
operation still running at `operation_timeout` is transient too: the sinks remember
it, and the retry resumes polling the same operation instead of starting another.
What a process remembers dies with it, so before starting a mutation the sinks also
ask Vertex (`wait_unfinished`: `{resource}/operations`, the documented
`models.operations.list` / `endpoints.operations.list`) for operations still running
on the model or endpoint, and wait for them: a replay after a crash, or after an
answer lost to a timeout or 5xx, then sees what the first attempt made.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator

from sinks.base import PermanentError, SinkSettings, TransientError
from sinks.urls import reject_userinfo

__all__ = [
    "SCOPE",
    "KeyedLocks",
    "VertexApiError",
    "VertexRest",
    "VertexSettings",
    "filter_string",
    "label_value",
    "operation_finished",
    "resource_id",
    "same_resource",
]

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
_MESSAGE_LIMIT = 500
# google.rpc.Code values worth retrying.
_TRANSIENT_RPC = {
    1: "CANCELLED",
    4: "DEADLINE_EXCEEDED",
    8: "RESOURCE_EXHAUSTED",
    10: "ABORTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
}
_LABEL_BAD = re.compile(r"[^a-z0-9_-]+")
_ID_BAD = re.compile(r"[^a-z0-9_-]+")


class VertexSettings(SinkSettings):
    """Where Vertex AI is and how to authenticate; shared by both Vertex sinks."""

    project_id: str | None = Field(
        default=None,
        description="default: the service account's project, GOOGLE_CLOUD_PROJECT, or the "
        "GCE metadata server (`project` is FlowyML's spelling)",
    )
    location: str = Field(
        default="us-central1",
        validation_alias=AliasChoices("location", "region"),
        description="Vertex AI region (`region` is accepted too)",
    )
    api_endpoint: str | None = Field(
        default=None, description="default: https://{location}-aiplatform.googleapis.com"
    )
    service_file: Path | None = Field(
        default=None, description="service-account JSON; default: application default credentials"
    )
    access_token: SecretStr | None = Field(
        default=None, description="a static OAuth token instead of service_file (tests, CI)"
    )
    request_timeout: float = Field(default=60.0, gt=0, description="seconds per HTTP request")
    operation_timeout: float = Field(
        default=1800.0, gt=0, description="seconds to wait for a long-running operation"
    )
    poll_interval: float = Field(
        default=2.0, gt=0, le=60, description="first wait between operations.get polls"
    )

    @field_validator("location")
    @classmethod
    def _location(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9-]+", value):
            raise ValueError("must be a Vertex AI region such as us-central1")
        return value

    @field_validator("api_endpoint")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(
                "must be an http(s) URL, e.g. https://us-central1-aiplatform.googleapis.com"
            )
        # aiohttp refuses URL credentials next to the bearer token: it could never work.
        value = reject_userinfo(value, "api_endpoint", "Vertex AI authenticates with "
                                "service_file or access_token")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _one_credential(self) -> VertexSettings:
        if self.service_file is not None and self.access_token is not None:
            raise ValueError("set service_file or access_token, not both")
        return self

    @property
    def base_url(self) -> str:
        if self.api_endpoint:
            return self.api_endpoint
        if self.location == "global":
            return "https://aiplatform.googleapis.com"
        return f"https://{self.location}-aiplatform.googleapis.com"


class VertexApiError(PermanentError):
    """Vertex AI refused a request with a 4xx that retrying cannot fix."""

    def __init__(self, what: str, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.api_message = message
        super().__init__(f"Vertex AI {what} answered {status} {reason}: {message}")


def operation_finished(exc: BaseException) -> bool:
    """Whether `exc` reports an operation that ended in an error (so it is not pending)."""
    return bool(getattr(exc, "operation_done", False))


class KeyedLocks:
    """One asyncio.Lock per name (a model, an endpoint): no two deliveries race on it."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def __call__(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock


def label_value(text: str, limit: int = 63) -> str:
    """A label value Vertex accepts: lowercase letters, digits, `_` and `-`."""
    return _LABEL_BAD.sub("_", text.lower())[:limit]


def resource_id(text: str, fallback: str = "model") -> str:
    """A Vertex resource id (`[a-z0-9_-]`, a letter first, at most 63 characters)."""
    ident = _ID_BAD.sub("-", text.lower()).strip("-_")
    if not ident or not ident[0].isalpha():
        ident = f"{fallback}-{ident}".rstrip("-")
    return ident[:63].rstrip("-")


def same_resource(a: str, b: str) -> bool:
    """Whether two resource names name the same thing; the API answers with the project
    number where a request may have used the project id, so compare from `locations/`."""
    return a.partition("/locations/")[2] == b.partition("/locations/")[2]


def filter_string(value: str) -> str:
    """`value` as a double-quoted string literal of a Google API list filter."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _clean(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= _MESSAGE_LIMIT else first[:_MESSAGE_LIMIT] + "..."


class VertexRest:
    """JSON over HTTPS to Vertex AI for one sink; one aiohttp session, one token source."""

    def __init__(self, sink_id: str, settings: VertexSettings) -> None:
        self.sink_id = sink_id
        self.settings = settings
        self.base = f"{settings.base_url}/v1"
        self._session: aiohttp.ClientSession | None = None
        self._token: Any = None
        self._project: str | None = settings.project_id
        self._lock = asyncio.Lock()

    # -- auth ---------------------------------------------------------------------

    async def _token_source(self) -> Any:
        if self._token is None:
            async with self._lock:
                if self._token is None:
                    from gcloud.aio.auth import Token

                    service_file = None
                    if self.settings.service_file is not None:
                        path = self.settings.service_file.expanduser()
                        if not await asyncio.to_thread(path.is_file):
                            raise PermanentError(
                                f"sink {self.sink_id}: service_file {path} does not exist"
                            )
                        service_file = str(path)
                    try:
                        self._token = Token(service_file=service_file, scopes=[SCOPE])
                    except Exception as exc:
                        raise PermanentError(
                            f"sink {self.sink_id}: cannot set up Google credentials: {exc}"
                        ) from exc
        return self._token

    async def _bearer(self) -> str:
        if self.settings.access_token is not None:
            return self.settings.access_token.get_secret_value()
        token = await self._token_source()
        try:
            # gcloud-aio-auth retries a failing token endpoint for minutes: bound it.
            value = await asyncio.wait_for(token.get(), timeout=self.settings.request_timeout)
        except Exception as exc:
            raise TransientError(
                f"sink {self.sink_id}: could not get a Google access token: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not value:
            raise PermanentError(f"sink {self.sink_id}: Google credentials gave no access token")
        return str(value)

    async def project(self) -> str:
        if self._project:
            return self._project
        found: str | None = None
        if self.settings.access_token is None:
            token = await self._token_source()
            try:
                found = await token.get_project()
            except Exception as exc:
                raise TransientError(
                    f"sink {self.sink_id}: could not look up the Google Cloud project: {exc}"
                ) from exc
        if not found:
            raise PermanentError(
                f"sink {self.sink_id}: no Google Cloud project; set project_id (or project) "
                "on the component, or GOOGLE_CLOUD_PROJECT"
            )
        self._project = found
        return found

    async def parent(self) -> str:
        return f"projects/{await self.project()}/locations/{self.settings.location}"

    # -- requests -----------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout),
                headers={"Accept": "application/json", "User-Agent": "artifact-router"},
            )
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One call; `path` is relative to /v1 (a resource name, maybe with `:verb`)."""
        url = f"{self.base}/{path}"
        headers = {"Authorization": f"Bearer {await self._bearer()}"}
        try:
            async with self._http().request(
                method, url, params=params, json=body, headers=headers
            ) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            raise TransientError(
                f"Vertex AI {what} at {self.settings.base_url}: {type(exc).__name__}: {exc}"
            ) from exc
        payload: Any = None
        if text:
            try:
                payload = json.loads(text)
            except ValueError:
                payload = None
        if status < 400:
            return payload if isinstance(payload, dict) else {}
        error = payload.get("error") if isinstance(payload, dict) else None
        reason = str((error or {}).get("status") or "")
        message = _clean(str((error or {}).get("message") or text or "no message"))
        if status in (408, 429) or status >= 500:
            kind = "throttled" if status == 429 else "failed"
            raise TransientError(
                f"Vertex AI {what} {kind}: HTTP {status} {reason}: {message}".replace("  ", " ")
            )
        if status == 409 and reason == "ABORTED":
            raise TransientError(f"Vertex AI {what}: HTTP 409 ABORTED: {message}")
        if status == 401:
            message += "; the access token is invalid or expired: check service_file / access_token"
        raise VertexApiError(what, status, reason or "ERROR", message)

    async def get_or_none(self, path: str, what: str) -> dict[str, Any] | None:
        """GET a resource; None when it does not exist (404)."""
        try:
            return await self.request("GET", path, what)
        except VertexApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def wait(self, operation: dict[str, Any], what: str) -> dict[str, Any]:
        """Poll a long-running operation until done; its `response`, or the mapped error."""
        name = str(operation.get("name") or "")
        deadline = time.monotonic() + self.settings.operation_timeout
        delay = self.settings.poll_interval
        while not operation.get("done"):
            if not name:
                raise PermanentError(f"Vertex AI {what} returned an operation without a name")
            if time.monotonic() > deadline:
                raise TransientError(
                    f"Vertex AI {what}: operation {name} still running after "
                    f"{self.settings.operation_timeout:g}s; a retry resumes waiting for it"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 30.0)
            operation = await self.request("GET", name, f"{what} (operations.get)")
        error = operation.get("error")
        if error:
            code = int(error.get("code") or 2)
            message = _clean(str(error.get("message") or "no message"))
            failed: Exception
            if code in _TRANSIENT_RPC:
                failed = TransientError(
                    f"Vertex AI {what}: operation {name} failed, {_TRANSIENT_RPC[code]}: {message}"
                )
            else:
                failed = PermanentError(
                    f"Vertex AI {what}: operation {name} failed (code {code}): {message}"
                )
            setattr(failed, "operation_done", True)  # noqa: B010 - read by operation_finished
            raise failed
        response = operation.get("response")
        return dict(response) if isinstance(response, dict) else {}

    async def wait_unfinished(self, resource: str, what: str) -> int:
        """Wait for every operation still running on `resource` (a model, an endpoint);
        how many there were.  Ones that end in an error are ignored (what they did not
        make, the caller makes); one still running at `operation_timeout` is transient.
        The list is filtered here, by `done`: Vertex documents no filter syntax for it.
        """
        params = {"pageSize": "100"}
        running: list[dict[str, Any]] = []
        while True:
            try:
                page = await self.request(
                    "GET", f"{resource}/operations", f"{what} (operations.list)", params=params
                )
            except VertexApiError as exc:
                if exc.status == 404:  # no such resource: nothing runs on it
                    return 0
                raise
            running += [op for op in page.get("operations") or [] if not op.get("done")]
            next_token = page.get("nextPageToken")
            if not next_token:
                break
            params["pageToken"] = str(next_token)
        for operation in running:
            try:
                await self.wait(operation, f"{what} (an earlier operation)")
            except Exception as exc:
                if not operation_finished(exc):
                    raise
        return len(running)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._token is not None:
            await self._token.close()
            self._token = None
