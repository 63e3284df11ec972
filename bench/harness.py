"""What every scenario needs: a real daemon process, peers as processes, peak RSS, medians."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DaemonUnderTest", "Figure", "ScenarioResult", "median", "p99", "peer_startup", "run_peer",
    "steady_rate",
]


@dataclass
class Figure:
    """One measured run: a rate (higher is better) and the process's peak RSS."""

    rate: float
    unit: str
    seconds: float
    peak_rss_mib: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScenarioResult:
    scenario: str
    peer: str
    unit: str
    router: float
    peer_value: float
    ratio: float
    router_peak_rss_mib: float
    peer_peak_rss_mib: float
    target: str
    met: bool
    repetitions: int
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def _wait_rusage(proc: subprocess.Popen[bytes]) -> tuple[int, float]:
    """Reap one child and return (exit status, its own peak RSS in MiB)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024.0


def run_peer(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run a peer tool to completion; return (elapsed seconds, its peak RSS in MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    code, rss = _wait_rusage(proc)
    elapsed = time.perf_counter() - start
    if code != 0:
        err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        raise RuntimeError(f"{cmd[0]} failed ({code}): {err}")
    return elapsed, rss


def peer_startup(
    command: Callable[[Path, int], list[str]], work: Path, env: dict[str, str] | None = None,
    reps: int = 3,
) -> float:
    """Median seconds a peer takes for one 4 KiB file: its start-up (interpreter, SDK,
    client set-up), which the router, a daemon already running, does not pay per batch.

    Scenarios subtract it from the peer's timed runs, so that both sides are compared
    in steady state (`aws s3 cp` spends about 0.5 s starting, a quarter of a 500-file
    run). `command(src, i)` is the peer's command line for source directory `src`.
    """
    src = work / "startup-src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "one.bin").write_bytes(os.urandom(4096))
    return median([run_peer(command(src, i), env)[0] for i in range(reps)])


def steady_rate(n: int, seconds: float, startup: float) -> float:
    """Items per second once started: the start-up taken off, never below 10 % of the run."""
    return n / max(seconds - startup, seconds / 10)


class DaemonUnderTest:
    """`artifact-router run` on a fresh workspace, measured from the outside."""

    def __init__(self, root: Path, stack: dict[str, Any], router: dict[str, Any] | None = None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.spool = root / "spool"
        self.db_path = root / "state" / "router.db"
        self.config = root / "router.yaml"
        from tests.servers_mqtt import free_port

        self.http_port = free_port()
        settings = {
            "spool": str(self.spool),
            "state_dir": str(root / "state"),
            "journal_url": f"sqlite+aiosqlite:///{self.db_path}",
            "rescan_seconds": 2.0,
            "listen": f"127.0.0.1:{self.http_port}",  # /healthz says when it is ready
            **(router or {}),
        }
        self.config.write_text(yaml.safe_dump(
            {"stacks": {"bench": stack}, "active_stack": "bench", "router": settings}))
        (self.spool / "incoming").mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "daemon.log"

    command_prefix: list[str] = []  # a wrapper for the daemon: valgrind, in bench/probe.py
    start_timeout = 30.0  # seconds until the daemon must be ready

    def start(self, env: dict[str, str] | None = None) -> None:
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*self.command_prefix, sys.executable, "-m", "router.cli", "run",
             "--config", str(self.config), "--log-level", "WARNING"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.root,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + self.start_timeout
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"daemon did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(Exception):
            self._log.close()

    def _ready(self) -> bool:
        """/healthz says ok: the spool watches (and MQTT, where set, is subscribed), so
        the load starts on a daemon that takes it, not on one still starting up."""
        try:
            url = f"http://127.0.0.1:{self.http_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(json.loads(resp.read()).get("status") == "ok")
        except (OSError, ValueError):  # URLError and HTTPError are OSErrors
            return False  # not listening yet, or 503 while starting

    # --- reading the journal (MqttDaemon reads PostgreSQL through its own _query) ------

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db_path, timeout=30) as conn:
            return [tuple(r) for r in conn.execute(sql).fetchall()]

    def count(self, state: str = "done") -> int:
        assert state.isidentifier()
        return int(self._query(f"select count(*) from events where state = '{state}'")[0][0])

    def finished_at(self) -> dict[str, float]:
        return {str(k): float(v) for k, v in self._query(
            "select id, finished_at from events where state = 'done'")}

    def last_finished(self) -> float:
        """Wall-clock time at which the last event was done (its journal commit)."""
        return float(self._query("select max(finished_at) from events where state = 'done'")[0][0])

    def wait_done(self, n: int, timeout: float = 1800, poll: float = 0.02) -> float:
        """Seconds (perf_counter) at which `n` events were done."""
        deadline = time.monotonic() + timeout
        while self.count() < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.count()}/{n} done: {self.log.read_text()[-2000:]}")
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon died: {self.log.read_text()[-3000:]}")
            time.sleep(poll)
        return time.perf_counter()

    def stop(self) -> float:
        """SIGTERM, reap; return the daemon's peak RSS in MiB over its whole life."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        _, rss = _wait_rusage(self.proc)
        self._log.close()
        return rss


def write_json(path: Path, results: list[ScenarioResult], meta: dict[str, Any]) -> None:
    path.write_text(json.dumps({"meta": meta, "results": [r.as_dict() for r in results]},
                               indent=2) + "\n")
