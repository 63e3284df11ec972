"""Acceptance tests against the real daemon process (`artifact-router run`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sinks.trackers.jsonl import read_jsonl
from tests.conftest import (
    ROOT,
    DaemonProcess,
    Workspace,
    bytes_read,
    free_port,
    model_manifest,
    wait_bytes_read,
    write_bundle,
)

EMITTER = ROOT / "examples" / "emit_bundle.sh"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bash_emit_many(spool: Path, count: int, run_prefix: str, files_dir: Path) -> None:
    """`count` bundles through the documented bash emitter, from one bash loop."""
    files_dir.mkdir(parents=True, exist_ok=True)
    script = f"""
set -euo pipefail
for i in $(seq 1 {count}); do
  f="{files_dir}/model-$i.bin"
  head -c $((1000 + i)) /dev/urandom > "$f"
  "{EMITTER}" "{spool}" fraud "{run_prefix}-$i" train clf "$f" 0.9 > /dev/null
done
"""
    subprocess.run(["bash", "-c", script], check=True, timeout=300)


def test_500_bash_bundles_land_at_their_templated_paths(workspace: Workspace,
                                                        start_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon = start_daemon(workspace)
    bash_emit_many(workspace.spool, 500, "run", workspace.root / "src")
    status = workspace.wait_settled(500, timeout=180)
    assert status["events"] == {"done": 500}
    assert status["deliveries"]["dead"] == 0
    for i in range(1, 501):
        stored = workspace.store / "fraud" / f"run-{i}" / "train" / "clf" / f"model-{i}.bin"
        assert sha256(stored) == sha256(workspace.root / "src" / f"model-{i}.bin")
    assert len(list((workspace.spool / "done").iterdir())) == 500
    assert not list((workspace.spool / "incoming").iterdir())
    assert daemon.terminate() == 0


def test_sigkill_at_random_points_delivers_everything_exactly_once(
    workspace: Workspace, start_daemon  # type: ignore[no-untyped-def]
) -> None:
    rng = random.Random(7)
    total = 400
    src = workspace.root / "src"
    src.mkdir()
    for i in range(total):
        (src / f"m{i}.bin").write_bytes(os.urandom(2000 + i))

    daemon = start_daemon(workspace)
    emitted = 0
    kills = 0
    while emitted < total:
        burst = min(total - emitted, rng.randint(20, 80))
        for i in range(emitted, emitted + burst):
            manifest = model_manifest("clf", run_id=f"run-{i}", files=[f"m{i}.bin"])
            manifest["artifacts"].append(
                {"type": "metrics", "name": "eval", "values": {"accuracy": i / total}, "step": i}
            )
            write_bundle(workspace.spool, f"b{i:04d}", manifest,
                         {f"m{i}.bin": (src / f"m{i}.bin").read_bytes()})
        emitted += burst
        time.sleep(rng.uniform(0.0, 0.4))
        daemon.kill()  # SIGKILL: no drain, no cleanup
        kills += 1
        daemon = start_daemon(workspace)
    status = workspace.wait_settled(total, timeout=240)
    assert kills >= 5
    assert status["events"] == {"done": total}, status

    stored = sorted(p for p in workspace.store.rglob("*")
                    if p.is_file() and ".router-tmp" not in p.parts)
    assert len(stored) == total, "each model stored once, no stray files"
    for i in range(total):
        path = workspace.store / "fraud" / f"run-{i}" / "train" / "clf" / f"m{i}.bin"
        assert sha256(path) == sha256(src / f"m{i}.bin")
    lines = [row for f in workspace.tracking.rglob("*.jsonl") for row in read_jsonl(f)]
    keys = [row["key"] for row in lines]
    assert len(keys) == len(set(keys)) == total, "each metric point logged exactly once"
    catalog = json.loads(workspace.cli("artifacts", "--json").stdout)
    assert len(catalog) == 2 * total
    assert daemon.terminate() == 0


BAD_BUNDLES: dict[str, tuple[dict[str, bytes] | None, str]] = {
    # name: (files incl. manifest.json, text error.json must contain)
    "invalid-json": ({"manifest.json": b'{"manifest_version": 1,'}, "not valid JSON"),
    "not-utf8": ({"manifest.json": b'{"a": "\xff\xfe"}'}, "not UTF-8"),
    "wrong-types": (
        {"manifest.json": json.dumps({**model_manifest("m"), "run_id": ["x"]}).encode()},
        "run_id",
    ),
    "unknown-type": (
        {"manifest.json": json.dumps({**model_manifest("m"), "artifacts": [
            {"type": "modle", "name": "m"}]}).encode()},
        "modle",
    ),
    "traversal": (
        {"manifest.json": json.dumps(model_manifest("m", files=["../../etc/passwd"])).encode()},
        "..",
    ),
    "absolute-path": (
        {"manifest.json": json.dumps(model_manifest("m", files=["/etc/passwd"])).encode()},
        "absolute",
    ),
    "duplicate-names": (
        {"manifest.json": json.dumps(model_manifest("m", files=["a/m.pkl", "b/m.pkl"])).encode(),
         "a/m.pkl": b"1", "b/m.pkl": b"2"},
        "appears twice",
    ),
    "missing-file": (
        {"manifest.json": json.dumps(model_manifest("m", files=["gone.pkl"])).encode()},
        "no such file",
    ),
    "oversized-value": (
        {"manifest.json": json.dumps({**model_manifest("m"), "artifacts": [
            {"type": "parameters", "name": "p", "values": {"blob": "x" * 70000}}]}).encode()},
        "over the limit",
    ),
    "wrong-version": (
        {"manifest.json": json.dumps({**model_manifest("m"), "manifest_version": 2}).encode()},
        "manifest_version",
    ),
    "unknown-field": (
        {"manifest.json": json.dumps({**model_manifest("m"), "pipline": "x"}).encode()},
        "pipline",
    ),
    "unknown-stack": (
        {"manifest.json": json.dumps({**model_manifest("m"), "stack": "prod"}).encode(),
         "model.pkl": b"x"},
        "stack",
    ),
}


def test_malformed_bundles_are_rejected_precisely_while_good_ones_flow(
    workspace: Workspace, start_daemon  # type: ignore[no-untyped-def]
) -> None:
    start_daemon(workspace)
    outside = workspace.root / "secret.txt"
    outside.write_text("top secret")
    good = 0
    for i, (name, (files, _)) in enumerate(BAD_BUNDLES.items()):
        write_bundle(workspace.spool, f"good-{i}", model_manifest("clf", run_id=f"g{i}"),
                     {"model.pkl": f"model {i}".encode()})
        good += 1
        incoming = workspace.spool / "incoming"
        tmp = incoming / f".tmp-{name}"
        tmp.mkdir(parents=True)
        for rel, data in (files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        os.rename(tmp, incoming / f"bad-{name}")
    # symlink escape and a FIFO need real filesystem objects
    for name, make in (
        ("symlink-escape", lambda d: os.symlink(outside, d / "model.pkl")),
        ("fifo", lambda d: os.mkfifo(d / "model.pkl")),
    ):
        tmp = workspace.spool / "incoming" / f".tmp-{name}"
        tmp.mkdir()
        make(tmp)
        (tmp / "manifest.json").write_text(json.dumps(model_manifest("m")))
        os.rename(tmp, workspace.spool / "incoming" / f"bad-{name}")
    expected = {**{k: v[1] for k, v in BAD_BUNDLES.items()},
                "symlink-escape": "outside the bundle", "fifo": "FIFO"}

    status = workspace.wait_settled(good + len(expected))
    assert status["events"]["done"] == good
    assert status["events"]["rejected"] == len(expected)
    for name, needle in expected.items():
        error_file = workspace.spool / "rejected" / f"bad-{name}" / "error.json"
        error = json.loads(error_file.read_text())
        assert needle in error["summary"], (name, error["summary"])
        assert all(e["field"] and e["message"] for e in error["errors"])
    assert "top secret" not in json.dumps(
        [json.loads(p.read_text()) for p in (workspace.spool / "rejected").glob("*/error.json")]
    )
    for i in range(good):
        assert (workspace.store / "fraud" / f"g{i}" / "train" / "clf" / "model.pkl").exists()
    rejected = json.loads(workspace.cli("artifacts", "--rejected", "--json").stdout)
    assert len(rejected) == len(expected)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make a directory read-only even for root: a read-only bind mount, else chattr +i."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)],
                             capture_output=True).returncode == 0
    immutable = False
    if not mounted:
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    if not (mounted or immutable):
        pytest.skip("cannot make a directory read-only here (no bind mount, no chattr)")
    try:
        yield
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_store_is_retried_until_writable(workspace: Workspace,
                                                   start_daemon) -> None:  # type: ignore[no-untyped-def]
    start_daemon(workspace)
    with read_only(workspace.store):
        for i in range(5):
            write_bundle(workspace.spool, f"b{i}", model_manifest("clf", run_id=f"r{i}"),
                         {"model.pkl": f"m{i}".encode()})
        workspace.wait_until(
            lambda s: s["sinks"].get("local.artifact_store", {}).get("pending", 0) == 5
            and s["events"].get("accepted") == 5,
            timeout=60,
        )
        time.sleep(1.0)  # several attempts fail meanwhile
        status = workspace.status()
        assert status["deliveries"]["dead"] == 0
        assert status["deliveries"]["done"] == 0
    status = workspace.wait_settled(5, timeout=60)
    assert status["events"] == {"done": 5}
    for i in range(5):
        stored = workspace.store / "fraud" / f"r{i}" / "train" / "clf" / "model.pkl"
        assert stored.read_bytes() == f"m{i}".encode()


def test_bundles_written_while_down_are_picked_up_at_start(workspace: Workspace,
                                                           start_daemon) -> None:  # type: ignore[no-untyped-def]
    for i in range(20):
        write_bundle(workspace.spool, f"b{i}", model_manifest("clf", run_id=f"r{i}"),
                     {"model.pkl": b"x"})
    # a half-written bundle (no manifest yet) and a hidden one are left alone
    (workspace.spool / "incoming" / "half").mkdir()
    (workspace.spool / "incoming" / "half" / "model.pkl").write_bytes(b"x")
    hidden = workspace.spool / "incoming" / ".tmp-building"
    hidden.mkdir()
    (hidden / "manifest.json").write_text(json.dumps(model_manifest("m")))
    start_daemon(workspace)
    workspace.wait_settled(20)
    assert sorted(p.name for p in (workspace.spool / "incoming").iterdir()) == [
        ".tmp-building", "half"]
    # completing the half-written bundle by renaming its manifest into place
    (workspace.spool / "incoming" / "half" / "manifest.json.tmp").write_text(
        json.dumps(model_manifest("late", run_id="late")))
    os.rename(workspace.spool / "incoming" / "half" / "manifest.json.tmp",
              workspace.spool / "incoming" / "half" / "manifest.json")
    workspace.wait_settled(21)
    assert (workspace.store / "fraud" / "late" / "train" / "late" / "model.pkl").exists()


def test_sigterm_drains_and_exits_zero(workspace: Workspace, start_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon: DaemonProcess = start_daemon(workspace)
    for i in range(50):
        write_bundle(workspace.spool, f"b{i}", model_manifest("clf", run_id=f"r{i}"),
                     {"model.pkl": os.urandom(50_000)})
    time.sleep(0.5)
    assert daemon.terminate() == 0
    assert "stopped" in daemon.log()
    # whatever was not finished is still journaled and completes on the next start
    start_daemon(workspace)
    assert workspace.wait_settled(50)["events"] == {"done": 50}


def test_sigusr1_writes_every_threads_stack_and_the_daemon_runs_on(
    workspace: Workspace, start_daemon  # type: ignore[no-untyped-def]
) -> None:
    """`kill -USR1` on a daemon that seems stuck: each thread's Python stack goes to
    stderr (the event loop's thread and the I/O pool's), and the daemon keeps routing
    and still stops cleanly."""
    daemon: DaemonProcess = start_daemon(workspace)
    daemon.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while "Current thread" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    dump = daemon.log()
    assert "Current thread" in dump, dump
    assert dump.count("Thread 0x") >= 1 and "router/cli.py" in dump, dump
    write_bundle(workspace.spool, "after", model_manifest("clf", run_id="r1"),
                 {"model.pkl": b"weights"})
    assert workspace.wait_settled(1)["events"] == {"done": 1}
    assert daemon.terminate() == 0


def test_sigterm_during_a_checkpoints_hash_gives_it_up_and_the_next_start_takes_it(
    workspace: Workspace, start_daemon  # type: ignore[no-untyped-def]
) -> None:
    """Stopping used to wait for a hash under way, about a second per GiB: a 64 GiB
    checkpoint would outlast a container's grace period and be killed. The hash is given
    up after its chunk instead; the bundle, never acknowledged, stays in incoming/ and
    the next start takes it. (A sparse file: 64 GiB to hash, nothing on disk.)"""
    daemon: DaemonProcess = start_daemon(workspace)
    incoming = workspace.spool / "incoming"
    started = bytes_read(daemon)
    write_bundle(workspace.spool, "ckpt", model_manifest("llm", run_id="r1"),
                 sparse={"model.pkl": 64 << 30})
    wait_bytes_read(daemon, started + (1 << 30))  # a GiB hashed: well under way

    assert daemon.terminate(timeout=50) == 0  # not the minute the whole hash would take
    log = daemon.log()
    assert "a large bundle's hash was given up" in log, log
    gave_up = next(json.loads(line) for line in log.splitlines()
                   if "hash was given up" in line)
    assert 1 << 30 <= gave_up["hashed_bytes"] < gave_up["size"] == 64 << 30, gave_up
    assert os.listdir(incoming) == ["ckpt"]
    assert json.loads(workspace.cli("status", "--json").stdout)["events"] == {}

    model = os.urandom(100_000)  # the writer's real model this time: quick to hash
    (incoming / "ckpt" / "model.pkl").write_bytes(model)
    start_daemon(workspace)
    assert workspace.wait_settled(1)["events"] == {"done": 1}
    (row,) = json.loads(workspace.cli("artifacts", "--json").stdout)
    assert row["locations"][0]["sha256"] == hashlib.sha256(model).hexdigest(), row


def _wait_log(daemon: DaemonProcess, text: str, after: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := daemon.log())[after:]:
        assert daemon.proc.poll() is None, log
        assert time.monotonic() < deadline, log[after:]
        time.sleep(0.05)
    return log[after:]


def test_sighup_reloads_the_rules_mid_stream_and_refuses_a_bad_config(
    workspace: Workspace, start_daemon  # type: ignore[no-untyped-def]
) -> None:
    daemon = start_daemon(workspace)
    for i in range(30):
        write_bundle(workspace.spool, f"a{i}", model_manifest("clf", run_id=f"a{i}"),
                     {"model.pkl": f"a{i}".encode()})
    workspace.stack["artifact_routing"]["Model"]["path"] = "reloaded/{run_id}/{name}"
    store2 = workspace.root / "artifacts2"  # a changed sink is built afresh
    workspace.stack["artifact_store"]["path"] = str(store2)
    workspace.write()
    seen = len(daemon.log())
    daemon.proc.send_signal(signal.SIGHUP)
    _wait_log(daemon, "config reloaded", seen)
    for i in range(30):
        write_bundle(workspace.spool, f"b{i}", model_manifest("clf", run_id=f"b{i}"),
                     {"model.pkl": f"b{i}".encode()})
    status = workspace.wait_settled(60)
    assert status["events"] == {"done": 60} and status["deliveries"]["dead"] == 0
    old = "fraud/{run}/train/clf/model.pkl"
    new = "reloaded/{run}/clf/model.pkl"
    for i in range(30):
        # Accepted before the reload: the old key, in the store the sink has when it
        # delivers (as after a restart); accepted after: the new key. Once, never twice.
        places = [workspace.store / old.format(run=f"a{i}"),
                  store2 / old.format(run=f"a{i}"), store2 / new.format(run=f"a{i}")]
        assert [p.read_bytes() for p in places if p.exists()] == [f"a{i}".encode()]
        assert (store2 / new.format(run=f"b{i}")).read_bytes() == f"b{i}".encode()

    # A config that does not load is refused with its reason (secrets in it redacted);
    # the last good one stays.
    workspace.stack["artifact_store"]["password"] = "hush-secret-42"  # not a local setting
    workspace.write()
    seen = len(daemon.log())
    daemon.proc.send_signal(signal.SIGHUP)
    refused = _wait_log(daemon, "config reload refused", seen)
    assert "artifact_store.password" in refused and "unknown setting" in refused, refused
    assert "hush-secret-42" not in daemon.log()
    write_bundle(workspace.spool, "c1", model_manifest("clf", run_id="c1"), {"model.pkl": b"c"})
    landed = store2 / new.format(run="c1")
    deadline = time.monotonic() + 30
    while not landed.exists():  # routed by the last good config while the file is bad
        assert time.monotonic() < deadline and daemon.proc.poll() is None, daemon.log()
        time.sleep(0.05)
    assert landed.read_bytes() == b"c"
    del workspace.stack["artifact_store"]["password"]
    workspace.write()  # for the CLI below
    assert workspace.wait_settled(61)["events"] == {"done": 61}
    assert daemon.terminate() == 0


def test_healthz_and_metrics(tmp_path: Path, start_daemon) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    workspace = Workspace(tmp_path, listen=f"127.0.0.1:{port}")
    start_daemon(workspace)
    write_bundle(workspace.spool, "b1", model_manifest("clf"), {"model.pkl": b"x"})
    write_bundle(workspace.spool, "bad", {"manifest_version": 1})
    workspace.wait_settled(2)
    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read())
    assert health["status"] == "ok" and health["checks"]["journal"] is True
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert 'router_component_received_events_total{component="spool"} 2.0' in metrics
    sent = 'router_component_sent_events_total{component="dispatcher",sink="local.artifact_store"}'
    assert f"{sent} 1.0" in metrics
    discarded = 'router_component_discarded_events_total{component="spool",reason="invalid"}'
    assert f"{discarded} 1.0" in metrics
    assert "router_delivery_duration_seconds_bucket" in metrics


def test_emit_cli_builds_a_bundle_the_daemon_routes(workspace: Workspace,
                                                    start_daemon) -> None:  # type: ignore[no-untyped-def]
    start_daemon(workspace)
    model = workspace.root / "model.pkl"
    model.write_bytes(b"\x80\x04sklearn model bytes")
    out = workspace.cli("emit", "--pipeline", "fraud", "--run-id", "run-9", "--step", "train",
                        "--type", "model", "--name", "clf", "--upload", "--metric",
                        "accuracy=0.95", "--param", "lr=0.01", "--input",
                        "fraud/run-9/prep/train_data", "--json", str(model))
    event_id = json.loads(out.stdout)["event_id"]
    workspace.wait_settled(1)
    stored = workspace.store / "fraud" / "run-9" / "train" / "clf" / "model.pkl"
    assert stored.read_bytes() == model.read_bytes()
    catalog = {a["kind"]: a for a in json.loads(workspace.cli("artifacts", "--json").stdout)}
    assert catalog["model"]["event_id"] == event_id
    assert catalog["model"]["framework"] == "sklearn"
    assert catalog["model"]["inputs"] == ["fraud/run-9/prep/train_data"]
    assert catalog["metrics"]["values"] == {"accuracy": 0.95}
    assert catalog["parameters"]["values"] == {"lr": 0.01}
    rows = read_jsonl(workspace.tracking / "fraud" / "run-9.jsonl")
    assert sorted(r["kind"] for r in rows) == ["metrics", "parameters"]
    runs = json.loads(workspace.cli("runs", "--json").stdout)
    assert runs[0]["run_id"] == "run-9" and runs[0]["artifacts"] == 3


def test_dead_letter_and_retry_through_the_cli(workspace: Workspace,
                                               start_daemon) -> None:  # type: ignore[no-untyped-def]
    start_daemon(workspace)
    # the same key with different content: a conflict is permanent, not retried
    write_bundle(workspace.spool, "a", model_manifest("clf"), {"model.pkl": b"one"})
    workspace.wait_settled(1)
    write_bundle(workspace.spool, "b", model_manifest("clf"), {"model.pkl": b"two"})
    status = workspace.wait_settled(2)
    assert status["events"] == {"done": 1, "failed": 1}
    dead = status["dead_letters"][0]
    assert "conflict" in dead["last_error"] and dead["attempts"] == 1
    assert (workspace.spool / "failed" / "b").is_dir()
    # the operator moves the old object aside and replays the dead letter; the running
    # daemon picks the re-queued delivery up from the journal
    stored = workspace.store / "fraud" / "run-1" / "train" / "clf" / "model.pkl"
    stored.rename(stored.with_name("model.pkl.old"))
    assert json.loads(workspace.cli("retry", "--all", "--json").stdout) == {"requeued": 1}
    status = workspace.wait_until(lambda s: s["events"] == {"done": 2})
    assert stored.read_bytes() == b"two"
    assert (workspace.spool / "done" / "b").is_dir()


def test_a_replayed_bundle_is_a_quiet_no_op(workspace: Workspace,
                                            start_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon = start_daemon(workspace)
    manifest = {**model_manifest("clf"), "id": "same-id"}
    write_bundle(workspace.spool, "first", manifest, {"model.pkl": b"x"})
    workspace.wait_settled(1)
    write_bundle(workspace.spool, "again", manifest, {"model.pkl": b"x"})
    workspace.wait_until(lambda s: not list((workspace.spool / "incoming").iterdir()))
    assert (workspace.spool / "done" / "again").is_dir()
    assert workspace.status()["events"] == {"done": 1}
    log = daemon.log()
    assert "duplicate bundle: already journaled" in log and "Traceback" not in log


def test_a_broken_sink_does_not_hold_up_the_others(tmp_path: Path,
                                                   start_daemon) -> None:  # type: ignore[no-untyped-def]
    """Fan-out to two stores: one read-only for the whole run, one healthy."""
    workspace = Workspace(tmp_path, sink_concurrency=2)
    good, bad = tmp_path / "good", tmp_path / "bad"
    workspace.stack["artifact_stores"] = {
        "good": {"type": "local", "path": str(good)},
        "bad": {"type": "local", "path": str(bad)},
    }
    workspace.stack["artifact_routing"]["Model"] = {
        "store": ["bad", "good"], "path": "{run_id}/{name}"}
    workspace.write()
    start_daemon(workspace)
    with read_only(bad):
        for i in range(60):
            write_bundle(workspace.spool, f"b{i}", model_manifest("clf", run_id=f"r{i}"),
                         {"model.pkl": f"m{i}".encode()})
        status = workspace.wait_until(
            lambda s: s["sinks"].get("local.artifact_stores.good", {}).get("done") == 60,
            timeout=60,
        )
        assert status["sinks"]["local.artifact_stores.bad"]["done"] == 0
        assert status["sinks"]["local.artifact_stores.bad"]["dead"] == 0
        assert len(list(good.rglob("model.pkl"))) == 60
    status = workspace.wait_settled(60)
    assert status["events"] == {"done": 60}
    assert len(list(bad.rglob("model.pkl"))) == 60


def test_secrets_never_reach_the_logs(tmp_path: Path, pg_url: str,
                                      start_daemon) -> None:  # type: ignore[no-untyped-def]
    """A journal URL with a password (PostgreSQL here trusts any password)."""
    secret = "s3cr3t-value-123"
    url = pg_url.replace("postgres@", f"postgres:{secret}@")
    workspace = Workspace(tmp_path, journal_url="${JOURNAL_URL}")
    workspace.env["JOURNAL_URL"] = url
    daemon = start_daemon(workspace)
    with read_only(workspace.store):
        write_bundle(workspace.spool, "b1", model_manifest("clf"), {"model.pkl": b"x"})
        workspace.wait_until(lambda s: s["deliveries"]["pending"] == 1)
        time.sleep(0.5)
    workspace.wait_settled(1)
    assert daemon.terminate() == 0
    log = daemon.log()
    assert "delivery will be retried" in log and "postgres:***@" in log
    assert secret not in log


# --- signals: a burst of SIGHUPs, and signals that arrive while the daemon starts -------

# `artifact-router run` with the first `load_config` call in one module held: it reads the
# file, then waits (as a slow disk or a big config might) until the test releases it.
# router.cli: the config read at start; router.daemon: the first reload's.
HOLD_FIRST_LOAD = """
import importlib, os, sys, time
from pathlib import Path

module = importlib.import_module(os.environ["HOLD_LOAD_IN"])
real = module.load_config
calls = []

def load_config(*args, **kwargs):
    loaded = real(*args, **kwargs)
    calls.append(1)
    if len(calls) == 1:
        Path(os.environ["HOLD_LOAD_READ"]).touch()
        while not Path(os.environ["HOLD_LOAD_GO"]).exists():
            time.sleep(0.01)
    return loaded

module.load_config = load_config
from router.cli import main

sys.argv = ["artifact-router", *sys.argv[1:]]
main()
"""


class HeldLoadDaemon(DaemonProcess):
    """A real daemon process whose first config load in `module` is held (see above)."""

    def __init__(self, workspace: Workspace, module: str) -> None:
        import sys

        self.workspace = workspace
        self.log_path = workspace.root / f"daemon-{time.time_ns()}.log"
        self.read_mark = workspace.root / f"held-{time.time_ns()}.read"
        self.go_mark = self.read_mark.with_suffix(".go")
        workspace.daemons.append(self)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_FIRST_LOAD, "run", "--config",
             str(workspace.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=workspace.root,
            env={**os.environ, **workspace.env, "HOLD_LOAD_IN": module,
                 "HOLD_LOAD_READ": str(self.read_mark), "HOLD_LOAD_GO": str(self.go_mark)},
        )

    def wait_read(self, timeout: float = 30.0) -> None:
        """Until the held load has read the file (and waits)."""
        deadline = time.monotonic() + timeout
        while not self.read_mark.exists():
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}: {self.log()}"
            assert time.monotonic() < deadline, f"the config load was not reached: {self.log()}"
            time.sleep(0.02)

    def release(self) -> None:
        self.go_mark.touch()


@pytest.fixture
def start_held() -> Iterator[Any]:
    started: list[HeldLoadDaemon] = []

    def start(workspace: Workspace, module: str) -> HeldLoadDaemon:
        daemon = HeldLoadDaemon(workspace, module)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.release()
        daemon.stop()


def _route_models_to(workspace: Workspace, prefix: str) -> None:
    workspace.stack["artifact_routing"]["Model"]["path"] = prefix + "/{run_id}/{name}"
    workspace.write()


def _landed(workspace: Workspace, run_id: str, timeout: float = 60) -> Path:
    """Where the model of run `run_id` (written with _route_models_to's template) landed."""
    deadline = time.monotonic() + timeout
    while not (found := list(workspace.store.glob(f"*/{run_id}/clf/model.pkl"))):
        assert time.monotonic() < deadline, f"not delivered{workspace.daemon_logs()}"
        time.sleep(0.05)
    assert len(found) == 1, found
    return found[0].relative_to(workspace.store)


def _wait_count(daemon: DaemonProcess, text: str, count: int, after: int,
                timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (log := daemon.log())[after:].count(text) < count:
        assert daemon.proc.poll() is None, log
        assert time.monotonic() < deadline, (
            f"{count} x {text!r} expected after the mark: {log[after:]}")
        time.sleep(0.05)


def test_a_burst_of_sighups_ends_with_the_newest_file_in_force(
    workspace: Workspace, start_held  # type: ignore[no-untyped-def]
) -> None:
    """The first reload is slow (it read v1, then waits); meanwhile the file is rewritten
    five times, each followed by a SIGHUP. The reload that read v1 must not be applied
    last: the reloads run one after the other, the ones asked for meanwhile in one go,
    and v6 is in force at the end."""
    daemon = start_held(workspace, "router.daemon")
    daemon.wait_started()
    _route_models_to(workspace, "v1")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_read()
    for n in range(2, 7):
        _route_models_to(workspace, f"v{n}")
        daemon.proc.send_signal(signal.SIGHUP)
        time.sleep(0.02)
    time.sleep(0.5)  # every SIGHUP has been taken in
    assert "config reloaded" not in daemon.log(), "a reload ran while the first one did"
    mark = len(daemon.log())
    daemon.release()
    # the slow reload (v1), then the newest file, read after the last SIGHUP
    _wait_count(daemon, "config reloaded", 2, after=mark)
    write_bundle(workspace.spool, "b1", model_manifest("clf", run_id="r1"), {"model.pkl": b"1"})
    assert _landed(workspace, "r1") == Path("v6/r1/clf/model.pkl")
    assert daemon.log().count("config reloaded") == 2, "the SIGHUPs of the burst coalesce"
    assert daemon.terminate() == 0


def test_sighup_while_the_config_loads_at_start_does_not_kill_and_applies(
    workspace: Workspace, start_held  # type: ignore[no-untyped-def]
) -> None:
    """A SIGHUP before the daemon handles signals (here: right after `run` read the file,
    then the file changes) neither kills it (SIGHUP's default action) nor is lost: the
    newest file is in force from the first event on."""
    daemon = start_held(workspace, "router.cli")
    daemon.wait_read()
    _route_models_to(workspace, "v1")
    daemon.proc.send_signal(signal.SIGHUP)
    time.sleep(0.3)
    assert daemon.proc.poll() is None, f"killed by SIGHUP while starting: {daemon.log()}"
    daemon.release()
    daemon.wait_started()
    assert "config reloaded" in daemon.log()
    write_bundle(workspace.spool, "b1", model_manifest("clf", run_id="r1"), {"model.pkl": b"1"})
    assert _landed(workspace, "r1") == Path("v1/r1/clf/model.pkl")
    assert daemon.terminate() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_sigint_while_the_config_loads_at_start_stops_cleanly(
    workspace: Workspace, start_held, start_daemon, sig: signal.Signals  # type: ignore[no-untyped-def]
) -> None:
    write_bundle(workspace.spool, "b1", model_manifest("clf", run_id="r1"), {"model.pkl": b"1"})
    daemon = start_held(workspace, "router.cli")
    daemon.wait_read()
    daemon.proc.send_signal(sig)
    time.sleep(0.3)
    daemon.release()
    assert daemon.proc.wait(timeout=60) == 0, daemon.log()
    log = daemon.log()
    assert "stopped" in log and "artifact-router started" not in log, log
    assert "Traceback" not in log, log
    assert (workspace.spool / "incoming" / "b1").is_dir(), "left for the next start"
    start_daemon(workspace)
    assert workspace.wait_settled(1)["events"] == {"done": 1}


class MigrationLock:
    """The lock a daemon takes to migrate its SQLite journal (router.db), held by the
    test: the daemon's start waits in it, its event loop running, not yet serving."""

    def __init__(self, workspace: Workspace) -> None:
        import fcntl

        if not Path("/proc/self/fd").is_dir():
            pytest.skip("needs Linux /proc to see the daemon wait for the lock")
        self.path = workspace.root / "state" / "router.db.migrate-lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def wait_waiting(self, daemon: DaemonProcess, timeout: float = 30) -> None:
        """Until the daemon has opened the lock file (it then waits for the lock)."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                if any(os.readlink(fd) == str(self.path)
                       for fd in Path(f"/proc/{daemon.proc.pid}/fd").iterdir()
                       if fd.is_symlink()):
                    return
            assert daemon.proc.poll() is None, daemon.log()
            assert time.monotonic() < deadline, f"never waited for the lock: {daemon.log()}"
            time.sleep(0.02)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def test_sighup_while_the_journal_migrates_does_not_kill_and_applies(
    workspace: Workspace, start_daemon  # type: ignore[no-untyped-def]
) -> None:
    lock = MigrationLock(workspace)
    try:
        daemon = start_daemon(workspace, wait=False)
        lock.wait_waiting(daemon)
        _route_models_to(workspace, "v1")
        daemon.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert daemon.proc.poll() is None, f"killed by SIGHUP while starting: {daemon.log()}"
    finally:
        lock.release()
    daemon.wait_started()
    assert "config reloaded" in daemon.log()
    write_bundle(workspace.spool, "b1", model_manifest("clf", run_id="r1"), {"model.pkl": b"1"})
    assert _landed(workspace, "r1") == Path("v1/r1/clf/model.pkl")
    assert daemon.terminate() == 0


def test_sigterm_while_the_journal_migrates_stops_cleanly_and_loses_nothing(
    workspace: Workspace, start_daemon  # type: ignore[no-untyped-def]
) -> None:
    write_bundle(workspace.spool, "b1", model_manifest("clf", run_id="r1"), {"model.pkl": b"1"})
    lock = MigrationLock(workspace)
    try:
        daemon = start_daemon(workspace, wait=False)
        lock.wait_waiting(daemon)
        daemon.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
    finally:
        lock.release()  # the migration cannot be cut off: the stop follows it
    assert daemon.proc.wait(timeout=60) == 0, daemon.log()
    log = daemon.log()
    assert "stopped" in log and "artifact-router started" not in log, log
    assert (workspace.spool / "incoming" / "b1").is_dir(), "left for the next start"
    start_daemon(workspace)
    assert workspace.wait_settled(1)["events"] == {"done": 1}
