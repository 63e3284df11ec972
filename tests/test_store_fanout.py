"""Remote stores through the real daemon: fan-out to S3 and GCS, permanent errors visible."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from tests.conftest import Workspace, free_port, model_manifest, write_bundle
from tests.servers_storage import (  # noqa: F401 - fixtures
    GcsEmulator,
    RcloneS3,
    gcs_emulator,
    rclone_s3,
)


def test_fan_out_to_s3_and_gcs_each_with_its_own_delivery(
    tmp_path: Path, rclone_s3: RcloneS3, gcs_emulator: GcsEmulator,  # noqa: F811
    start_daemon,  # type: ignore[no-untyped-def]
) -> None:
    prefix = uuid.uuid4().hex
    workspace = Workspace(tmp_path)
    workspace.stack["artifact_stores"] = {
        "lake": {"type": "s3", **rclone_s3.settings(prefix=prefix)},
        "archive": {"type": "gcs", **gcs_emulator.settings(prefix=prefix)},
    }
    workspace.stack["artifact_routing"]["Model"] = {
        "store": ["lake", "archive"], "path": "{pipeline}/{run_id}/{name}"}
    workspace.write()
    start_daemon(workspace)
    payloads = {i: f"model {i} ".encode() * (100 + i) for i in range(10)}
    for i, data in payloads.items():
        write_bundle(workspace.spool, f"b{i}", model_manifest("clf", run_id=f"r{i}"),
                     {"model.pkl": data})
    status = workspace.wait_settled(10)
    assert status["events"] == {"done": 10}
    assert status["sinks"]["local.artifact_stores.lake"]["done"] == 10
    assert status["sinks"]["local.artifact_stores.archive"]["done"] == 10

    catalog = json.loads(workspace.cli("artifacts", "--json").stdout)
    for artifact in catalog:
        i = int(artifact["run_id"][1:])
        digest = hashlib.sha256(payloads[i]).hexdigest()
        uris = sorted(loc["uri"] for loc in artifact["locations"])
        assert uris == [
            f"gs://{gcs_emulator.bucket}/{prefix}/fraud/r{i}/clf/model.pkl",
            f"s3://{rclone_s3.bucket}/{prefix}/fraud/r{i}/clf/model.pkl",
        ]
        assert {loc["sha256"] for loc in artifact["locations"]} == {digest}
        stored = rclone_s3.root / rclone_s3.bucket / prefix / "fraud" / f"r{i}" / "clf"
        assert hashlib.sha256((stored / "model.pkl").read_bytes()).hexdigest() == digest


def test_a_missing_bucket_is_dead_lettered_with_its_reason_while_others_deliver(
    tmp_path: Path, rclone_s3: RcloneS3, start_daemon,  # type: ignore[no-untyped-def]  # noqa: F811
) -> None:
    workspace = Workspace(tmp_path)
    workspace.stack["artifact_stores"] = {
        "typo": {"type": "s3", **rclone_s3.settings(bucket_name="no-such-bucket")},
        "local": {"type": "local", "path": str(workspace.store)},
    }
    workspace.stack["artifact_routing"]["Model"] = {"store": ["typo", "local"],
                                                    "path": "{run_id}/{name}"}
    workspace.write()
    start_daemon(workspace)
    write_bundle(workspace.spool, "b1", model_manifest("clf"), {"model.pkl": b"x"})
    status = workspace.wait_settled(1)
    assert status["events"] == {"failed": 1}
    assert status["sinks"]["local.artifact_stores.local"]["done"] == 1
    dead = status["dead_letters"][0]
    assert dead["key"].endswith("local.artifact_stores.typo")
    assert dead["attempts"] == 1  # permanent: not retried
    assert "no-such-bucket" in dead["last_error"]
    assert (workspace.spool / "failed" / "b1").is_dir()


def test_sinks_open_at_start_and_one_that_is_down_holds_nothing_up(
    tmp_path: Path, rclone_s3: RcloneS3, start_daemon,  # type: ignore[no-untyped-def]  # noqa: F811
) -> None:
    """Every sink of the stack is opened (client, capability probe) at start, so /healthz
    reports each before the first artifact; a store whose server is down neither delays
    the start nor the other stores."""
    port = free_port()
    workspace = Workspace(tmp_path, listen=f"127.0.0.1:{port}")
    workspace.stack["artifact_stores"] = {
        "lake": {"type": "s3", **rclone_s3.settings(prefix="warm")},
        "down": {"type": "s3", **rclone_s3.settings(prefix="warm"),
                 "endpoint_url": f"http://127.0.0.1:{free_port()}", "max_attempts": 1},
    }
    workspace.stack["artifact_routing"]["Model"] = {"store": "lake", "path": "{run_id}/{name}"}
    workspace.write()
    started = time.monotonic()
    start_daemon(workspace)
    assert time.monotonic() - started < 20
    sinks: dict[str, bool] = {}
    deadline = time.monotonic() + 20
    while not {"local.artifact_stores.lake", "local.artifact_stores.down"} <= set(sinks):
        assert time.monotonic() < deadline, sinks
        time.sleep(0.2)
        with contextlib.suppress(urllib.error.HTTPError):  # 503 until every check is up
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read()
            sinks = json.loads(body)["checks"]["sinks"]
    assert sinks["local.artifact_stores.lake"] is True
    assert sinks["local.artifact_stores.down"] is False
    write_bundle(workspace.spool, "b1", model_manifest("clf", run_id="r1"), {"model.pkl": b"m"})
    assert workspace.wait_settled(1)["events"] == {"done": 1}
    assert (rclone_s3.root / rclone_s3.bucket / "warm" / "r1" / "clf" / "model.pkl").exists()


def _vm_hwm_mib(pid: int) -> float:
    """Peak resident set of a running process (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def test_a_1_gib_model_goes_up_through_the_daemon_in_bounded_memory(
    tmp_path: Path, rclone_s3: RcloneS3, start_daemon,  # type: ignore[no-untyped-def]  # noqa: F811
) -> None:
    """The real daemon, default S3 settings: the file is never read whole, so its peak
    RSS stays under 200 MiB (part buffers: 8 parts of 8 MiB) for a 1 GiB model."""
    size = 1024 * 1024 * 1024
    workspace = Workspace(tmp_path)
    lake = {"type": "s3", **rclone_s3.settings(prefix="big")}
    workspace.stack["artifact_stores"] = {"lake": lake}
    workspace.stack["artifact_routing"]["Model"] = {"store": "lake", "path": "{run_id}/{name}"}
    workspace.write()
    daemon = start_daemon(workspace)
    staging = tmp_path / "staging" / "big"
    staging.mkdir(parents=True)
    digest = hashlib.sha256()
    with open(staging / "model.bin", "wb") as fh:
        for _ in range(size // (8 << 20)):  # incompressible, never whole in this process
            chunk = os.urandom(8 << 20)
            digest.update(chunk)
            fh.write(chunk)
    (staging / "manifest.json").write_text(json.dumps(
        model_manifest("big", run_id="r1", files=["model.bin"])))
    os.rename(staging, workspace.spool / "incoming" / "big")

    status = workspace.wait_settled(1, timeout=300)
    peak = _vm_hwm_mib(daemon.proc.pid)

    assert status["events"] == {"done": 1}, status
    stored = rclone_s3.root / rclone_s3.bucket / "big" / "r1" / "big" / "model.bin"
    assert stored.stat().st_size == size
    remote = hashlib.sha256()
    with open(stored, "rb") as fh:
        while chunk := fh.read(8 << 20):
            remote.update(chunk)
    assert remote.hexdigest() == digest.hexdigest()
    print(f"daemon peak RSS with a 1 GiB upload: {peak:.0f} MiB")
    assert peak < 200, f"daemon peak RSS {peak:.0f} MiB"
