"""`wandb` tracker: metrics and parameters to Weights & Biases, offline by default.

Settings: `dir` (where W&B files go, default `./wandb-runs`), `project` (default: the
pipeline name), `entity`, `mode` (`offline` unless an `api_key` is given, then
`online`), `api_key` (passed to W&B in its settings, never logged, never written to
~/.netrc) and `base_url` for a self-hosted server.  Offline runs are uploaded later with
`wandb sync <dir>/wandb`.

Each (pipeline, run_id) is one W&B run with a stable id derived from both, opened
with `resume="allow"`, so every step and every restart logs to the same run; a
manifest's `run_status` finishes it with exit code 0 (finished) or 1 (failed, killed), and
the sidecar remembers it so that points arriving later finish with the same code.  Metrics
are logged with the artifact's step as the x axis `router/step` (W&B drops points whose
built-in step goes backwards, and pipeline steps do not log in step order); a metric
whose name W&B or that axis reserves (`_step`, `router/step`) is logged as
`metrics/<name>`; parameters
go to the run config as `<step_name>.<param>`, as in the MLflow tracker.

W&B's SDK is synchronous and keeps process-wide state, so every call runs in a thread,
one at a time, and each delivery opens the run, logs and calls `finish()`, which is
when W&B has written everything.  The delivery's files are written in a private
staging directory and renamed into `<dir>/wandb/` under a name that carries a hash of
the delivery key, then the key is appended to the run's sidecar record.  A replay
finds the key (or, after a crash before the sidecar write, the directory) and logs
nothing, so offline mode never duplicates a point.  In online mode the points reach
the server during the run: a crash after they are sent and before the sidecar write
can log them again on replay.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr

from router.delivery import Action
from router.rules import sanitise_segment
from sinks.base import (
    BaseSink,
    DeliveryItem,
    DeliveryResult,
    PermanentError,
    SinkSettings,
    TransientError,
)
from sinks.durable import fsync_paths
from sinks.mlflow_rest import LruCache, short_hash
from sinks.trackers.mlflow import tracked_values
from sinks.trackers.tensorboard import append_sidecar, read_sidecar

__all__ = ["STEP_METRIC", "WandbTracker", "WandbTrackerSettings", "wandb_key", "wandb_run_id"]

STEP_METRIC = "router/step"
_LOCK_STRIPES = 64
# W&B keeps one process-wide service and global state: one call at a time.
_WANDB_LOCK = threading.Lock()


class WandbTrackerSettings(SinkSettings):
    dir: Path = Field(
        default=Path("wandb-runs"), description="W&B files; relative to the daemon's cwd"
    )
    # The config loader renames FlowyML's `project` to `project_id` (a GCP setting).
    project: str | None = Field(
        default=None,
        validation_alias=AliasChoices("project", "project_id"),
        description="default: the pipeline name",
    )
    entity: str | None = None
    mode: Literal["offline", "online"] | None = Field(
        default=None, description="default: offline, or online when api_key is set"
    )
    api_key: SecretStr | None = None
    base_url: str | None = None

    @property
    def effective_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        return "online" if self.api_key is not None else "offline"


def wandb_key(name: str) -> str:
    """The history key a metric is logged under. W&B keeps the keys starting with `_`
    (`_step`, `_runtime`, `_timestamp`) for itself and this tracker's x axis is
    `router/step`: a metric named so would be overwritten without a word, so it goes
    under `metrics/<name>` instead."""
    return f"metrics/{name}" if name.startswith("_") or name == STEP_METRIC else name


def wandb_run_id(pipeline: str, run_id: str) -> str:
    """The W&B run id of a pipeline run: stable across steps and restarts."""
    return short_hash(pipeline, run_id, length=24)


class WandbTracker(BaseSink):
    Settings = WandbTrackerSettings
    settings: WandbTrackerSettings

    def __init__(self, sink_id: str, settings: WandbTrackerSettings) -> None:
        super().__init__(sink_id, settings)
        self.root = settings.dir.expanduser().resolve()
        self._keys: LruCache[Path, set[str]] = LruCache(256)
        self._locks = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]
        self._used = False

    def sidecar(self, pipeline: str, run_id: str) -> Path:
        return (
            self.root
            / ".router-logged-keys"
            / sanitise_segment(pipeline)
            / f"{sanitise_segment(run_id)}.keys"
        )

    def run_files(self, item: DeliveryItem) -> Path:
        """Where the W&B files of this delivery end up (deterministic, for replays)."""
        prefix = "offline-run" if self.settings.effective_mode == "offline" else "run"
        stamp = item.context.received_at.strftime("%Y%m%d_%H%M%S")
        run = wandb_run_id(item.context.pipeline, item.context.run_id)
        return self.root / "wandb" / f"{prefix}-{stamp}-{run}-{short_hash(item.key, length=12)}"

    async def deliver(self, item: DeliveryItem) -> DeliveryResult:
        if item.action not in (Action.TRACK, Action.END_RUN):
            raise PermanentError(
                f"sink {self.sink_id}: wandb handles track deliveries, not {item.action.value}"
            )
        sidecar = self.sidecar(item.context.pipeline, item.context.run_id)
        target = self.run_files(item)
        details = {
            "wandb_run_id": wandb_run_id(item.context.pipeline, item.context.run_id),
            "project": self.settings.project or item.context.pipeline,
            "mode": self.settings.effective_mode,
        }
        async with self._locks[hash(sidecar) % _LOCK_STRIPES]:
            try:
                keys = self._keys.get(sidecar)
                if keys is None:
                    keys = await asyncio.to_thread(read_sidecar, sidecar)
                    self._keys.put(sidecar, keys)
                if item.key in keys:
                    return DeliveryResult(uri=f"file://{target}", details=details, skipped=True)
                self._used = True
                ended = item.context.run_status or _ended_as(keys)
                written = await asyncio.to_thread(self._write, item, sidecar, target, ended)
            except OSError as exc:
                raise TransientError(f"{self.root}: {exc.strerror or exc}") from exc
            if item.action is Action.END_RUN:
                keys.add(_ended_marker(ended))
            keys.add(item.key)
        return DeliveryResult(uri=f"file://{target}", details=details, skipped=not written)

    def _write(
        self, item: DeliveryItem, sidecar: Path, target: Path, ended: str | None
    ) -> bool:
        """`ended`: the status the run ended with, if it did (this delivery's, or an
        earlier END_RUN's): every finish() after it keeps that exit code, as W&B shows
        the last one."""
        if target.exists():  # moved into place, then the process died
            self._record(item, sidecar, ended)
            return False
        staging = self.root / ".router-staging" / target.name
        if staging.exists():  # a crash left a half-written attempt
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        # An END_RUN only finishes the run, with the exit code its status gives.
        metrics, params = (
            ({}, {}) if item.action is Action.END_RUN else tracked_values(item.artifact)
        )
        with _WANDB_LOCK:
            self._log(
                item,
                staging,
                metrics,
                {f"{item.context.step_name}.{k}": v for k, v in params.items()},
                exit_code=0 if ended in (None, "finished") else 1,
            )
        produced = [
            p
            for p in (staging / "wandb").iterdir()
            if p.is_dir() and not p.is_symlink() and p.name.startswith(("offline-run-", "run-"))
        ]
        if len(produced) != 1:
            raise OSError(f"W&B wrote {len(produced)} run directories in {staging}, expected 1")
        target.parent.mkdir(parents=True, exist_ok=True)
        produced[0].rename(target)
        fsync_paths([target.parent])
        shutil.rmtree(staging, ignore_errors=True)
        self._record(item, sidecar, ended)
        return True

    @staticmethod
    def _record(item: DeliveryItem, sidecar: Path, ended: str | None) -> None:
        """Note the delivery as logged; an END_RUN notes the run's status first, so a
        crash between the two replays the END_RUN rather than forgetting the status."""
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        if item.action is Action.END_RUN:
            append_sidecar(sidecar, _ended_marker(ended))
        append_sidecar(sidecar, item.key)

    def _log(
        self,
        item: DeliveryItem,
        staging: Path,
        metrics: dict[str, float],
        config: dict[str, Any],
        exit_code: int,
    ) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise PermanentError(
                "the wandb tracker needs the wandb package: pip install 'artifact-router[wandb]'"
            ) from exc
        options: dict[str, Any] = {
            "mode": self.settings.effective_mode,
            "silent": True,
            "console": "off",
            "save_code": False,
            "disable_git": True,
            "disable_code": True,
            "x_disable_stats": True,
            "x_disable_meta": True,
            "x_disable_machine_info": True,
            "x_save_requirements": False,
        }
        if self.settings.api_key is not None:
            options["api_key"] = self.settings.api_key.get_secret_value()
        if self.settings.base_url:
            options["base_url"] = self.settings.base_url
        context = item.context
        try:
            # Process-wide settings first: W&B's analytics read the global mode, not the
            # run's, and would reach out to the network from an offline run otherwise.
            wandb.setup(settings=wandb.Settings(**options))
            run = wandb.init(
                project=self.settings.project or context.pipeline,
                entity=self.settings.entity,
                dir=str(staging),
                id=wandb_run_id(context.pipeline, context.run_id),
                name=context.run_id,
                group=context.pipeline,
                resume="allow",
                settings=wandb.Settings(**options),
            )
        except Exception as exc:  # W&B raises its own errors for auth, network, settings
            raise TransientError(f"wandb.init failed: {type(exc).__name__}: {exc}") from exc
        ok = False
        try:
            if config:
                run.config.update(config, allow_val_change=True)
            if metrics:
                run.define_metric(STEP_METRIC)
                run.define_metric("*", step_metric=STEP_METRIC)
                run.log({**{wandb_key(k): v for k, v in metrics.items()},
                         STEP_METRIC: item.artifact.step or 0})
            ok = True
        finally:
            # W&B keeps the last exit code: a run that failed shows as failed.
            run.finish(exit_code=exit_code if ok else 1)

    async def close(self) -> None:
        if self._used:
            await asyncio.to_thread(_teardown)


def _ended_marker(status: str | None) -> str:
    # No delivery key lacks a "/", so the marker cannot be mistaken for one.
    return f"run-ended:{status or 'finished'}"


def _ended_as(keys: set[str]) -> str | None:
    """The status an earlier END_RUN gave the run, from its sidecar: failed or killed
    win over finished, so that a late point never makes a failed run look finished."""
    ended = {k.removeprefix("run-ended:") for k in keys if k.startswith("run-ended:")}
    for status in ("failed", "killed", "finished"):
        if status in ended:
            return status
    return None


def _teardown() -> None:
    import wandb

    with _WANDB_LOCK:
        wandb.teardown()
