"""artifact-router: route ML pipeline artifacts from a spool or MQTT to stores, registries
and trackers, durably.

Emit side (router.sdk): Model, Dataset, Metrics, Parameters, Report, Artifact (with the
Domino-style DATA, MODEL, REPORT types), emit, step.  Read side (router.client): Flow,
Run, merge_artifacts, cached.  Both are imported on first use, so the daemon never loads
them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from router.config import RouterConfig, current_stack, load_config, use_stack
from router.manifest import Manifest, ManifestError, parse_manifest
from router.rules import RoutePlan, plan_event

if TYPE_CHECKING:
    from router.client import Flow, Run, cached, merge_artifacts
    from router.sdk import (
        DATA,
        MODEL,
        REPORT,
        Artifact,
        Dataset,
        Metrics,
        Model,
        Parameters,
        Report,
        UntrustedFileError,
        emit,
        step,
    )

__all__ = [
    "DATA",
    "MODEL",
    "REPORT",
    "Artifact",
    "Dataset",
    "Flow",
    "Manifest",
    "ManifestError",
    "Metrics",
    "Model",
    "Parameters",
    "Report",
    "RoutePlan",
    "RouterConfig",
    "Run",
    "UntrustedFileError",
    "cached",
    "current_stack",
    "emit",
    "load_config",
    "merge_artifacts",
    "parse_manifest",
    "plan_event",
    "step",
    "use_stack",
]
__version__ = "0.1.0"

_LAZY = {
    **dict.fromkeys(
        ("DATA", "MODEL", "REPORT", "Artifact", "Dataset", "Metrics", "Model", "Parameters",
         "Report", "UntrustedFileError", "emit", "step"),
        "router.sdk",
    ),
    **dict.fromkeys(("Flow", "Run", "cached", "merge_artifacts"), "router.client"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'router' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
