"""SpoolSource pieces that need no daemon: retention of done/ and crash recovery moves."""

from __future__ import annotations

import os
import time
from pathlib import Path

from router.metrics import RouterMetrics
from router.sources.spool import SpoolPaths, SpoolSource


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
