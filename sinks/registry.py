"""Type name -> sink class: the one place the router core knows about sinks.

Classes are imported lazily, so a stack that does not use S3 never imports aiobotocore.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from router.config import mask_at
from router.errors import Problem, did_you_mean

if TYPE_CHECKING:
    from router.config import ComponentConfig
    from sinks.base import BaseSink

__all__ = ["KNOWN_UNAVAILABLE", "SINK_TYPES", "check_component", "create_sink", "sink_class"]

# type name -> (roles it can fill, "module:Class")
SINK_TYPES: dict[str, tuple[frozenset[str], str]] = {
    "local": (frozenset({"artifact_store"}), "sinks.stores.local:LocalStore"),
    "jsonl": (frozenset({"experiment_tracker"}), "sinks.trackers.jsonl:JsonlTracker"),
    # One class tracks and registers: it dispatches on the delivery's action.
    "mlflow": (
        frozenset({"experiment_tracker", "model_registry"}),
        "sinks.registries.mlflow:MlflowSink",
    ),
    "tensorboard": (
        frozenset({"experiment_tracker"}),
        "sinks.trackers.tensorboard:TensorBoardTracker",
    ),
    "wandb": (frozenset({"experiment_tracker"}), "sinks.trackers.wandb:WandbTracker"),
    "mlflow_alias": (
        frozenset({"model_deployer"}),
        "sinks.deployers.mlflow_alias:MlflowAliasDeployer",
    ),
    "s3": (frozenset({"artifact_store"}), "sinks.stores.s3:S3Store"),
    "gcs": (frozenset({"artifact_store"}), "sinks.stores.gcs:GCSStore"),
    "sagemaker_model_registry": (
        frozenset({"model_registry"}),
        "sinks.registries.sagemaker:SageMakerRegistry",
    ),
    "sagemaker_endpoint": (
        frozenset({"model_deployer"}),
        "sinks.deployers.sagemaker:SageMakerEndpointDeployer",
    ),
    "vertex_model_registry": (
        frozenset({"model_registry"}),
        "sinks.registries.vertex:VertexModelRegistry",
    ),
    "vertex_endpoint": (
        frozenset({"model_deployer"}),
        "sinks.deployers.vertex:VertexEndpointDeployer",
    ),
    # FlowyML's spelling of the same deployer.
    "vertex_endpoints": (
        frozenset({"model_deployer"}),
        "sinks.deployers.vertex:VertexEndpointDeployer",
    ),
}

# Types FlowyML configs name that this build does not ship yet: the config loads (so a
# shared flowyml.yaml keeps working), but a daemon refuses to start on a stack using them.
KNOWN_UNAVAILABLE: dict[str, str] = {
    "azure_blob": "artifact_store",
}


def sink_class(type_name: str) -> type[BaseSink]:
    _, target = SINK_TYPES[type_name]
    module_name, class_name = target.split(":")
    cls: type[BaseSink] = getattr(importlib.import_module(module_name), class_name)
    return cls


def _settings_problems(path: str, exc: ValidationError) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown setting for this component type; check its spelling in the README"
        # A model-level error's input is the whole settings dict, secrets included, and its
        # message names the fields: show no value.  Any other value is masked.
        hidden = err["type"] == "missing" or not err["loc"]
        problems.append(
            Problem(
                field=f"{path}.{where}" if where else path,
                value=None if hidden else mask_at(err["loc"], err.get("input")),
                message=message,
            )
        )
    return problems


def check_component(role: str, path: str, component: ComponentConfig) -> list[Problem]:
    """Validate a component's type and settings when the config loads."""
    if component.type in SINK_TYPES:
        roles, _ = SINK_TYPES[component.type]
        if role not in roles:
            return [
                Problem(
                    field=f"{path}.type",
                    value=component.type,
                    message=f"is not a {role} type; use one of "
                    f"{', '.join(sorted(t for t, (r, _) in SINK_TYPES.items() if role in r))}",
                )
            ]
        try:
            sink_class(component.type).Settings.model_validate(component.settings)
        except ValidationError as exc:
            return _settings_problems(path, exc)
        return []
    if component.type in KNOWN_UNAVAILABLE:
        return []
    known = sorted(set(SINK_TYPES) | set(KNOWN_UNAVAILABLE))
    return [
        Problem(
            field=f"{path}.type",
            value=component.type,
            message=f"unknown component type{did_you_mean(component.type, known)}; "
            f"known: {', '.join(known)}",
        )
    ]


def create_sink(sink_id: str, component: ComponentConfig) -> BaseSink:
    if component.type not in SINK_TYPES:
        raise LookupError(
            f"sink {sink_id}: component type {component.type!r} is not available in this "
            "build of artifact-router; pick a stack that does not use it or upgrade"
        )
    cls = sink_class(component.type)
    settings: Any = cls.Settings.model_validate(component.settings)
    return cls(sink_id, settings)
