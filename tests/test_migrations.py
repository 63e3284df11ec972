"""Schema migrations of a SQLite journal: atomic, and one process at a time (a daemon
starting while a CLI command runs both migrate the same file)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _migrate_in_child(url: str, *, crash_at_create: bool = False,
                      start_at: float | None = None) -> subprocess.Popen[str]:
    code = textwrap.dedent(f"""
        import asyncio, os, signal, time
        import sqlalchemy as sa
        from router.db import Database
        db = Database({url!r})
        if {crash_at_create!r}:
            @sa.event.listens_for(db.engine.sync_engine, "after_cursor_execute")
            def crash(conn, cursor, statement, *args):
                if statement.lstrip().upper().startswith("CREATE TABLE ARTIFACTS"):
                    os.kill(os.getpid(), signal.SIGKILL)
        while {start_at!r} and time.time() < {start_at!r}:
            pass
        asyncio.run(db.migrate())
    """)
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _tables(db: Path) -> set[str]:
    con = sqlite3.connect(db)
    try:
        return {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
    finally:
        con.close()


def test_a_migration_killed_half_way_leaves_nothing_the_next_start_trips_over(
    tmp_path: Path,
) -> None:
    db = tmp_path / "router.db"
    url = f"sqlite+aiosqlite:///{db}"
    child = _migrate_in_child(url, crash_at_create=True)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert "artifacts" not in _tables(db), "the cut-off migration was rolled back"
    again = _migrate_in_child(url)
    _, err = again.communicate(timeout=60)
    assert again.returncode == 0, err[-500:]
    assert {"artifacts", "events", "deliveries", "alembic_version"} <= _tables(db)


def test_two_processes_migrating_one_new_journal_at_once_both_succeed(tmp_path: Path) -> None:
    failures = []
    for i in range(4):
        url = f"sqlite+aiosqlite:///{tmp_path / f'r{i}.db'}"
        start_at = time.time() + 1.0  # both past their imports, then at once
        children = [_migrate_in_child(url, start_at=start_at) for _ in range(2)]
        for child in children:
            _, err = child.communicate(timeout=60)
            if child.returncode != 0:
                failures.append(err.strip().splitlines()[-1])
    assert not failures, failures
