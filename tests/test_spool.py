"""SpoolSource pieces that need no daemon: retention of done/, crash recovery moves, and
intake's hashing of a bundle's files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from router.intake import AcceptedEvent, Rejection, load_bundle, sha256_files
from router.metrics import RouterMetrics
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


def test_a_bundle_arriving_right_after_the_start_scan_is_seen_at_once(tmp_path: Path) -> None:
    """The watcher is armed before the initial scan: a bundle renamed in just after the
    scan is picked up by the watcher, not left for the periodic rescan (an hour here),
    behind bundles that came after it. Fails if the scan runs first."""
    import asyncio
    import json

    from router.db import Database
    from router.journal import DeliveryJournal
    from tests.test_journal import planner

    paths = SpoolPaths(tmp_path / "spool")
    paths.ensure()
    staged = tmp_path / "spool" / "incoming" / ".tmp-late"
    staged.mkdir()
    (staged / "manifest.json").write_text(json.dumps({
        "manifest_version": 1, "pipeline": "p", "run_id": "r", "step_name": "s",
        "artifacts": [{"type": "metrics", "name": "m", "values": {"a": 1}}]}))

    async def scenario() -> None:
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'j.db'}")
        await db.migrate()
        source = SpoolSource(paths, DeliveryJournal(db), planner, preflight=lambda e: None,
                             metrics=RouterMetrics(), rescan_seconds=3600)
        scan = source._scan

        def scan_then_a_bundle_arrives() -> None:
            scan()
            os.rename(staged, paths.incoming / "late")

        source._scan = scan_then_a_bundle_arrives  # type: ignore[method-assign]
        running = asyncio.create_task(source.run())
        try:
            for _ in range(200):
                if (paths.accepted / "late").is_dir() or (paths.done / "late").is_dir():
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the bundle was not seen within 10 s")
        finally:
            source.stop()
            await running
            await db.dispose()

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
    good = [r for i, r in enumerate(results) if i != 1]
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
