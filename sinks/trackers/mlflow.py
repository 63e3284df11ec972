"""`mlflow` experiment tracker: metrics and parameters to an MLflow tracking server.

Speaks MLflow's REST API through aiohttp (see `sinks.mlflow_rest`); the synchronous
`mlflow` client is never used in the event loop and is not a runtime dependency.

Mapping, as FlowyML does it:

- one MLflow experiment per pipeline, named `<experiment_prefix><pipeline>`
  (created on first use; "already exists" is success and the id is read back by name);
- one MLflow run per (pipeline, run_id), found with `runs/search` on the tag
  `router.run_id` = run_id, else created with that tag (plus `router.pipeline` and
  `router.run_key`, a hash of both), so every step of a pipeline run, and every restart
  of the daemon, logs to the same MLflow run with no local state;
- metrics: `metrics` artifacts' `values`, and the numeric `metadata.metrics` of any
  other artifact (models), at MLflow step = the artifact's `step` (default 0), with the
  event's `received_at` as timestamp;
- parameters: `parameters` artifacts' `values`, logged as `<step_name>.<param>` (for
  example `train.learning_rate`), strings as they are and other values as JSON.
  MLflow never changes a param: the same value again is success, a different value is
  a PermanentError naming both values.

Everything goes through `runs/log-batch`, chunked to MLflow's limits (1,000 metrics,
100 params, 100 tags, 1,000 entities per request).

Replays never duplicate a metric point.  Metric timestamps come from the event, so a
replay produces byte-identical points.  The last log-batch of a delivery carries the
tag `router.logged.<hash of the delivery key>`; a delivery that finds the tag on the
run is skipped with one `runs/get`.  A crash between the metrics and that tag (the
batches are separate requests, and MLflow does not make even one batch atomic)
leaves no tag, so the replay drops the points that are already there before logging
the rest and the tag: a point equal to the run's latest value of its key is there, one
greater than it is not, and only otherwise is that key's history fetched.

Run ids are cached, and creation is serialised, per process (the tracker and the
registry of a stack share them).  Two daemons creating the run of the same pipeline
run at the same instant both search again after creating and keep the earliest
(start_time, run id), deleting their own otherwise; only clock skew between them
within that instant could leave two runs.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import weakref
from typing import Any

from pydantic import Field

from router.delivery import Action, ArtifactView
from router.manifest import ArtifactKind
from sinks.base import BaseSink, DeliveryItem, DeliveryResult, PermanentError
from sinks.mlflow_rest import (
    LruCache,
    MlflowApiError,
    MlflowConnectionSettings,
    MlflowRest,
    filter_literal,
    short_hash,
)

__all__ = [
    "MAX_ENTITIES_PER_BATCH",
    "MAX_METRICS_PER_BATCH",
    "MAX_PARAMS_PER_BATCH",
    "MlflowTracker",
    "MlflowTrackerSettings",
    "clear_run_cache",
    "logged_tag",
    "param_text",
    "received_ms",
    "tracked_values",
]

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000

RUN_ID_TAG = "router.run_id"
RUN_KEY_TAG = "router.run_key"
LOGGED_TAG_PREFIX = "router.logged."
_LOCK_STRIPES = 64

# Shared by every MLflow sink of the process: a stack's tracker and registry are two
# sinks that both need the run of a pipeline run, often at the same moment.
_RUNS: LruCache[tuple[str, str, str], str] = LruCache(4096)
_LOOP_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def clear_run_cache() -> None:
    """Forget every cached MLflow run id, as a restarted daemon would (for tests)."""
    global _RUNS
    _RUNS = LruCache(4096)


def _run_lock(key: tuple[str, str, str]) -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    locks = _LOOP_LOCKS.get(loop)
    if locks is None:
        locks = _LOOP_LOCKS[loop] = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]
    return locks[hash(key) % _LOCK_STRIPES]


def tracked_values(artifact: ArtifactView) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, params) a tracker logs for one artifact."""
    if artifact.kind is ArtifactKind.PARAMETERS:
        return {}, dict(artifact.values)
    raw = artifact.values if artifact.kind is ArtifactKind.METRICS else {}
    if not raw:
        found = artifact.metadata.get("metrics", {})
        raw = found if isinstance(found, dict) else {}
    metrics = {
        str(k): float(v)
        for k, v in raw.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    return metrics, {}


def param_text(value: Any) -> str:
    """A parameter value as MLflow stores it: strings unchanged, containers as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def logged_tag(delivery_key: str) -> str:
    return LOGGED_TAG_PREFIX + short_hash(delivery_key)


def received_ms(item: DeliveryItem) -> int:
    """When the item's event was received, in MLflow's milliseconds."""
    return int(item.context.received_at.timestamp() * 1000)


class MlflowTrackerSettings(MlflowConnectionSettings):
    experiment_prefix: str = Field(
        default="", description="prepended to the pipeline name to form the experiment name"
    )


class MlflowTracker(BaseSink):
    Settings = MlflowTrackerSettings
    # The MLflow server has 15 database connections by default (pool 5 + overflow 10):
    # more requests in flight than that only makes it time out.
    default_concurrency = 8
    settings: MlflowTrackerSettings

    def __init__(self, sink_id: str, settings: MlflowTrackerSettings) -> None:
        super().__init__(sink_id, settings)
        self.api = MlflowRest(settings)
        self._experiments: LruCache[str, str] = LruCache()

    def _run_key(self, pipeline: str, run_id: str) -> tuple[str, str, str]:
        return (self.settings.tracking_uri, self.experiment_name(pipeline), run_id)

    async def deliver(self, item: DeliveryItem) -> DeliveryResult:
        if item.action not in (Action.TRACK, Action.END_RUN):
            raise PermanentError(
                f"sink {self.sink_id}: an mlflow experiment_tracker handles track deliveries, "
                f"not {item.action.value}"
            )
        return await self.track(item)

    async def health(self) -> bool:
        try:
            await self.api.get("experiments/search", {"max_results": 1})
        except Exception:
            return False
        return True

    async def close(self) -> None:
        await self.api.close()

    # -- experiment and run -------------------------------------------------------------

    def experiment_name(self, pipeline: str) -> str:
        return f"{self.settings.experiment_prefix}{pipeline}"

    async def experiment_id(self, pipeline: str) -> str:
        name = self.experiment_name(pipeline)
        cached = self._experiments.get(name)
        if cached is not None:
            return cached
        try:
            created = await self.api.post("experiments/create", {"name": name})
            experiment_id = str(created["experiment_id"])
        except MlflowApiError as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = await self.api.get("experiments/get-by-name", {"experiment_name": name})
            experiment = found["experiment"]
            if experiment.get("lifecycle_stage") == "deleted":
                raise PermanentError(
                    f"MLflow experiment {name!r} (id {experiment['experiment_id']}) is deleted; "
                    "restore it (mlflow experiments restore) or set another experiment_prefix"
                ) from exc
            experiment_id = str(experiment["experiment_id"])
        self._experiments.put(name, experiment_id)
        return experiment_id

    async def _search_runs(self, experiment_id: str, pipeline: str, run_id: str) -> list[dict]:
        literal = filter_literal(run_id)
        if literal is not None:
            filter_string = f"tags.`{RUN_ID_TAG}` = {literal}"
        else:  # holds both quote kinds: search on the hash tag instead
            filter_string = f"tags.`{RUN_KEY_TAG}` = '{short_hash(pipeline, run_id)}'"
        found = await self.api.post(
            "runs/search",
            {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 50},
        )
        runs = []
        for run in found.get("runs", []):
            tags = {t["key"]: t.get("value") for t in run.get("data", {}).get("tags", [])}
            # `=` may be case-insensitive on some databases: compare exactly here.
            if tags.get(RUN_ID_TAG) == run_id:
                runs.append(run)
        runs.sort(key=lambda r: (int(r["info"].get("start_time", 0)), r["info"]["run_id"]))
        return runs

    async def mlflow_run_id(self, pipeline: str, run_id: str, started_ms: int | None = None) -> str:
        """The MLflow run of (pipeline, run_id), created on first use.

        `started_ms`: when the event that needs the run was received. A run created for
        it starts then at the latest, not when the delivery happens to run: a run first
        made by its ending step (or by a retry hours later) would otherwise start after
        it ended."""
        key = self._run_key(pipeline, run_id)
        cached = _RUNS.get(key)
        if cached is not None:
            return cached
        async with _run_lock(key):
            cached = _RUNS.get(key)
            if cached is not None:
                return cached
            experiment_id = await self.experiment_id(pipeline)
            runs = await self._search_runs(experiment_id, pipeline, run_id)
            if not runs:
                now = int(time.time() * 1000)
                created = await self.api.post(
                    "runs/create",
                    {
                        "experiment_id": experiment_id,
                        "run_name": run_id,
                        "start_time": now if started_ms is None else min(now, started_ms),
                        "tags": [
                            {"key": RUN_ID_TAG, "value": run_id},
                            {"key": "router.pipeline", "value": pipeline},
                            {"key": RUN_KEY_TAG, "value": short_hash(pipeline, run_id)},
                        ],
                    },
                )
                mine = created["run"]["info"]["run_id"]
                # Another daemon may have created one at the same time: everyone keeps
                # the earliest (start_time, run id) and the others delete their own.
                runs = await self._search_runs(experiment_id, pipeline, run_id)
                if runs and runs[0]["info"]["run_id"] != mine:
                    await self.api.post("runs/delete", {"run_id": mine})
                elif not runs:
                    runs = [created["run"]]
            chosen = str(runs[0]["info"]["run_id"])
            _RUNS.put(key, chosen)
            return chosen

    def forget_run(self, pipeline: str, run_id: str) -> None:
        _RUNS.pop(self._run_key(pipeline, run_id))

    # -- tracking -----------------------------------------------------------------------

    async def track(self, item: DeliveryItem) -> DeliveryResult:
        """Log the item's values to its MLflow run, or end that run (END_RUN)."""
        pipeline, run_id = item.context.pipeline, item.context.run_id
        was_cached = _RUNS.get(self._run_key(pipeline, run_id)) is not None
        mlflow_run = await self.mlflow_run_id(pipeline, run_id, received_ms(item))
        act = self._end_run if item.action is Action.END_RUN else self._log
        try:
            return await act(mlflow_run, item)
        except MlflowApiError as exc:
            self.forget_run(pipeline, run_id)
            if not was_cached or exc.error_code not in (
                "RESOURCE_DOES_NOT_EXIST",
                "INVALID_PARAMETER_VALUE",
                "INVALID_STATE",
            ):
                raise
            # The cached run may have been deleted in MLflow: resolve it again, once.
            mlflow_run = await self.mlflow_run_id(pipeline, run_id, received_ms(item))
            return await act(mlflow_run, item)

    async def _end_run(self, mlflow_run: str, item: DeliveryItem) -> DeliveryResult:
        """Set the run's terminal status and end time (the event's): the same request
        again changes nothing, so a replay is harmless. MLflow still takes metrics for
        an ended run, so a step whose points arrive after the last one loses nothing."""
        status = (item.context.run_status or "finished").upper()
        end_time = received_ms(item)
        await self.api.post(
            "runs/update", {"run_id": mlflow_run, "status": status, "end_time": end_time}
        )
        return DeliveryResult(
            uri=f"runs:/{mlflow_run}",
            details={"mlflow_run_id": mlflow_run, "status": status, "end_time": end_time},
        )

    async def _log(self, mlflow_run: str, item: DeliveryItem) -> DeliveryResult:
        got = await self.api.get("runs/get", {"run_id": mlflow_run})
        run = got["run"]
        data = run.get("data", {})
        tags = {t["key"]: t.get("value") for t in data.get("tags", [])}
        marker = logged_tag(item.key)
        result = DeliveryResult(
            uri=f"runs:/{mlflow_run}",
            details={
                "experiment_id": run["info"]["experiment_id"],
                "mlflow_run_id": mlflow_run,
                "run_url": f"{self.api.display}/#/experiments/"
                f"{run['info']['experiment_id']}/runs/{mlflow_run}",
            },
        )
        if marker in tags:
            result.skipped = True
            return result

        metric_values, param_values = tracked_values(item.artifact)
        step = item.artifact.step or 0
        timestamp = received_ms(item)
        metrics: list[dict[str, Any]] = [
            {"key": k, "value": v, "timestamp": timestamp, "step": step}
            for k, v in sorted(metric_values.items())
        ]
        existing_params = {p["key"]: p.get("value", "") for p in data.get("params", [])}
        params = []
        for name, value in sorted(param_values.items()):
            key, text = f"{item.context.step_name}.{name}", param_text(value)
            if key in existing_params:
                if existing_params[key] != text:
                    raise PermanentError(
                        f"param {key!r} is already {existing_params[key]!r} on MLflow run "
                        f"{mlflow_run} ({item.context.pipeline}/{item.context.run_id}); MLflow "
                        f"never changes a logged param, so {text!r} cannot be logged; "
                        "use a new run_id or another parameter name"
                    )
                continue
            params.append({"key": key, "value": text})

        metrics = await self._not_yet_logged(mlflow_run, metrics, data.get("metrics", []))
        batches = _batches(metrics, params)
        batches[-1]["tags"] = [{"key": marker, "value": item.key}]
        for batch in batches:
            await self.api.post("runs/log-batch", {"run_id": mlflow_run, **batch})
        result.details.update(metrics=len(metrics), params=len(params))
        return result

    async def _not_yet_logged(
        self, mlflow_run: str, metrics: list[dict[str, Any]], latest: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Drop the points a crashed attempt already logged (it set no marker tag).

        The run's latest value per key is its greatest (step, timestamp, value), as
        MLflow keeps it: our point is logged if it is that latest one, cannot be logged
        if the latest is smaller, and only otherwise is the key's history fetched.
        """
        latest_by_key = {
            m["key"]: (int(m.get("step", 0)), int(m["timestamp"]), float(m["value"]))
            for m in latest
        }
        keep = []
        history: dict[str, set[tuple[int, int, float]]] = {}
        for m in metrics:
            point = (int(m["step"]), int(m["timestamp"]), float(m["value"]))
            last = latest_by_key.get(m["key"])
            if last is None or last < point:
                keep.append(m)
                continue
            if last == point:
                continue
            if m["key"] not in history:
                history[m["key"]] = await self._history(mlflow_run, m["key"])
            if point not in history[m["key"]]:
                keep.append(m)
        return keep

    async def _history(self, mlflow_run: str, key: str) -> set[tuple[int, int, float]]:
        points: set[tuple[int, int, float]] = set()
        page_token: str | None = None
        while True:
            page = await self.api.get(
                "metrics/get-history",
                {"run_id": mlflow_run, "metric_key": key, "page_token": page_token},
            )
            for m in page.get("metrics", []):
                points.add((int(m.get("step", 0)), int(m["timestamp"]), float(m["value"])))
            page_token = page.get("next_page_token") or None
            if page_token is None:
                return points


def _batches(metrics: list[dict], params: list[dict]) -> list[dict[str, list[dict]]]:
    """Split into log-batch requests within MLflow's limits; always at least one."""
    batches: list[dict[str, list[dict]]] = []
    m, p = list(metrics), list(params)
    while m or p or not batches:
        chunk_p, p = p[:MAX_PARAMS_PER_BATCH], p[MAX_PARAMS_PER_BATCH:]
        # Leave room for the marker tag in the 1,000-entity budget.
        room = min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(chunk_p) - 1)
        chunk_m, m = m[:room], m[room:]
        batches.append({"metrics": chunk_m, "params": chunk_p})
    return batches
