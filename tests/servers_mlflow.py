"""A real `mlflow server` for the tests (DESIGN section 8), one per test session.

Import the fixtures into a test module:

    from tests.servers_mlflow import mlflow_server  # noqa: F401

The server uses a sqlite backend and a temporary artifact root, listens on a free port
of 127.0.0.1 with one worker, and is stopped by its own process id (its process group,
which holds the uvicorn worker) when the session ends.  Notes for MLflow 3.x:

- `--workers 1`: the default is 4 uvicorn workers, slower to start and not needed;
  `--dev` is not needed (it only adds auto-reload and debug logging);
- MLflow's security middleware (allowed hosts, CORS) accepts Host 127.0.0.1 by
  default, so no `--allowed-hosts` is needed for requests to 127.0.0.1;
- `MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false` keeps the server from starting its job
  runner and a handful of Huey consumer processes nothing here uses;
- a model version's `source` must not be a local path outside the run's artifact
  directory, so the tests register `s3://` URIs.

Starting takes about 5 to 10 s, so the process is shared by every module that imports
the fixture (pytest makes one session fixture per importing module; they share it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from router.delivery import (
    Action,
    ArtifactView,
    DeliveryContext,
    DeliveryItem,
    DeliveryResult,
)
from router.manifest import ArtifactKind
from tests.servers_common import free_port, stop_process, wait_http

__all__ = ["MlflowServer", "free_port", "make_item", "mlflow_server"]

START_TIMEOUT = 90.0


@dataclass
class MlflowServer:
    url: str
    root: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    _stopped: bool = field(default=False)

    def api(
        self, method: str, endpoint: str, body: dict[str, Any] | None = None, **query: Any
    ) -> dict[str, Any]:
        """Synchronous read-back through MLflow's REST API (for assertions)."""
        import json
        import urllib.parse

        url = f"{self.url}/api/2.0/mlflow/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return dict(json.loads(resp.read() or b"{}"))
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {endpoint}: {exc.code} {exc.read()[:500]!r}") from exc

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        # The server runs in its own session: its pid is its process group id, which
        # also holds the uvicorn worker.
        stop_process(self.process, group=True)


def _mlflow_command() -> list[str]:
    script = Path(sys.executable).with_name("mlflow")
    if script.exists():
        return [str(script)]
    found = shutil.which("mlflow")
    if found:
        return [found]
    return [sys.executable, "-m", "mlflow"]


def start_mlflow_server(root: Path) -> MlflowServer:
    root.mkdir(parents=True, exist_ok=True)
    artifacts = root / "artifacts"
    artifacts.mkdir(exist_ok=True)
    port = free_port()
    log_path = root / "server.log"
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        # No job runner and Huey consumers: nothing here uses MLflow's background jobs.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "PYTHONUNBUFFERED": "1",
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                *_mlflow_command(),
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--default-artifact-root",
                str(artifacts),
                "--artifacts-destination",
                str(artifacts),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = MlflowServer(f"http://127.0.0.1:{port}", root, process, log_path)
    try:
        wait_http(f"{server.url}/health", process, log_path, START_TIMEOUT, ok_only=True)
    except RuntimeError:
        server.stop()
        raise
    return server


_SHARED: MlflowServer | None = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One MLflow tracking server (sqlite backend) for the whole test session."""
    global _SHARED
    if shutil.which("mlflow") is None and not Path(sys.executable).with_name("mlflow").exists():
        pytest.skip("the mlflow server is not installed (pip install -e '.[dev]')")
    if _SHARED is None or _SHARED._stopped:
        _SHARED = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield _SHARED
    _SHARED.stop()


def make_item(
    *,
    key: str,
    action: Action = Action.TRACK,
    kind: ArtifactKind = ArtifactKind.METRICS,
    name: str = "evaluation",
    pipeline: str = "fraud_training",
    run_id: str = "run-1",
    step_name: str = "train",
    values: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    step: int | None = None,
    version: str = "1.0.0",
    framework: str | None = None,
    params: dict[str, Any] | None = None,
    upstream: DeliveryResult | None = None,
    sink_id: str = "local.tracker",
    received_at: datetime | None = None,
    run_status: str | None = None,
) -> DeliveryItem:
    """A DeliveryItem built directly, as the dispatcher would hand it to a sink."""
    return DeliveryItem(
        key=key,
        action=action,
        sink_id=sink_id,
        context=DeliveryContext(
            event_id=key.split("/", 1)[0],
            pipeline=pipeline,
            run_id=run_id,
            step_name=step_name,
            received_at=received_at or datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
            run_status=run_status,
        ),
        artifact=ArtifactView(
            index=0,
            kind=kind,
            name=name,
            version=version,
            framework=framework,
            metadata=metadata or {},
            values=values or {},
            step=step,
        ),
        params=params or {},
        upstream=upstream,
    )
