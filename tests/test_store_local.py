"""The local store's batch path: one call, one outcome per item, nothing half-written."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import sinks.durable
from router.delivery import (
    Action,
    ArtifactView,
    DeliveryContext,
    DeliveryItem,
    DeliveryResult,
    PermanentError,
    StagedFile,
)
from sinks.stores.local import TMP_DIR, LocalStore, LocalStoreSettings


def staged(src: Path, name: str, data: bytes) -> StagedFile:
    path = src / f"{hashlib.sha256(name.encode() + data).hexdigest()[:16]}-{name}"
    path.write_bytes(data)
    return StagedFile(name=name, type="bin", path=path,
                      sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def item(key: str, target: str, files: list[StagedFile], **params: str) -> DeliveryItem:
    return DeliveryItem(
        key=key, action=Action.STORE, sink_id="local.artifact_store",
        context=DeliveryContext(event_id=key, pipeline="p", run_id="r", step_name="s",
                                received_at=datetime.now(UTC)),
        artifact=ArtifactView(index=0, kind="model", name="m", version="3", files=files),
        target=target, params=dict(params),
    )


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore("local.artifact_store", LocalStoreSettings(path=tmp_path / "store"))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "src"
    path.mkdir()
    return path


def temp_files(store: LocalStore) -> list[str]:
    tmp = store.root / TMP_DIR
    return sorted(os.listdir(tmp)) if tmp.exists() else []


def test_an_unknown_on_conflict_fails_permanently_and_writes_nothing(
    store: LocalStore, src: Path
) -> None:
    # As the S3 and GCS stores do: a value no store knows is not taken for "fail".
    batch = [item("a", "typo", [staged(src, "m.bin", b"x")], on_conflict="replace"),
             item("b", "fine", [staged(src, "m.bin", b"y")])]
    out = asyncio.run(store.deliver_batch(batch))
    assert isinstance(out[0], PermanentError)
    assert "on_conflict 'replace' is not one of fail, overwrite, version" in str(out[0])
    assert not (store.root / "typo").exists()
    assert isinstance(out[1], DeliveryResult) and (store.root / "fine" / "m.bin").exists()


def test_one_bad_item_never_fails_the_rest_of_its_batch(store: LocalStore, src: Path) -> None:
    (store.root / "taken").mkdir(parents=True)
    (store.root / "taken" / "m.bin").write_bytes(b"someone else's file")
    edited = staged(src, "e.bin", b"as accepted")
    edited.path.write_bytes(b"edited since")  # type: ignore[union-attr]
    batch = [
        item("a", "ok1", [staged(src, "m.bin", b"first")]),
        item("b", "taken", [staged(src, "m.bin", b"mine")]),
        item("c", "edited", [edited]),
        item("d", "ok2", [staged(src, "m.bin", b"second")]),
    ]
    out = asyncio.run(store.deliver_batch(batch))
    assert isinstance(out[0], DeliveryResult) and isinstance(out[3], DeliveryResult)
    assert isinstance(out[1], PermanentError) and "conflict" in str(out[1])
    assert isinstance(out[2], PermanentError) and "changed after it was accepted" in str(out[2])
    assert (store.root / "ok1" / "m.bin").read_bytes() == b"first"
    assert (store.root / "ok2" / "m.bin").read_bytes() == b"second"
    assert (store.root / "taken" / "m.bin").read_bytes() == b"someone else's file"
    assert not (store.root / "edited").exists() or not list((store.root / "edited").iterdir())
    assert out[0].objects[0].uri == f"file://{store.root}/ok1/m.bin"
    assert temp_files(store) == []


def test_two_items_of_one_batch_aiming_at_one_key(store: LocalStore, src: Path) -> None:
    same = asyncio.run(store.deliver_batch([
        item("a", "k", [staged(src, "m.bin", b"v")]),
        item("b", "k", [staged(src, "m.bin", b"v")]),
    ]))
    assert isinstance(same[1], DeliveryResult) and same[1].skipped  # identical: a no-op
    clash = asyncio.run(store.deliver_batch([
        item("c", "j", [staged(src, "m.bin", b"one")]),
        item("d", "j", [staged(src, "m.bin", b"two")]),
    ]))
    assert isinstance(clash[0], DeliveryResult)
    assert isinstance(clash[1], PermanentError) and "conflict" in str(clash[1])
    assert (store.root / "j" / "m.bin").read_bytes() == b"one"
    later = asyncio.run(store.deliver_batch([
        item("e", "o", [staged(src, "m.bin", b"one")], on_conflict="overwrite"),
        item("f", "o", [staged(src, "m.bin", b"two")], on_conflict="overwrite"),
    ]))
    assert all(isinstance(r, DeliveryResult) for r in later)
    assert (store.root / "o" / "m.bin").read_bytes() == b"two"  # in batch order
    assert temp_files(store) == []


@pytest.mark.parametrize("size", [0, 1, 1024 * 1024, 2 * 1024 * 1024 + 3],
                         ids=["empty", "one-byte", "one-buffer", "three-buffers"])
def test_files_of_every_size_are_copied_byte_for_byte(
    store: LocalStore, src: Path, size: int,
) -> None:
    """The copy reads through one buffer sized for the file (at most 1 MiB) and writes
    unbuffered: the edges of that buffer must neither drop nor repeat a byte."""
    data = os.urandom(size)
    result = asyncio.run(store.deliver(item("a", "x", [staged(src, "m.bin", data)])))
    assert (store.root / "x" / "m.bin").read_bytes() == data
    assert result.objects[0].sha256 == hashlib.sha256(data).hexdigest()
    assert temp_files(store) == []


def test_a_replayed_batch_is_a_no_op(store: LocalStore, src: Path) -> None:
    batch = [item(str(i), f"r{i}", [staged(src, "m.bin", os.urandom(100))]) for i in range(20)]
    first = asyncio.run(store.deliver_batch(batch))
    assert not any(isinstance(r, Exception) or r.skipped for r in first)
    mtimes = [(store.root / f"r{i}" / "m.bin").stat().st_mtime_ns for i in range(20)]
    again = asyncio.run(store.deliver_batch(batch))
    assert all(isinstance(r, DeliveryResult) and r.skipped for r in again)
    assert mtimes == [(store.root / f"r{i}" / "m.bin").stat().st_mtime_ns for i in range(20)]


def test_stale_temp_files_are_swept_and_fresh_ones_kept(store: LocalStore, src: Path) -> None:
    tmp = store.root / TMP_DIR
    tmp.mkdir(parents=True)
    stale, fresh = tmp / "old.part", tmp / "new.part"
    stale.write_bytes(b"killed mid-copy two hours ago")
    fresh.write_bytes(b"another daemon's copy in progress")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    asyncio.run(store.deliver(item("a", "x", [staged(src, "m.bin", b"d")])))
    assert temp_files(store) == ["new.part"]


def test_the_temp_folder_is_recreated_if_removed(store: LocalStore, src: Path) -> None:
    asyncio.run(store.deliver(item("a", "x", [staged(src, "m.bin", b"1")])))
    os.rmdir(store.root / TMP_DIR)
    asyncio.run(store.deliver(item("b", "y", [staged(src, "m.bin", b"2")])))
    assert (store.root / "y" / "m.bin").read_bytes() == b"2"


@pytest.mark.parametrize("key", ["a/./b", "a//b", "a/../../escape"])
def test_keys_with_dot_segments_are_still_checked(store: LocalStore, src: Path, key: str) -> None:
    """Only plain keys skip realpath; the rest are resolved and must stay in the root."""
    (out,) = asyncio.run(store.deliver_batch([item("a", key, [staged(src, "m.bin", b"z")])]))
    if key.startswith("a/../.."):
        assert isinstance(out, PermanentError) and "outside the store root" in str(out)
        assert not (store.root.parent / "escape").exists()
    else:
        assert isinstance(out, DeliveryResult)
        assert Path(out.objects[0].uri.removeprefix("file://")).is_relative_to(store.root)


@pytest.mark.parametrize("dirty", [0, 1 << 30], ids=["syncfs", "fsync-per-file"])
def test_both_ways_of_flushing_store_every_file(
    store: LocalStore, src: Path, monkeypatch: pytest.MonkeyPatch, dirty: int
) -> None:
    """With little dirty data on the system a batch is flushed with one syncfs before
    its renames and one after; with much (a checkpoint just written, that syncfs would
    wait for), or without syncfs, each temp file is fsynced, then each folder."""
    monkeypatch.setattr("sinks.durable.dirty_bytes", lambda: dirty)
    flushed: list[str] = []
    syncfs, fsync_paths = sinks.durable.syncfs, sinks.durable.fsync_paths

    def recording_syncfs(root: Path) -> None:
        flushed.append(f"syncfs {root}")
        syncfs(root)

    def recording_fsync(paths: Iterable[Path]) -> None:
        paths = list(paths)
        flushed.extend(f"fsync {p.relative_to(store.root)}" for p in paths)
        fsync_paths(paths)

    monkeypatch.setattr("sinks.durable.syncfs", recording_syncfs)
    monkeypatch.setattr("sinks.durable.fsync_paths", recording_fsync)
    batch = [item(str(i), f"d{i % 3}/r{i}", [staged(src, "m.bin", bytes([i]) * 10)])
             for i in range(10)]
    out = asyncio.run(store.deliver_batch(batch))
    assert all(isinstance(r, DeliveryResult) for r in out)
    for i in range(10):
        assert (store.root / f"d{i % 3}" / f"r{i}" / "m.bin").read_bytes() == bytes([i]) * 10
    assert temp_files(store) == []
    if dirty == 0 and sinks.durable.HAVE_SYNCFS:
        assert flushed == [f"syncfs {store.root}"] * 2
    else:
        temps = [f for f in flushed[:10] if f.startswith(f"fsync {TMP_DIR}/")]
        assert len(temps) == 10  # every copy, before any rename
        folders = {f"fsync d{i % 3}/r{i}" for i in range(10)} | {f"fsync d{i}" for i in range(3)}
        assert sorted(flushed[10:]) == sorted(folders | {"fsync ."})  # up to the root


def test_a_failed_item_claims_no_key_for_the_rest_of_its_batch(
    store: LocalStore, src: Path
) -> None:
    """An item whose second file fails writes nothing, so a later item of the batch
    with the same content at the same key must still write it, not take it as there."""
    edited = staged(src, "b.bin", b"as accepted")
    edited.path.write_bytes(b"edited since")  # type: ignore[union-attr]
    out = asyncio.run(store.deliver_batch([
        item("a", "k", [staged(src, "a.bin", b"same"), edited]),
        item("b", "k", [staged(src, "a.bin", b"same")]),
    ]))
    assert isinstance(out[0], PermanentError)
    assert isinstance(out[1], DeliveryResult) and not out[1].skipped
    assert (store.root / "k" / "a.bin").read_bytes() == b"same"
    assert not (store.root / "k" / "b.bin").exists()


def _both_batches_check_before_either_places(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hold each batch (in its worker thread) after its checks and copies, until the
    other batch got there too: the race the dispatcher runs into by chance (several
    batches in flight per sink), every time."""
    barrier = threading.Barrier(2, timeout=30)
    original = LocalStore._commit

    def held(self: LocalStore, ready: list[Any]) -> None:
        barrier.wait()
        original(self, ready)

    monkeypatch.setattr(LocalStore, "_commit", held)


async def _two_batches(store: LocalStore, a: DeliveryItem, b: DeliveryItem) -> list[Any]:
    outcomes = await asyncio.gather(store.deliver_batch([a]), store.deliver_batch([b]))
    return [o for batch in outcomes for o in batch]


@pytest.mark.parametrize("no_hard_links", [False, True], ids=["link", "no-hard-links"])
def test_two_batches_at_once_aiming_at_one_key_never_both_win(
    store: LocalStore, src: Path, monkeypatch: pytest.MonkeyPatch, no_hard_links: bool
) -> None:
    """Both batches find the key free; the file is put in place with link(2), which
    refuses a taken name, so the second sees the first's file: a conflict, and the
    first's bytes stay. Where the file system has no hard links (simulated: link fails
    with EPERM as on such mounts), a lock makes check-and-rename atomic instead."""
    if no_hard_links:
        def no_link(src: Any, dst: Any) -> None:
            raise OSError(errno.EPERM, "Operation not permitted", str(dst))

        monkeypatch.setattr(os, "link", no_link)
    _both_batches_check_before_either_places(monkeypatch)
    a, b = staged(src, "m.bin", b"from a"), staged(src, "m.bin", b"from b")

    out = asyncio.run(_two_batches(store, item("a", "race", [a]), item("b", "race", [b])))

    assert sum(isinstance(o, PermanentError) and "conflict" in str(o) for o in out) == 1
    winner = b"from a" if isinstance(out[0], DeliveryResult) else b"from b"
    assert (store.root / "race" / "m.bin").read_bytes() == winner
    assert temp_files(store) == []


def test_two_batches_at_once_with_the_same_content_both_succeed(
    store: LocalStore, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same bytes raced to one key: one batch places them, the other finds them
    there (link refuses the name, the content matches) and is a no-op."""
    _both_batches_check_before_either_places(monkeypatch)
    out = asyncio.run(_two_batches(store, item("a", "same", [staged(src, "m.bin", b"v")]),
                                   item("b", "same", [staged(src, "m.bin", b"v")])))
    assert all(isinstance(o, DeliveryResult) for o in out)
    assert sorted(o.skipped for o in out) == [False, True]
    assert (store.root / "same" / "m.bin").read_bytes() == b"v"
    assert temp_files(store) == []


def test_two_batches_racing_for_the_same_keys_in_other_orders_leave_no_mix(
    store: LocalStore, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two artifacts of two files each, aimed at the same keys, their files listed in
    opposite orders, placed at the same moment (each link(2) slowed so that the two
    batches take turns): one artifact is stored whole and the other is a conflict.
    Before, each won one file, both failed, and the store held half of each."""
    _both_batches_check_before_either_places(monkeypatch)
    real_link = os.link

    def slow_link(src_path: Any, dst: Any) -> None:
        real_link(src_path, dst)
        time.sleep(0.05)  # let the other batch's thread run between two files

    monkeypatch.setattr(os, "link", slow_link)
    a = item("a", "mix", [staged(src, "x.bin", b"a-x"), staged(src, "y.bin", b"a-y")])
    b = item("b", "mix", [staged(src, "y.bin", b"b-y"), staged(src, "x.bin", b"b-x")])

    out = asyncio.run(_two_batches(store, a, b))

    assert sum(isinstance(o, PermanentError) and "conflict" in str(o) for o in out) == 1
    winner = "a" if isinstance(out[0], DeliveryResult) else "b"
    assert (store.root / "mix" / "x.bin").read_bytes() == f"{winner}-x".encode()
    assert (store.root / "mix" / "y.bin").read_bytes() == f"{winner}-y".encode()
    assert temp_files(store) == []


def test_dirty_bytes_reads_the_write_back_backlog_from_proc_meminfo() -> None:
    """The figure flush() chooses by: on Linux a number, never None (which would mean
    an fsync per file always, and the small-bundle throughput that costs)."""
    before = sinks.durable.dirty_bytes()
    assert isinstance(before, int) and before >= 0
