"""`vertex_endpoint` / `vertex_endpoints`: serve a model version on a Vertex AI endpoint.

Deploying the version a `vertex_model_registry` delivery registered, over the
documented REST API (`sinks.gcp`):

1. the endpoint is the one whose display name is the rule's `endpoint_name`, else
   the `endpoint_name` setting, else the artifact name: `endpoints.list` with the
   filter `display_name="<name>"` reuses it, `endpoints.create` (a long-running
   operation) makes it when there is none, with an `endpointId` derived from the
   display name (`endpoint_id`): a create cut off by a crash is found again by that
   id (after waiting for its operation), and a second create of it answers 409
   ALREADY_EXISTS instead of making a second endpoint of the same name;
2. the endpoint's operations still running (`endpoints.operations.list`) are waited
   for: deployedModels does not list a deployment in progress, such as one a crash
   cut off. When the endpoint then has a deployed model of this model version, the
   deploy is done: a replay is a no-op (`skipped`), and traffic a person moved since
   is left alone;
3. otherwise `endpoints.deployModel` deploys `<model>@<version>` on dedicated
   resources (`machine_type`, `min_replica_count`..`max_replica_count`) with the
   traffic split `{"0": 100}`: all traffic goes to the newly deployed model ("0"
   stands for it). Earlier deployed models stay on the endpoint with 0% (a rollback
   is a traffic change away; undeploy them to stop paying for their nodes).

Long-running operations are polled with `operations.get`; one still running when a
delivery gives up is remembered, and the retry resumes waiting for it instead of
deploying twice (after a restart, steps 1 and 2 find it on Vertex). Deliveries to the
same endpoint are serialized in the sink.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from pydantic import Field, model_validator

from router.delivery import Action
from sinks.base import BaseSink, DeliveryItem, DeliveryResult, PermanentError, TransientError
from sinks.gcp import (
    KeyedLocks,
    VertexApiError,
    VertexRest,
    VertexSettings,
    filter_string,
    operation_finished,
    resource_id,
    same_resource,
)
from sinks.mlflow_rest import LruCache

__all__ = ["VertexEndpointDeployer", "VertexEndpointSettings", "endpoint_id"]

MAX_DISPLAY_NAME = 128
_ENDPOINT_ID_BAD = re.compile(r"[^a-z0-9]+")


class VertexEndpointSettings(VertexSettings):
    endpoint_name: str | None = Field(
        default=None, description="endpoint display name used when the rule names none"
    )
    machine_type: str = Field(default="n1-standard-2")
    min_replica_count: int = Field(default=1, ge=1)
    max_replica_count: int | None = Field(default=None, ge=1, description="default: min")

    @model_validator(mode="after")
    def _replicas(self) -> VertexEndpointSettings:
        if self.max_replica_count is not None and self.max_replica_count < self.min_replica_count:
            raise ValueError("max_replica_count must be at least min_replica_count")
        return self


def endpoint_id(display: str) -> str:
    """The endpointId of the endpoint named `display`, the same on every replay.

    Vertex's rule for ids that start with a letter: `[a-z0-9-]`, at most 63
    characters, a letter or digit last.  8 hex digits of the name's sha256 keep names
    that read alike ("Fraud Prod", "fraud-prod") apart.
    """
    slug = _ENDPOINT_ID_BAD.sub("-", display.lower()).strip("-")
    if not slug[:1].isalpha():
        slug = f"ep-{slug}".rstrip("-")
    digest = hashlib.sha256(display.encode()).hexdigest()[:8]
    return f"{slug[:54].rstrip('-')}-{digest}"


def _same_version(deployed: dict[str, Any], model: str, version: str) -> bool:
    name = str(deployed.get("model") or "")
    base, _, at = name.partition("@")
    return same_resource(base, model) and str(deployed.get("modelVersionId") or at) == version


class VertexEndpointDeployer(BaseSink):
    """`vertex_endpoint`: endpoints.list/create, endpoints.deployModel with a traffic split."""

    Settings = VertexEndpointSettings
    settings: VertexEndpointSettings

    def __init__(self, sink_id: str, settings: VertexEndpointSettings) -> None:
        super().__init__(sink_id, settings)
        self.api = VertexRest(sink_id, settings)
        self._pending: LruCache[str, dict[str, Any]] = LruCache(1024)
        self._locks = KeyedLocks()

    async def deliver(self, item: DeliveryItem) -> DeliveryResult:
        if item.action is not Action.DEPLOY:
            raise PermanentError(
                f"sink {self.sink_id}: vertex_endpoint handles deploy deliveries, "
                f"not {item.action.value}"
            )
        details = item.upstream.details if item.upstream else {}
        model, version = details.get("model_resource_name"), details.get("version_id")
        if not model or not version:
            raise PermanentError(
                f"deploy {item.artifact.name!r}: vertex_endpoint deploys a model version from "
                "the Vertex AI Model Registry, and no vertex_model_registry delivery came before "
                "this one; set register: true in the rule and use vertex_model_registry"
            )
        model, version = str(model), str(version)
        display = str(
            item.params.get("endpoint_name") or self.settings.endpoint_name or item.artifact.name
        )[:MAX_DISPLAY_NAME]
        parent = await self.api.parent()
        async with self._locks(f"{parent}/{display}"):
            endpoint, created = await self._endpoint(parent, display)
            name = str(endpoint["name"])
            if self._pending.get(item.key) is None and await self.api.wait_unfinished(
                name, f"endpoints.deployModel on {display}"
            ):  # a deployment in progress (ours, cut off?) is not in deployedModels yet
                endpoint = await self.api.request("GET", name, f"endpoints.get {display}")
            previous = dict(endpoint.get("trafficSplit") or {})
            already = [
                d for d in endpoint.get("deployedModels") or [] if _same_version(d, model, version)
            ]
            if already:
                deployed_id = str(already[0].get("id"))
                current = endpoint
            else:
                deployed_id = await self._deploy(item, name, model, version)
                current = await self.api.request("GET", name, f"endpoints.get {display}")
        return DeliveryResult(
            uri=name,
            details={
                "endpoint_resource_name": name,
                "endpoint_display_name": display,
                "deployed_model_id": deployed_id,
                "model_resource_name": model,
                "version_id": version,
                "traffic_split": dict(current.get("trafficSplit") or {}),
                "previous_traffic_split": previous,
                "endpoint_created": created,
            },
            skipped=bool(already) and not created,
        )

    async def _endpoint(self, parent: str, display: str) -> tuple[dict[str, Any], bool]:
        """The endpoint named `display`, reused or created; and whether it was created."""
        pending_key = f"create:{parent}/{display}"
        found = await self._find_endpoint(parent, display)
        if found is not None:
            self._pending.pop(pending_key)
            return found, False
        ident = endpoint_id(display)
        operation = self._pending.get(pending_key)
        if operation is None:
            # A create cut off by a crash (or whose answer was lost) made this id.
            existing = await self._by_id(parent, ident, display)
            if existing is not None:
                return existing, False
            try:
                operation = await self.api.request(
                    "POST",
                    f"{parent}/endpoints",
                    f"endpoints.create {display}",
                    params={"endpointId": ident},
                    body={
                        "displayName": display,
                        "description": "managed by artifact-router",
                        "labels": {"managed_by": "artifact-router"},
                    },
                )
            except VertexApiError as exc:
                if exc.status != 409:
                    raise
                existing = await self._by_id(parent, ident, display)  # a racing create
                if existing is not None:
                    return existing, False
                raise TransientError(
                    f"{exc}; endpoint {ident} is being created by another request, the "
                    "retry waits for it"
                ) from exc
            self._pending.put(pending_key, operation)
        try:
            response = await self.api.wait(operation, f"endpoints.create {display}")
        except Exception as exc:
            if operation_finished(exc):
                self._pending.pop(pending_key)
            raise
        self._pending.pop(pending_key)
        name = response.get("name")
        if not name:
            raise PermanentError(f"Vertex AI endpoints.create {display} returned no endpoint name")
        endpoint = await self.api.request("GET", str(name), f"endpoints.get {display}")
        return endpoint, True

    async def _by_id(self, parent: str, ident: str, display: str) -> dict[str, Any] | None:
        """The endpoint `ident` once its operations are done; None if it does not exist."""
        name = f"{parent}/endpoints/{ident}"
        await self.api.wait_unfinished(name, f"endpoints.create {display}")
        endpoint = await self.api.get_or_none(name, f"endpoints.get {display}")
        if endpoint is not None and endpoint.get("displayName") != display:
            raise PermanentError(
                f"Vertex AI endpoint {ident}, which artifact-router creates for endpoints "
                f"named {display!r}, is now named {endpoint.get('displayName')!r}; name it "
                f"{display!r} again or delete it"
            )
        return endpoint

    async def _find_endpoint(self, parent: str, display: str) -> dict[str, Any] | None:
        params = {"filter": f"display_name={filter_string(display)}", "pageSize": "100"}
        while True:
            page = await self.api.request(
                "GET", f"{parent}/endpoints", "endpoints.list", params=params
            )
            for endpoint in page.get("endpoints") or []:
                if endpoint.get("displayName") == display:
                    return dict(endpoint)
            next_token = page.get("nextPageToken")
            if not next_token:
                return None
            params["pageToken"] = str(next_token)

    async def _deploy(self, item: DeliveryItem, endpoint: str, model: str, version: str) -> str:
        s = self.settings
        operation = self._pending.get(item.key)
        what = f"endpoints.deployModel {model}@{version}"
        if operation is None:
            model_id = model.rsplit("/", 1)[-1]
            operation = await self.api.request(
                "POST",
                f"{endpoint}:deployModel",
                what,
                body={
                    "deployedModel": {
                        "model": f"{model}@{version}",
                        "displayName": resource_id(f"{model_id}-v{version}"),
                        "dedicatedResources": {
                            "machineSpec": {"machineType": s.machine_type},
                            "minReplicaCount": s.min_replica_count,
                            "maxReplicaCount": s.max_replica_count or s.min_replica_count,
                        },
                    },
                    "trafficSplit": {"0": 100},
                },
            )
            self._pending.put(item.key, operation)
        try:
            response = await self.api.wait(operation, what)
        except Exception as exc:
            if operation_finished(exc):
                self._pending.pop(item.key)
            raise
        self._pending.pop(item.key)
        return str((response.get("deployedModel") or {}).get("id") or "")

    async def health(self) -> bool:
        try:
            parent = await self.api.parent()
            await self.api.request(
                "GET", f"{parent}/endpoints", "endpoints.list", params={"pageSize": "1"}
            )
        except Exception:
            return False
        return True

    async def close(self) -> None:
        await self.api.close()
