"""`/healthz` against a real daemon process whose sinks hang or fail their health check.

A liveness probe gives /healthz a few seconds: the sinks are checked at once, each for
at most `HEALTH_TIMEOUT`, so hung sinks cost one timeout in all, not one each.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.dispatcher import HEALTH_TIMEOUT
from tests.conftest import Workspace, free_port

HUNG = 3  # one after another these took HUNG x HEALTH_TIMEOUT


@pytest.fixture
def silent_ports() -> Iterator[list[int]]:
    """Servers that accept connections (the kernel does) and never answer."""
    servers = []
    try:
        for _ in range(HUNG):
            server = socket.socket()
            server.bind(("127.0.0.1", 0))
            server.listen(16)  # accepted by the kernel, never read, never answered
            servers.append(server)
        yield [server.getsockname()[1] for server in servers]
    finally:
        for server in servers:
            server.close()


def timed_healthz(port: int) -> tuple[float, int, dict[str, Any]]:
    """Seconds /healthz took, its status and body (a 503 body too)."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=60) as resp:
            status, body = resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        status, body = exc.code, json.loads(exc.read())
    return time.monotonic() - started, status, body


def test_healthz_answers_within_one_timeout_however_many_sinks_hang(
    tmp_path: Path, silent_ports: list[int], start_daemon,  # type: ignore[no-untyped-def]
) -> None:
    """Three MLflow trackers on servers that never answer, a local store whose health()
    raises (a path the OS refuses: "File name too long"), and a healthy local store and
    jsonl tracker: /healthz answers within about one timeout, each hung or failing sink
    is unhealthy with its reason in the log, and the healthy ones are still healthy."""
    port = free_port()
    workspace = Workspace(tmp_path, listen=f"127.0.0.1:{port}")
    workspace.stack["experiment_tracker"] = [
        {"type": "jsonl", "path": str(workspace.tracking)},
        *({"type": "mlflow", "tracking_uri": f"http://127.0.0.1:{silent}",
           "request_timeout": 600} for silent in silent_ports),
    ]
    workspace.stack["artifact_stores"] = {
        "broken": {"type": "local", "path": str(tmp_path / ("x" * 300) / "store")}}
    workspace.write()
    daemon = start_daemon(workspace)
    hung = {f"local.experiment_tracker[{i + 1}]" for i in range(HUNG)}
    healthy = {"local.artifact_store", "local.experiment_tracker[0]"}
    expected = hung | healthy | {"local.artifact_stores.broken"}

    deadline = time.monotonic() + 60
    while True:  # the sinks are built in the background at start: wait until all are
        elapsed, status, body = timed_healthz(port)
        sinks = body["checks"]["sinks"]
        if set(sinks) == expected:
            break
        assert time.monotonic() < deadline, (sinks, daemon.log())

    assert elapsed < 2 * HEALTH_TIMEOUT, (  # one after another: HUNG x HEALTH_TIMEOUT
        f"/healthz took {elapsed:.1f} s with {HUNG} hung sinks")
    assert elapsed >= HEALTH_TIMEOUT * 0.9, "the silent servers should hold their checks"
    assert status == 200 and body["status"] == "ok", body  # the router itself is fine
    assert {sink for sink in expected if sinks[sink] is False} == (
        hung | {"local.artifact_stores.broken"}), sinks
    assert all(sinks[sink] is True for sink in healthy), sinks

    timed_healthz(port)  # asked again: nothing new to say
    reasons: dict[str, list[str]] = {}
    for entry in _log_entries(daemon, "sink unhealthy"):
        reasons.setdefault(entry["sink"], []).append(entry["reason"])
    assert set(reasons) == hung | {"local.artifact_stores.broken"}, reasons
    for sink in hung:  # once each, however many probes found it so
        assert reasons[sink] == [f"health check timed out after {HEALTH_TIMEOUT:g} s"]
    (broken,) = reasons["local.artifact_stores.broken"]
    assert broken.startswith("health check failed: ") and "File name too long" in broken


def _log_entries(daemon: Any, event: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in daemon.log().splitlines()
            if line.startswith("{") and f'"{event}"' in line]


def test_an_unhealthy_sink_is_logged_once_until_it_recovers(
    tmp_path: Path, start_daemon,  # type: ignore[no-untyped-def]
) -> None:
    """A liveness probe asks every few seconds: a sink that stays unhealthy is one
    warning with its reason, not one per probe; its recovery is logged once too."""
    port = free_port()
    workspace = Workspace(tmp_path, listen=f"127.0.0.1:{port}")
    parent = tmp_path / "mounted-later" / "artifacts"
    workspace.stack["artifact_stores"] = {"later": {"type": "local", "path": str(parent / "store")}}
    workspace.write()
    daemon = start_daemon(workspace)
    sink = "local.artifact_stores.later"

    deadline = time.monotonic() + 60
    while sink not in timed_healthz(port)[2]["checks"]["sinks"]:  # built in the background
        assert time.monotonic() < deadline, daemon.log()
    for _ in range(4):
        _, _, body = timed_healthz(port)
        assert body["checks"]["sinks"][sink] is False, body

    warned = [e for e in _log_entries(daemon, "sink unhealthy") if e["sink"] == sink]
    assert len(warned) == 1, warned
    assert "health check says it cannot work" in warned[0]["reason"]

    parent.mkdir(parents=True)  # the volume appears
    for _ in range(3):
        _, _, body = timed_healthz(port)
        assert body["checks"]["sinks"][sink] is True, body
    recovered = [e for e in _log_entries(daemon, "sink healthy again") if e["sink"] == sink]
    assert len(recovered) == 1 and recovered[0]["was"] == warned[0]["reason"], recovered
    assert len([e for e in _log_entries(daemon, "sink unhealthy") if e["sink"] == sink]) == 1
