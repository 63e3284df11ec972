"""SpoolSource pieces that need no daemon: retention of done/, crash recovery moves, and
intake's hashing of a bundle's files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from router.intake import (
    AcceptedEvent,
    FileHash,
    Rejection,
    load_bundle,
    read_bounded,
    settled_identity,
    sha256_file,
    sha256_files,
)
from router.metrics import RouterMetrics
from router.sources import spool as spool_module
from router.sources.spool import SpoolPaths, SpoolSource
from tests.conftest import model_manifest, write_bundle


class _NoJournal:
    """Retention never touches the journal; anything else would fail loudly."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"unexpected journal call {name}")


def test_done_bundles_are_pruned_after_the_retention_period(tmp_path: Path) -> None:
    paths = SpoolPaths(tmp_path)
    paths.ensure()
    source = SpoolSource(paths, _NoJournal(), lambda e, v: None,  # type: ignore[arg-type,return-value]
                         preflight=lambda e: None,
                         metrics=RouterMetrics(), retention_days=7)
    old, fresh = paths.done / "old", paths.done / "fresh"
    for bundle in (old, fresh):
        bundle.mkdir()
        (bundle / "manifest.json").write_text("{}")
    eight_days_ago = time.time() - 8 * 86400
    os.utime(old, (eight_days_ago, eight_days_ago))
    keep = paths.failed / "failed-long-ago"  # failed bundles wait for an operator: kept
    keep.mkdir()
    os.utime(keep, (eight_days_ago, eight_days_ago))
    source._prune_done()
    assert not old.exists()
    assert fresh.is_dir() and keep.is_dir()


def test_retention_zero_keeps_everything(tmp_path: Path) -> None:
    paths = SpoolPaths(tmp_path)
    paths.ensure()
    source = SpoolSource(paths, _NoJournal(), lambda e, v: None,  # type: ignore[arg-type,return-value]
                         preflight=lambda e: None,
                         metrics=RouterMetrics(), retention_days=0)
    (paths.done / "old").mkdir()
    os.utime(paths.done / "old", (0, 0))
    source._prune_done()
    assert (paths.done / "old").is_dir()


def test_deliveries_never_read_a_bundle_still_in_incoming(tmp_path: Path) -> None:
    """After a crash between commit and rename, a journaled bundle sits in incoming/
    until intake moves it (as a duplicate): deliveries must wait for that, not read
    files that vanish under them."""
    import asyncio

    paths = SpoolPaths(tmp_path)
    paths.ensure()
    source = SpoolSource(paths, _NoJournal(), lambda e, v: None,  # type: ignore[arg-type,return-value]
                         preflight=lambda e: None,
                         metrics=RouterMetrics())
    for folder, name in ((paths.incoming, "moving"), (paths.accepted, "settled"),
                         (paths.failed, "parked")):
        (folder / name).mkdir()
    found = asyncio.run(source.locate_many(["moving", "settled", "parked", "gone"]))
    assert found == {"moving": None, "settled": paths.accepted / "settled",
                     "parked": paths.failed / "parked", "gone": None}


_METRICS_MANIFEST = json.dumps({
    "manifest_version": 1, "pipeline": "p", "run_id": "r", "step_name": "s",
    "artifacts": [{"type": "metrics", "name": "m", "values": {"a": 1}}]})


@contextlib.asynccontextmanager
async def _running_source(
    tmp_path: Path, paths: SpoolPaths, prepare: Callable[[SpoolSource], None] | None = None,
    rescan_seconds: float = 3600,
) -> AsyncIterator[SpoolSource]:
    """A SpoolSource running on a real SQLite journal with its rescan an hour away (by
    default): a bundle it takes was seen by the watcher (or looked at again), not by the
    rescan."""
    import asyncio

    from router.db import Database
    from router.journal import DeliveryJournal
    from tests.test_journal import planner

    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'j.db'}")
    await db.migrate()
    source = SpoolSource(paths, DeliveryJournal(db), planner, preflight=lambda e: None,
                         metrics=RouterMetrics(), rescan_seconds=rescan_seconds)
    if prepare is not None:
        prepare(source)
    running = asyncio.create_task(source.run())
    try:
        yield source
    finally:
        source.stop()
        await running
        await db.dispose()


async def _taken(paths: SpoolPaths, name: str) -> None:
    """Until bundle `name` was journaled (moved out of incoming/), at most 10 s."""
    import asyncio

    for _ in range(200):
        if (paths.accepted / name).is_dir() or (paths.done / name).is_dir():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"bundle {name} was not taken within 10 s")


def test_a_bundle_arriving_right_after_the_start_scan_is_seen_at_once(tmp_path: Path) -> None:
    """The watcher is armed before the initial scan: a bundle renamed in just after the
    scan is picked up by the watcher, not left for the periodic rescan (an hour here),
    behind bundles that came after it. Fails if the scan runs first."""
    import asyncio

    paths = _spool(tmp_path)
    staged = paths.incoming / ".tmp-late"
    staged.mkdir()
    (staged / "manifest.json").write_text(_METRICS_MANIFEST)

    def scan_first_then_a_bundle_arrives(source: SpoolSource) -> None:
        scan = source._scan

        def scan_then_a_bundle_arrives() -> None:
            scan()
            os.rename(staged, paths.incoming / "late")

        source._scan = scan_then_a_bundle_arrives  # type: ignore[method-assign]

    async def scenario() -> None:
        async with _running_source(tmp_path, paths, scan_first_then_a_bundle_arrives):
            await _taken(paths, "late")

    asyncio.run(scenario())


def test_the_spool_says_ready_only_once_it_watches(tmp_path: Path) -> None:
    """/healthz reports the spool's `healthy`: a supervisor that waits for it before
    handing over work must find a spool that sees a bundle at once. So it is false
    until the watcher is armed and the start scan done, and a bundle renamed in as soon
    as it says ready is taken by the watcher, not left for the rescan (an hour here)."""
    import asyncio

    paths = _spool(tmp_path)
    staged = paths.incoming / ".tmp-first"
    staged.mkdir()
    (staged / "manifest.json").write_text(_METRICS_MANIFEST)
    seen_before_run: list[bool] = []

    async def scenario() -> None:
        async with _running_source(tmp_path, paths,
                                   lambda source: seen_before_run.append(source.healthy)
                                   ) as source:
            for _ in range(200):
                if source.healthy:
                    break
                await asyncio.sleep(0.01)
            assert source.healthy, "the spool never said it was ready"
            os.rename(staged, paths.incoming / "first")
            await _taken(paths, "first")

    asyncio.run(scenario())
    assert seen_before_run == [False], "ready before the spool ran: bundles would wait"


def test_rescans_leave_alone_the_bundles_the_intake_already_has(tmp_path: Path) -> None:
    """A rescan every 50 ms while a batch of 30 bundles waits on its journal commit (and
    30 more wait their turn): every bundle is read once and taken. Before, each rescan
    stat'ed every name in incoming/, and queued the batch under way again, whose names
    were then read a second time, gone by then."""
    import asyncio

    paths = _spool(tmp_path)
    for i in range(60):
        write_bundle(paths.root, f"b{i:02d}", model_manifest(f"m{i}"), {"model.pkl": b"x"})
    reads: list[str] = []
    looked_at: list[str] = []
    release, first_batch_read = asyncio.Event(), asyncio.Event()

    def instrument(source: SpoolSource) -> None:
        source.batch_size = 30
        read_all, accept, states = source._read_all, source.journal.accept, source._states

        async def recorded_read(names: list[str], hash_up_to: int | None) -> Any:
            reads.extend(names)
            first_batch_read.set()
            return await read_all(names, hash_up_to)

        async def held_accept(*args: Any, **kwargs: Any) -> Any:
            await release.wait()
            return await accept(*args, **kwargs)

        def recorded_states(names: list[str]) -> list[str]:
            if reads:  # not the start scan, which finds all 60
                looked_at.extend(names)
            return states(names)

        source._read_all = recorded_read  # type: ignore[method-assign]
        source.journal.accept = held_accept  # type: ignore[method-assign]
        source._states = recorded_states  # type: ignore[method-assign]

    async def scenario() -> None:
        async with _running_source(tmp_path, paths, instrument, rescan_seconds=0.05):
            await asyncio.wait_for(first_batch_read.wait(), 10)
            await asyncio.sleep(0.5)  # some ten rescans while the first batch waits
            release.set()
            for i in range(60):
                await _taken(paths, f"b{i:02d}")

    asyncio.run(scenario())
    assert sorted(reads) == [f"b{i:02d}" for i in range(60)]  # each once
    assert looked_at == []  # every name was in hand when a rescan came


def test_a_bundle_completed_in_place_is_taken_without_waiting_for_the_rescan(
        tmp_path: Path) -> None:
    """DESIGN's second way to write a bundle: files first in incoming/<name>/, then
    manifest.json renamed in last. The watcher sees incoming/ only, so the directory,
    first read without its manifest, is looked at again: the bundle is taken although
    the rescan is an hour away, whether it was there before the start (found by the
    start scan) or made while running, and whether its manifest comes at once or later.
    """
    import asyncio

    paths = _spool(tmp_path)
    (paths.incoming / "before").mkdir()  # half-written while the daemon was down

    def complete(name: str) -> None:
        (paths.incoming / name / "manifest.json.tmp").write_text(_METRICS_MANIFEST)
        os.rename(paths.incoming / name / "manifest.json.tmp",
                  paths.incoming / name / "manifest.json")

    async def scenario() -> None:
        async with _running_source(tmp_path, paths):
            await asyncio.sleep(0.3)
            complete("before")
            await _taken(paths, "before")
            (paths.incoming / "soon").mkdir()
            (paths.incoming / "later").mkdir()
            (paths.incoming / "later" / "data.bin").write_bytes(b"x" * 1000)
            await asyncio.sleep(0.1)
            complete("soon")
            await _taken(paths, "soon")
            await asyncio.sleep(2.5)  # looked at ever less often meanwhile
            assert (paths.incoming / "later").is_dir()  # never taken without a manifest
            complete("later")
            await _taken(paths, "later")

    asyncio.run(scenario())


# -- intake: hashing a bundle's files ------------------------------------------------


def _shards(count: int, size: int) -> dict[str, bytes]:
    return {f"model-{i:05d}-of-{count:05d}.safetensors": bytes([i + 1]) * size
            for i in range(count)}


def test_shards_of_a_large_bundle_are_hashed_in_manifest_order(tmp_path: Path) -> None:
    """Over 32 MiB in all, the files are hashed on several threads at once: each digest
    still lands on its own file, in the manifest's order."""
    shards = _shards(4, 9 * 1024 * 1024)
    bundle = write_bundle(tmp_path / "spool", "sharded", model_manifest(
        "llm", files=list(shards)), shards)

    event = load_bundle(bundle, time.time())

    assert isinstance(event, AcceptedEvent)
    staged = event.files[0]
    assert [f.path for f in staged] == [Path(n) for n in shards]
    assert [f.sha256 for f in staged] == [hashlib.sha256(d).hexdigest() for d in shards.values()]
    assert [f.size for f in staged] == [len(d) for d in shards.values()]


@pytest.mark.parametrize("count", [1, 3], ids=["one-file", "three-large-files"])
def test_sha256_files_reports_an_unreadable_file_in_its_own_slot(
    tmp_path: Path, count: int
) -> None:
    paths = []
    for i, data in enumerate(_shards(count, 12 * 1024 * 1024).values()):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(data)
    paths.insert(1, tmp_path / "vanished")

    results = sha256_files(paths)

    assert isinstance(results[1], FileNotFoundError)
    good = [r[:2] for i, r in enumerate(results) if i != 1 and isinstance(r, FileHash)]
    assert good == [(hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size)
                    for i, p in enumerate(paths) if i != 1]


def test_an_unreadable_file_rejects_its_bundle_naming_field_value_and_fix(
    tmp_path: Path,
) -> None:
    """A file the router's user may not read (written by another user with a tight umask)
    is a rejection of that bundle, not an error that fails the whole batch it was read
    with. As root the check runs in a child process that drops to `nobody`."""
    spool = Path(tempfile.mkdtemp(dir="/tmp" if os.geteuid() == 0 else tmp_path))
    try:
        os.chmod(spool, 0o755)
        files = {"model.pkl": b"weights", "secret.bin": b"not yours"}
        bundle = write_bundle(spool, "b1", model_manifest(
            "m", files=list(files)), files)
        for path in (spool, spool / "incoming", bundle, bundle / "model.pkl",
                     bundle / "manifest.json"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.chmod(bundle / "secret.bin", 0o000)

        result = _load_as_unprivileged(bundle)

        assert result["type"] == "rejection", result
        (problem,) = result["problems"]
        assert problem["field"] == "artifacts[0].files[1].path"
        assert problem["value"] == "secret.bin"
        assert "cannot read: Permission denied" in problem["message"]
        assert "readable by the router's user" in problem["message"]
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def _load_as_unprivileged(bundle: Path) -> dict[str, Any]:
    """load_bundle's outcome as JSON, read by a user without root's override."""
    if os.geteuid() != 0:
        return _outcome(bundle)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, load, report, exit without cleanup
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, json.dumps(_outcome(bundle)).encode())
        except BaseException as exc:
            os.write(write_end, json.dumps({"type": "error", "error": repr(exc)}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(data)
    return result


def _outcome(bundle: Path) -> dict[str, Any]:
    try:
        result = load_bundle(bundle, time.time())
    except OSError as exc:  # the old behaviour: raised, failing the whole batch
        return {"type": "raised", "error": repr(exc)}
    if isinstance(result, Rejection):
        return {"type": "rejection", "problems": [p.model_dump() for p in result.problems]}
    return {"type": "accepted"}


# -- intake through a real SpoolSource and SQLite journal: hostile incoming/ entries ----


def _spool(tmp_path: Path) -> SpoolPaths:
    paths = SpoolPaths(tmp_path / "spool")
    paths.ensure()
    return paths


def _with_source(tmp_path: Path, scenario: Callable[[SpoolSource], Awaitable[None]],
                 timeout: float = 20.0) -> None:
    """Run `scenario` against a SpoolSource on a real SQLite journal, in a thread of its
    own: an event loop blocked for good (a FIFO opened on it) fails the test, not hang it."""
    import asyncio
    import threading

    from router.db import Database
    from router.journal import DeliveryJournal
    from tests.test_journal import planner

    async def main() -> None:
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'j.db'}")
        await db.migrate()
        source = SpoolSource(_spool(tmp_path), DeliveryJournal(db), planner,
                             preflight=lambda e: None, metrics=RouterMetrics())
        try:
            await scenario(source)
        finally:
            await db.dispose()

    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in (tmp_path / "spool").rglob("*"):  # let a writer stuck on a FIFO go
            if fifo.is_fifo():
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"the spool source was blocked for over {timeout}s")
    if failure:
        raise failure[0]


def _process(tmp_path: Path, names: list[str]) -> dict[str, Any]:
    """One intake batch of `names`; then the journal's status and each event's bundle."""
    seen: dict[str, Any] = {}

    async def scenario(source: SpoolSource) -> None:
        await source._process(names)
        status = await source.journal.status()
        seen["events"], seen["rejected"] = status.events, status.rejected

    _with_source(tmp_path, scenario)
    return seen


def _listing(paths: SpoolPaths) -> dict[str, list[str]]:
    return {folder.name: sorted(os.listdir(folder)) for folder in (
        paths.incoming, paths.accepted, paths.done, paths.rejected)}


def test_a_symlink_loop_in_incoming_is_rejected_alone(tmp_path: Path) -> None:
    """os.lstat(loop/manifest.json) raises ELOOP: that entry is rejected, naming it; the
    valid bundle read in the same batch is journaled. Fails without the fix: the ELOOP
    escaped _process, failing (and retrying) the whole batch forever."""
    paths = _spool(tmp_path)
    os.symlink("loop", paths.incoming / "loop")
    write_bundle(paths.root, "good", model_manifest("clf"), {"model.pkl": b"x"})

    seen = _process(tmp_path, ["good", "loop"])

    assert _listing(paths) == {"incoming": [], "accepted": ["good"], "done": [],
                               "rejected": ["loop"]}
    assert (paths.rejected / "loop").is_symlink()  # moved as it is, never followed
    assert seen["events"] == {"accepted": 1, "rejected": 1}
    (rejected,) = seen["rejected"]
    assert rejected["bundle"] == "loop" and "is a symlink" in rejected["error"]


def test_a_symlinked_bundle_directory_is_refused_not_read(tmp_path: Path) -> None:
    """incoming/linked -> a valid bundle outside the spool: refused (in the watcher's path,
    _process, and listed by the scan so it does not linger), nothing read or written
    outside. Fails without the fix: the target was read, accepted and its files staged."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "model.pkl").write_bytes(b"not the spool's")
    (outside / "manifest.json").write_text(json.dumps(model_manifest("clf")))
    paths = _spool(tmp_path)
    os.symlink(outside, paths.incoming / "linked")

    seen = _process(tmp_path, ["linked"])

    assert _listing(paths)["rejected"] == ["linked"]
    assert sorted(os.listdir(outside)) == ["manifest.json", "model.pkl"]  # no error.json
    assert seen["events"] == {"rejected": 1}
    assert "must be a real directory" in seen["rejected"][0]["error"]
    os.symlink(outside, paths.incoming / "again")
    scan = SpoolSource(paths, _NoJournal(), lambda e, v: None,  # type: ignore[arg-type,return-value]
                       preflight=lambda e: None, metrics=RouterMetrics())
    assert scan._bundles_by_state()[0] == ["again"]


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_error_json_replaces_whatever_the_writer_left_never_following_it(
    tmp_path: Path, kind: str
) -> None:
    """A rejected bundle already holding an `error.json`: a symlink to a file outside (it
    was overwritten), a FIFO (it blocked the event loop for good) or a directory (the
    write raised and the rejection was lost). Fails without the fix in each case."""
    victim = tmp_path / "precious.txt"
    victim.write_text("do not touch\n")
    paths = _spool(tmp_path)
    staged = paths.incoming / ".tmp-bad"
    staged.mkdir()
    if kind == "symlink":
        os.symlink(victim, staged / "error.json")
    elif kind == "fifo":
        os.mkfifo(staged / "error.json")
    else:
        (staged / "error.json").mkdir()
        (staged / "error.json" / "keep").write_text("writer's")
    (staged / "manifest.json").write_text("{not json")
    os.rename(staged, paths.incoming / "bad")
    write_bundle(paths.root, "good", model_manifest("clf"), {"model.pkl": b"x"})

    seen = _process(tmp_path, ["bad", "good"])

    written = paths.rejected / "bad" / "error.json"
    assert written.is_file() and not written.is_symlink()
    assert "not valid JSON" in json.loads(written.read_text())["summary"]
    assert victim.read_text() == "do not touch\n"
    if kind == "directory":
        (kept,) = (paths.rejected / "bad").glob("error.json.*.bundled")
        assert (kept / "keep").read_text() == "writer's"
    assert [p for p in (paths.rejected / "bad").iterdir() if p.name.endswith(".tmp")] == []
    assert _listing(paths)["accepted"] == ["good"]
    assert seen["events"] == {"accepted": 1, "rejected": 1}


def test_a_bundle_name_that_is_not_utf8_is_rejected_and_intake_goes_on(
    tmp_path: Path,
) -> None:
    """A directory name with a byte that is not UTF-8: rejected (saying to rename it),
    journaled under its escaped name, and the bundle read with it is journaled. Fails
    without the fix: SQLite raised UnicodeEncodeError and the batch was retried forever."""
    paths = _spool(tmp_path)
    raw = os.fsencode(paths.incoming) + b"/run-\xff"
    os.mkdir(raw)
    with open(raw + b"/model.pkl", "wb") as fh:
        fh.write(b"x")
    with open(raw + b"/manifest.json", "w") as fh:
        fh.write(json.dumps(model_manifest("clf")))
    write_bundle(paths.root, "good", model_manifest("clf"), {"model.pkl": b"y"})

    seen = _process(tmp_path, sorted(os.listdir(paths.incoming)))

    assert os.listdir(os.fsencode(paths.rejected)) == [b"run-\xff"]
    error = json.loads((paths.rejected / os.fsdecode(b"run-\xff") / "error.json").read_text())
    assert error["bundle"] == "run-\\xff"
    assert "not valid UTF-8; rename it to UTF-8" in error["summary"]
    assert seen["events"] == {"accepted": 1, "rejected": 1}
    assert seen["rejected"][0]["bundle"] == "run-\\xff"


def test_a_reused_directory_name_is_journaled_under_the_name_it_moves_to(
    tmp_path: Path,
) -> None:
    """Two events (ids train-1, train-2) in directories both named `train` while the first
    is still in accepted/: the second is journaled, and moved, as `train-<ns>`, so its
    deliveries read its own files. Also after a crash between its commit and its move
    (simulated: the move is skipped once): the restart moves it to that journaled name.
    Fails without the fix: the journal kept `train`, which leads to the first's files."""
    paths = _spool(tmp_path)
    seen: dict[str, Any] = {}

    def emit(run: str) -> None:
        manifest = model_manifest("clf", run_id=run)
        manifest["id"] = f"train-{run}"
        write_bundle(paths.root, "train", manifest, {"model.pkl": f"run {run}".encode()})

    async def scenario(source: SpoolSource) -> None:
        emit("1")
        await source._process(["train"])
        emit("2")
        with pytest.MonkeyPatch.context() as patch:  # the crash: the move never runs
            patch.setattr(spool_module, "_move_all", lambda moves: None)
            await source._process(["train"])
        seen["left"] = list(paths.incoming.iterdir())
        await source._process(["train"])  # the restart reads it again: a duplicate
        second = (await source.journal.event_record("train-2"))["bundle"]
        seen["second"] = second
        seen["found"] = await source.locate_many(["train", second])

    _with_source(tmp_path, scenario)

    second = seen["second"]
    assert seen["left"] == [paths.incoming / "train"]
    assert second.startswith("train-") and second != "train"
    assert seen["found"] == {"train": paths.accepted / "train", second: paths.accepted / second}
    assert (paths.accepted / "train" / "model.pkl").read_bytes() == b"run 1"
    assert (paths.accepted / second / "model.pkl").read_bytes() == b"run 2"
    assert _listing(paths)["incoming"] == []


def test_two_bundles_with_one_id_in_a_batch_are_both_settled(tmp_path: Path) -> None:
    """Bundles `a` and `b` carry the same id and manifest, read in one batch: `a` is
    journaled and moved to accepted/, `b` (a duplicate) to done/; none is left behind.
    Fails without the fix: outcomes were matched by id, so `a` stayed in incoming/ and
    `b` sat in accepted/ under a name the journal does not know."""
    paths = _spool(tmp_path)
    manifest = model_manifest("clf")
    manifest["id"] = "same"
    for name in ("a", "b"):
        write_bundle(paths.root, name, manifest, {"model.pkl": b"x"})
    seen: dict[str, Any] = {}

    async def scenario(source: SpoolSource) -> None:
        await source._process(["a", "b"])
        seen["record"] = await source.journal.event_record("same")

    _with_source(tmp_path, scenario)

    assert _listing(paths) == {"incoming": [], "accepted": ["a"], "done": ["b"],
                               "rejected": []}
    assert seen["record"]["bundle"] == "a"


# -- file identity: what lets a store skip hashing a large file again ---------------


def _settled(path: Path) -> None:
    """Let the file's last change fall well behind the clock (timestamps may lag it by
    a kernel tick)."""
    changed = path.stat().st_ctime_ns
    while time.time_ns() - changed < 100_000_000:
        time.sleep(0.02)


def test_a_large_file_hashed_after_it_settled_carries_its_identity_into_the_bundle(
    tmp_path: Path,
) -> None:
    files = {"model.bin": os.urandom(2 * 1024 * 1024), "small.txt": b"tiny"}
    bundle = write_bundle(tmp_path, "b1", model_manifest("m", files=list(files)), files)
    _settled(bundle / "model.bin")

    event = load_bundle(bundle, time.time())

    assert isinstance(event, AcceptedEvent)
    big, small = event.files[0]
    st = (bundle / "model.bin").stat()
    assert big.identity is not None and big.identity.matches(st)
    assert small.identity is None  # hashed again where needed: cheaper than recording it
    # and it survives the journal's JSON
    again = AcceptedEvent.model_validate_json(event.model_dump_json())
    assert again.files[0][0].identity == big.identity


def test_a_file_changed_just_before_or_while_it_was_hashed_has_no_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(2 * 1024 * 1024))
    st = path.stat()
    # Changed within a tick of the hash: a later write could keep the same ctime.
    assert settled_identity(st, st, st.st_size, st.st_ctime_ns + 1_000_000) is None
    # Hashed in the tick it was written. The clock is pinned there: on a loaded machine
    # (a CI run alongside) the real one had moved on, and the identity was kept.
    with monkeypatch.context() as pinned:
        pinned.setattr("router.intake.time.time_ns", lambda: st.st_ctime_ns)
        assert sha256_file(path).identity is None
    # Changed while it was read: the stat after is not the stat before.
    _settled(path)
    with open(path, "r+b") as fh:
        fh.write(b"x")
    assert settled_identity(st, path.stat(), st.st_size, time.time_ns()) is None
    # Settled: the identity it was hashed under.
    _settled(path)
    hashed = sha256_file(path)
    assert hashed.identity is not None and hashed.identity.matches(path.stat())


def test_whole_second_timestamps_need_two_seconds_of_settling(tmp_path: Path) -> None:
    """On a filesystem that keeps whole seconds (FAT, ext3, some mounts) a write a
    moment later keeps the same stamp; the margin is then 2 s, not a tick."""
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(2 * 1024 * 1024))
    real = path.stat()
    fields = list(real)
    stamp = 1_700_000_000
    fields[7:10] = [stamp, stamp, stamp]  # st_atime, st_mtime, st_ctime (whole seconds)
    coarse = os.stat_result(fields, {"st_atime_ns": stamp * 10**9,
                                     "st_mtime_ns": stamp * 10**9,
                                     "st_ctime_ns": stamp * 10**9})
    assert coarse.st_ctime_ns == stamp * 10**9
    at = stamp * 10**9
    assert settled_identity(coarse, coarse, real.st_size, at + 1_500_000_000) is None
    assert settled_identity(coarse, coarse, real.st_size, at + 2_500_000_000) is not None


@pytest.mark.parametrize(("written", "expected", "limit", "read"), [
    (100, 100, 1000, 100),     # as stat said
    (5000, 100, 100_000, 5000),  # grew after the stat: read to its end
    (5000, 100, 1001, 1001),   # grew past the limit: one byte over, so it shows
    (0, 0, 10, 0),
])
def test_read_bounded_reads_to_the_end_but_never_past_the_limit(
    tmp_path: Path, written: int, expected: int, limit: int, read: int,
) -> None:
    path = tmp_path / "manifest.json"
    data = os.urandom(written)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_bounded(fd, expected, limit) == data[:read]
    finally:
        os.close(fd)


# -- intake: large bundles hashed apart --------------------------------------------------


def test_a_large_bundle_is_hashed_apart_and_holds_back_only_its_own_run(
        tmp_path: Path) -> None:
    """A bundle over `hash_apart_bytes` is hashed in a task of its own: a small bundle of
    another run, renamed in after it, is journaled while it still hashes (before, every
    bundle behind it waited the seconds a checkpoint takes). Bundles of its run, and
    bundles naming its run as an input, wait for it, so lineage resolves in order. The
    large one's hashing is held at a gate here, to see who passes meanwhile."""
    import asyncio
    import threading

    paths = _spool(tmp_path)
    gate = threading.Event()
    load_many = spool_module._load_many

    def gated(paths_: list[Path], held: tuple[Path, ...], hash_up_to: int | None,
              abandon: threading.Event) -> Any:
        if hash_up_to is None:  # the large bundle's own read: it hashes its files
            assert gate.wait(30), "the test never opened the gate"
        return load_many(paths_, held, hash_up_to, abandon)

    big = os.urandom(3 * 1024 * 1024)

    def metrics(run_id: str, **extra: Any) -> dict[str, Any]:
        return {"manifest_version": 1, "pipeline": "fraud", "run_id": run_id,
                "step_name": "eval", **extra,
                "artifacts": [{"type": "metrics", "name": "m", "values": {"a": 1}}]}

    def prepare(source: SpoolSource) -> None:
        source.hash_apart_bytes = 1024 * 1024

    async def scenario() -> None:
        spool_module._load_many = gated  # type: ignore[assignment]
        try:
            async with _running_source(tmp_path, paths, prepare) as source:
                write_bundle(paths.root, "large", model_manifest("m", run_id="A"),
                             {"model.pkl": big})
                await asyncio.sleep(0.3)
                write_bundle(paths.root, "other-run", metrics("B"))
                write_bundle(paths.root, "same-run", metrics("A"))
                write_bundle(paths.root, "consumer", metrics(
                    "C", inputs=["fraud/A/train/m"]))
                await _taken(paths, "other-run")
                await asyncio.sleep(0.5)  # a batch or two more: still nothing of run A
                assert sorted(os.listdir(paths.incoming)) == ["consumer", "large", "same-run"]
                gate.set()
                for name in ("large", "same-run", "consumer"):
                    await _taken(paths, name)
                record = await source.journal.event_record("large")
                staged = record["files"][0][0]
                assert staged["sha256"] == hashlib.sha256(big).hexdigest()
                assert staged["size"] == len(big)
                assert (await source.journal.known_events(
                    ["large", "same-run", "consumer", "other-run"])).keys() == {
                    "large", "same-run", "consumer", "other-run"}
        finally:
            gate.set()
            spool_module._load_many = load_many

    asyncio.run(scenario())


def test_a_large_bundle_the_journal_refused_stays_in_incoming_and_is_taken_later(
        tmp_path: Path) -> None:
    """The journal failing (a full disk, here its first accept raising) while a large
    bundle is hashed apart: nothing was acknowledged, so the bundle stays in incoming/,
    the source reports itself unhealthy, and the bundle is read and journaled again."""
    import asyncio

    paths = _spool(tmp_path)
    big = os.urandom(2 * 1024 * 1024)
    seen_unhealthy: list[bool] = []

    def prepare(source: SpoolSource) -> None:
        source.hash_apart_bytes = 1024 * 1024
        accept = source.journal.accept
        calls = 0

        async def failing_once(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise OSError(28, "No space left on device")
            seen_unhealthy.append(not source.healthy)
            return await accept(*args, **kwargs)

        source.journal.accept = failing_once  # type: ignore[method-assign]

    async def scenario() -> None:
        async with _running_source(tmp_path, paths, prepare) as source:
            write_bundle(paths.root, "large", model_manifest("m", run_id="A"),
                         {"model.pkl": big})
            await asyncio.sleep(0.5)
            assert (paths.incoming / "large" / "model.pkl").read_bytes() == big
            await _taken(paths, "large")
            record = await source.journal.event_record("large")
            assert record["files"][0][0]["sha256"] == hashlib.sha256(big).hexdigest()
        assert seen_unhealthy == [True]  # the retry came while it was reported unhealthy

    asyncio.run(scenario())


def test_bundles_read_in_one_batch_with_a_large_one_of_their_run_are_journaled_with_it(
        tmp_path: Path) -> None:
    """Bundles already waiting when the daemon starts are read in one batch, in name
    order, not in the order they were made. Those linked to a large bundle's run (of
    that run, or naming it in `inputs`) go with it into one transaction, as they did
    when everything was hashed in line: a consumer sorted before its large producer is
    never journaled first. Others in the batch go on at once."""
    import asyncio
    import sqlite3
    import threading

    paths = _spool(tmp_path)
    gate = threading.Event()
    load_many = spool_module._load_many

    def gated(paths_: list[Path], held: tuple[Path, ...], hash_up_to: int | None,
              abandon: threading.Event) -> Any:
        if hash_up_to is None:
            assert gate.wait(30), "the test never opened the gate"
        return load_many(paths_, held, hash_up_to, abandon)

    def metrics(run_id: str, name: str, **extra: Any) -> dict[str, Any]:
        return {"manifest_version": 1, "pipeline": "fraud", "run_id": run_id,
                "step_name": "eval", **extra,
                "artifacts": [{"type": "metrics", "name": name, "values": {"a": 1}}]}

    write_bundle(paths.root, "a-consumer", metrics("C", "c", inputs=["fraud/A/train/m"]))
    write_bundle(paths.root, "b-large", model_manifest("m", run_id="A"),
                 {"model.pkl": os.urandom(2 * 1024 * 1024)})
    write_bundle(paths.root, "c-other", metrics("B", "o"))
    write_bundle(paths.root, "d-same", metrics("A", "s"))

    def prepare(source: SpoolSource) -> None:
        source.hash_apart_bytes = 1024 * 1024

    async def scenario() -> None:
        spool_module._load_many = gated  # type: ignore[assignment]
        try:
            async with _running_source(tmp_path, paths, prepare):
                await _taken(paths, "c-other")
                await asyncio.sleep(0.3)
                assert sorted(os.listdir(paths.incoming)) == ["a-consumer", "b-large", "d-same"]
                gate.set()
                for name in ("a-consumer", "b-large", "d-same"):
                    await _taken(paths, name)
        finally:
            gate.set()
            spool_module._load_many = load_many

    asyncio.run(scenario())
    with sqlite3.connect(tmp_path / "j.db") as conn:
        created = dict(conn.execute("select name, created_at from artifacts").fetchall())
    assert created["c"] == created["m"] == created["s"]  # one commit
    assert created["o"] < created["m"]
