"""The jsonl tracker: one line per delivery key, even across processes sharing the files."""

from __future__ import annotations

import asyncio
import errno
import multiprocessing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from router.delivery import Action, ArtifactView, DeliveryContext, DeliveryItem
from router.manifest import ArtifactKind
from sinks.base import TransientError
from sinks.trackers.jsonl import JsonlTracker, JsonlTrackerSettings, read_jsonl


def item(key: str, value: float = 1.0) -> DeliveryItem:
    return DeliveryItem(
        key=key, action=Action.TRACK, sink_id="local.experiment_tracker",
        context=DeliveryContext(event_id="e", pipeline="p", run_id="r", step_name="s",
                                received_at=datetime.now(UTC)),
        artifact=ArtifactView(index=0, kind=ArtifactKind.METRICS, name="m", version="1",
                              values={"acc": value}, step=3),
    )


def test_replays_write_nothing_and_a_torn_last_line_is_survived(tmp_path: Path) -> None:
    tracker = JsonlTracker("t", JsonlTrackerSettings(path=tmp_path))
    first = asyncio.run(tracker.deliver(item("k1")))
    assert not first.skipped
    assert asyncio.run(tracker.deliver(item("k1"))).skipped
    path = tracker.file_for("p", "r")
    with open(path, "ab") as fh:
        fh.write(b'{"key": "torn')  # a crash in the middle of a write
    fresh = JsonlTracker("t", JsonlTrackerSettings(path=tmp_path))  # a restarted daemon
    assert asyncio.run(fresh.deliver(item("k1"))).skipped
    assert not asyncio.run(fresh.deliver(item("k2", 2.0))).skipped
    rows = read_jsonl(path)
    assert [r["key"] for r in rows] == ["k1", "k2"]
    assert rows[1]["values"] == {"acc": 2.0} and rows[1]["step"] == 3


def _deliver_all(root: str, keys: list[str]) -> int:
    tracker = JsonlTracker("t", JsonlTrackerSettings(path=Path(root), fsync=False))

    async def run() -> int:
        results = [await tracker.deliver(item(k)) for k in keys]
        return sum(not r.skipped for r in results)

    return asyncio.run(run())


def test_daemons_sharing_the_files_never_write_a_key_twice(tmp_path: Path) -> None:
    """A pool member that takes over another's lease may replay its deliveries."""
    keys = [f"k{i}" for i in range(300)]
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        written = pool.starmap(_deliver_all, [(str(tmp_path), keys)] * 3)
    assert sum(written) == len(keys)
    lines = read_jsonl(tmp_path / "p" / "r.jsonl")
    assert sorted(str(r["key"]) for r in lines) == sorted(keys)


def test_batches_skip_keys_written_before_them_by_us_or_by_another_process(
    tmp_path: Path,
) -> None:
    tracker = JsonlTracker("t", JsonlTrackerSettings(path=tmp_path))
    first = asyncio.run(tracker.deliver_batch([item("a"), item("b"), item("a")]))
    # "a" twice: written once
    assert [r.skipped for r in first] == [False, False, False]  # type: ignore[union-attr]
    other = JsonlTracker("t", JsonlTrackerSettings(path=tmp_path))  # another daemon
    assert not asyncio.run(other.deliver(item("c"))).skipped
    second = asyncio.run(tracker.deliver_batch([item("b"), item("c"), item("d")]))
    assert [r.skipped for r in second] == [True, True, False]  # type: ignore[union-attr]
    assert [r["key"] for r in read_jsonl(tracker.file_for("p", "r"))] == ["a", "b", "c", "d"]


def _deliver_batches(root: str, keys: list[str], size: int) -> int:
    tracker = JsonlTracker("t", JsonlTrackerSettings(path=Path(root), fsync=False))

    async def run() -> int:
        written = 0
        for start in range(0, len(keys), size):
            results = await tracker.deliver_batch([item(k) for k in keys[start:start + size]])
            written += sum(not r.skipped for r in results)  # type: ignore[union-attr]
        return written

    return asyncio.run(run())


def test_daemons_sharing_the_files_in_batches_never_write_a_key_twice(tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(600)]
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        written = pool.starmap(_deliver_batches, [(str(tmp_path), keys, n) for n in (7, 50, 256)])
    assert sum(written) == len(keys)
    assert sorted(str(r["key"]) for r in read_jsonl(tmp_path / "p" / "r.jsonl")) == sorted(keys)


def test_without_syncfs_each_appended_file_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sinks.durable.HAVE_SYNCFS", False)
    synced: list[Path] = []
    monkeypatch.setattr("sinks.durable.fsync_paths", lambda paths: synced.extend(paths))
    tracker = JsonlTracker("t", JsonlTrackerSettings(path=tmp_path))
    out = asyncio.run(tracker.deliver_batch([item("a"), item("b")]))
    assert [r.skipped for r in out] == [False, False]  # type: ignore[union-attr]
    assert synced == [tracker.file_for("p", "r")]  # one file, flushed once
    asyncio.run(tracker.deliver_batch([item("a")]))  # a replay writes nothing...
    # ...but flushes the file it relies on again (its line may never have been flushed)
    assert synced == [tracker.file_for("p", "r")] * 2


@pytest.mark.parametrize("with_syncfs", [True, False])
def test_a_retry_after_a_failed_flush_flushes_before_reporting_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_syncfs: bool
) -> None:
    """EIO from fsync/syncfs is simulated by monkeypatching the flush calls (the file
    writes themselves are real).  The retry, and a restarted daemon's replay, find the
    key already in the file: they must flush it, not report it done unflushed."""
    flushed: list[object] = []
    fail = {"left": 1}

    def flush(arg: object) -> None:
        if fail["left"]:
            fail["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        flushed.append(arg)

    monkeypatch.setattr("sinks.durable.HAVE_SYNCFS", with_syncfs)
    monkeypatch.setattr("sinks.durable.dirty_bytes", lambda: 0)
    monkeypatch.setattr("sinks.durable.syncfs", flush)
    monkeypatch.setattr("sinks.durable.fsync_paths", lambda paths: flush(list(paths)))
    tracker = JsonlTracker("t", JsonlTrackerSettings(path=tmp_path))
    with pytest.raises(TransientError):
        asyncio.run(tracker.deliver(item("k1")))  # written, flush failed
    assert asyncio.run(tracker.deliver(item("k1"))).skipped  # the dispatcher's retry
    assert len(flushed) == 1

    fail["left"] = 1
    with pytest.raises(TransientError):
        asyncio.run(tracker.deliver(item("k2")))
    fresh = JsonlTracker("t", JsonlTrackerSettings(path=tmp_path))  # restarted: no cache
    assert asyncio.run(fresh.deliver(item("k2"))).skipped
    assert len(flushed) == 2
    assert [r["key"] for r in read_jsonl(tracker.file_for("p", "r"))] == ["k1", "k2"]


def test_memory_stays_bounded_over_many_runs_and_replays_to_forgotten_runs_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-lived daemon logs to a file per run without end: the keys it keeps in memory
    are those of the runs appended to most recently; a replay to a run it forgot reads
    that file again and still writes nothing twice."""
    monkeypatch.setattr("sinks.trackers.jsonl.CACHED_FILES", 3)
    tracker = JsonlTracker("t", JsonlTrackerSettings(path=tmp_path, fsync=False))

    def in_run(run_id: str, key: str) -> DeliveryItem:
        one = item(key)
        return one.model_copy(update={"context": one.context.model_copy(
            update={"run_id": run_id})})

    runs = [f"run{i}" for i in range(10)]
    for run_id in runs:
        results = asyncio.run(tracker.deliver_batch(
            [in_run(run_id, f"{run_id}-k{i}") for i in range(50)]))
        assert not any(r.skipped for r in results)  # type: ignore[union-attr]
    assert len(tracker._seen) == 3  # the three runs appended to last
    replay = asyncio.run(tracker.deliver_batch(
        [in_run("run0", "run0-k0"), in_run("run0", "run0-k49"), in_run("run0", "new")]))
    assert [r.skipped for r in replay] == [True, True, False]  # type: ignore[union-attr]
    keys = [str(r["key"]) for r in read_jsonl(tracker.file_for("p", "run0"))]
    assert keys == [f"run0-k{i}" for i in range(50)] + ["new"]
    assert len(tracker._seen) == 3 and tracker.file_for("p", "run0") in tracker._seen


def test_a_pipeline_folder_removed_while_running_is_made_again(tmp_path: Path) -> None:
    """The pipeline's folder is made when its file cannot be opened (not tried per
    batch): one removed under a running daemon, by a clean-up say, comes back with the
    next line, and the line is not taken for one written before."""
    import shutil

    tracker = JsonlTracker("t", JsonlTrackerSettings(path=tmp_path / "tracking"))
    assert not asyncio.run(tracker.deliver(item("k1"))).skipped
    path = tracker.file_for("p", "r")
    assert [r["key"] for r in read_jsonl(path)] == ["k1"]
    shutil.rmtree(path.parent)
    assert not asyncio.run(tracker.deliver(item("k2"))).skipped
    assert [r["key"] for r in read_jsonl(path)] == ["k2"]
