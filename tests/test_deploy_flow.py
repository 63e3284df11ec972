"""Deploy conditions end to end: real daemon, rclone S3 store, real MLflow registry and alias.

Every model goes to S3 (`rclone serve s3`), is registered in MLflow, and is deployed by
pointing an alias at its version; the tests read the alias back through MLflow's REST API.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Workspace, free_port, model_manifest, write_bundle
from tests.servers_mlflow import MlflowServer, mlflow_server  # noqa: F401 - fixture
from tests.servers_storage import RcloneS3, rclone_s3  # noqa: F401 - fixture


class TcpProxy:
    """A loopback TCP forwarder that can be switched off: a deployer that goes down."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self._server: socket.socket | None = None

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def alias_version(server: MlflowServer, name: str, alias: str = "production") -> str | None:
    query = urllib.parse.urlencode({"name": name, "alias": alias})
    try:
        with urllib.request.urlopen(
            f"{server.url}/api/2.0/mlflow/registered-models/alias?{query}"
        ) as response:
            return str(json.loads(response.read())["model_version"]["version"])
    except urllib.error.HTTPError as exc:
        if exc.code in (400, 404):  # no such alias (MLflow answers 400 for some versions)
            return None
        raise


def registered(workspace: Workspace, name: str, version: str) -> str:
    """The MLflow model version the router registered for (name, router version)."""
    for artifact in json.loads(workspace.cli("artifacts", "--json").stdout):
        if artifact["name"] == name and artifact["version"] == version:
            for location in artifact["locations"]:
                if location["action"] == "register":
                    return str(location["uri"].rsplit("/", 1)[1])
    raise AssertionError(f"{name} {version} was not registered")


def make_workspace(tmp_path: Path, s3: RcloneS3, mlflow: MlflowServer, condition: str,
                   deployer_url: str | None = None, **rule: Any) -> Workspace:
    workspace = Workspace(tmp_path)
    workspace.stack["artifact_store"] = {"type": "s3", **s3.settings(prefix=uuid.uuid4().hex)}
    workspace.stack["artifact_stores"] = {"local": {"type": "local", "path": str(workspace.store)}}
    workspace.stack["model_registry"] = {"type": "mlflow", "tracking_uri": mlflow.url}
    workspace.stack["model_deployer"] = {"type": "mlflow_alias",
                                         "tracking_uri": deployer_url or mlflow.url}
    workspace.stack["artifact_routing"]["Model"] = {
        "store": "s3", "path": "{pipeline}/{name}/{version}", "register": True,
        "deploy": True, "deploy_condition": condition, **rule}
    workspace.write()
    return workspace


def emit_model(workspace: Workspace, name: str, version: str, **metrics: float) -> None:
    manifest = model_manifest(name, run_id=f"run-{version}", version=version,
                              metadata={"metrics": metrics})
    write_bundle(workspace.spool, f"{name}-{version}", manifest,
                 {"model.pkl": f"{name} {version}".encode()})


def models(workspace: Workspace, *args: str) -> dict[str, dict[str, Any]]:
    rows = json.loads(workspace.cli("model", "list", "--json", *args).stdout)
    return {row["version"]: row for row in rows}


def test_auto_deploys_above_the_bounds_and_blocks_below(
    tmp_path: Path, rclone_s3: RcloneS3, mlflow_server: MlflowServer,  # noqa: F811
    start_daemon,  # type: ignore[no-untyped-def]
) -> None:
    name = f"auto-{uuid.uuid4().hex[:8]}"
    workspace = make_workspace(tmp_path, rclone_s3, mlflow_server, "auto",
                               deploy_min_metrics={"accuracy": 0.9, "loss": {"max": 0.2}})
    start_daemon(workspace)
    emit_model(workspace, name, "1", accuracy=0.95, loss=0.1)
    workspace.wait_settled(1)
    assert alias_version(mlflow_server, name) == registered(workspace, name, "1")
    emit_model(workspace, name, "2", accuracy=0.97, loss=0.35)  # lower-is-better bound fails
    emit_model(workspace, name, "3", accuracy=0.80, loss=0.05)
    workspace.wait_settled(3)
    rows = models(workspace)
    assert rows["1"]["state"] == "deployed"
    assert rows["2"]["state"] == "blocked" and "loss=0.35" in rows["2"]["reason"]
    assert "0.15 above the maximum" in rows["2"]["reason"]
    assert rows["3"]["state"] == "blocked" and "accuracy=0.8" in rows["3"]["reason"]
    # still the good one
    assert alias_version(mlflow_server, name) == registered(workspace, name, "1")


def test_manual_then_model_deploy(
    tmp_path: Path, rclone_s3: RcloneS3, mlflow_server: MlflowServer,  # noqa: F811
    start_daemon,  # type: ignore[no-untyped-def]
) -> None:
    name = f"manual-{uuid.uuid4().hex[:8]}"
    workspace = make_workspace(tmp_path, rclone_s3, mlflow_server, "manual",
                               endpoint_name="champion")
    start_daemon(workspace)
    emit_model(workspace, name, "1", accuracy=0.5)
    workspace.wait_settled(1)
    assert models(workspace, "--pending")["1"]["state"] == "awaiting_manual"
    assert alias_version(mlflow_server, name, "champion") is None
    out = workspace.cli("model", "deploy", name, "--version", "1", "--by", "alice", "--json")
    assert json.loads(out.stdout)["state"] == "deploying"
    workspace.wait_until(lambda s: s["deliveries"]["pending"] + s["deliveries"]["in_flight"]
                         == 0 and s["events"].get("done") == 1)
    assert alias_version(mlflow_server, name, "champion") == registered(workspace, name, "1")
    row = models(workspace)["1"]
    assert (row["state"], row["decided_by"]) == ("deployed", "alice")


def test_on_approval_approve_reject_and_late_approval(
    tmp_path: Path, rclone_s3: RcloneS3, mlflow_server: MlflowServer,  # noqa: F811
    start_daemon,  # type: ignore[no-untyped-def]
) -> None:
    name = f"approval-{uuid.uuid4().hex[:8]}"
    workspace = make_workspace(tmp_path, rclone_s3, mlflow_server, "on_approval")
    start_daemon(workspace)
    for version in ("1", "2", "3"):
        emit_model(workspace, name, version, accuracy=0.9)
    workspace.wait_settled(3)
    assert {r["state"] for r in models(workspace).values()} == {"pending_approval"}

    reject = workspace.cli("model", "reject", name, "--version", "3", "--by", "bob",
                           "--comment", "leaks labels", "--json")
    assert json.loads(reject.stdout)["state"] == "rejected"
    # `model deploy` does not bypass the approval: pending or rejected needs --force
    for version, words in (("1", f"`artifact-router model approve {name} --version 1`"),
                           ("3", "rejected by bob; pass --force")):
        bypass = workspace.cli("model", "deploy", name, "--version", version, check=False)
        assert bypass.returncode == 1 and words in " ".join(bypass.stderr.split())
    workspace.cli("model", "approve", name, "--version", "2", "--by", "carol",
                  "--comment", "offline eval ok")
    workspace.wait_until(lambda s: s["deliveries"]["pending"] + s["deliveries"]["in_flight"] == 0)
    assert alias_version(mlflow_server, name) == registered(workspace, name, "2")
    row = models(workspace)["2"]
    assert (row["state"], row["decided_by"], row["comment"]) == (
        "deployed", "carol", "offline eval ok")

    # version 1 approved late: refused, version 2 stays live
    late = workspace.cli("model", "approve", name, "--version", "1", check=False)
    assert late.returncode == 1 and "newer" in late.stderr and "--force" in late.stderr
    assert alias_version(mlflow_server, name) == registered(workspace, name, "2")
    # ... unless the operator rolls back on purpose
    workspace.cli("model", "approve", name, "--version", "1", "--force")
    workspace.wait_until(lambda s: s["deliveries"]["pending"] + s["deliveries"]["in_flight"] == 0)
    assert alias_version(mlflow_server, name) == registered(workspace, name, "1")
    rows = models(workspace)
    assert rows["1"]["state"] == "deployed" and rows["2"]["state"] == "superseded"
    assert rows["3"]["state"] == "rejected"


def test_deployer_down_during_approval_then_recovered(
    tmp_path: Path, rclone_s3: RcloneS3, mlflow_server: MlflowServer,  # noqa: F811
    start_daemon,  # type: ignore[no-untyped-def]
) -> None:
    name = f"recover-{uuid.uuid4().hex[:8]}"
    proxy = TcpProxy(int(mlflow_server.url.rsplit(":", 1)[1]))
    workspace = make_workspace(tmp_path, rclone_s3, mlflow_server, "on_approval",
                               deployer_url=f"http://127.0.0.1:{proxy.port}")
    start_daemon(workspace)
    emit_model(workspace, name, "1", accuracy=0.9)
    workspace.wait_settled(1)
    workspace.cli("model", "approve", name, "--version", "1")  # the deployer is down
    status = workspace.wait_until(
        lambda s: s["sinks"].get("local.model_deployer", {}).get("pending") == 1
        and s["deliveries"]["dead"] == 0
        and s["oldest_pending_age_seconds"] is not None
    )
    assert status["sinks"]["local.model_deployer"]["done"] == 0
    assert models(workspace)["1"]["state"] == "deploying"
    proxy.start()
    try:
        workspace.wait_until(lambda s: s["sinks"]["local.model_deployer"]["done"] == 1,
                             timeout=60)
    finally:
        proxy.stop()
    assert alias_version(mlflow_server, name) == registered(workspace, name, "1")
    assert models(workspace)["1"]["state"] == "deployed"


@pytest.mark.parametrize("upload", [False])
def test_register_without_upload_is_a_plan_error(
    tmp_path: Path, rclone_s3: RcloneS3, mlflow_server: MlflowServer,  # noqa: F811
    start_daemon, upload: bool,  # type: ignore[no-untyped-def]
) -> None:
    workspace = make_workspace(tmp_path, rclone_s3, mlflow_server, "auto")
    daemon = start_daemon(workspace)
    manifest = model_manifest("local-only", upload=upload)
    write_bundle(workspace.spool, "b1", manifest, {"model.pkl": b"x"})
    workspace.wait_settled(1)
    artifact = json.loads(workspace.cli("artifacts", "--json").stdout)[0]
    assert any("upload: false" in e for e in artifact["plan_errors"])
    log = daemon.log()
    assert '"event": "event accepted with plan errors"' in log
    assert "Traceback" not in log
