"""Shared fixtures: databases (SQLite and the local PostgreSQL) and real daemon processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.servers_common import free_port

__all__ = ["free_port"]  # re-exported: tests import it from here

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_DSN = os.environ.get("ROUTER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_available() -> str | None:
    try:
        import asyncpg
    except ImportError:
        return "asyncpg is not installed"

    async def probe() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        return f"no PostgreSQL at {PG_ADMIN_DSN}: {exc}"
    return None


_PG_REASON = _pg_available()


def create_pg_database() -> str:
    """A fresh, empty PostgreSQL database; returns its SQLAlchemy asyncpg URL."""
    import asyncpg

    name = f"router_test_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}"


def drop_pg_database(url: str) -> None:
    import asyncpg

    name = url.rsplit("/", 1)[1]

    async def drop() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.fixture
def pg_url() -> Iterator[str]:
    if _PG_REASON:
        pytest.skip(_PG_REASON)
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Both journal backends: every test using this runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'router.db'}"
        return
    if _PG_REASON:
        pytest.skip(_PG_REASON)
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


# --- a configured workspace and a real daemon process -----------------------------------


class Workspace:
    """A directory with a router.yaml, a spool, a local store and a tracker dir."""

    def __init__(self, root: Path, journal_url: str | None = None, **router: Any) -> None:
        self.root = root
        self.spool = root / "spool"
        self.store = root / "artifacts"
        self.tracking = root / "tracking"
        self.config_path = root / "router.yaml"
        self.env: dict[str, str] = {}  # for ${VAR} in the config, given to every process
        self.journal_url = journal_url or f"sqlite+aiosqlite:///{root / 'state' / 'router.db'}"
        self.daemons: list[DaemonProcess] = []  # started on this workspace (their logs)
        self.router = {
            "spool": str(self.spool),
            "state_dir": str(root / "state"),
            "journal_url": self.journal_url,
            "rescan_seconds": 1.0,
            "drain_seconds": 10,
            "retry": {"base_delay": 0.05, "max_delay": 0.5, "max_attempts": 100},
            **router,
        }
        self.stack: dict[str, Any] = {
            "artifact_store": {"type": "local", "path": str(self.store)},
            "experiment_tracker": {"type": "jsonl", "path": str(self.tracking)},
            "artifact_routing": {
                "Model": {"store": "local", "path": "{pipeline}/{run_id}/{step_name}/{name}"},
                "Dataset": {"store": "local", "path": "{pipeline}/{run_id}/{step_name}/{name}"},
                "Metrics": {"log_to_tracker": True},
                "Parameters": {"log_to_tracker": True},
                "default": {"store": "local", "path": "{pipeline}/{run_id}/{step_name}/{name}"},
            },
        }
        self.write()

    def write(self) -> None:
        self.config_path.write_text(
            yaml.safe_dump(
                {"active_stack": "local", "stacks": {"local": self.stack}, "router": self.router}
            )
        )

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "router.cli", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            check=check,
            cwd=self.root,
            timeout=120,
            env={**os.environ, **self.env},
        )

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.cli("status", "--json").stdout)
        return out

    def wait_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 120.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status = self.status()
        while not predicate(status):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting; last status: {status}{self.daemon_logs()}")
            time.sleep(0.3)
            status = self.status()
        return status

    def daemon_logs(self, lines: int = 80) -> str:
        """The end of each daemon's log: what a timed-out wait needs to be diagnosed
        from CI output alone. Daemons still running are asked first for every thread's
        stack (SIGUSR1), which shows where a stuck one waits."""
        running = [d for d in self.daemons if d.proc.poll() is None]
        for daemon in running:
            daemon.proc.send_signal(signal.SIGUSR1)
        if running:
            time.sleep(1.0)
            lines = max(lines, 400)  # a stack per thread: the I/O pool's included
        out = []
        for daemon in self.daemons:
            tail = daemon.log_path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"\n--- {daemon.log_path.name} (last {len(tail)} lines) ---\n"
                       + "\n".join(tail))
        return "".join(out)

    def wait_settled(self, events: int, timeout: float = 120.0) -> dict[str, Any]:
        """Until `events` events are finished (done, failed or rejected) and none pending."""

        def settled(s: dict[str, Any]) -> bool:
            finished = sum(s["events"].get(k, 0) for k in ("done", "failed", "rejected"))
            d = s["deliveries"]
            return finished >= events and d["pending"] == 0 and d["in_flight"] == 0

        return self.wait_until(settled, timeout)


class DaemonProcess:
    """`artifact-router run` as a real child process, stopped by its own pid."""

    def __init__(self, workspace: Workspace, *extra: str, env: dict[str, str] | None = None):
        self.workspace = workspace
        self.log_path = workspace.root / f"daemon-{time.time_ns()}.log"
        workspace.daemons.append(self)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "run", "--config", str(workspace.config_path),
             *extra],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workspace.root,
            env={**os.environ, **workspace.env, **(env or {})},
        )

    def wait_started(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Poll, then read the log: a daemon may start and exit between two looks
            # (a wrong password fails fast); the log says whether it started.
            exited = self.proc.poll() is not None
            if "artifact-router started" in self.log():
                return
            if exited:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"daemon did not start: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def terminate(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if not self._log.closed:
            self._log.close()


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


@pytest.fixture
def start_daemon() -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(workspace: Workspace, *extra: str, env: dict[str, str] | None = None,
              wait: bool = True) -> DaemonProcess:
        daemon = DaemonProcess(workspace, *extra, env=env)
        started.append(daemon)
        if wait:
            daemon.wait_started()
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def bytes_read(daemon: DaemonProcess) -> int:
    """Bytes the daemon has read so far, by any means (a sparse file's holes included)."""
    io = Path(f"/proc/{daemon.proc.pid}/io").read_text().splitlines()
    return int(dict(line.split(": ") for line in io)["rchar"])


def wait_bytes_read(daemon: DaemonProcess, total: int, timeout: float = 60.0) -> None:
    """Until the daemon has read `total` bytes: a hash well under way, say."""
    deadline = time.monotonic() + timeout
    while bytes_read(daemon) < total:
        assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.log()
        time.sleep(0.05)


def write_bundle(
    spool: Path,
    name: str,
    manifest: dict[str, Any],
    files: dict[str, bytes] | None = None,
    sparse: dict[str, int] | None = None,
) -> Path:
    """Build a bundle the way the DESIGN says writers should: under .tmp-, then rename.

    `sparse` names files of that many bytes that take no disk (a checkpoint to hash)."""
    incoming = spool / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    tmp = incoming / f".tmp-{name}"
    tmp.mkdir()
    for rel, data in (files or {}).items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for rel, size in (sparse or {}).items():
        with open(tmp / rel, "wb") as holes:
            holes.truncate(size)
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    os.rename(tmp, incoming / name)
    return incoming / name


def model_manifest(name: str, run_id: str = "run-1", files: list[str] | None = None,
                   upload: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "manifest_version": 1,
        "pipeline": "fraud",
        "run_id": run_id,
        "step_name": "train",
        "artifacts": [
            {"type": "model", "name": name, "upload": upload,
             "files": [{"path": f} for f in (files or ["model.pkl"])], **extra}
        ],
    }


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under scripts/test.sh (ROUTER_TEST_NO_SKIPS=1) a skipped test fails the run: a
    suite that passes with tests skipped for a missing server proves less than it says."""
    if os.environ.get("ROUTER_TEST_NO_SKIPS") != "1" or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reporter.write_line(
            f"{len(skipped)} test(s) skipped: failing on purpose (see the reasons above; "
            "set ROUTER_TEST_ALLOW_SKIPS=1 to accept them)", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
