"""`mlflow` model registry, and the one class behind the `mlflow` component type.

The same `mlflow` type fills two roles in a FlowyML stack: `experiment_tracker` and
`model_registry`.  Both need the same things (the server, its credentials, the MLflow
run of a pipeline run), so one class serves both and dispatches on the delivery's
action: `track` goes to the tracker (`sinks.trackers.mlflow`), `register` is here.

Registering a model artifact:

1. create the registered model named after the artifact (RESOURCE_ALREADY_EXISTS is
   success);
2. look for a version of it carrying the tag `router.delivery_key` = the delivery key
   (`model-versions/search`); a replay finds it and creates nothing;
3. otherwise create a model version whose source is the stored artifact's URI (from
   the store delivery this one waited for) and whose run is the MLflow run of
   (pipeline, run_id), with the delivery-key tag and the version, framework and
   metric tags in the same request, so a version never exists without its key;
4. wait while its status is PENDING_REGISTRATION (FAILED_REGISTRATION is permanent).

MLflow refuses a local `file://` source outside the run's artifact directory: route
models that are registered to an object store (s3, gs).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic import Field

from router.delivery import Action
from sinks.base import DeliveryItem, DeliveryResult, PermanentError, TransientError
from sinks.mlflow_rest import MlflowApiError, filter_literal
from sinks.trackers.mlflow import (
    MlflowTracker,
    MlflowTrackerSettings,
    param_text,
    received_ms,
    tracked_values,
)

__all__ = ["DELIVERY_KEY_TAG", "MlflowSettings", "MlflowSink", "model_source"]

DELIVERY_KEY_TAG = "router.delivery_key"
MAX_TAG_VALUE = 5000


class MlflowSettings(MlflowTrackerSettings):
    registration_timeout: float = Field(
        default=300.0, gt=0, description="seconds to wait for PENDING_REGISTRATION to end"
    )


def model_source(item: DeliveryItem) -> str:
    """The stored artifact's URI, from the store delivery this one waited for."""
    upstream = item.upstream
    if upstream is None:
        raise PermanentError(
            f"register {item.artifact.name!r}: no stored location to register; the rule must "
            "store the model (store: ... with upload: true) before registering it"
        )
    if upstream.uri:
        return upstream.uri
    uris = [o.uri for o in upstream.objects]
    if len(uris) == 1:
        return uris[0]
    if uris:
        prefix = uris[0].rsplit("/", 1)[0]
        if all(u.startswith(prefix + "/") for u in uris):
            return prefix
    raise PermanentError(
        f"register {item.artifact.name!r}: the store delivery reported no URI to register"
    )


def _version_tags(item: DeliveryItem) -> list[dict[str, str]]:
    artifact, context = item.artifact, item.context
    tags = {
        DELIVERY_KEY_TAG: item.key,
        "router.pipeline": context.pipeline,
        "router.run_id": context.run_id,
        "router.step_name": context.step_name,
        "router.event_id": context.event_id,
        "version": artifact.version,
    }
    if artifact.framework:
        tags["framework"] = artifact.framework
    metrics, _ = tracked_values(artifact)
    for name, value in metrics.items():
        tags[f"metric.{name}"] = repr(value)
    metadata = item.params.get("metadata") or {}
    if isinstance(metadata, dict):
        for name, value in metadata.items():
            tags.setdefault(str(name), param_text(value))
    return [{"key": k, "value": v[:MAX_TAG_VALUE]} for k, v in tags.items()]


class MlflowSink(MlflowTracker):
    """`mlflow`: experiment tracker (track) and model registry (register)."""

    Settings = MlflowSettings
    settings: MlflowSettings

    async def deliver(self, item: DeliveryItem) -> DeliveryResult:
        if item.action in (Action.TRACK, Action.END_RUN):
            return await self.track(item)
        if item.action is Action.REGISTER:
            return await self.register(item)
        raise PermanentError(
            f"sink {self.sink_id}: an mlflow component tracks and registers; "
            f"{item.action.value} needs a model_deployer such as mlflow_alias"
        )

    async def register(self, item: DeliveryItem) -> DeliveryResult:
        source = model_source(item)
        name = item.artifact.name
        try:
            await self.api.post("registered-models/create", {"name": name})
        except MlflowApiError as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        existing = await self._find_version(name, item.key)
        skipped = existing is not None
        if existing is None:
            mlflow_run = await self.mlflow_run_id(
                item.context.pipeline, item.context.run_id, received_ms(item)
            )
            try:
                created = await self.api.post(
                    "model-versions/create",
                    {
                        "name": name,
                        "source": source,
                        "run_id": mlflow_run,
                        "tags": _version_tags(item),
                        "description": f"{item.context.pipeline}/{item.context.run_id}/"
                        f"{item.context.step_name}: {name} {item.artifact.version}",
                    },
                )
            except MlflowApiError as exc:
                if "source" in exc.mlflow_message and source.startswith(("file:", "/")):
                    raise PermanentError(
                        f"{exc}; MLflow only registers a local path inside the run's artifact "
                        "directory: store models you register in an object store (s3, gs)"
                    ) from exc
                raise
            existing = created["model_version"]
        version = await self._wait_ready(name, str(existing["version"]), existing)
        return DeliveryResult(
            uri=f"models:/{name}/{version}",
            details={
                "registered_model": name,
                "model_version": version,
                "source": source,
                "mlflow_run_id": existing.get("run_id"),
            },
            skipped=skipped,
        )

    async def _find_version(self, name: str, key: str) -> dict[str, Any] | None:
        clauses = []
        for field, value in (("name", name), (f"tags.`{DELIVERY_KEY_TAG}`", key)):
            literal = filter_literal(value)
            if literal is not None:
                clauses.append(f"{field} = {literal}")
        if not clauses:  # both hold both quote kinds; narrow it down client-side
            clauses.append("name LIKE '%'")
        page_token: str | None = None
        while True:
            page = await self.api.get(
                "model-versions/search",
                {"filter": " AND ".join(clauses), "max_results": 1000, "page_token": page_token},
            )
            for version in page.get("model_versions", []):
                tags = {t["key"]: t.get("value") for t in version.get("tags", [])}
                if version.get("name") == name and tags.get(DELIVERY_KEY_TAG) == key:
                    return dict(version)
            page_token = page.get("next_page_token") or None
            if page_token is None:
                return None

    async def _wait_ready(self, name: str, version: str, current: dict[str, Any]) -> str:
        deadline = time.monotonic() + self.settings.registration_timeout
        delay = 0.2
        while True:
            status = current.get("status", "READY")
            if status == "READY":
                return version
            if status == "FAILED_REGISTRATION":
                raise PermanentError(
                    f"MLflow failed to register {name} version {version}: "
                    f"{current.get('status_message') or 'no reason given'}"
                )
            if time.monotonic() > deadline:
                raise TransientError(
                    f"{name} version {version} is still {status} after "
                    f"{self.settings.registration_timeout}s; a retry keeps waiting for it"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            got = await self.api.get("model-versions/get", {"name": name, "version": version})
            current = got["model_version"]
