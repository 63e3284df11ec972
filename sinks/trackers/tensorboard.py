"""`tensorboard` tracker: scalars as TensorBoard event files, written with tensorboardX.

Layout: `<log_dir>/<pipeline>/<run_id>/` (both sanitised) is one TensorBoard run, so
`tensorboard --logdir <log_dir>` shows one run per pipeline run.  Metrics become
scalars (tag = metric name) at the artifact's step (default 0) and the event's
`received_at` as wall time; parameters become text summaries tagged
`parameters/<step_name>.<param>`.

Each delivery is written to its own event file, exactly once:

1. tensorboardX writes the events into a private temporary directory;
2. the file is copied into the run directory under a hidden name TensorBoard does not
   read (no `tfevents` in it), fsynced, and renamed to
   `events.out.tfevents.<seconds>.<nanoseconds>.router.<hash of the delivery key>`,
   stamped when it is written and after every event file already there;
3. the delivery key is appended to the run's sidecar record `.router-logged-keys`.

Why the write time, not the event's: a live TensorBoard reads a run's files in name
order and never goes back to a name that sorts before the file it reads ("created
after ... even though it's lexicographically earlier"): a retried or late delivery
named by its older event time would stay invisible until TensorBoard restarts. The
points keep the event's time as their wall time.

A replay finds its key in the sidecar, or (after a crash between 2 and 3) its event
file by the hash in its name, and writes nothing; a crash before the rename leaves only
a hidden partial file, overwritten by the replay.  A live TensorBoard never sees a
partial file.

A run directory is listed once per process (`_RunState.load`), when a delivery first
comes for it, not once per delivery: a run logged at every step holds thousands of
event files, and listing them all for each new one made a run's logging quadratic.
tensorboardX is synchronous, so all file work runs in a thread.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from sinks.trackers.mlflow import param_text, tracked_values

__all__ = ["SIDECAR_NAME", "TensorBoardTracker", "TensorBoardTrackerSettings", "read_sidecar"]

SIDECAR_NAME = ".router-logged-keys"
EVENT_PREFIX = "events.out.tfevents."
_LOCK_STRIPES = 64


class TensorBoardTrackerSettings(SinkSettings):
    log_dir: Path


def read_sidecar(path: Path) -> set[str]:
    """Delivery keys recorded in a sidecar file (a torn last line is ignored)."""
    if not path.exists():
        return set()
    data = path.read_text(encoding="utf-8")
    lines = data.split("\n")
    if not data.endswith("\n"):
        lines = lines[:-1]
    return {line for line in lines if line}


def append_sidecar(path: Path, key: str) -> None:
    """Append one key durably, starting on a fresh line if a crash tore the last one."""
    with open(path, "ab") as fh:
        if fh.tell() > 0:
            with open(path, "rb") as check:
                check.seek(-1, os.SEEK_END)
                if check.read(1) != b"\n":
                    fh.write(b"\n")
        fh.write(key.encode("utf-8") + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


class TensorBoardTracker(BaseSink):
    Settings = TensorBoardTrackerSettings
    settings: TensorBoardTrackerSettings

    def __init__(self, sink_id: str, settings: TensorBoardTrackerSettings) -> None:
        super().__init__(sink_id, settings)
        self.root = settings.log_dir.expanduser().resolve()
        self._runs: LruCache[Path, _RunState] = LruCache(256)
        self._locks = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]

    def run_dir(self, pipeline: str, run_id: str) -> Path:
        return self.root / sanitise_segment(pipeline) / sanitise_segment(run_id)

    @staticmethod
    def key_tag(key: str) -> str:
        """What names a delivery's event file (and its partial file): its key's hash."""
        return short_hash(key, length=20)

    async def deliver(self, item: DeliveryItem) -> DeliveryResult:
        if item.action not in (Action.TRACK, Action.END_RUN):
            raise PermanentError(
                f"sink {self.sink_id}: tensorboard handles track deliveries, "
                f"not {item.action.value}"
            )
        run_dir = self.run_dir(item.context.pipeline, item.context.run_id)
        if item.action is Action.END_RUN:  # TensorBoard has no run status to set
            return DeliveryResult(uri=f"file://{run_dir}", skipped=True,
                                  details={"note": "TensorBoard keeps no run status"})
        async with self._locks[hash(run_dir) % _LOCK_STRIPES]:
            try:
                state = self._runs.get(run_dir)
                if state is None:
                    state = await asyncio.to_thread(_RunState.load, run_dir, self.key_tag)
                    self._runs.put(run_dir, state)
                if item.key in state.keys:
                    return DeliveryResult(uri=f"file://{run_dir}", skipped=True)
                target, written = await asyncio.to_thread(self._write, item, run_dir, state)
            except OSError as exc:
                raise TransientError(f"{run_dir}: {exc.strerror or exc}") from exc
            state.keys.add(item.key)
        return DeliveryResult(
            uri=f"file://{target}", details={"log_dir": str(run_dir)}, skipped=not written
        )

    def _write(self, item: DeliveryItem, run_dir: Path, state: _RunState) -> tuple[Path, bool]:
        """Write the delivery's event file; its path, and False when a previous attempt
        already did."""
        sidecar = run_dir / SIDECAR_NAME
        tag = self.key_tag(item.key)
        done = state.unrecorded.get(tag)
        if done is not None:  # renamed into place, then the sidecar was not written
            append_sidecar(sidecar, item.key)
            del state.unrecorded[tag]
            return done, False
        run_dir.mkdir(parents=True, exist_ok=True)
        target = run_dir / _next_name(state.newest, tag)
        metrics, params = tracked_values(item.artifact)
        with tempfile.TemporaryDirectory(prefix="router-tb-") as tmp:
            produced = _write_events(
                Path(tmp),
                metrics,
                {f"{item.context.step_name}.{k}": v for k, v in params.items()},
                step=item.artifact.step or 0,
                walltime=item.context.received_at.timestamp(),
            )
            partial = run_dir / f".router-partial-{tag}"
            shutil.copyfile(produced, partial)
            with open(partial, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(partial, target)
        state.newest = target.name
        state.unrecorded[tag] = target  # until the sidecar has it: a retry must find it
        fsync_paths([run_dir])
        append_sidecar(sidecar, item.key)
        del state.unrecorded[tag]
        return target, True


@dataclass
class _RunState:
    """What this process knows of one run directory, so it is listed only once.

    `keys`: deliveries recorded in the sidecar. `unrecorded`: event files of ours whose
    key the sidecar lacks (renamed into place, then the process died or the sidecar
    write failed), by key hash: a retry of that delivery adopts the file instead of
    writing a second one. `newest`: the event file name that sorts last, which the next
    name must follow.
    """

    keys: set[str]
    unrecorded: dict[str, Path]
    newest: str | None

    @classmethod
    def load(cls, run_dir: Path, key_tag: Callable[[str], str]) -> _RunState:
        keys = read_sidecar(run_dir / SIDECAR_NAME)
        recorded = {key_tag(key) for key in keys}
        unrecorded: dict[str, Path] = {}
        newest: str | None = None
        try:
            entries = list(os.scandir(run_dir))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if EVENT_PREFIX not in entry.name:
                continue
            _, mark, tag = entry.name.rpartition(".router.")
            if mark and tag not in recorded:
                unrecorded[tag] = Path(entry.path)
            if newest is None or entry.name > newest:
                newest = entry.name
        return cls(keys, unrecorded, newest)


def _next_name(newest: str | None, tag: str) -> str:
    """An event file name stamped now that sorts after `newest`: if the clock is behind
    it (a clock step, another writer ahead), the stamp follows it instead."""
    ns = time.time_ns()
    if newest is not None:
        ns = max(ns, _stamp_ns(newest) + 1)
    return f"{EVENT_PREFIX}{ns // 10**9:010d}.{ns % 10**9:09d}.router.{tag}"


def _stamp_ns(name: str) -> int:
    """The time in an event file's name as nanoseconds: ours carry seconds and
    nanoseconds; others (a previous release's, TensorFlow's `<seconds>.<host>...`)
    only seconds, read as the end of that second so that what follows sorts after."""
    fields = name.removeprefix(EVENT_PREFIX).split(".")
    seconds = int(fields[0]) if fields[0].isdigit() else 0
    nanos = fields[1] if len(fields) > 1 else ""
    if len(nanos) == 9 and nanos.isdigit():
        return seconds * 10**9 + int(nanos)
    return seconds * 10**9 + 10**9 - 1


def _write_events(
    directory: Path,
    metrics: dict[str, float],
    params: dict[str, Any],
    *,
    step: int,
    walltime: float,
) -> Path:
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir=str(directory), flush_secs=3600)
    try:
        for name, value in sorted(metrics.items()):
            writer.add_scalar(name, value, global_step=step, walltime=walltime)
        for name, value in sorted(params.items()):
            writer.add_text(
                f"parameters/{name}", param_text(value), global_step=step, walltime=walltime
            )
    finally:
        writer.close()
    files = [p for p in directory.iterdir() if "tfevents" in p.name]
    if len(files) != 1:
        raise OSError(f"tensorboardX wrote {len(files)} event files in {directory}, expected 1")
    return files[0]
