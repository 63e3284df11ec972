"""The rule engine: (manifest, stack) -> RoutePlan.  Pure: no I/O, no clock, no config files.

A RoutePlan lists every delivery an event needs (store puts at rendered keys, registry
registrations, deploys, tracker logs), each with a stable idempotency key, plus the
deploy decision for models, so the journal can persist the whole plan atomically.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from router.config import MetricBound, RoutingRule, StackConfig
from router.delivery import Action
from router.manifest import AnyArtifact, ArtifactKind, Manifest, MetricsArtifact

__all__ = [
    "FILE_SLOT",
    "ArtifactPlan",
    "DeployDecision",
    "MetricShortfall",
    "PlannedDelivery",
    "RoutePlan",
    "delivery_key",
    "evaluate_deploy",
    "object_key",
    "plan_event",
    "render_path",
    "sanitise_segment",
]

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f/\\]")
_MAX_SEGMENT = 200  # bytes: leaves room for suffixes such as .v12 under 255


def sanitise_segment(value: str) -> str:
    """Make a user-supplied value safe as part of one path segment.

    Slashes, backslashes, NUL and control characters become '_', values made only of
    dots (and the empty value) become underscores, and the result is at most 200
    characters, so no run id, step or name can climb out of a store root.
    """
    cleaned = _UNSAFE.sub("_", value)
    if len(cleaned.encode()) > _MAX_SEGMENT:
        # File systems cap a name at 255 *bytes*: cut on a character boundary.
        cleaned = cleaned.encode()[:_MAX_SEGMENT].decode("utf-8", "ignore")
    if cleaned.strip(".") == "":
        cleaned = "_" * max(len(cleaned), 1)
    return cleaned


def render_path(template: str, values: Mapping[str, str]) -> str:
    """Render a (load-time validated) template; the result is always a relative key.

    Every value is sanitised to one segment; the value FILE_SLOT is kept as the slot
    `object_key` fills, and FILE_SLOT inside any other value is defused so a run id of
    "{file}" cannot become a second slot.  Raises ValueError if the template itself
    would leave the root (config validation rejects such templates at load).
    """
    safe = {
        k: v if k == "file" and v == FILE_SLOT else sanitise_segment(v).replace(FILE_SLOT, "(file)")
        for k, v in values.items()
    }
    rendered = template.format_map(safe)
    segments = [s for s in rendered.split("/") if s not in ("", ".")]
    if not segments or any(s == ".." for s in segments):
        raise ValueError(f"template {template!r} rendered to an unsafe path {rendered!r}")
    return "/".join(segments)


# Left in an export's target and numbered by the journal (next snapshot of the dataset).
SNAPSHOT_SLOT = "{snapshot}"

# Left in a rendered target and filled per file by `object_key`.
FILE_SLOT = "{file}"


def object_key(target: str, file_name: str) -> str:
    """The key of one file: the template's {file} slot, or appended as the last segment."""
    safe = sanitise_segment(file_name)
    if FILE_SLOT in target:
        return target.replace(FILE_SLOT, safe)
    return f"{target}/{safe}"


def delivery_key(event_id: str, index: int, action: Action, sink_id: str) -> str:
    return f"{event_id}/{index}/{action.value}/{sink_id}"


class PlannedDelivery(BaseModel):
    key: str
    artifact_index: int
    action: Action
    stack: str
    component: str = Field(description="config path of the sink, e.g. artifact_stores.archive")
    target: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    after: str | None = Field(default=None, description="key of the delivery this one needs")

    @property
    def sink_id(self) -> str:
        return f"{self.stack}.{self.component}"


class MetricShortfall(BaseModel):
    metric: str
    bound: Literal["min", "max"]
    required: float
    actual: float | None = None
    by: float | None = Field(default=None, description="how far from the bound; None if missing")

    def describe(self) -> str:
        if self.actual is None:
            return f"{self.metric} is missing (needs {self.bound} {self.required})"
        word = "below the minimum" if self.bound == "min" else "above the maximum"
        return f"{self.metric}={self.actual:g} is {self.by:g} {word} {self.required:g}"


class DeployDecision(BaseModel):
    condition: Literal["manual", "auto", "on_approval"]
    outcome: Literal["deploy", "awaiting_manual", "pending_approval", "blocked"]
    failures: list[MetricShortfall] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)

    @property
    def reason(self) -> str:
        if self.outcome == "blocked":
            return "; ".join(f.describe() for f in self.failures)
        return {
            "deploy": "all deploy_min_metrics bounds hold",
            "awaiting_manual": "deploy_condition manual: run `artifact-router model deploy`",
            "pending_approval": "deploy_condition on_approval: run `artifact-router model approve`",
        }[self.outcome]


class ArtifactPlan(BaseModel):
    index: int
    name: str
    kind: ArtifactKind
    version: str
    upload: bool
    deliveries: list[PlannedDelivery] = Field(default_factory=list)
    decision: DeployDecision | None = None
    errors: list[str] = Field(default_factory=list)


class RoutePlan(BaseModel):
    event_id: str
    stack: str
    artifacts: list[ArtifactPlan]

    @property
    def deliveries(self) -> list[PlannedDelivery]:
        return [d for a in self.artifacts for d in a.deliveries]


def evaluate_deploy(rule: RoutingRule, metrics: Mapping[str, float]) -> DeployDecision:
    """FlowyML's should_auto_deploy, recording which bound failed and by how much."""
    condition = rule.deploy_condition
    if condition == "manual":
        return DeployDecision(condition=condition, outcome="awaiting_manual", metrics=dict(metrics))
    if condition == "on_approval":
        return DeployDecision(
            condition=condition, outcome="pending_approval", metrics=dict(metrics)
        )
    failures = [
        f for name, bound in rule.deploy_min_metrics.items() for f in _check(name, bound, metrics)
    ]
    return DeployDecision(
        condition=condition,
        outcome="blocked" if failures else "deploy",
        failures=failures,
        metrics=dict(metrics),
    )


def _check(name: str, bound: MetricBound, metrics: Mapping[str, float]) -> list[MetricShortfall]:
    actual = metrics.get(name)
    if actual is not None and not math.isfinite(actual):
        actual = None  # NaN passes no comparison: treat it as missing, not as passing
    out = []
    if bound.min is not None and (actual is None or actual < bound.min):
        out.append(
            MetricShortfall(
                metric=name,
                bound="min",
                required=bound.min,
                actual=actual,
                by=None if actual is None else bound.min - actual,
            )
        )
    if bound.max is not None and (actual is None or actual > bound.max):
        out.append(
            MetricShortfall(
                metric=name,
                bound="max",
                required=bound.max,
                actual=actual,
                by=None if actual is None else actual - bound.max,
            )
        )
    return out


def _event_metrics(manifest: Manifest, artifact: AnyArtifact) -> dict[str, float]:
    """A model's own metadata.metrics, then Metrics artifacts of the same run and step."""
    metrics: dict[str, float] = {}
    for other in manifest.artifacts:
        if isinstance(other, MetricsArtifact):
            metrics.update(other.values)
    metrics.update(artifact.metrics())
    return metrics


def plan_event(
    manifest: Manifest,
    *,
    event_id: str,
    stack: StackConfig,
    versions: Sequence[str],
    received_at: datetime,
    upload_all: bool | None = None,
) -> RoutePlan:
    """Every delivery the event needs under `stack`, in dependency order."""
    plans = []
    date = ""  # of received_at, for path templates: formatted once, when a path needs it
    for index, artifact in enumerate(manifest.artifacts):
        kind = artifact.kind
        rule = stack.rule_for(kind) or RoutingRule()
        upload = artifact.upload if upload_all is None else upload_all
        plan = ArtifactPlan(
            index=index,
            name=artifact.name,
            kind=kind,
            version=versions[index],
            upload=upload,
        )
        first_store: str | None = None
        export = rule.export_to_dataset
        values: dict[str, str] = {}
        if artifact.files and (upload or export is not None):  # a path to render
            date = date or received_at.strftime("%Y-%m-%d")
            values = {
                "run_id": manifest.run_id,
                "step_name": manifest.step_name,
                "artifact_name": kind.value,
                "pipeline": manifest.pipeline,
                "name": artifact.name,
                "version": versions[index],
                "date": date,
            }
        if upload and artifact.files:
            for store in rule.stores:
                resolved = stack.resolve_store(store)
                if resolved is None:
                    # Config validation rejects named stores that do not exist; what is
                    # left is a rule without `store:` in a stack without artifact_store.
                    plan.errors.append(
                        f"upload: true but stack {stack.name!r} has no artifact_store"
                        if store is None
                        else f"store {store!r} is not defined in stack {stack.name!r}"
                    )
                    continue
                component, _ = resolved
                sink_id = f"{stack.name}.{component}"
                key = delivery_key(event_id, index, Action.STORE, sink_id)
                if any(d.key == key for d in plan.deliveries):
                    continue  # one store named twice (config validation refuses it)
                try:
                    target = render_path(rule.path, {**values, "file": FILE_SLOT})
                except ValueError as exc:
                    plan.errors.append(str(exc))
                    continue
                plan.deliveries.append(
                    PlannedDelivery(
                        key=key,
                        artifact_index=index,
                        action=Action.STORE,
                        stack=stack.name,
                        component=component,
                        target=target,
                        params={"on_conflict": rule.on_conflict},
                    )
                )
                first_store = first_store or key

        if export is not None and kind is ArtifactKind.DATASET and artifact.files:
            resolved = stack.resolve_store(export.store) if upload else None
            if not upload:
                plan.errors.append(
                    f"export_to_dataset {export.name!r} needs upload: true (nothing is stored)"
                )
            elif resolved is None:
                plan.errors.append(f"export_to_dataset: no store {export.store!r} in the stack")
            else:
                component, _ = resolved
                sink_id = f"{stack.name}.{component}"
                plan.deliveries.append(
                    PlannedDelivery(
                        key=delivery_key(event_id, index, Action.EXPORT, sink_id),
                        artifact_index=index,
                        action=Action.EXPORT,
                        stack=stack.name,
                        component=component,
                        # {snapshot} is numbered by the journal when the event is accepted
                        target=render_path(
                            export.path,
                            {**values, "dataset": export.name, "snapshot": SNAPSHOT_SLOT,
                             "file": FILE_SLOT},
                        ),
                        params={"on_conflict": "fail", "export": {"dataset": export.name}},
                        after=first_store,
                    )
                )

        wants_remote = rule.register or rule.deploy
        if wants_remote and kind is ArtifactKind.MODEL and not upload:
            plan.errors.append(
                f"rule for {kind.value} asks to "
                f"{'register' if rule.register else 'deploy'} but the artifact has "
                "upload: false, so there is nothing remote to point at; set upload: true "
                "(or FLOWYML_UPLOAD_ALL_ARTIFACTS=true)"
            )
        elif wants_remote and kind is ArtifactKind.MODEL and first_store is None:
            plan.errors.append(
                f"rule for model asks to {'register' if rule.register else 'deploy'} but no "
                "file of this model was stored (it has no files, or no store took them); "
                "add the model's files to the manifest"
            )
        elif wants_remote and kind is ArtifactKind.MODEL:
            register_key: str | None = None
            if rule.register:
                register_key = delivery_key(
                    event_id, index, Action.REGISTER, f"{stack.name}.model_registry"
                )
                plan.deliveries.append(
                    PlannedDelivery(
                        key=register_key,
                        artifact_index=index,
                        action=Action.REGISTER,
                        stack=stack.name,
                        component="model_registry",
                        after=first_store,
                        params={"metadata": rule.metadata},
                    )
                )
            if rule.deploy:
                decision = evaluate_deploy(rule, _event_metrics(manifest, artifact))
                plan.decision = decision
                if decision.outcome == "deploy":
                    plan.deliveries.append(
                        PlannedDelivery(
                            key=delivery_key(
                                event_id, index, Action.DEPLOY, f"{stack.name}.model_deployer"
                            ),
                            artifact_index=index,
                            action=Action.DEPLOY,
                            stack=stack.name,
                            component="model_deployer",
                            after=register_key or first_store,
                            params={"endpoint_name": rule.endpoint_name},
                        )
                    )

        if rule.log_to_tracker and _has_values(artifact):
            if not stack.trackers:
                plan.errors.append(
                    f"rule for {kind.value} sets log_to_tracker but stack "
                    f"{stack.name!r} has no experiment_tracker; nothing was logged"
                )
            for component, _ in stack.trackers:
                sink_id = f"{stack.name}.{component}"
                plan.deliveries.append(
                    PlannedDelivery(
                        key=delivery_key(event_id, index, Action.TRACK, sink_id),
                        artifact_index=index,
                        action=Action.TRACK,
                        stack=stack.name,
                        component=component,
                    )
                )
        plans.append(plan)
    if manifest.run_status is not None:
        # An event-level delivery, carried by the last artifact's plan: each tracker is
        # told the run ended (MLflow would otherwise show every run as running forever).
        last = plans[-1]
        for component, _ in stack.trackers:
            sink_id = f"{stack.name}.{component}"
            last.deliveries.append(PlannedDelivery(
                key=delivery_key(event_id, last.index, Action.END_RUN, sink_id),
                artifact_index=last.index,
                action=Action.END_RUN,
                stack=stack.name,
                component=component,
            ))
    return RoutePlan(event_id=event_id, stack=stack.name, artifacts=plans)


def _has_values(artifact: AnyArtifact) -> bool:
    if artifact.kind in (ArtifactKind.METRICS, ArtifactKind.PARAMETERS):
        return True
    return bool(artifact.metrics())
