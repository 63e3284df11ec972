"""`vertex_model_registry`: a model version in the Vertex AI Model Registry.

Registering a model artifact, over the documented REST API (`sinks.gcp`):

1. the Vertex model id is the artifact's name made a resource id (`[a-z0-9_-]`,
   a letter first); `models.get` says whether that model exists;
2. when it does, `models.listVersions` with the filter
   `labels.router_delivery_key="<hash>"` looks for the version this delivery made
   before: a replay finds it and uploads nothing (`skipped`);
3. otherwise `models.upload` (`POST v1/{parent}/models:upload`): the first time with
   `modelId`, later with `parentModel` so the upload becomes the model's next
   version. The model carries `artifactUri` (the directory holding the stored
   model: Vertex's serving containers load e.g. `model.joblib` / `model.pkl` from
   it), the serving container (`serving_container_image_uri`), the delivery key's
   hash as the label `router_delivery_key` (in the same request, so a version never
   exists without it), and pipeline, run, step, version and metrics in the version
   description;
4. the upload is a long-running operation, polled with `operations.get` until done;
   its response names the model and the new `modelVersionId`. An operation still
   running when a delivery gives up is remembered, and the retry waits for it
   rather than uploading a second version. Before step 2 the model's operations
   still running (`models.operations.list`) are waited for too, so a replay after a
   crash, or after a timeout or 5xx that lost the upload's answer, finds the version
   that upload makes instead of uploading another.

Vertex AI reads model artifacts from Cloud Storage: route registered models to a
`gcs` store. Result details (what `vertex_endpoint` reads): `model_resource_name`,
`model_id`, `version_id`, `artifact_uri`.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import Field

from router.delivery import Action
from sinks.base import BaseSink, DeliveryItem, DeliveryResult, PermanentError, TransientError
from sinks.gcp import (
    KeyedLocks,
    VertexApiError,
    VertexRest,
    VertexSettings,
    filter_string,
    label_value,
    operation_finished,
    resource_id,
)
from sinks.mlflow_rest import LruCache
from sinks.registries.mlflow import model_source
from sinks.trackers.mlflow import tracked_values

__all__ = [
    "KEY_LABEL",
    "VertexModelRegistry",
    "VertexRegistrySettings",
    "artifact_directory",
    "key_label",
]

KEY_LABEL = "router_delivery_key"
MAX_DISPLAY_NAME = 128


class VertexRegistrySettings(VertexSettings):
    serving_container_image_uri: str | None = Field(
        default=None,
        description="serving image for the model (a Vertex prebuilt prediction container or "
        "your own); required to register",
    )
    serving_container_predict_route: str | None = None
    serving_container_health_route: str | None = None
    serving_container_ports: list[int] = Field(default_factory=list)


def key_label(key: str) -> str:
    """The delivery key as a label value (lowercase hex: what labels allow)."""
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def artifact_directory(item: DeliveryItem) -> str:
    """The gs:// directory holding the stored model (Vertex's artifactUri)."""
    uri = model_source(item)
    objects = [o.uri for o in item.upstream.objects] if item.upstream else []
    if uri in objects:
        uri = uri.rsplit("/", 1)[0]
    if not uri.startswith("gs://"):
        raise PermanentError(
            f"register {item.artifact.name!r}: Vertex AI reads model artifacts from Cloud "
            f"Storage, and this model is at {uri}; route it to a gcs store"
        )
    return uri.rstrip("/")


class VertexModelRegistry(BaseSink):
    """`vertex_model_registry`: models.upload, a new version per registered artifact."""

    Settings = VertexRegistrySettings
    settings: VertexRegistrySettings

    def __init__(self, sink_id: str, settings: VertexRegistrySettings) -> None:
        super().__init__(sink_id, settings)
        self.api = VertexRest(sink_id, settings)
        self._pending: LruCache[str, dict[str, Any]] = LruCache(1024)
        self._locks = KeyedLocks()

    async def deliver(self, item: DeliveryItem) -> DeliveryResult:
        if item.action is not Action.REGISTER:
            raise PermanentError(
                f"sink {self.sink_id}: vertex_model_registry registers models; "
                f"{item.action.value} needs another component (deploys: vertex_endpoint)"
            )
        artifact_uri = artifact_directory(item)
        image = self.settings.serving_container_image_uri
        if not image:
            raise PermanentError(
                f"sink {self.sink_id}: set serving_container_image_uri on the "
                "vertex_model_registry component (the container that serves the model)"
            )
        parent = await self.api.parent()
        model_id = resource_id(item.artifact.name)
        model_name = f"{parent}/models/{model_id}"
        label = key_label(item.key)
        async with self._locks(model_name):
            operation = self._pending.get(item.key)
            if operation is None:
                # An upload cut off by a crash (or whose answer a timeout or 5xx lost) is
                # known only to Vertex, and listVersions shows it only once done: wait.
                await self.api.wait_unfinished(model_name, f"models.upload {model_id}")
                exists = await self.api.get_or_none(model_name, f"models.get {model_id}")
                if exists is not None:
                    found = await self._find_version(model_name, label)
                    if found is not None:
                        name = str(found.get("name") or model_name)
                        return self._result(name, model_id, found, artifact_uri, True)
                body: dict[str, Any] = {"model": self._model(item, artifact_uri, image, label)}
                if exists is not None:
                    body["parentModel"] = model_name
                else:
                    body["modelId"] = model_id
                try:
                    operation = await self.api.request(
                        "POST", f"{parent}/models:upload", f"models.upload {model_id}", body=body
                    )
                except VertexApiError as exc:
                    if exc.status == 409 and exists is None:
                        raise TransientError(
                            f"{exc}; another upload created model {model_id} first, the retry "
                            "uploads a new version of it"
                        ) from exc
                    raise
                self._pending.put(item.key, operation)
            try:
                response = await self.api.wait(operation, f"models.upload {model_id}")
            except Exception as exc:
                if operation_finished(exc):
                    self._pending.pop(item.key)
                raise
            self._pending.pop(item.key)
        version = str(response.get("modelVersionId") or "")
        model = str(response.get("model") or model_name)
        if not version:
            found = await self._find_version(model, label)
            if found is None:
                raise TransientError(
                    f"Vertex AI models.upload {model_id} finished without a modelVersionId "
                    "and the version is not listed yet"
                )
            version = str(found.get("versionId"))
        return self._result(model, model_id, {"versionId": version}, artifact_uri, False)

    def _model(
        self, item: DeliveryItem, artifact_uri: str, image: str, label: str
    ) -> dict[str, Any]:
        c, a = item.context, item.artifact
        s = self.settings
        container: dict[str, Any] = {"imageUri": image}
        if s.serving_container_predict_route:
            container["predictRoute"] = s.serving_container_predict_route
        if s.serving_container_health_route:
            container["healthRoute"] = s.serving_container_health_route
        if s.serving_container_ports:
            container["ports"] = [{"containerPort": p} for p in s.serving_container_ports]
        metrics, _ = tracked_values(a)
        about = f"{c.pipeline}/{c.run_id}/{c.step_name}: {a.name} {a.version}"
        if a.framework:
            about += f" ({a.framework})"
        if metrics:
            about += "; metrics " + ", ".join(f"{k}={v!r}" for k, v in sorted(metrics.items()))
        metadata = item.params.get("metadata") or {}
        if isinstance(metadata, dict) and metadata:
            about += "; " + ", ".join(f"{k}={v}" for k, v in metadata.items())
        return {
            "displayName": a.name[:MAX_DISPLAY_NAME],
            "description": f"{a.name}, registered by artifact-router",
            "versionDescription": about,
            "artifactUri": artifact_uri,
            "containerSpec": container,
            "labels": {
                KEY_LABEL: label,
                "router_pipeline": label_value(c.pipeline),
                "router_run_id": label_value(c.run_id),
                "router_version": label_value(a.version),
                "managed_by": "artifact-router",
            },
        }

    def _result(
        self,
        model_name: str,
        model_id: str,
        version: dict[str, Any],
        artifact_uri: str,
        skipped: bool,
    ) -> DeliveryResult:
        version_id = str(version.get("versionId"))
        return DeliveryResult(
            uri=f"{model_name}@{version_id}",
            details={
                "model_resource_name": model_name,
                "model_id": model_id,
                "version_id": version_id,
                "artifact_uri": artifact_uri,
            },
            skipped=skipped,
        )

    async def _find_version(self, model_name: str, label: str) -> dict[str, Any] | None:
        params = {"filter": f"labels.{KEY_LABEL}={filter_string(label)}", "pageSize": "100"}
        while True:
            page = await self.api.request(
                "GET", f"{model_name}:listVersions", "models.listVersions", params=params
            )
            for version in page.get("models") or []:
                if (version.get("labels") or {}).get(KEY_LABEL) == label:
                    return dict(version)
            next_token = page.get("nextPageToken")
            if not next_token:
                return None
            params["pageToken"] = str(next_token)

    async def health(self) -> bool:
        try:
            parent = await self.api.parent()
            await self.api.request(
                "GET", f"{parent}/models", "models.list", params={"pageSize": "1"}
            )
        except Exception:
            return False
        return True

    async def close(self) -> None:
        await self.api.close()
