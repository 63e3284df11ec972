"""Fault suite (issue 8, part 3): the daemon as a real process, routing to real sinks,
while things go wrong around it.  Every test here is marked `faults`:

    .venv/bin/pytest -m faults -q

1. SIGKILL at 20 seeded random points while 1,000 artifacts route to S3, the jsonl
   tracker and MLflow: every object once with the right checksum, no metric point twice.
2. The S3 server down for 30 s mid-run: the other sinks keep their pace (measured),
   everything lands once S3 is back, RSS stays bounded.
3. The MQTT broker restarted mid-stream, with the same three sinks.
4. The disk holding the journal fills up (a 16 MiB tmpfs; a file-layer quota where
   mounting is not allowed): intake stops with a clear error, nothing accepted is lost,
   and it recovers when space returns.  (And /healthz while only the
   dispatcher's journal writes fail.)
5. A restart with a changed routing rule while bundles are in flight.
"""

from __future__ import annotations

import base64
import json
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess, Workspace, free_port
from tests.fault_tools import (
    Emitted,
    MiB,
    PacedEmitter,
    Sampler,
    assert_jsonl_exactly,
    assert_mlflow_exactly,
    assert_s3_exactly,
    emit,
    file_size_quota,
    fill,
    healthz,
    jsonl_line_count,
    model_and_metrics,
    piped_daemon,
    rate_between,
    read_only_dir,
    rss_bytes,
    small_tmpfs,
    wait_for,
    wal_checkpoint_truncate,
)
from tests.servers_mlflow import MlflowServer, mlflow_server
from tests.servers_storage import RcloneS3, rclone_s3, rclone_s3_private

try:  # the MQTT source and its broker fixture (test 3 skips without them)
    import router.sources.mqtt  # noqa: F401
    from tests.servers_mqtt import (
        BROKER_KIND,
        Broker,
        StreamPublisher,
        mqtt_broker,
        mqtt_broker_factory,
    )

    MQTT_MISSING = "" if BROKER_KIND == "mosquitto" else (
        f"needs mosquitto (broker persistence across its restart); found {BROKER_KIND}")
except ImportError as exc:  # pragma: no cover - depends on the checkout
    MQTT_MISSING = f"the MQTT source or its broker fixture is not available: {exc}"

__all__ = [  # fixtures, imported for pytest
    "mlflow_server", "mqtt_broker", "mqtt_broker_factory", "rclone_s3", "rclone_s3_private"]

pytestmark = pytest.mark.faults

StartDaemon = Callable[..., DaemonProcess]


def three_sink_workspace(root: Path, s3: RcloneS3, mlflow_url: str, *, prefix: str,
                         experiment_prefix: str, **router: Any) -> Workspace:
    """Models to S3; metrics to the jsonl tracker and to MLflow."""
    ws = Workspace(root, **router)
    ws.stack["artifact_store"] = {"type": "s3", **s3.settings(prefix=prefix)}
    ws.stack["experiment_tracker"] = [
        {"type": "jsonl", "path": str(ws.tracking)},
        # The test MLflow server (sqlite backend, one worker, a pool of 5+10 connections)
        # answers 400 BAD_REQUEST "QueuePool limit ... reached" when its pool runs dry,
        # and the mlflow sink dead-letters every 400 as permanent (a bug, reported with
        # this suite): with the default 32 requests in flight some points never land.
        {"type": "mlflow", "tracking_uri": mlflow_url, "experiment_prefix": experiment_prefix,
         "concurrency": 8},
    ]
    ws.stack["artifact_routing"] = {
        "Model": {"store": "s3", "path": "{pipeline}/{run_id}/{step_name}/{name}"},
        "Metrics": {"log_to_tracker": True},
        "default": {"store": "s3", "path": "{pipeline}/{run_id}/{step_name}/{name}"},
    }
    ws.write()
    return ws


def assert_all_done(status: dict[str, Any], events: int) -> None:
    assert status["events"] == {"done": events}, status["events"]
    d = status["deliveries"]
    assert (d["pending"], d["in_flight"], d["dead"]) == (0, 0, 0), d
    assert d["done"] == 3 * events, d


# --- 1. SIGKILL at random points --------------------------------------------------------------


def test_sigkill_at_20_random_points_three_sinks_exactly_once(
    tmp_path: Path, rclone_s3: RcloneS3, mlflow_server: MlflowServer, start_daemon: StartDaemon
) -> None:
    """500 bundles (a model file each, to S3, and a metrics artifact each, to the jsonl
    tracker and to MLflow: 1,000 artifacts, 1,500 deliveries) while the daemon is
    SIGKILLed 20 times at seeded random moments: during intake, uploads, MLflow batches,
    completion commits, and start-up recovery."""
    rng = random.Random(8_2024)
    tag = uuid.uuid4().hex[:8]
    pipeline, prefix, experiment_prefix = f"faults-{tag}", f"faults-sigkill-{tag}", "faults-"
    ws = three_sink_workspace(tmp_path, rclone_s3, mlflow_server.url, prefix=prefix,
                              experiment_prefix=experiment_prefix)
    total, kills, runs = 500, 20, 10
    # burst sizes summing to `total`, one burst before each kill
    cuts = sorted(rng.sample(range(1, total), kills - 1))
    bursts = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    on_disk = rclone_s3.root / rclone_s3.bucket / prefix

    def progress() -> int:
        """Deliveries visible in the sinks: objects in S3's directory plus jsonl lines."""
        return sum(1 for _ in on_disk.rglob("*.bin")) + jsonl_line_count(ws.tracking)

    emitted: list[Emitted] = []
    points: list[str] = []
    mid_work = 0
    daemon = start_daemon(ws)
    for burst in bursts:
        for _ in range(burst):
            emitted.append(emit(ws.spool, pipeline, len(emitted), runs=runs, rng=rng))
        # The kill point is a seeded random fraction of the work outstanding, so kills
        # land at every stage whatever the machine's speed; below 0: at once, while the
        # daemon is still recovering from the previous kill.
        now, goal = progress(), 2 * len(emitted)
        fraction = rng.uniform(-0.15, 1.0)
        threshold = now + max(0.0, fraction) * (goal - now)
        deadline = time.monotonic() + 30
        while progress() < threshold and time.monotonic() < deadline:
            time.sleep(0.01)
        at = progress()
        daemon.kill()  # SIGKILL: no drain, no cleanup, wherever it was
        mid_work += at < goal
        points.append(f"{at}/{goal}")
        daemon = start_daemon(ws)
    print(f"{kills} SIGKILLs at (sink progress/goal): {', '.join(points)}")
    assert mid_work >= kills // 2, f"only {mid_work} kills landed with work outstanding"
    t0 = time.monotonic()
    status = ws.wait_settled(total, timeout=240)
    print(f"settled {time.monotonic() - t0:.1f}s after the last restart")
    assert_all_done(status, total)
    assert_s3_exactly(rclone_s3.settings(), prefix, pipeline, emitted)
    assert sum(1 for p in on_disk.rglob("*") if p.is_file()) == total, "stray objects/temps"
    assert_jsonl_exactly(ws.tracking, emitted)
    assert_mlflow_exactly(mlflow_server.url, experiment_prefix + pipeline, emitted)
    catalog = json.loads(ws.cli("artifacts", "--json").stdout)
    assert len(catalog) == 2 * total
    assert daemon.terminate() == 0


# --- 2. S3 down for 30 s --------------------------------------------------------------------


RSS_BOUND = 400 * MiB


def test_s3_down_for_30s_other_sinks_keep_their_pace(
    tmp_path: Path, rclone_s3_private: RcloneS3, start_daemon: StartDaemon
) -> None:
    """Bundles arrive at a steady 12/s; each model fans out to S3 and to a local mirror
    store, each metrics artifact goes to the jsonl tracker.  S3 (a server of this test's
    own) is stopped for 30 s.  Head-of-line blocking is measured, not guessed: the
    mirror's and the tracker's completions per second during the outage (files on disk,
    counted every 0.5 s) against the 10 s before it.  With a queue shared between sinks
    the outage rate would fall towards 0; it must stay at half the baseline or more.
    Afterwards every S3 object is there once with its checksum, and the daemon's RSS
    (VmRSS, sampled every 0.5 s) stayed under 400 MiB throughout."""
    s3 = rclone_s3_private
    tag = uuid.uuid4().hex[:8]
    pipeline, prefix = f"outage-{tag}", f"outage-{tag}"
    ws = Workspace(tmp_path)
    mirror = tmp_path / "mirror"
    ws.stack["artifact_store"] = {
        "type": "s3", **s3.settings(prefix=prefix, max_attempts=1, connect_timeout=2),
        # an outage of 30 s must not exhaust the attempts: back off up to 2 s, keep trying
        "retry": {"base_delay": 0.2, "max_delay": 2.0, "max_attempts": 10_000},
    }
    ws.stack["artifact_stores"] = {"mirror": {"type": "local", "path": str(mirror)}}
    ws.stack["artifact_routing"] = {
        "Model": {"store": ["s3", "mirror"], "path": "{pipeline}/{run_id}/{step_name}/{name}"},
        "Metrics": {"log_to_tracker": True},
        "default": {"store": "mirror", "path": "{pipeline}/{run_id}/{step_name}/{name}"},
    }
    ws.write()
    daemon = start_daemon(ws)

    rss = Sampler(lambda: rss_bytes(daemon.proc.pid), every=0.5)
    tracker_done = Sampler(lambda: jsonl_line_count(ws.tracking), every=0.5)
    mirror_done = Sampler(lambda: sum(1 for p in mirror.rglob("*.bin")), every=0.5)
    for sampler in (rss, tracker_done, mirror_done):
        sampler.start()
    rate = 12.0
    emitter = PacedEmitter(ws.spool, pipeline, rate=rate, runs=10, seed=30)
    emitter.start()
    time.sleep(13)
    down_at = time.monotonic()
    s3.stop()
    time.sleep(20)
    during = ws.status()["sinks"]
    time.sleep(10)
    s3.start()
    up_at = time.monotonic()
    time.sleep(3)
    emitted = emitter.stop()
    status = ws.wait_settled(len(emitted), timeout=180)
    for sampler in (rss, tracker_done, mirror_done):
        sampler.stop()

    s3_during = during["local.artifact_store"]
    assert s3_during["pending"] + s3_during["in_flight"] > 100, s3_during  # really down
    assert s3_during["dead"] == 0
    rates = {}
    for name, sampler in (("tracker", tracker_done), ("mirror", mirror_done)):
        baseline = rate_between(sampler.samples, down_at - 10, down_at)
        outage = rate_between(sampler.samples, down_at + 1, up_at)
        rates[name] = (round(baseline, 2), round(outage, 2))
    peak = max(v for _, v in rss.samples if v)
    print(f"emitted {len(emitted)} at {rate}/s; completions/s (baseline, S3 down): {rates}; "
          f"RSS min {min(v for _, v in rss.samples if v) / MiB:.0f} MiB, "
          f"peak {peak / MiB:.0f} MiB")
    for name, (baseline, outage) in rates.items():
        assert baseline >= rate / 2, f"{name} did not keep up before the outage: {rates}"
        assert outage >= baseline / 2, f"{name} slowed down while S3 was down: {rates}"
    assert peak < RSS_BOUND, f"RSS peaked at {peak / MiB:.0f} MiB"

    assert status["events"] == {"done": len(emitted)}, (status["events"], status["dead_letters"])
    d = status["deliveries"]
    assert (d["pending"], d["in_flight"], d["dead"]) == (0, 0, 0), d
    assert_s3_exactly(s3.settings(), prefix, pipeline, emitted, server_restarted=True)
    assert len(list(mirror.rglob("*.bin"))) == len(emitted)
    assert_jsonl_exactly(ws.tracking, emitted)
    assert daemon.terminate() == 0


# --- 3. the MQTT broker restarted mid-stream ----------------------------------------------------


def mqtt_stream(pipeline: str, n: int, runs: int, seed: int) -> tuple[list[Emitted],
                                                                    list[tuple[str, bytes]]]:
    """The same model + metrics pairs as the spool tests, with the model file inline."""
    rng = random.Random(seed)
    emitted, messages = [], []
    for i in range(n):
        e, manifest = model_and_metrics(pipeline, i, runs=runs, rng=rng)
        manifest["id"] = f"{pipeline}-{i:05d}"
        manifest["artifacts"][0]["files"] = [{
            "name": e.file_name, "type": "bin",
            "content_base64": base64.b64encode(e.data).decode()}]
        emitted.append(e)
        messages.append((f"artifacts/{pipeline}/train", json.dumps(manifest).encode()))
    return emitted, messages


@pytest.mark.skipif(bool(MQTT_MISSING), reason=MQTT_MISSING or "-")
def test_broker_restart_mid_stream_three_sinks_exactly_once(
    tmp_path: Path, mqtt_broker: Broker, rclone_s3: RcloneS3, mlflow_server: MlflowServer,
    start_daemon: StartDaemon,
) -> None:
    """400 manifests published at QoS 1 (model inline, metrics) while mosquitto is
    stopped and started again mid-stream: the publisher's client reconnects and sends
    what was not acknowledged again (at least once), the router's persistent session
    gets what the broker kept.  Every model lands in S3 once, every metric point once
    in jsonl and MLflow."""
    tag = uuid.uuid4().hex[:8]
    pipeline, prefix, experiment_prefix = f"mqtt-{tag}", f"faults-mqtt-{tag}", "faults-"
    port = free_port()
    ws = three_sink_workspace(tmp_path, rclone_s3, mlflow_server.url, prefix=prefix,
                              experiment_prefix=experiment_prefix,
                              mqtt=mqtt_broker.mqtt_settings(), listen=f"127.0.0.1:{port}")
    start_daemon(ws)

    def mqtt_healthy(want: bool) -> bool:
        try:
            _code, body = healthz(port)
        except OSError:
            return False
        return body.get("checks", {}).get("MqttSource") is want

    wait_for(lambda: mqtt_healthy(True), 30, "the MQTT source to connect")
    n = 400
    emitted, messages = mqtt_stream(pipeline, n, runs=10, seed=3)
    # ~100 messages/s; it holds at 300 until released, so the broker's restart always
    # falls inside the stream, whatever the machine's speed
    publisher = StreamPublisher(mqtt_broker, messages, window=10, pause=0.05, hold_at=300)
    publisher.start()
    wait_for(lambda: publisher.acked >= 150, 60, "150 acknowledged publications", every=0.02)
    mqtt_broker.stop()  # SIGTERM mid-stream: mosquitto saves its persistence file
    stopped_at = publisher.acked
    wait_for(lambda: mqtt_healthy(False), 30, "/healthz to see the broker gone")
    code, body = healthz(port)
    assert (code, body["status"]) == (503, "degraded"), body
    time.sleep(2.0)  # the daemon and the publisher retry against a closed port
    mqtt_broker.start()
    publisher.release()
    wait_for(lambda: mqtt_healthy(True), 60, "the MQTT source to reconnect")
    publisher.join_checked()  # paho reconnects on its own, or the publisher does
    assert stopped_at < 300, "the broker must go down mid-stream"
    status = ws.wait_settled(n, timeout=180)
    print(f"broker stopped after {stopped_at} of {n} acknowledged; "
          f"publisher reconnects {publisher.reconnects}")
    assert_all_done(status, n)
    assert_s3_exactly(rclone_s3.settings(), prefix, pipeline, emitted)
    assert_jsonl_exactly(ws.tracking, emitted)
    assert_mlflow_exactly(mlflow_server.url, experiment_prefix + pipeline, emitted)


# --- 4. the journal's disk fills up ----------------------------------------------------------


JOURNAL_FS_SIZE = "16m"


def test_journal_disk_full_stops_intake_loses_nothing_and_recovers(tmp_path: Path) -> None:
    """state_dir (the SQLite journal) on a 16 MiB tmpfs of its own.  While 20 accepted
    bundles are still being retried against a read-only store, the tmpfs is filled with
    a ballast file and 30 more bundles arrive.  The daemon keeps running, says why
    ("database or disk is full", /healthz 503 degraded), leaves the 30 in incoming/
    (not acknowledged), dead-letters nothing, and once the ballast is deleted (and the
    store writable again) accepts and delivers all 70.

    Where mounting a tmpfs is not allowed, the disk is a quota simulated at the file
    layer instead: RLIMIT_FSIZE on the daemon process (prlimit), so that no file it
    writes may grow (SQLite then says "disk I/O error" rather than "disk is full"); its
    log goes through a pipe, so the quota does not silence it.
    ROUTER_TEST_NO_MOUNT=1 takes that path on purpose."""
    port = free_port()
    ws = Workspace(tmp_path, listen=f"127.0.0.1:{port}")
    state, db = tmp_path / "state", tmp_path / "state" / "router.db"
    ballast = state / "ballast"
    rng = random.Random(4)
    with small_tmpfs(state, JOURNAL_FS_SIZE) as mounted, piped_daemon(ws) as daemon:
        first = [emit(ws.spool, "full", i, runs=5, rng=rng) for i in range(20)]
        ws.wait_settled(20)
        with read_only_dir(ws.store):
            second = [emit(ws.spool, "full", 20 + i, runs=5, rng=rng) for i in range(20)]
            ws.wait_until(lambda s: s["events"].get("accepted") == 20, timeout=60)
            # the disk fills up: the journal's next write has nowhere to go
            wal_checkpoint_truncate(db)
            if mounted:
                fill(ballast)
                problem = ("database or disk is full",)
            else:
                file_size_quota(daemon.proc.pid, 0)  # simulated at the file layer
                problem = ("disk I/O error", "database or disk is full")
            third = [emit(ws.spool, "full", 40 + i, runs=5, rng=rng) for i in range(30)]
            wait_for(lambda: "intake failed; bundles stay in incoming/" in daemon.log(), 30,
                     "the intake error in the log")
            time.sleep(3.0)  # several intake and dispatcher retries fail meanwhile
            assert daemon.proc.poll() is None, "the daemon exited on a full disk"
            log = daemon.log()
            assert any(p in log for p in problem), log[-3000:]
            code, body = healthz(port)
            assert (code, body["status"], body["checks"]["spool"]) == (503, "degraded", False)
            waiting = {p.name for p in (ws.spool / "incoming").iterdir()}
            assert waiting == {e.bundle for e in third}, "not acknowledged: left in incoming/"
            status = ws.status()  # reads still work
            assert status["events"] == {"done": 20, "accepted": 20}, status["events"]
            assert status["deliveries"]["dead"] == 0
            # space returns
            if mounted:
                ballast.unlink()
            else:
                file_size_quota(daemon.proc.pid, None)
        status = ws.wait_settled(70, timeout=120)
        assert status["events"] == {"done": 70}, status["events"]
        assert (status["deliveries"]["dead"], status["deliveries"]["done"]) == (0, 140)
        everything = first + second + third
        for e in everything:
            stored = ws.store / "full" / e.run_id / "train" / "clf" / e.file_name
            assert stored.read_bytes() == e.data
        assert_jsonl_exactly(ws.tracking, everything)
        code, body = healthz(port)
        assert (code, body["status"]) == (200, "ok"), body
        assert daemon.terminate() == 0


def test_healthz_degraded_while_the_journal_cannot_be_written(tmp_path: Path) -> None:
    """Accepted deliveries are being retried (read-only store) when the journal's disk
    fills; no new bundle arrives.  Every dispatcher tick now fails ("journal tick
    failed": neither outcomes nor claims can be recorded), so /healthz should say so."""
    port = free_port()
    ws = Workspace(tmp_path, listen=f"127.0.0.1:{port}")
    state = tmp_path / "state"
    rng = random.Random(41)
    with small_tmpfs(state, JOURNAL_FS_SIZE) as mounted, piped_daemon(ws) as daemon:
        with read_only_dir(ws.store):
            for i in range(10):
                emit(ws.spool, "full", i, runs=5, rng=rng)
            ws.wait_until(lambda s: s["events"].get("accepted") == 10, timeout=60)
            wal_checkpoint_truncate(state / "router.db")
            if mounted:
                fill(state / "ballast")
            else:
                file_size_quota(daemon.proc.pid, 0)  # simulated at the file layer
            try:
                wait_for(lambda: "journal tick failed" in daemon.log(), 30,
                         "a failed dispatcher tick")
                time.sleep(1.0)
                code, body = healthz(port)
            finally:
                if mounted:
                    (state / "ballast").unlink()
                else:
                    file_size_quota(daemon.proc.pid, None)
        ws.wait_settled(10, timeout=60)  # recovers all the same
        assert (code, body["status"]) == (503, "degraded"), body


# --- 5. a restart with a changed routing rule while work is in flight ------------------------


def journaled_event_ids(db: Path) -> set[str]:
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    try:
        return {row[0] for row in conn.execute("SELECT id FROM events")}
    finally:
        conn.close()


def test_restart_with_a_new_rule_mid_work_keeps_journaled_plans(
    tmp_path: Path, start_daemon: StartDaemon
) -> None:
    """The daemon reads its config at start (there is no live reload), so a config
    change is a restart: SIGTERM (drain, exit 0), edit, start again.

    Models first go to the `primary` store only; then the rule becomes a fan-out to
    `primary` and `archive`, and the daemon is restarted while 150 accepted bundles are
    still undelivered (the primary store is read-only meanwhile, so their deliveries are
    pending) and 100 more are arriving in the spool (some journaled before the SIGTERM,
    the rest after the restart).  The contract:

    * nothing accepted before the restart is lost: every model reaches `primary`;
    * an event keeps the RoutePlan it was journaled with: events accepted before the
      restart are not re-planned, so they never go to `archive`;
    * events accepted after the restart (the rest of the 100, and 50 more) follow the
      new rule and land in both stores."""
    ws = Workspace(tmp_path)
    archive = tmp_path / "archive"
    ws.stack["artifact_stores"] = {"archive": {"type": "local", "path": str(archive)}}
    path = "{pipeline}/{run_id}/{step_name}/{name}"
    ws.stack["artifact_routing"]["Model"] = {"store": "local", "path": path}
    ws.write()
    rng = random.Random(5)
    daemon = start_daemon(ws)
    with read_only_dir(ws.store):
        before = [emit(ws.spool, "cfg", i, runs=5, rng=rng) for i in range(150)]
        ws.wait_until(lambda s: s["events"].get("accepted") == 150, timeout=60)
        during = [emit(ws.spool, "cfg", 150 + i, runs=5, rng=rng) for i in range(50)]
        ws.wait_until(lambda s: s["events"].get("accepted", 0) > 150, timeout=60)
        during += [emit(ws.spool, "cfg", 200 + i, runs=5, rng=rng) for i in range(50)]
        ws.stack["artifact_routing"]["Model"] = {"store": ["local", "archive"], "path": path}
        ws.write()
        assert daemon.terminate() == 0
        old_plan = journaled_event_ids(ws.root / "state" / "router.db")
    assert {e.bundle for e in before} < old_plan
    daemon = start_daemon(ws)
    after = [emit(ws.spool, "cfg", 250 + i, runs=5, rng=rng) for i in range(50)]
    everything = before + during + after
    status = ws.wait_settled(len(everything), timeout=120)
    new_plan = [e for e in everything if e.bundle not in old_plan]
    print(f"journaled before the restart: {len(old_plan)} "
          f"({len(old_plan) - len(before)} of the 100 arriving); after: {len(new_plan)}")
    assert status["events"] == {"done": len(everything)}, status["events"]
    assert status["deliveries"]["dead"] == 0
    assert status["deliveries"]["done"] == 2 * len(everything) + len(new_plan)
    for e in everything:
        rel = Path("cfg", e.run_id, "train", "clf", e.file_name)
        assert (ws.store / rel).read_bytes() == e.data, f"{e.bundle} lost from primary"
        if e.bundle in old_plan:
            assert not (archive / rel).exists(), f"{e.bundle} was re-planned"
        else:
            assert (archive / rel).read_bytes() == e.data, f"{e.bundle} missed the new rule"
    assert_jsonl_exactly(ws.tracking, everything)
    assert daemon.terminate() == 0
