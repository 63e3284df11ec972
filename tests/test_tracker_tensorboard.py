"""The `tensorboard` tracker: real event files, read back with TensorBoard's own reader."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import sinks.trackers.tensorboard as tbmod
from router.config import ComponentConfig
from router.delivery import Action
from router.manifest import ArtifactKind
from sinks.base import PermanentError, TransientError
from sinks.mlflow_rest import short_hash
from sinks.registry import check_component, create_sink
from sinks.trackers.tensorboard import (
    SIDECAR_NAME,
    TensorBoardTracker,
    TensorBoardTrackerSettings,
    read_sidecar,
)
from tests.servers_mlflow import make_item


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    if tag not in accumulator.Tags()["scalars"]:
        return []
    return [(e.step, round(e.value, 6)) for e in accumulator.Scalars(tag)]


def _items():
    return [
        make_item(
            key="ev-1/0/track/prod.tb",
            values={"accuracy": 0.91, "loss": 0.4},
            step=3,
            received_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        ),
        make_item(
            key="ev-2/0/track/prod.tb",
            step_name="evaluate",
            values={"accuracy": 0.95},
            step=5,
            received_at=datetime(2026, 1, 2, 3, 5, 0, tzinfo=UTC),
        ),
        make_item(
            key="ev-2/1/track/prod.tb",
            step_name="evaluate",
            kind=ArtifactKind.MODEL,
            name="fraud_detector",
            metadata={"metrics": {"f1_score": 0.88}},
            received_at=datetime(2026, 1, 2, 3, 5, 0, tzinfo=UTC),
        ),
        make_item(
            key="ev-1/1/track/prod.tb",
            kind=ArtifactKind.PARAMETERS,
            name="hparams",
            values={"lr": 0.001},
        ),
    ]


async def test_scalars_at_their_steps_and_replays_write_nothing(tmp_path: Path):
    sink = TensorBoardTracker("prod.tb", TensorBoardTrackerSettings(log_dir=tmp_path))
    items = _items()
    results = [await sink.deliver(item) for item in items]
    assert not any(r.skipped for r in results)
    replays = [await sink.deliver(item) for item in items]
    assert all(r.skipped for r in replays)
    # A restarted daemon (no cache) replays everything again.
    restarted = TensorBoardTracker("prod.tb", TensorBoardTrackerSettings(log_dir=tmp_path))
    assert all([(await restarted.deliver(item)).skipped for item in items])

    run_dir = tmp_path / "fraud_training" / "run-1"
    assert _scalars(run_dir, "accuracy") == [(3, 0.91), (5, 0.95)]
    assert _scalars(run_dir, "loss") == [(3, 0.4)]
    assert _scalars(run_dir, "f1_score") == [(0, 0.88)]
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    assert "parameters/train.lr/text_summary" in accumulator.Tags()["tensors"]
    assert len(list(run_dir.glob("*tfevents*"))) == len(items)
    assert read_sidecar(run_dir / SIDECAR_NAME) == {item.key for item in items}


async def test_crash_after_the_event_file_before_the_sidecar(tmp_path: Path):
    item = _items()[0]
    sink = TensorBoardTracker("prod.tb", TensorBoardTrackerSettings(log_dir=tmp_path))
    await sink.deliver(item)
    run_dir = tmp_path / "fraud_training" / "run-1"
    # The process died after the rename: the sidecar never got the key.
    (run_dir / SIDECAR_NAME).write_text("")
    # And an earlier attempt left a partial file behind.
    (run_dir / ".router-partial-junk").write_bytes(b"\x00garbage")

    restarted = TensorBoardTracker("prod.tb", TensorBoardTrackerSettings(log_dir=tmp_path))
    replay = await restarted.deliver(item)
    assert replay.skipped
    assert read_sidecar(run_dir / SIDECAR_NAME) == {item.key}
    assert _scalars(run_dir, "accuracy") == [(3, 0.91)]


async def test_crash_before_the_rename_is_written_once(tmp_path: Path):
    item = _items()[1]
    sink = TensorBoardTracker("prod.tb", TensorBoardTrackerSettings(log_dir=tmp_path))
    run_dir = sink.run_dir(item.context.pipeline, item.context.run_id)
    run_dir.mkdir(parents=True)
    partial = run_dir / f".router-partial-{sink.key_tag(item.key)}"
    partial.write_bytes(b"torn")
    result = await sink.deliver(item)
    assert not result.skipped
    assert not partial.exists()
    assert _scalars(run_dir, "accuracy") == [(5, 0.95)]


async def test_a_late_delivery_shows_in_a_tensorboard_already_reading_the_run(
    tmp_path: Path,
):
    """A live TensorBoard reads a run's event files in name order and never goes back
    to a name sorting before the one it reads: a delivery that lands late (retried, or
    overtaken) with an older event time still shows, since files are named in write
    order. Its points keep the event's time."""
    sink = TensorBoardTracker("prod.tb", TensorBoardTrackerSettings(log_dir=tmp_path))
    run_dir = tmp_path / "fraud_training" / "run-1"
    live = EventAccumulator(str(run_dir / "missing"))  # replaced once the run exists
    received = [datetime(2026, 1, 2, 3, minute, tzinfo=UTC) for minute in (30, 10, 20)]
    for i, (step, when) in enumerate(zip([3, 1, 2], received, strict=True)):
        await sink.deliver(make_item(key=f"ev-{i}/0/track/prod.tb", values={"loss": step / 10},
                                     step=step, received_at=when))
        if i == 0:
            live = EventAccumulator(str(run_dir))
        live.Reload()  # as a running TensorBoard does between writes
    points = [(e.step, round(e.value, 6), e.wall_time) for e in live.Scalars("loss")]
    assert sorted(points) == [(1, 0.1, received[1].timestamp()),
                              (2, 0.2, received[2].timestamp()),
                              (3, 0.3, received[0].timestamp())]
    names = sorted(p.name for p in run_dir.glob("*tfevents*"))
    assert [n.rsplit(".", 1)[-1] for n in names] == [
        short_hash(f"ev-{i}/0/track/prod.tb", length=20) for i in range(3)]


async def test_run_directories_are_sanitised(tmp_path: Path):
    sink = TensorBoardTracker("prod.tb", TensorBoardTrackerSettings(log_dir=tmp_path))
    item = make_item(key="ev/0/track/tb", pipeline="..", run_id="a/../b", values={"x": 1.0})
    result = await sink.deliver(item)
    assert result.uri is not None
    written = Path(result.uri.removeprefix("file://"))
    assert written.is_relative_to(tmp_path)
    assert written.parent == tmp_path / "__" / "a_.._b"


async def test_errors(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    sink = TensorBoardTracker("prod.tb", TensorBoardTrackerSettings(log_dir=blocker))
    with pytest.raises(TransientError):
        await sink.deliver(make_item(key="ev/0/track/tb", values={"x": 1.0}))
    with pytest.raises(PermanentError):
        await sink.deliver(make_item(key="ev/0/register/tb", action=Action.REGISTER))


def test_component_type(tmp_path: Path):
    component = ComponentConfig.model_validate({"type": "tensorboard", "log_dir": str(tmp_path)})
    assert check_component("experiment_tracker", "stacks.x.experiment_tracker", component) == []
    assert isinstance(create_sink("x.experiment_tracker", component), TensorBoardTracker)


async def test_a_run_directory_is_listed_once_however_many_deliveries_it_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A run logged at every step holds one event file per delivery: listing them all
    for each new one made logging a run quadratic. One listing per run per process."""
    loads: list[Path] = []
    original = tbmod._RunState.load

    def counted(run_dir: Path, key_tag: Any) -> Any:
        loads.append(run_dir)
        return original(run_dir, key_tag)

    monkeypatch.setattr(tbmod._RunState, "load", staticmethod(counted))
    sink = TensorBoardTracker("prod.tb", TensorBoardTrackerSettings(log_dir=tmp_path))
    for step in range(40):
        await sink.deliver(make_item(key=f"ev-{step}/0/track/prod.tb",
                                     values={"loss": 1 / (step + 1)}, step=step))
    run_dir = tmp_path / "fraud_training" / "run-1"
    assert loads == [run_dir]
    names = [p.name for p in run_dir.glob("*tfevents*")]
    assert len(names) == 40 and sorted(names) == [  # named in write order all the same
        n for _, n in sorted((int(n.split(".")[3] + n.split(".")[4]), n) for n in names)]
    assert [s for s, _ in _scalars(run_dir, "loss")] == list(range(40))


async def test_a_failed_sidecar_write_after_the_rename_is_not_written_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The event file is in place but its key never reached the sidecar (a full disk):
    the retry, in the same process, adopts that file instead of logging the points a
    second time."""
    item = _items()[0]
    sink = TensorBoardTracker("prod.tb", TensorBoardTrackerSettings(log_dir=tmp_path))
    await sink.deliver(_items()[1])  # the run is known (listed) before the failure
    original = tbmod.append_sidecar

    def full_disk(path: Path, key: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tbmod, "append_sidecar", full_disk)
    with pytest.raises(TransientError, match="No space left"):
        await sink.deliver(item)
    monkeypatch.setattr(tbmod, "append_sidecar", original)

    retry = await sink.deliver(item)

    assert retry.skipped  # nothing new written
    run_dir = tmp_path / "fraud_training" / "run-1"
    assert sorted(_scalars(run_dir, "accuracy")) == [(3, 0.91), (5, 0.95)]  # once each
    assert len(list(run_dir.glob(f"*tfevents*{sink.key_tag(item.key)}"))) == 1
    assert item.key in read_sidecar(run_dir / SIDECAR_NAME)


async def test_a_run_status_is_acknowledged_without_writing(tmp_path: Path):
    """TensorBoard keeps no run status: the end of a run writes nothing, logs nothing."""
    sink = TensorBoardTracker("prod.tb", TensorBoardTrackerSettings(log_dir=tmp_path))
    result = await sink.deliver(make_item(key="ev-9/0/end_run/prod.tb", action=Action.END_RUN,
                                          values={"loss": 0.1}, run_status="finished"))
    assert result.skipped
    assert os.listdir(tmp_path) == []  # not even the run directory
