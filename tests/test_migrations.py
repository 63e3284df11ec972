"""Schema migrations: atomic, and one process at a time on SQLite (a daemon starting
while a CLI command runs both migrate the same file); and in step with the models."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from router.db import Database, metadata

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


async def test_the_migrations_build_the_schema_the_models_declare(db_url: str) -> None:
    """A table or column added to router/db.py without its migration shows here, on both
    backends (the daemon's tables come from the migrations, not from the models)."""
    db = Database(db_url)
    try:
        await db.migrate()
        async with db.engine.connect() as conn:
            diffs = await conn.run_sync(lambda c: compare_metadata(
                MigrationContext.configure(c, opts={"compare_type": True}), metadata))
    finally:
        await db.dispose()
    if db.is_sqlite:  # SQLite's INTEGER is 64-bit already: 0003 leaves it be
        diffs = [d for d in diffs if not (isinstance(d, list) and d[0][0] == "modify_type"
                                          and d[0][2:4] == ("artifacts", "step"))]
    assert diffs == []
