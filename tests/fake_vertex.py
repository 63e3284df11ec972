"""VertexRecordedContractFake: a FAKE of the Vertex AI REST API, not an emulator.

No Vertex AI emulator exists (DESIGN section 8), so the Vertex sinks are tested
against this recorded-contract HTTP fake: an aiohttp server implementing only the
documented v1 calls the sinks make, with request and response shapes taken from
the Vertex AI REST reference (https://cloud.google.com/vertex-ai/docs/reference/rest):

* `CONTRACT` below records, as data, each call's method, path template, required
  request fields and response shape. A request missing a required field is refused
  with 400 INVALID_ARGUMENT, an unknown resource with 404 NOT_FOUND, a taken id with
  409 ALREADY_EXISTS, a missing or unknown bearer token with 401 UNAUTHENTICATED, all
  in Google's error format `{"error": {"code", "message", "status"}}`.
* Mutations answer with a long-running `Operation` (`name`, `metadata`, `done`);
  the change happens when the operation completes, after `operation_polls`
  `operations.get` calls, and `response` then carries the documented response
  message (`UploadModelResponse`, `Endpoint`, `DeployModelResponse`).
* The OAuth2 token endpoint (`POST /token`, the JWT-bearer grant a service account
  uses) issues tokens, so gcloud-aio-auth's real token flow can be exercised.

What a fake cannot tell: whether Google's servers would accept a given container
image, machine type or artifact; whether labels, filters and traffic splits behave
in every corner as in production. Only the recorded contract is checked.

Test hooks: `fail(call, status, times=1)` makes the next calls of `call` answer
with an error (with `after=True` the call is carried out first, its answer lost: a
timeout or 5xx after Vertex accepted it); `fail_operation(call, code, message)`
makes its next operation end in a google.rpc error; `calls` records every request
(call name, path, body, query). Operations run until polled `operation_polls` times;
`advance_operations(polls)` stands for time passing on the server (a crashed
client's operation goes on without it).

Listing a resource's operations (`{model|endpoint}/operations`) returns every
operation whose name is under it, done or not, and no filter: Vertex documents the
filter only as "the standard list filter", so the sinks filter by `done` themselves.
`endpoints.create` takes the documented `endpointId` query parameter (a letter, then
up to 62 of `[a-z0-9-]` ending in a letter or digit; or up to 9 digits, no leading
zero) and answers 409 ALREADY_EXISTS for an id taken or being created.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

__all__ = ["CONTRACT", "Call", "VertexRecordedContractFake"]

_NAME = r"[^/:]+"
_PARENT = rf"v1/projects/(?P<project>{_NAME})/locations/(?P<location>{_NAME})"

# The recorded contract: (call, HTTP method, path pattern, required body fields,
# response). Dotted field names are nested; "a|b" means one of them.
CONTRACT: list[dict[str, Any]] = [
    {
        "call": "models.upload",
        "method": "POST",
        "path": rf"{_PARENT}/models:upload",
        "required": [
            "model",
            "model.displayName",
            "model.containerSpec.imageUri",
        ],
        "optional": ["parentModel", "modelId", "serviceAccount"],
        "response": "Operation; response: UploadModelResponse {model, modelVersionId}",
    },
    {
        "call": "models.get",
        "method": "GET",
        "path": rf"{_PARENT}/models/(?P<model>[^/:@]+)",
        "required": [],
        "response": "Model (the default version)",
    },
    {
        "call": "models.list",
        "method": "GET",
        "path": rf"{_PARENT}/models",
        "required": [],
        "query": ["filter", "pageSize", "pageToken"],
        "response": "ListModelsResponse {models, nextPageToken}",
    },
    {
        "call": "models.listVersions",
        "method": "GET",
        "path": rf"{_PARENT}/models/(?P<model>[^/:@]+):listVersions",
        "required": [],
        "query": ["filter", "pageSize", "pageToken"],
        "response": "ListModelVersionsResponse {models, nextPageToken}",
    },
    {
        "call": "endpoints.create",
        "method": "POST",
        "path": rf"{_PARENT}/endpoints",
        "required": ["displayName"],
        "query": ["endpointId"],
        "response": "Operation; response: Endpoint",
    },
    {
        "call": "endpoints.list",
        "method": "GET",
        "path": rf"{_PARENT}/endpoints",
        "required": [],
        "query": ["filter", "pageSize", "pageToken"],
        "response": "ListEndpointsResponse {endpoints, nextPageToken}",
    },
    {
        "call": "endpoints.get",
        "method": "GET",
        "path": rf"{_PARENT}/endpoints/(?P<endpoint>[^/:]+)",
        "required": [],
        "response": "Endpoint {name, displayName, deployedModels, trafficSplit, ...}",
    },
    {
        "call": "endpoints.deployModel",
        "method": "POST",
        "path": rf"{_PARENT}/endpoints/(?P<endpoint>[^/:]+):deployModel",
        "required": [
            "deployedModel",
            "deployedModel.model",
            "deployedModel.dedicatedResources|deployedModel.automaticResources",
        ],
        "optional": ["trafficSplit"],
        "response": "Operation; response: DeployModelResponse {deployedModel}",
    },
    {
        "call": "models.operations.list",
        "method": "GET",
        "path": rf"{_PARENT}/models/(?P<model>[^/:@]+)/operations",
        "required": [],
        "query": ["filter", "pageSize", "pageToken"],
        "response": "ListOperationsResponse {operations, nextPageToken}",
    },
    {
        "call": "endpoints.operations.list",
        "method": "GET",
        "path": rf"{_PARENT}/endpoints/(?P<endpoint>[^/:]+)/operations",
        "required": [],
        "query": ["filter", "pageSize", "pageToken"],
        "response": "ListOperationsResponse {operations, nextPageToken}",
    },
    {
        "call": "operations.get",
        "method": "GET",
        "path": rf"v1/(?P<operation>projects/{_NAME}/locations/{_NAME}/.+/operations/\d+)",
        "required": [],
        "response": "Operation {name, metadata, done, error | response}",
    },
    {
        "call": "oauth2.token",
        "method": "POST",
        "path": r"token",
        "required": ["grant_type", "assertion"],
        "response": "{access_token, expires_in, token_type}",
    },
]

_ROUTES = [(re.compile(c["path"] + "$"), c) for c in CONTRACT]
_LABEL_FILTER = re.compile(
    r'labels\.(?P<key>[A-Za-z0-9_-]+)\s*=\s*(?P<value>"(?:[^"\\]|\\.)*"|\S+)$'
)
_DISPLAY_FILTER = re.compile(r'(?:display_name|displayName)\s*=\s*(?P<value>"(?:[^"\\]|\\.)*")$')
_TYPE = "type.googleapis.com/google.cloud.aiplatform.v1."
_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_RPC_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}

# google.rpc.Code of an HTTP status, for errors that end an operation.
_RPC_CODE = {400: 3, 403: 7, 404: 5, 409: 6, 429: 8, 500: 13, 503: 14}


@dataclass
class Call:
    call: str
    method: str
    path: str
    body: dict[str, Any] | None
    query: dict[str, str]


@dataclass
class _Operation:
    name: str
    call: str
    metadata_type: str
    complete: Any  # () -> response dict
    polls_left: int
    done: bool = False
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


@dataclass
class _Failure:
    status: int
    times: int
    message: str = "injected by the test"
    after: bool = False


@dataclass
class _State:
    models: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    endpoint_ids: set[str] = field(default_factory=set)  # taken, or being created
    operations: dict[str, _Operation] = field(default_factory=dict)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


def _unquote(literal: str) -> str:
    if literal.startswith('"'):
        return re.sub(r"\\(.)", r"\1", literal[1:-1])
    return literal


def _has(body: dict[str, Any], dotted: str) -> bool:
    value: Any = body
    for part in dotted.split("."):
        if not isinstance(value, dict) or value.get(part) in (None, "", [], {}):
            return False
        value = value[part]
    return True


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class VertexRecordedContractFake:
    """An aiohttp server playing Vertex AI's documented REST contract (see module doc)."""

    def __init__(
        self,
        *,
        project: str = "fake-project",
        location: str = "us-central1",
        tokens: set[str] | None = None,
        operation_polls: int = 2,
        page_size: int = 100,
    ) -> None:
        self.project = project
        self.location = location
        self.tokens = set(tokens if tokens is not None else {"test-token"})
        self.operation_polls = operation_polls
        self.page_size = page_size
        self.calls: list[Call] = []
        self.token_requests: list[dict[str, Any]] = []
        self.state = _State()
        self._failures: dict[str, _Failure] = {}
        self._operation_failures: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1000)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        host, bound_port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- test hooks ---------------------------------------------------------------

    def fail(
        self, call: str, status: int, times: int = 1, message: str = "", *, after: bool = False
    ) -> None:
        self._failures[call] = _Failure(status, times, message or "injected by the test", after)

    def advance_operations(self, polls: int = 0) -> None:
        """Time passes on the server: every running operation needs at most `polls`
        more operations.get calls (0: done now)."""
        for op in self.state.operations.values():
            if not op.done:
                op.polls_left = min(op.polls_left, polls)
                if op.polls_left <= 0:
                    self._finish(op)

    def fail_operation(self, call: str, code: int, message: str) -> None:
        self._operation_failures[call] = {"code": code, "message": message}

    def count(self, call: str) -> int:
        return sum(1 for c in self.calls if c.call == call)

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.location}"

    # -- dispatch -----------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.path.lstrip("/")
        query = {k: v for k, v in request.query.items()}
        for pattern, contract in _ROUTES:
            match = pattern.match(path)
            if match is None or request.method != contract["method"]:
                continue
            call = contract["call"]
            try:
                if call == "oauth2.token":
                    return await self._token(request)
                body = await self._body(request)
                self.calls.append(Call(call, request.method, path, body, query))
                self._authorize(request)
                failure = self._failures.get(call)
                lost: _Failure | None = None
                if failure is not None and failure.times > 0:
                    failure.times -= 1
                    if not failure.after:
                        raise _ApiError(failure.status, failure.message)
                    lost = failure
                if body is not None:
                    missing = [
                        r
                        for r in contract["required"]
                        if not any(_has(body, alt) for alt in r.split("|"))
                    ]
                    if missing:
                        raise _ApiError(
                            400, f"Required field is not set: {', '.join(missing)} ({call})"
                        )
                self._check_location(match)
                handler = getattr(self, "_" + call.replace(".", "_"))
                answer = handler(match.groupdict(), body or {}, query)
                if lost is not None:  # carried out, but the client never hears so
                    raise _ApiError(lost.status, lost.message)
                return web.json_response(answer)
            except _ApiError as exc:
                return _error(exc.status, exc.message)
        return _error(
            404, f"The requested URL /{path} was not found (not in the recorded contract)"
        )

    async def _body(self, request: web.Request) -> dict[str, Any] | None:
        if request.method != "POST":
            return None
        text = await request.text()
        try:
            body = json.loads(text or "{}")
        except ValueError as exc:
            raise _ApiError(400, f"Invalid JSON payload received. {exc}") from exc
        if not isinstance(body, dict):
            raise _ApiError(400, "Invalid JSON payload received: expected an object")
        return body

    def _authorize(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or header[7:] not in self.tokens:
            raise _ApiError(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access "
                "token, login cookie or other valid authentication credential.",
            )

    def _check_location(self, match: re.Match[str]) -> None:
        groups = match.groupdict()
        if "project" in groups and groups["project"] != self.project:
            raise _ApiError(403, f"Permission denied on project {groups['project']}")
        if "location" in groups and groups["location"] != self.location:
            raise _ApiError(400, f"Location {groups['location']} is not served by this endpoint")

    async def _token(self, request: web.Request) -> web.Response:
        form = parse_qs(await request.text())
        grant = (form.get("grant_type") or [""])[0]
        assertion = (form.get("assertion") or [""])[0]
        if grant != _JWT_BEARER or assertion.count(".") != 2:
            return web.json_response(
                {"error": "invalid_grant", "error_description": "Invalid grant or assertion"},
                status=400,
            )
        payload = assertion.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        self.token_requests.append(claims)
        token = f"ya29.fake-{len(self.token_requests)}"
        self.tokens.add(token)
        return web.json_response(
            {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}
        )

    # -- operations ---------------------------------------------------------------

    def _operation(self, resource: str, call: str, metadata: str, complete: Any) -> dict[str, Any]:
        name = f"{resource}/operations/{next(self._ids)}"
        op = _Operation(name, call, metadata, complete, self.operation_polls)
        self.state.operations[name] = op
        if op.polls_left <= 0:
            self._finish(op)
        return self._operation_json(op)

    def _finish(self, op: _Operation) -> None:
        failure = self._operation_failures.pop(op.call, None)
        if failure is not None:
            op.error = failure
        else:
            try:
                op.response = op.complete()
            except _ApiError as exc:
                op.error = {"code": _RPC_CODE.get(exc.status, 2), "message": exc.message}
        if op.error is not None and op.call == "endpoints.create":  # the id is free again
            self.state.endpoint_ids.discard(op.name.split("/operations/")[0].rsplit("/", 1)[-1])
        op.done = True

    def _operation_json(self, op: _Operation) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": op.name,
            "metadata": {
                "@type": _TYPE + op.metadata_type,
                "genericMetadata": {"createTime": _now(), "updateTime": _now()},
            },
        }
        if op.done:
            out["done"] = True
            if op.error is not None:
                out["error"] = op.error
            else:
                out["response"] = op.response
        return out

    def _list_operations(self, resource: str, query: dict[str, str]) -> dict[str, Any]:
        if (query.get("filter") or "").strip():
            raise _ApiError(400, f"Unsupported filter in this fake: {query['filter']}")
        prefix = f"{resource}/operations/"
        ops = [self._operation_json(op) for name, op in self.state.operations.items()
               if name.startswith(prefix)]
        return self._page(ops, "operations", query)

    def _models_operations_list(
        self, path: dict[str, str], body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        return self._list_operations(self._model_name(path["model"]), query)

    def _endpoints_operations_list(
        self, path: dict[str, str], body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        return self._list_operations(f"{self.parent}/endpoints/{path['endpoint']}", query)

    def _operations_get(
        self, path: dict[str, str], body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        op = self.state.operations.get(path["operation"])
        if op is None:
            raise _ApiError(404, f"Operation {path['operation']} not found")
        if not op.done:
            op.polls_left -= 1
            if op.polls_left <= 0:
                self._finish(op)
        return self._operation_json(op)

    # -- models -------------------------------------------------------------------

    def _model_name(self, model_id: str) -> str:
        return f"{self.parent}/models/{model_id}"

    def _models_upload(
        self, path: dict[str, str], body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        model = dict(body["model"])
        parent_model = body.get("parentModel")
        if parent_model:
            model_id = str(parent_model).rsplit("/", 1)[-1]
            if not str(parent_model).startswith(f"{self.parent}/models/"):
                raise _ApiError(400, f"Invalid parentModel {parent_model}")
            if model_id not in self.state.models:
                raise _ApiError(404, f"Model {parent_model} not found")
            if body.get("modelId"):
                raise _ApiError(400, "modelId cannot be set when uploading a new version")
        else:
            model_id = str(body.get("modelId") or next(self._ids))
            if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,62}", model_id):
                raise _ApiError(400, f"Invalid modelId {model_id}")
            if model_id in self.state.models:
                raise _ApiError(409, f"Model {self._model_name(model_id)} already exists")
        for key, value in (model.get("labels") or {}).items():
            if not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", key) or not re.fullmatch(
                r"[a-z0-9_-]{0,63}", str(value)
            ):
                raise _ApiError(400, f"Invalid label {key}={value}")
        name = self._model_name(model_id)

        def complete() -> dict[str, Any]:
            versions = self.state.models.setdefault(model_id, [])
            if not parent_model and versions:  # a racing upload took the id first
                raise _ApiError(409, f"Model {name} already exists")
            version_id = str(len(versions) + 1)
            versions.append(
                {
                    **model,
                    "name": name,
                    "versionId": version_id,
                    "versionAliases": ["default"] if not versions else [],
                    "createTime": _now(),
                    "versionCreateTime": _now(),
                    "versionUpdateTime": _now(),
                }
            )
            return {
                "@type": _TYPE + "UploadModelResponse",
                "model": name,
                "modelVersionId": version_id,
            }

        return self._operation(name, "models.upload", "UploadModelOperationMetadata", complete)

    def _models_get(
        self, path: dict[str, str], body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        versions = self.state.models.get(path["model"])
        if not versions:
            raise _ApiError(404, f"Model {self._model_name(path['model'])} not found")
        return next(v for v in versions if "default" in v["versionAliases"])

    def _page(self, items: list[dict[str, Any]], key: str, query: dict[str, str]) -> dict[str, Any]:
        size = min(int(query.get("pageSize") or self.page_size), self.page_size)
        start = int(query.get("pageToken") or 0)
        out: dict[str, Any] = {key: items[start : start + size]}
        if start + size < len(items):
            out["nextPageToken"] = str(start + size)
        return out

    def _label_filter(self, query: dict[str, str]) -> Any:
        text = (query.get("filter") or "").strip()
        if not text:
            return lambda item: True
        match = _LABEL_FILTER.match(text)
        if match is None:
            raise _ApiError(400, f"Unsupported filter in this fake: {text}")
        key, value = match["key"], _unquote(match["value"])
        return lambda item: (item.get("labels") or {}).get(key) == value

    def _models_list(
        self, path: dict[str, str], body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        wanted = self._label_filter(query)
        models = [self._models_get({"model": m}, {}, {}) for m in self.state.models]
        return self._page([m for m in models if wanted(m)], "models", query)

    def _models_listVersions(  # named after the documented call
        self, path: dict[str, str], body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        versions = self.state.models.get(path["model"])
        if versions is None:
            raise _ApiError(404, f"Model {self._model_name(path['model'])} not found")
        wanted = self._label_filter(query)
        return self._page([v for v in versions if wanted(v)], "models", query)

    # -- endpoints ----------------------------------------------------------------

    def _endpoints_create(
        self, path: dict[str, str], body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        endpoint_id = query.get("endpointId") or str(next(self._ids))
        if not re.fullmatch(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?|[1-9][0-9]{0,8}", endpoint_id):
            raise _ApiError(400, f"Invalid endpointId {endpoint_id}")
        if endpoint_id in self.state.endpoint_ids:
            raise _ApiError(409, f"Endpoint {endpoint_id} already exists")
        self.state.endpoint_ids.add(endpoint_id)
        name = f"{self.parent}/endpoints/{endpoint_id}"

        def complete() -> dict[str, Any]:
            endpoint = {
                "name": name,
                "displayName": body["displayName"],
                "description": body.get("description", ""),
                "labels": body.get("labels") or {},
                "deployedModels": [],
                "trafficSplit": {},
                "etag": "1",
                "createTime": _now(),
                "updateTime": _now(),
            }
            self.state.endpoints[endpoint_id] = endpoint
            return {"@type": _TYPE + "Endpoint", **endpoint}

        return self._operation(
            name, "endpoints.create", "CreateEndpointOperationMetadata", complete
        )

    def _endpoints_list(
        self, path: dict[str, str], body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        text = (query.get("filter") or "").strip()
        endpoints = list(self.state.endpoints.values())
        if text:
            match = _DISPLAY_FILTER.match(text)
            if match is None:
                raise _ApiError(400, f"Unsupported filter in this fake: {text}")
            wanted = _unquote(match["value"])
            endpoints = [e for e in endpoints if e["displayName"] == wanted]
        return self._page(endpoints, "endpoints", query)

    def _endpoints_get(
        self, path: dict[str, str], body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        endpoint = self.state.endpoints.get(path["endpoint"])
        if endpoint is None:
            raise _ApiError(404, f"Endpoint {path['endpoint']} not found")
        return endpoint

    def _endpoints_deployModel(  # named after the documented call
        self, path: dict[str, str], body: dict[str, Any], query: dict[str, str]
    ) -> dict[str, Any]:
        endpoint = self._endpoints_get(path, body, query)
        deployed = dict(body["deployedModel"])
        model_ref = str(deployed["model"])
        base, _, version = model_ref.partition("@")
        model_id = base.rsplit("/", 1)[-1]
        versions = self.state.models.get(model_id) if base.startswith(self.parent) else None
        if not versions:
            raise _ApiError(404, f"Model {base} not found")
        if version and not any(v["versionId"] == version for v in versions):
            raise _ApiError(404, f"Model version {model_ref} not found")
        version = version or next(
            v["versionId"] for v in versions if "default" in v["versionAliases"]
        )
        resources = deployed.get("dedicatedResources")
        if resources is not None:
            if not _has(resources, "machineSpec.machineType"):
                raise _ApiError(
                    400,
                    "Required field is not set: deployedModel.dedicatedResources."
                    "machineSpec.machineType",
                )
            if int(resources.get("minReplicaCount") or 0) < 1:
                raise _ApiError(400, "dedicatedResources.minReplicaCount must be at least 1")
        split = {str(k): int(v) for k, v in (body.get("trafficSplit") or {}).items()}
        known = {d["id"] for d in endpoint["deployedModels"]}
        if split:
            if sum(split.values()) != 100:
                raise _ApiError(400, "The traffic split percentages must add up to 100")
            unknown = set(split) - known - {"0"}
            if unknown:
                raise _ApiError(400, f"trafficSplit names unknown deployed models {unknown}")

        def complete() -> dict[str, Any]:
            deployed_id = str(next(self._ids))
            record = {
                **deployed,
                "id": deployed_id,
                "model": base,
                "modelVersionId": version,
                "createTime": _now(),
            }
            endpoint["deployedModels"].append(record)
            if split:  # documented: a non-empty split replaces the endpoint's split
                endpoint["trafficSplit"] = {
                    (deployed_id if k == "0" else k): v for k, v in split.items()
                }
            endpoint["etag"] = str(int(endpoint["etag"]) + 1)
            return {"@type": _TYPE + "DeployModelResponse", "deployedModel": record}

        return self._operation(
            endpoint["name"], "endpoints.deployModel", "DeployModelOperationMetadata", complete
        )


def _error(status: int, message: str) -> web.Response:
    return web.json_response(
        {
            "error": {
                "code": status,
                "message": message,
                "status": _RPC_STATUS.get(status, "UNKNOWN"),
            }
        },
        status=status,
    )
