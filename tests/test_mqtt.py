"""The MQTT source against a real broker (tests/servers_mqtt.py) and real daemon processes.

Which broker ran is in every test id (`[mosquitto]` or `[amqtt]`) and printed with -s.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt._packet as paho_packet
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from router.config import MqttSettings
from router.db import Database, artifacts, held_messages
from router.journal import FinishedEvent
from router.manifest import ManifestError, parse_manifest
from router.metrics import RouterMetrics
from router.sources import mqtt as mqtt_source
from router.sources import paho_reads
from router.sources.mqtt import (
    MqttPublishError,
    MqttSource,
    build_publication,
    derive_event_id,
    publish_manifest,
)
from router.sources.mqtt_pool import Pool, status_payload
from router.sources.paho_tables import SharedTableProperties
from sinks.trackers.jsonl import read_jsonl
from tests.conftest import DaemonProcess, Workspace, bytes_read, free_port, wait_bytes_read
from tests.servers_mqtt import (
    BROKER_KIND,
    Broker,
    Collector,
    StreamPublisher,
    make_ca,
    mqtt_broker,
    mqtt_broker_factory,
    publish_all,
    v5_properties,
)

__all__ = ["mqtt_broker", "mqtt_broker_factory"]  # fixtures, imported for pytest

StartDaemon = Callable[..., DaemonProcess]


# --- helpers --------------------------------------------------------------------------------


def metrics_manifest(i: int, *, pipeline: str = "stream", runs: int = 5) -> dict[str, Any]:
    return {
        "manifest_version": 1,
        "id": f"evt-{i:05d}",
        "pipeline": pipeline,
        "run_id": f"run-{i % runs}",
        "step_name": "train",
        "artifacts": [
            {"type": "metrics", "name": "eval", "values": {"i": i, "accuracy": 0.5}, "step": i}
        ],
    }


def stream(n: int, **kw: Any) -> list[tuple[str, bytes]]:
    return [
        (f"artifacts/{kw.get('pipeline', 'stream')}/train", json.dumps(metrics_manifest(i, **kw))
         .encode())
        for i in range(n)
    ]


def mqtt_workspace(root: Path, broker: Broker, *, journal_url: str | None = None,
                   mqtt: dict[str, Any] | None = None, **router: Any) -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    return Workspace(root, journal_url=journal_url,
                     mqtt=broker.mqtt_settings(**(mqtt or {})), **router)


def query(url: str, statement: sa.Select[Any]) -> list[Any]:
    """The rows of one query, read straight from the journal's database."""

    async def run() -> list[Any]:
        db = Database(url)
        try:
            async with db.read() as conn:
                return list(await conn.execute(statement))
        finally:
            await db.dispose()

    return asyncio.run(run())


def catalog_event_ids(url: str) -> Counter[str]:
    """Event id of every catalogued artifact row."""
    return Counter(r[0] for r in query(url, sa.select(artifacts.c.event_id)))


def wait_catalogued(url: str, count: int, timeout: float = 180.0) -> Counter[str]:
    deadline = time.monotonic() + timeout
    while True:
        ids = catalog_event_ids(url)
        if len(ids) >= count:
            return ids
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(ids)} of {count} events catalogued after {timeout}s")
        time.sleep(0.5)


def tracker_points(tracking: Path) -> Counter[int]:
    """How many times each metric point (values.i) was logged to the jsonl tracker."""
    seen: Counter[int] = Counter()
    for path in tracking.rglob("*.jsonl"):
        for row in read_jsonl(path):
            values = row.get("values")
            assert isinstance(values, dict)
            seen[int(values["i"])] += 1
    return seen


def assert_exactly_once(url: str, tracking: Path, n: int) -> None:
    ids = catalog_event_ids(url)
    assert set(ids) == {f"evt-{i:05d}" for i in range(n)}, "events missing from the catalog"
    assert max(ids.values()) == 1, f"catalogued twice: {[k for k, v in ids.items() if v > 1]}"
    points = tracker_points(tracking)
    assert set(points) == set(range(n)), f"missing metric points: {set(range(n)) - set(points)}"
    twice = sorted(k for k, v in points.items() if v > 1)
    assert not twice, f"metric points logged more than once: {twice[:20]}"


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_health(port: int, healthy: bool, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            _status, body = healthz(port)
        except (OSError, ValueError):
            time.sleep(0.2)
            continue
        if body.get("checks", {}).get("MqttSource") is healthy:
            return body
        time.sleep(0.2)
    raise AssertionError(f"MqttSource never became healthy={healthy}: {body}")


def log_events(daemon: DaemonProcess, event: str) -> list[dict[str, Any]]:
    out = []
    for line in daemon.log().splitlines():
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("event") == event:
                out.append(row)
    return out


def start_subscribed(start_daemon: StartDaemon, ws: Workspace) -> DaemonProcess:
    """Start a daemon and wait until its subscription exists: on a fresh broker, what is
    published before the router's first subscription has no subscriber and is dropped."""
    daemon = start_daemon(ws)
    deadline = time.monotonic() + 30
    while not log_events(daemon, "mqtt connected"):
        assert daemon.proc.poll() is None, daemon.log()
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    return daemon


def wait_exit(daemon: DaemonProcess, timeout: float = 60.0) -> int:
    code = daemon.proc.wait(timeout=timeout)
    return code


# amqtt (the fallback) speaks MQTT 3.1.1 only, keeps sessions in memory, has no shared
# subscriptions and does not redeliver unacknowledged messages to a returning session.
needs_v5 = pytest.mark.skipif(
    BROKER_KIND != "mosquitto",
    reason="needs MQTT v5, persistent sessions that redeliver and $share (mosquitto)",
)


# --- volume, restarts, crashes ------------------------------------------------------------------


def test_two_thousand_manifests_reach_the_catalog(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon
) -> None:
    listen = free_port()
    ws = mqtt_workspace(tmp_path / "ws", mqtt_broker, listen=f"127.0.0.1:{listen}")
    start_daemon(ws)
    assert wait_health(listen, True)["status"] == "ok"
    publish_all(mqtt_broker, stream(2000))
    ids = wait_catalogued(ws.journal_url, 2000)
    status = ws.wait_settled(2000, timeout=180)
    assert status["events"].get("done") == 2000, status
    assert len(ids) == 2000
    assert_exactly_once(ws.journal_url, ws.tracking, 2000)


@needs_v5
def test_broker_restart_mid_stream_loses_nothing(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon
) -> None:
    listen = free_port()
    ws = mqtt_workspace(tmp_path / "ws", mqtt_broker, listen=f"127.0.0.1:{listen}")
    start_daemon(ws)
    wait_health(listen, True)
    n = 1200
    publisher = StreamPublisher(mqtt_broker, stream(n), window=50, pause=0.01, hold_at=600)
    publisher.start()
    publisher.wait_held()
    mqtt_broker.stop()  # SIGTERM: mosquitto writes its persistence file
    print("catalogued when the broker stopped:", len(catalog_event_ids(ws.journal_url)))
    body = wait_health(listen, False)
    assert body["status"] == "degraded"
    time.sleep(1.0)  # the daemon and the publisher retry against a closed port
    mqtt_broker.start()
    publisher.release()
    wait_health(listen, True)
    publisher.join_checked()
    assert publisher.reconnects >= 1
    wait_catalogued(ws.journal_url, n)
    ws.wait_settled(n, timeout=180)
    assert_exactly_once(ws.journal_url, ws.tracking, n)


@needs_v5
def test_sigkill_mid_stream_loses_and_duplicates_nothing(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon
) -> None:
    ws = mqtt_workspace(tmp_path / "ws", mqtt_broker)
    daemon = start_subscribed(start_daemon, ws)
    n = 1200
    publisher = StreamPublisher(mqtt_broker, stream(n), window=20, pause=0.01)
    publisher.start()
    wait_catalogued(ws.journal_url, 300)
    daemon.kill()  # between receipt, commit, PUBACK and delivery: wherever it was
    killed_at = len(catalog_event_ids(ws.journal_url))
    time.sleep(0.5)  # messages keep arriving in the broker's session for us
    restarted = start_subscribed(start_daemon, ws)
    publisher.join_checked()
    wait_catalogued(ws.journal_url, n)
    ws.wait_settled(n, timeout=180)
    assert_exactly_once(ws.journal_url, ws.tracking, n)
    assert killed_at < n
    assert restarted.terminate() == 0
    (stats,) = log_events(restarted, "mqtt source stopped")
    assert stats["received"] > 0
    print(f"killed with {killed_at} of {n} catalogued; after the restart: {stats}")


def wait_log_event(daemon: DaemonProcess, event: str, timeout: float = 60.0
                   ) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not (rows := log_events(daemon, event)):
        assert time.monotonic() < deadline, f"no {event!r} in {daemon.log()[-3000:]}"
        time.sleep(0.1)
    return rows


def pool_statuses(broker: Broker, group: str) -> dict[str, dict[str, Any]]:
    """The retained pool statuses (client id -> status) a new subscriber is given."""
    collector = Collector(broker, f"artifact-router/pool/{group}/+")
    try:
        time.sleep(1.0)  # retained messages come right after the SUBACK
        return {m.topic.rsplit("/", 1)[1]: json.loads(m.payload) for m in collector.messages}
    finally:
        collector.close()


@needs_v5
@pytest.mark.postgres
def test_shared_subscription_splits_work_across_three_daemons(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon, pg_url: str
) -> None:
    """One member is SIGKILLed mid-stream and never comes back: a survivor takes its
    session over, and every event is still processed by exactly one member."""
    tracking = tmp_path / "tracking"
    store = tmp_path / "store"
    workspaces = []
    for k in range(3):
        ws = mqtt_workspace(
            tmp_path / f"node{k}", mqtt_broker, journal_url=pg_url,
            mqtt={"client_id": f"router-node-{k}", "shared_group": "routers",
                  "takeover_after": 2},
            lease_seconds=10,
        )
        ws.stack["experiment_tracker"]["path"] = str(tracking)
        ws.stack["artifact_store"]["path"] = str(store)
        ws.write()
        workspaces.append(ws)
    daemons = [start_subscribed(start_daemon, ws) for ws in workspaces]
    n, late = 3000, 300
    messages = stream(n)
    publisher = StreamPublisher(mqtt_broker, messages[:n - late], window=50, pause=0.01,
                                hold_at=1200)
    publisher.start()
    publisher.wait_held()
    wait_catalogued(pg_url, 900)
    daemons[2].kill()
    # The stream goes on: the dead member's session collects its share (mosquitto keeps
    # it there) until a survivor takes the session over and drains it.
    publisher.release()
    publisher.join_checked()
    (takeover,) = wait_log_event(daemons[0], "mqtt takeover")
    # Published after the takeover: the drained session no longer takes a share.
    publish_all(mqtt_broker, messages[n - late:])
    wait_catalogued(pg_url, n)
    # node2's in-flight deliveries wait for their lease to expire (router.lease_seconds,
    # 10 s here), then a survivor delivers them.
    workspaces[0].wait_settled(n, timeout=180)

    # The lowest live client id took the dead member over, alone, and drained its
    # unacknowledged messages and its share; then it cleared the member's status.
    assert takeover["member"] == "router-node-2" and takeover["outcome"] == "drained", takeover
    assert takeover["drained"] > 0, takeover
    assert takeover["rejected"] == 0, takeover
    assert takeover["accepted"] + takeover["duplicate"] == takeover["drained"], takeover
    assert not log_events(daemons[1], "mqtt takeover started")
    statuses = pool_statuses(mqtt_broker, "routers")
    assert {k: v["state"] for k, v in statuses.items()} == {
        "router-node-0": "online", "router-node-1": "online"}, statuses
    for d in daemons[:2]:
        assert d.terminate() == 0
    assert {k: v["state"] for k, v in pool_statuses(mqtt_broker, "routers").items()} == {
        "router-node-0": "offline", "router-node-1": "offline"}

    # Each event was processed by exactly one member: catalogued once, and no member
    # that stayed up ever saw, in its own session, a message another one had (it would
    # count a duplicate).  The takeover may count duplicates: messages node2 journaled
    # but was killed before acknowledging; they are no-ops (catalogued once, below).
    ids = catalog_event_ids(pg_url)
    assert set(ids) == {f"evt-{i:05d}" for i in range(n)}
    assert max(ids.values()) == 1
    final = [log_events(d, "mqtt source stopped")[-1] for d in daemons[:2]]
    assert [f["duplicate"] for f in final] == [0, 0], final
    first_batch = log_events(daemons[2], "mqtt intake")
    assert first_batch and first_batch[0]["accepted"] > 0, "node2 got nothing before the kill"
    assert all(f["accepted"] > 0 for f in final), final
    print("accepted: node0", final[0]["accepted"], "node1", final[1]["accepted"],
          "takeover of node2", takeover)
    # Nothing left behind and nothing twice: every metric point reached the tracker once,
    # although the killed member's in-flight deliveries were retried by another member
    # (the jsonl tracker's check-and-append holds an flock across processes).
    points = tracker_points(tracking)
    assert set(points) == set(range(n))
    assert max(points.values()) == 1, sorted(k for k, v in points.items() if v > 1)[:20]


def test_takeover_settings_are_checked() -> None:
    assert MqttSettings(shared_group="g").takeover_enabled()  # on by default in a pool
    assert not MqttSettings().takeover_enabled()
    assert not MqttSettings(shared_group="g", takeover_after=0).takeover_enabled()
    assert not MqttSettings(shared_group="g", takeover_after=None).takeover_enabled()
    assert not MqttSettings(shared_group="g", protocol="3.1.1").takeover_enabled()
    with pytest.raises(ValidationError, match='takeover_after 5 needs protocol "5"'):
        MqttSettings(shared_group="g", protocol="3.1.1", takeover_after=5)
    with pytest.raises(ValidationError, match="client_id 'pods/r1' names this member's status"):
        MqttSettings(shared_group="g", client_id="pods/r1")
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        MqttSettings(shared_group="g", takeover_after=-1)


def test_only_the_lowest_live_member_takes_over_after_the_grace_period() -> None:
    settings = MqttSettings(client_id="router-b", shared_group="g", takeover_after=10)
    pool = Pool(SimpleNamespace(settings=settings))  # type: ignore[arg-type]
    pool._on_status("router-c", status_payload("router-c", "online"))
    pool._on_status("router-a", status_payload("router-a", "offline"))
    since = pool.members["router-a"].since
    assert pool.due(since + 9) == []
    assert pool.due(since + 10) == ["router-a"]
    pool._on_status("router-a", b"")  # a taker cleared its status: nothing left to take
    assert pool.due(since + 100) == []
    # A live member with a lower client id decides; this one keeps out of its way.
    pool._on_status("router-a", status_payload("router-a", "online"))
    pool._on_status("router-d", status_payload("router-d", "offline"))
    assert pool.due(time.monotonic() + 100) == []
    pool._on_status("router-a", status_payload("router-a", "offline"))
    assert pool.due(time.monotonic() + 100) == ["router-a", "router-d"]


def test_a_member_whose_heartbeats_stop_is_taken_for_offline() -> None:
    """A member that died while the broker was down left its retained "online" status (no
    Will could go out): three missed heartbeats, then the grace period, and it is taken
    over. A member that does not beat (an older router) is never taken for silent."""
    settings = MqttSettings(client_id="router-b", shared_group="g", takeover_after=10)
    pool = Pool(SimpleNamespace(settings=settings))  # type: ignore[arg-type]
    pool._on_status("router-a", status_payload("router-a", "online", heartbeat=5))
    pool._on_status("router-c", status_payload("router-c", "online"))  # does not beat
    seen = pool.members["router-a"].seen
    assert pool.due(seen + 14) == []  # router-a is live, and the lowest: its call
    assert pool.due(seen + 15 + 9) == []  # silent since seen + 15, not for 10 s yet
    assert pool.due(seen + 15 + 10) == ["router-a"]
    assert pool.due(seen + 10_000) == ["router-a"]  # router-c stays live
    pool._on_status("router-a", status_payload("router-a", "online", heartbeat=5))
    assert pool.due(pool.members["router-a"].seen + 14) == []  # beating again


@needs_v5
@pytest.mark.postgres
def test_a_member_killed_while_the_broker_was_down_is_taken_over(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon, pg_url: str
) -> None:
    """A broker that crashes publishes no Will (one that stops cleanly publishes them all),
    so a member that dies while it is down keeps its retained "online" status for good.
    Its heartbeats stop, and after three of them (and the grace period) the survivor
    drains its session: its share of what is published afterwards is not stranded there
    until it returns."""
    workspaces = [mqtt_workspace(
        tmp_path / f"node{k}", mqtt_broker, journal_url=pg_url,
        mqtt={"client_id": f"router-node-{k}", "shared_group": "routers",
              "takeover_after": 1, "heartbeat_seconds": 1})
        for k in range(2)]
    survivor, doomed = (start_subscribed(start_daemon, ws) for ws in workspaces)
    deadline = time.monotonic() + 30  # "online" is published just after "mqtt connected"
    while {k: v["state"] for k, v in pool_statuses(mqtt_broker, "routers").items()} != {
            "router-node-0": "online", "router-node-1": "online"}:
        assert time.monotonic() < deadline, pool_statuses(mqtt_broker, "routers")
    saved = mqtt_broker.root / "data" / "broker.db"
    before = saved.stat().st_mtime_ns if saved.exists() else 0
    assert mqtt_broker.proc is not None
    mqtt_broker.proc.send_signal(signal.SIGUSR1)  # mosquitto saves sessions and statuses
    deadline = time.monotonic() + 10
    while not saved.exists() or saved.stat().st_mtime_ns == before:
        assert time.monotonic() < deadline, "mosquitto did not save on SIGUSR1"
        time.sleep(0.05)
    time.sleep(0.2)  # written whole
    mqtt_broker.proc.kill()  # a crash: no Will goes out
    mqtt_broker.proc.wait(10)
    doomed.kill()
    mqtt_broker.start()
    assert pool_statuses(mqtt_broker, "routers")["router-node-1"]["state"] == "online"
    n = 200
    publish_all(mqtt_broker, stream(n))  # its share goes to its session meanwhile
    (takeover,) = wait_log_event(survivor, "mqtt takeover")
    assert takeover["member"] == "router-node-1" and takeover["outcome"] == "drained", takeover
    ids = wait_catalogued(pg_url, n, timeout=60)
    assert set(ids) == {f"evt-{i:05d}" for i in range(n)} and max(ids.values()) == 1
    assert "router-node-1" not in pool_statuses(mqtt_broker, "routers")


def test_a_hashed_folder_name_is_never_another_events_id() -> None:
    """Ids over 200 bytes get a hashed folder name; an id chosen to equal that name must
    not share the folder (its inline files would land in the other event's)."""
    long_id = "x" * 250
    hashed = mqtt_source._segment(long_id)
    assert hashed.startswith("~sha256-") and len(hashed) < 64
    assert mqtt_source._segment(hashed) not in (hashed, long_id)
    assert mqtt_source._segment("run-1") == "run-1"


def test_only_a_cleared_status_makes_the_pool_forget_a_dead_member() -> None:
    """Anything else on a member's status topic (a receipt a publisher aimed there with its
    ResponseTopic, garbage) must not make the survivors forget it: its session would never
    be taken over."""
    settings = MqttSettings(client_id="router-a", shared_group="g", takeover_after=10)
    pool = Pool(SimpleNamespace(settings=settings))  # type: ignore[arg-type]
    pool._on_status("router-b", status_payload("router-b", "offline"))
    since = pool.members["router-b"].since
    receipt = json.dumps({"event_id": "evt-1", "state": "done", "artifacts": []}).encode()
    for payload in (receipt, b"not json", b"[1]", json.dumps({"state": "gone"}).encode()):
        pool._on_status("router-b", payload)
        assert pool.due(since + 10) == ["router-b"], payload
    pool._on_status("router-b", b"")  # cleared by the taker once drained
    assert pool.due(since + 100) == []


@needs_v5
async def test_member_returning_during_a_takeover_loses_and_duplicates_nothing(
    tmp_path: Path, mqtt_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member comes back under its own client id while a survivor is draining its
    session: mosquitto hands the session back, the takeover stops quietly, and what it
    had not acknowledged reaches the returning member, where the journal keeps every
    event once.  The taker's intake is held at its first batch so the return happens
    mid-takeover every time."""
    from router import config as router_config
    from router.daemon import Daemon
    from router.sources.mqtt import MqttSource

    ws = mqtt_workspace(tmp_path / "ws", mqtt_broker,
                        mqtt={"shared_group": "g", "takeover_after": 0.5})
    daemon = Daemon(router_config.load_config(ws.config_path))
    await daemon.db.migrate()
    n = 60
    taker_holds, release = asyncio.Event(), asyncio.Event()
    original = MqttSource._handle

    async def gated(self: MqttSource, client: Any, batch: list[Any]) -> None:
        if not self.healthy:  # only a takeover's intake is never "healthy"
            taker_holds.set()
            await asyncio.wait_for(release.wait(), 60)
        await original(self, client, batch)

    monkeypatch.setattr(MqttSource, "_handle", gated)

    def member(client_id: str) -> MqttSource:
        source = MqttSource.from_daemon(daemon)
        source.settings = source.settings.model_copy(update={"client_id": client_id})
        return source

    async def until(done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 60
        while not done():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.05)

    def takeovers(outcome: str) -> float:
        value = daemon.metrics.registry.get_sample_value(
            "router_pool_takeovers_total", {"outcome": outcome})
        return value or 0.0

    running: list[tuple[MqttSource, asyncio.Task[None]]] = []

    def start(source: MqttSource) -> MqttSource:
        running.append((source, asyncio.create_task(source.run())))
        return source

    async def stop(source: MqttSource) -> None:
        for s, task in running:
            if s is source:
                source.stop()
                await asyncio.wait_for(task, 30)

    try:
        # m-a subscribes, then stops: its session keeps the shared subscription and
        # collects the whole stream (it is the group's only member).
        first = start(member("m-a"))
        await until(lambda: first.healthy, "m-a connected")
        await stop(first)
        await asyncio.to_thread(publish_all, mqtt_broker, stream(n))
        # m-b finds m-a's retained "offline" status and takes its session over ...
        survivor = start(member("m-b"))
        await until(taker_holds.is_set, "m-b never took m-a over")
        # ... and m-a comes back while the taker holds unacknowledged messages.
        returned = start(member("m-a"))
        await until(lambda: returned.stats["accepted"] == n, f"m-a got {returned.stats}")
        release.set()
        await until(lambda: takeovers("interrupted") == 1, "the takeover did not stop")
        assert returned.stats == {"received": n, "accepted": n, "duplicate": 0,
                                  "rejected": 0, "ignored": 0}
        # Both members are live now: new messages are shared, and nobody takes m-a over.
        await asyncio.to_thread(publish_all, mqtt_broker, stream(n + 40)[n:])
        await until(lambda: returned.stats["received"] + survivor.stats["received"] >= n + 40,
                    "the late messages did not arrive")
        await asyncio.sleep(1.5)  # three grace periods: a wrong takeover would start now
        assert takeovers("drained") == 0 and takeovers("interrupted") == 1
        assert survivor.stats["received"] > 0 and survivor.stats["duplicate"] == 0
        ids = await asyncio.to_thread(catalog_event_ids, ws.journal_url)
        assert set(ids) == {f"evt-{i:05d}" for i in range(n + 40)}
        assert max(ids.values()) == 1
    finally:
        release.set()
        for source, task in running:
            source.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
        await daemon.close()


# --- bad input ------------------------------------------------------------------------------


def _valid(name: str, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "manifest_version": 1,
        "id": f"ok-{name}",
        "pipeline": "corpus",
        "run_id": "run-1",
        "step_name": "check",
        "artifacts": [{"type": "metrics", "name": f"m-{name}", "values": {"x": 1.0}}],
    }
    doc.update(extra)
    return doc


def _bad(name: str, artifacts: list[dict[str, Any]] | None = None, **extra: Any) -> bytes:
    doc = _valid(name, **extra)
    doc["id"] = f"bad-{name}"
    if artifacts is not None:
        doc["artifacts"] = artifacts
    return json.dumps(doc).encode()


def malformed_corpus(allowed: Path, outside: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (payload, words the rejection reason must contain)."""
    big = base64.b64encode(b"x" * 2048).decode()
    def report(entry: dict[str, Any], **meta: Any) -> list[dict[str, Any]]:
        art: dict[str, Any] = {"type": "report", "name": "r", "upload": True, "files": [entry]}
        if meta:
            art["metadata"] = meta
        return [art]

    missing_pipeline = _valid("x")
    del missing_pipeline["pipeline"]
    return {
        "not_utf8": (b'{"manifest_version": 1, "pipeline": "\xff\xfe"}', "not UTF-8"),
        "not_json": (b'{"manifest_version": 1, "pipeline": ', "not valid JSON"),
        "empty_payload": (b"", "empty payload"),
        "json_array": (b"[1, 2, 3]", "must be a JSON object"),
        "json_number": (b"42", "must be a JSON object"),
        "missing_pipeline": (json.dumps(missing_pipeline).encode(), "required field is missing"),
        "wrong_manifest_version": (_bad("v", manifest_version=2), "reads manifest_version 1"),
        "no_artifacts": (_bad("n", artifacts=[]), "at least one item"),
        "unknown_artifact_type": (
            _bad("t", artifacts=[{"type": "blob", "name": "b"}]), "unknown artifact type"),
        "unknown_field": (_bad("f", colour="red"), "unknown field"),
        "metric_not_a_number": (
            _bad("m", artifacts=[{"type": "metrics", "name": "m", "values": {"acc": "high"}}]),
            "number"),
        "negative_metric_step": (
            _bad("s", artifacts=[{"type": "metrics", "name": "m", "values": {"a": 1},
                                  "step": -1}]), "greater than or equal to 0"),
        "name_with_slash": (
            _bad("sl", artifacts=[{"type": "metrics", "name": "a/b", "values": {"a": 1}}]),
            "must not contain '/'"),
        "path_entry_over_mqtt": (
            _bad("path_entry_over_mqtt", artifacts=report({"path": "model.pkl"})),
            "'path' is for spool bundles"),
        "bad_base64": (_bad("b64", artifacts=report({"content_base64": "!!!not base64",
                                                     "name": "a.txt"})), "not valid base64"),
        "inline_over_cap": (
            _bad("inline_over_cap", artifacts=report({"content_base64": big, "name": "a.bin"})),
            "inline_max_bytes"),
        "file_without_extension": (
            _bad("ext", artifacts=report({"content_base64": "aGk=", "name": "README"})),
            "'type' is required"),
        "two_sources_in_entry": (
            _bad("two", artifacts=report({"uri": "s3://bucket/k.bin", "content_base64": "aGk="})),
            "exactly one of"),
        "duplicate_file_names": (
            _bad("dup", artifacts=[{"type": "report", "name": "r", "files": [
                {"content_base64": "aGk=", "name": "a.txt"},
                {"content_base64": "aGk=", "name": "a.txt"}]}]), "appears twice"),
        "uri_http_scheme": (
            _bad("http", artifacts=report({"uri": "http://example.com/m.bin"})),
            "must start with file://, s3:// or gs://"),
        "uri_outside_roots": (
            _bad("uri_outside_roots", artifacts=report({"uri": (outside / "secret.txt").as_uri()})),
            "outside router.mqtt.allowed_roots"),
        "uri_symlink_escape": (
            _bad("uri_symlink_escape",
                 artifacts=report({"uri": (allowed / "escape.txt").as_uri()})),
            "outside router.mqtt.allowed_roots"),
        "uri_encoded_dotdot": (
            _bad("uri_encoded_dotdot", artifacts=report(
                {"uri": f"file://{allowed}/%2e%2e/{outside.name}/secret.txt", "name": "s.txt"})),
            "outside router.mqtt.allowed_roots"),
        "uri_missing_file": (
            _bad("uri_missing_file", artifacts=report({"uri": (allowed / "nope.bin").as_uri()})),
            "no such file"),
        "uri_directory": (
            _bad("uri_directory", artifacts=report({"uri": (allowed / "subdir").as_uri(),
                                                    "type": "bin"})),
            "not a regular file"),
        "uri_bracketed_host": (
            _bad("uri_bracketed_host", artifacts=report({"uri": "file://[::1/x.bin"})),
            "files[0].uri = 'file://[::1/x.bin': is not a valid file:// URI"),
        "uri_remote_host": (
            _bad("uri_remote_host", artifacts=report({"uri": "file://otherhost/data/x.bin"})),
            "names host"),
        "bad_declared_sha256": (
            _bad("bad_declared_sha256", artifacts=report({"uri": "gs://bucket/k.bin"},
                                                         sha256="xyz")),
            "64 hex digits"),
        "unknown_stack": (_bad("unknown_stack", stack="nope"), "names no configured stack"),
        "id_conflict": (json.dumps(_valid("conflict", run_id="other-run")).encode(),
                        "already accepted with a different manifest"),
    }


def expected_rejection_id(topic: str, payload: bytes) -> str:
    try:
        manifest = parse_manifest(payload)
    except ManifestError:
        return derive_event_id(topic, payload)
    return manifest.id or derive_event_id(topic, payload)


def test_malformed_corpus_is_rejected_with_reasons_and_valid_messages_flow(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon
) -> None:
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    (allowed / "subdir").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("not for the router")
    (allowed / "escape.txt").symlink_to(outside / "secret.txt")
    model_bytes = os.urandom(3000)
    (allowed / "model.bin").write_bytes(model_bytes)
    (allowed / "alias.bin").symlink_to(allowed / "model.bin")  # a link that stays inside
    dead_topic = "artifacts/dead-letters"  # inside our own subscription, on purpose
    ws = mqtt_workspace(
        tmp_path / "ws", mqtt_broker,
        mqtt={"allowed_roots": [str(allowed)], "inline_max_bytes": 1024,
              "dead_letter_topic": dead_topic},
    )
    dead = Collector(mqtt_broker, dead_topic)
    start_subscribed(start_daemon, ws)

    inline = b"%PDF-1.4 tiny report"
    sha = hashlib.sha256(b"object bytes").hexdigest()
    valid: dict[str, bytes] = {
        f"metrics-{i}": json.dumps(_valid(f"metrics-{i}")).encode() for i in range(5)
    }
    valid["conflict"] = json.dumps(_valid("conflict")).encode()
    valid["inline-report"] = json.dumps(_valid("inline-report", artifacts=[
        {"type": "report", "name": "summary", "upload": True,
         "files": [{"content_base64": base64.b64encode(inline).decode(), "name": "s.pdf"}]},
        {"type": "report", "name": "again", "upload": True,  # the same file name, another
         "files": [{"content_base64": base64.b64encode(b"other").decode(), "name": "s.pdf"}]},
    ])).encode()
    valid["file-uri-model"] = json.dumps(_valid("file-uri-model", artifacts=[
        {"type": "model", "name": "clf", "upload": True,
         "files": [{"uri": (allowed / "alias.bin").as_uri(), "name": "model.bin"}]},
    ])).encode()
    valid["s3-dataset"] = json.dumps(_valid("s3-dataset", artifacts=[
        {"type": "dataset", "name": "train", "upload": True, "metadata": {"sha256": sha},
         "files": [{"uri": "s3://bucket/data/train.parquet"}]},
    ])).encode()
    no_id = _valid("no-id")
    del no_id["id"]
    valid["no-id"] = json.dumps(no_id).encode()

    corpus = malformed_corpus(allowed, outside)
    assert len(corpus) >= 20
    messages: list[tuple[str, bytes]] = []
    bad_items = list(corpus.items())
    for i, (name, payload) in enumerate(valid.items()):
        messages.append((f"artifacts/ok/{name}", payload))
        for bad_name, (bad_payload, _) in bad_items[i * 3:(i + 1) * 3]:
            messages.append((f"artifacts/bad/{bad_name}", bad_payload))
    for bad_name, (bad_payload, _) in bad_items[len(valid) * 3:]:
        messages.append((f"artifacts/bad/{bad_name}", bad_payload))
    messages.append(("artifacts/ok/metrics-0", valid["metrics-0"]))  # an exact repeat: no-op
    # the conflict must come after the original it conflicts with
    messages = [m for m in messages if m[0] != "artifacts/bad/id_conflict"]
    messages.append(("artifacts/bad/id_conflict", corpus["id_conflict"][0]))
    publish_all(mqtt_broker, messages)

    status = ws.wait_settled(len(valid) + len(corpus), timeout=120)
    assert status["events"].get("rejected") == len(corpus), status
    assert status["events"].get("done") == len(valid), status

    rejected = json.loads(ws.cli("artifacts", "--rejected", "--json").stdout)
    by_id = {row["id"]: row for row in rejected}
    for name, (payload, words) in corpus.items():
        topic = f"artifacts/bad/{name}"
        if name == "id_conflict":
            found = [r for i, r in by_id.items() if i.startswith("ok-conflict#rejected-")]
            assert len(found) == 1, (name, sorted(by_id))
            row = found[0]
        else:
            row = by_id.get(expected_rejection_id(topic, payload))
            assert row is not None, f"{name}: no rejection recorded; have {sorted(by_id)}"
        assert row["source"] == "mqtt", (name, row)
        assert words in row["error"], f"{name}: {row['error']!r} lacks {words!r}"

    letters = dead.wait_for(len(corpus))
    dead.close()
    by_topic = {json.loads(m.payload)["topic"]: json.loads(m.payload) for m in letters}
    for name, (payload, words) in corpus.items():
        letter = by_topic[f"artifacts/bad/{name}"]
        assert words in letter["reason"], (name, letter["reason"])
        assert base64.b64decode(letter["payload_base64"]) == payload

    ids = catalog_event_ids(ws.journal_url)
    assert ids["ok-metrics-0"] == 1
    assert derive_event_id("artifacts/ok/no-id", valid["no-id"]) in ids
    rows = {r["name"]: r for r in json.loads(ws.cli("artifacts", "--json").stdout)}
    summary, again = rows["summary"], rows["again"]
    stored = [loc["uri"] for loc in summary["locations"] if loc["uri"].startswith("file://")]
    assert stored and Path(stored[0].removeprefix("file://")).read_bytes() == inline
    assert summary["files"][0]["path"].startswith(str(tmp_path / "ws" / "state" / "mqtt"))
    assert summary["files"][0]["path"] != again["files"][0]["path"]
    model = rows["clf"]
    assert model["checksum"] == hashlib.sha256(model_bytes).hexdigest()
    assert model["files"][0]["path"] == str(allowed / "model.bin")  # symlink resolved
    dataset = rows["train"]
    assert dataset["files"][0]["uri"] == "s3://bucket/data/train.parquet"
    assert dataset["files"][0]["sha256"] == sha


# --- security ----------------------------------------------------------------------------------


def _file_uri_source(tmp_path: Path, allowed: Path) -> MqttSource:
    settings = MqttSettings(allowed_roots=[str(allowed)])
    return MqttSource(settings, SimpleNamespace(), SimpleNamespace(),  # type: ignore[arg-type]
                      preflight=lambda _e: None, metrics=RouterMetrics(),
                      state_dir=tmp_path / "state")


def _swap_setup(tmp_path: Path) -> tuple[Path, Path, Any, Callable[[], None]]:
    """allowed/run/model.bin, and a swap that turns allowed/run into a symlink to
    outside/run, whose model.bin holds a secret."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "run").mkdir(parents=True)
    (outside / "run").mkdir(parents=True)
    (allowed / "run" / "model.bin").write_bytes(b"inside " * 100)
    (outside / "run" / "model.bin").write_bytes(b"SECRET " * 100)
    manifest = parse_manifest(json.dumps(_valid("race", artifacts=[
        {"type": "model", "name": "m", "upload": True,
         "files": [{"uri": (allowed / "run" / "model.bin").as_uri()}]}])).encode())

    def swap() -> None:
        os.rename(allowed / "run", allowed / "run.real")
        os.symlink(outside / "run", allowed / "run")

    return allowed, outside, manifest, swap


def test_a_directory_swapped_after_the_check_is_not_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race is simulated at its exact point: the check of the file:// URI passed, and
    a directory of its path becomes a symlink out of allowed_roots before the hash opens
    the file by name.  The identity checked (device, inode) no longer matches."""
    allowed, _outside, manifest, swap = _swap_setup(tmp_path)
    source = _file_uri_source(tmp_path, allowed)
    real = mqtt_source.sha256_files

    def swapped_then_hashed(items: Any, abandon: Any) -> Any:
        swap()
        return real(items, abandon)

    monkeypatch.setattr(mqtt_source, "sha256_files", swapped_then_hashed)
    found = source._hash_local_files(manifest)[(0, 0)]
    assert not isinstance(found, tuple), f"hashed {found[0]} with the outside file's content"
    assert found.field == "artifacts[0].files[0].uri"
    assert "changed while the router read it" in found.message


def test_a_directory_swapped_between_resolve_and_stat_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same swap, simulated right after the URI's path resolved under allowed_roots:
    a stat by path would follow the new symlink and vouch for the outside file."""
    allowed, _outside, manifest, swap = _swap_setup(tmp_path)
    source = _file_uri_source(tmp_path, allowed)
    target = allowed / "run" / "model.bin"
    real = Path.resolve

    def resolve_then_swap(self: Path, strict: bool = False) -> Path:
        out = real(self, strict=strict)
        if self == target:
            swap()
        return out

    monkeypatch.setattr(Path, "resolve", resolve_then_swap)
    found = source._hash_local_files(manifest)[(0, 0)]
    assert not isinstance(found, tuple), f"hashed {found[0]} with the outside file's content"
    assert "changed while the router read it" in found.message


@needs_v5
def test_tls_and_password_and_a_wrong_password_fails_at_start(
    tmp_path: Path, mqtt_broker_factory: Callable[..., Broker], start_daemon: StartDaemon
) -> None:
    ca = make_ca(tmp_path / "pki")
    broker = mqtt_broker_factory(users={"router": "correct horse"}, ca=ca,
                                 require_certificate=True)
    ws = mqtt_workspace(tmp_path / "ws", broker)
    assert ws.router["mqtt"]["tls"] and ws.router["mqtt"]["cert_file"]
    start_subscribed(start_daemon, ws)
    settings = MqttSettings(**ws.router["mqtt"])
    report = tmp_path / "report.txt"
    report.write_text("over TLS, with a password")
    manifest = {"manifest_version": 1, "id": "tls-1", "pipeline": "secure", "run_id": "r1",
                "step_name": "s", "artifacts": [{"type": "report", "name": "rep", "upload": True,
                                                 "files": [{"path": "report.txt"}]}]}
    asyncio.run(publish_manifest(settings, manifest, [report]))
    ws.wait_settled(1, timeout=60)
    assert catalog_event_ids(ws.journal_url) == Counter({"tls-1": 1})

    # A sidecar with a wrong password must fail loudly at start, not retry in silence:
    # the daemon exits non-zero and says why.
    bad = mqtt_workspace(tmp_path / "bad-pass", broker, mqtt={"password": "wrong"})
    failing = start_daemon(bad)
    assert wait_exit(failing) != 0
    assert "not authorised" in failing.log(), failing.log()
    assert "router.mqtt.password" in failing.log()

    # A broker certificate from a CA we do not trust: the same, with its own words.
    other = make_ca(tmp_path / "other-pki", common_name="someone else")
    untrusted = mqtt_workspace(tmp_path / "bad-ca", broker, mqtt={"ca_file": str(other.ca_file)})
    failing = start_daemon(untrusted)
    assert wait_exit(failing) != 0
    assert "certificate verification failed" in failing.log(), failing.log()


# --- publishing and receipts -------------------------------------------------------------------


def test_publish_manifest_inlines_small_files_and_references_large_ones_v311(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon
) -> None:
    files_dir = tmp_path / "job-output"
    files_dir.mkdir()
    small = files_dir / "metrics.csv"
    small.write_bytes(b"a,b\n1,2\n")
    large = files_dir / "model.pkl"
    large_bytes = os.urandom(200_000)
    large.write_bytes(large_bytes)
    ws = mqtt_workspace(tmp_path / "ws", mqtt_broker, mqtt={
        "protocol": "3.1.1", "allowed_roots": [str(files_dir)], "inline_max_bytes": 4096})
    settings = MqttSettings(**ws.router["mqtt"])
    manifest = {"manifest_version": 1, "id": "emit-1", "pipeline": "emit", "run_id": "r1",
                "step_name": "train", "artifacts": [
                    {"type": "model", "name": "clf", "upload": True,
                     "files": [{"path": "model.pkl"}]},
                    {"type": "dataset", "name": "m", "upload": True,
                     "files": [{"path": "metrics.csv"}]}]}
    topic, payload = build_publication(settings, manifest, [large, small])
    assert topic == "artifacts/emit/r1/train"
    doc = json.loads(payload)
    assert doc["artifacts"][0]["files"][0] == {"name": "model.pkl", "uri": large.as_uri()}
    assert base64.b64decode(doc["artifacts"][1]["files"][0]["content_base64"]) == small.read_bytes()
    with pytest.raises(ValueError, match="matches none"):
        build_publication(settings, manifest, [small])

    # Inline files of a delivered event are kept `retention_days` (7), then pruned.
    state = ws.root / "state"
    expired = state / "mqtt-done" / "long-ago"
    expired.mkdir(parents=True)
    (expired / "x.csv").write_bytes(b"old")
    os.utime(expired, (time.time() - 8 * 86400,) * 2)

    start_subscribed(start_daemon, ws)
    asyncio.run(publish_manifest(settings, manifest, [large, small]))
    ws.wait_settled(1, timeout=60)
    rows = {r["name"]: r for r in json.loads(ws.cli("artifacts", "--json").stdout)}
    for name, data in (("clf", large_bytes), ("m", small.read_bytes())):
        uris = [loc["uri"] for loc in rows[name]["locations"] if loc["uri"].startswith("file:")]
        assert uris and Path(uris[0].removeprefix("file://")).read_bytes() == data, rows[name]
    inline = [p.relative_to(state) for p in state.rglob("*.csv")]
    assert inline == [Path("mqtt-done/emit-1/1/metrics.csv")], "delivered: moved aside"


def test_expired_inline_files_are_pruned_on_a_machine_booted_minutes_ago(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The monotonic clock counts from boot. Taking 0.0 for 'never pruned' put the first
    prune off until the machine had been up ten minutes (a fresh CI runner or node)."""
    source = _file_uri_source(tmp_path, tmp_path)
    expired, fresh = source.retired_root / "long-ago", source.retired_root / "yesterday"
    for folder, age_days in ((expired, 8), (fresh, 1)):
        folder.mkdir(parents=True)
        (folder / "x.csv").write_bytes(b"old")
        os.utime(folder, (time.time() - age_days * 86400,) * 2)
    monkeypatch.setattr(mqtt_source.time, "monotonic", lambda: 120.0)  # up two minutes
    source._retire_inline([])
    assert sorted(p.name for p in source.retired_root.iterdir()) == ["yesterday"]


def test_a_sharded_checkpoint_by_file_uris_lands_whole_with_each_shards_checksum(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon
) -> None:
    """Three file:// shards over 32 MiB in all are hashed together on the intake's pool:
    each stored shard is that shard's bytes, and the catalog holds each one's sha256
    (a digest handed to the wrong file would show here)."""
    shards_dir = tmp_path / "ckpt"
    shards_dir.mkdir()
    shards = []
    for i, mib in enumerate((14, 12, 10)):  # 36 MiB: over the parallel-hash threshold
        shard = shards_dir / f"model-{i:05d}-of-00003.safetensors"
        shard.write_bytes(os.urandom(mib << 20))
        shards.append(shard)
    ws = mqtt_workspace(tmp_path / "ws", mqtt_broker, mqtt={
        "protocol": "3.1.1", "allowed_roots": [str(shards_dir)], "inline_max_bytes": 4096})
    settings = MqttSettings(**ws.router["mqtt"])
    manifest = {"manifest_version": 1, "id": "ckpt-1", "pipeline": "llm", "run_id": "r1",
                "step_name": "train", "artifacts": [
                    {"type": "model", "name": "llm", "upload": True,
                     "files": [{"path": s.name} for s in shards]}]}
    _, payload = build_publication(settings, manifest, shards)
    assert [f["uri"] for f in json.loads(payload)["artifacts"][0]["files"]] == [
        s.as_uri() for s in shards]

    start_subscribed(start_daemon, ws)
    asyncio.run(publish_manifest(settings, manifest, shards))
    ws.wait_settled(1, timeout=120)
    (row,) = json.loads(ws.cli("artifacts", "--json").stdout)
    want = {s.name: hashlib.sha256(s.read_bytes()).hexdigest() for s in shards}
    stored = {Path(loc["uri"]).name: Path(loc["uri"].removeprefix("file://"))
              for loc in row["locations"] if loc["uri"].startswith("file://")}
    assert {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in stored.items()} \
        == want, row["locations"]
    assert {loc["file_name"]: loc["sha256"] for loc in row["locations"]} == want


def sparse_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A 64 GiB checkpoint with nothing on disk (a minute to hash, a GiB in well under
    one), and the manifest of run llm/r1 that hands it over."""
    model = tmp_path / "ckpt" / "model.safetensors"
    model.parent.mkdir()
    with open(model, "wb") as sparse:
        sparse.truncate(64 << 30)
    return model, {"manifest_version": 1, "id": "ckpt-1", "pipeline": "llm", "run_id": "r1",
                   "step_name": "train", "artifacts": [
                       {"type": "model", "name": "llm", "upload": True,
                        "files": [{"path": model.name}]}]}


def catalog_order(url: str) -> list[str]:
    """Event ids in the order their artifacts were catalogued (one artifact each)."""
    return [r[0] for r in query(url, sa.select(artifacts.c.event_id).order_by(artifacts.c.id))]


def held_rows(url: str) -> int:
    return len(query(url, sa.select(held_messages.c.id)))


@needs_v5
def test_a_large_file_uri_checkpoint_is_held_apart_and_the_messages_behind_it_flow(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon
) -> None:
    """A `file://` checkpoint takes about a second per GiB to hash. Its message is held in
    the journal and acknowledged, so the metrics of other runs behind it are catalogued
    meanwhile; its own run's, and a run naming it in `inputs`, wait and follow it. SIGTERM
    gives the hash up (a sparse 64 GiB file) and the next start journals what was held,
    with the receipt to its response topic. (It used to hold up every message behind it,
    and to stay unacknowledged when stopped.)"""
    model, checkpoint = sparse_checkpoint(tmp_path)
    files_dir = model.parent
    port = free_port()
    ws = mqtt_workspace(tmp_path / "ws", mqtt_broker, mqtt={
        "allowed_roots": [str(files_dir)], "receipts": True}, listen=f"127.0.0.1:{port}")
    settings = MqttSettings(**ws.router["mqtt"])
    replies = Collector(mqtt_broker, "replies/#")
    own_run = metrics_manifest(100, pipeline="llm") | {"id": "r1-after", "run_id": "r1"}
    naming_it = metrics_manifest(101, pipeline="eval") | {
        "id": "eval-after", "inputs": ["llm/r1/train/llm"]}
    messages = [build_publication(settings, checkpoint, [model]), *stream(20),
                ("artifacts/llm/train", json.dumps(own_run).encode()),
                ("artifacts/eval/train", json.dumps(naming_it).encode())]
    daemon = start_subscribed(start_daemon, ws)
    started = bytes_read(daemon)
    publish_all(mqtt_broker, messages, properties=lambda i: v5_properties(
        ResponseTopic="replies/ckpt", CorrelationData=b"\x00ckpt") if i == 0 else None)

    others = wait_catalogued(ws.journal_url, 20, timeout=60)
    assert bytes_read(daemon) - started < 60 << 30, "the whole checkpoint was hashed"
    assert set(others) == {f"evt-{i:05d}" for i in range(20)}, others
    assert held_rows(ws.journal_url) >= 1  # the checkpoint's; the others may follow it
    wait_bytes_read(daemon, started + (1 << 30))  # a GiB hashed: well under way
    deadline = time.monotonic() + 10  # the two behind it come in the next batch or two
    while "router_mqtt_held_messages 3.0" not in (
            metrics := urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()):
        assert time.monotonic() < deadline, [m for m in metrics.splitlines() if "held" in m]
        time.sleep(0.1)

    assert daemon.terminate(timeout=50) == 0  # not the minute the whole hash would take
    (gave_up,) = log_events(daemon, "stopping: a file:// hash was given up; the batch "
                                    "stays held in the journal for the next start")
    assert "of 68719476736 bytes" in gave_up["detail"], gave_up
    assert len(catalog_event_ids(ws.journal_url)) == 20
    assert json.loads(ws.cli("status", "--json").stdout)["held_messages"] == 3
    assert "held: 3 MQTT messages" in ws.cli("status").stdout

    data = os.urandom(100_000)  # the writer's real file this time: quick to hash
    model.write_bytes(data)
    again = start_subscribed(start_daemon, ws)
    ws.wait_settled(23, timeout=60)
    (resumed,) = log_events(again, "mqtt held messages resumed: journaled once hashed")
    assert resumed["messages"] == 3, resumed
    order = catalog_order(ws.journal_url)
    assert order[20:] == ["ckpt-1", "r1-after", "eval-after"], order
    rows = {r["event_id"]: r for r in json.loads(ws.cli("artifacts", "--json").stdout)}
    assert {loc["sha256"] for loc in rows["ckpt-1"]["locations"]} == {
        hashlib.sha256(data).hexdigest()}
    assert held_rows(ws.journal_url) == 0
    (reply,) = replies.wait_for(1, timeout=60)
    replies.close()
    assert reply.properties.CorrelationData == b"\x00ckpt"
    assert json.loads(reply.payload)["event_id"] == "ckpt-1"


@needs_v5
def test_a_held_checkpoint_whose_file_is_gone_at_the_next_start_is_rejected_with_why(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon
) -> None:
    """A held message is checked again when it is journaled: its file deleted while the
    router was down, it is rejected naming the field and the reason, dead-lettered, and
    no longer held (it was acknowledged: only the journal keeps it)."""
    model, checkpoint = sparse_checkpoint(tmp_path)
    files_dir = model.parent
    ws = mqtt_workspace(tmp_path / "ws", mqtt_broker, mqtt={
        "allowed_roots": [str(files_dir)], "dead_letter_topic": "dead/letters"})
    settings = MqttSettings(**ws.router["mqtt"])
    dead = Collector(mqtt_broker, "dead/letters")
    daemon = start_subscribed(start_daemon, ws)
    started = bytes_read(daemon)
    publish_all(mqtt_broker, [build_publication(settings, checkpoint, [model])])
    wait_bytes_read(daemon, started + (1 << 30))
    assert daemon.terminate(timeout=50) == 0
    model.unlink()

    start_subscribed(start_daemon, ws)
    (letter,) = dead.wait_for(1, timeout=60)
    dead.close()
    body = json.loads(letter.payload)
    assert body["event_id"] == "ckpt-1"
    assert body["errors"] == [{"field": "artifacts[0].files[0].uri", "value": model.as_uri(),
                               "message": "no such file"}], body
    deadline = time.monotonic() + 30  # released just after the dead letter goes out
    while (status := json.loads(ws.cli("status", "--json").stdout))["held_messages"]:
        assert time.monotonic() < deadline, status
    assert status["events"] == {"rejected": 1}, status
    assert "no such file" in status["rejected"][0]["error"]


@needs_v5
@pytest.mark.postgres
def test_a_pool_member_that_dies_holding_a_checkpoint_has_it_journaled_by_a_survivor(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon, pg_url: str
) -> None:
    """A held message was acknowledged, so no broker session keeps it: when a member is
    SIGKILLed mid-hash and never returns, the member that takes its session over adopts
    what it held and journals it."""
    model, checkpoint = sparse_checkpoint(tmp_path)
    files_dir = model.parent
    workspaces = [mqtt_workspace(
        tmp_path / f"node{k}", mqtt_broker, journal_url=pg_url,
        mqtt={"client_id": f"router-node-{k}", "shared_group": "routers",
              "takeover_after": 1, "allowed_roots": [str(files_dir)]})
        for k in range(2)]
    settings = MqttSettings(**workspaces[0].router["mqtt"])
    doomed = start_subscribed(start_daemon, workspaces[1])  # alone: the message is its
    started = bytes_read(doomed)
    publish_all(mqtt_broker, [build_publication(settings, checkpoint, [model])])
    wait_bytes_read(doomed, started + (1 << 30))
    assert held_rows(pg_url) == 1
    doomed.kill()

    data = os.urandom(100_000)
    model.write_bytes(data)
    survivor = start_subscribed(start_daemon, workspaces[0])
    (takeover,) = wait_log_event(survivor, "mqtt takeover")
    assert takeover["member"] == "router-node-1" and takeover["outcome"] == "drained", takeover
    assert takeover["adopted"] == 1, takeover
    workspaces[0].wait_settled(1, timeout=60)
    (row,) = json.loads(workspaces[0].cli("artifacts", "--json").stdout)
    assert row["event_id"] == "ckpt-1"
    assert {loc["sha256"] for loc in row["locations"]} == {hashlib.sha256(data).hexdigest()}
    assert held_rows(pg_url) == 0


@needs_v5
def test_an_event_with_nothing_to_deliver_gets_its_receipt_and_its_files_served(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon
) -> None:
    """Nothing uploaded: the event is done at intake. Its receipt goes out at once, its
    inline file moves to mqtt-done, and the HTTP file endpoint and the local client serve
    that file and the file:// file under an allowed root, as they do spool bundles' files."""
    files_dir = tmp_path / "job-output"
    files_dir.mkdir()
    (files_dir / "big.bin").write_bytes(os.urandom(50_000))
    (files_dir / "small.csv").write_bytes(b"a,b\n1,2\n")
    port = free_port()
    ws = mqtt_workspace(tmp_path / "ws", mqtt_broker, listen=f"127.0.0.1:{port}", mqtt={
        "allowed_roots": [str(files_dir)], "inline_max_bytes": 4096, "receipts": True})
    settings = MqttSettings(**ws.router["mqtt"])
    manifest = {"manifest_version": 1, "id": "kept-1", "pipeline": "p", "run_id": "r1",
                "step_name": "s", "artifacts": [
                    {"type": "dataset", "name": "small", "upload": False,
                     "files": [{"path": "small.csv"}]},
                    {"type": "dataset", "name": "big", "upload": False,
                     "files": [{"path": "big.bin"}]}]}
    replies = Collector(mqtt_broker, "artifacts/receipts/#")
    start_subscribed(start_daemon, ws)
    asyncio.run(publish_manifest(settings, manifest, [files_dir / "small.csv",
                                                      files_dir / "big.bin"]))
    (receipt,) = replies.wait_for(1, timeout=30)
    replies.close()
    assert json.loads(receipt.payload)["event_id"] == "kept-1"
    assert ws.wait_settled(1, timeout=60)["deliveries"]["done"] == 0  # nothing to deliver
    assert list((ws.root / "state" / "mqtt-done").rglob("small.csv")), "done: retired"
    assert not list((ws.root / "state" / "mqtt").rglob("small.csv"))
    rows = {r["name"]: r for r in json.loads(ws.cli("artifacts", "--json").stdout)}
    for name, file_name in (("small", "small.csv"), ("big", "big.bin")):
        url = f"http://127.0.0.1:{port}/api/v1/artifacts/{rows[name]['id']}/files/{file_name}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.read() == (files_dir / file_name).read_bytes(), name
    # The local client finds the same kept files (router.sources.LocalCopies), with a
    # cache dir of its own so that nothing it downloads could answer instead.
    from router.client import Client

    with Client(config=ws.config_path, cache_dir=tmp_path / "client-cache") as client:
        for row in client.backend.artifacts(pipeline="p"):
            file_name = row.files[0]["name"]
            path = client.local_file(row, file_name)
            assert path.read_bytes() == (files_dir / file_name).read_bytes(), row.name
            assert "client-cache" not in path.parts, path


@needs_v5
def test_publish_to_a_topic_nobody_reads_is_an_error(mqtt_broker: Broker) -> None:
    settings = MqttSettings(**mqtt_broker.mqtt_settings(topics=["nobody-listens/#"]))
    manifest = metrics_manifest(1)
    with pytest.raises(MqttPublishError, match="no one subscribes"):
        asyncio.run(publish_manifest(settings, manifest, []))


@needs_v5
def test_receipts_go_to_the_response_topic_or_the_receipt_topic(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon
) -> None:
    ws = mqtt_workspace(tmp_path / "ws", mqtt_broker, mqtt={"receipts": True})
    replies = Collector(mqtt_broker, "replies/#", "artifacts/receipts/#")
    start_subscribed(start_daemon, ws)
    with_reply = _valid("with-reply", artifacts=[
        {"type": "report", "name": "summary", "upload": True,
         "files": [{"content_base64": base64.b64encode(b"hello").decode(), "name": "s.txt"}]}])
    plain = metrics_manifest(7)
    publish_all(
        mqtt_broker,
        [("artifacts/jobs/a", json.dumps(with_reply).encode()),
         ("artifacts/jobs/b", json.dumps(plain).encode())],
        properties=lambda i: v5_properties(ResponseTopic="replies/job-7",
                                           CorrelationData=b"\x00corr-7") if i == 0 else None,
    )
    received = replies.wait_for(2, timeout=60)
    replies.close()
    by_topic = {m.topic: m for m in received}
    reply = by_topic["replies/job-7"]
    assert reply.properties.CorrelationData == b"\x00corr-7"
    body = json.loads(reply.payload)
    assert body["event_id"] == "ok-with-reply" and body["state"] == "done"
    assert body["versions"] == ["1"]
    (art,) = body["artifacts"]
    assert art["name"] == "summary" and art["version"] == "1"
    assert any(loc["uri"].startswith("file://") for loc in art["locations"])
    other = json.loads(by_topic["artifacts/receipts/evt-00007"].payload)
    assert other["event_id"] == "evt-00007" and other["state"] == "done"
    assert other["artifacts"][0]["type"] == "metrics"
    status = ws.wait_settled(2)
    assert status["events"].get("rejected", 0) == 0, "a receipt was read as a manifest"


@needs_v5
def test_receipt_topics_that_cannot_be_used_fall_back_and_later_receipts_flow(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon
) -> None:
    """An id with # or + and a ResponseTopic with a wildcard, under $ or on a pool status
    topic: each receipt goes to receipt_topic (the id made topic-safe) and the receipts
    after them still flow (a wildcard used to kill the receipt task for good)."""
    ws = mqtt_workspace(tmp_path / "ws", mqtt_broker, mqtt={"receipts": True})
    replies = Collector(mqtt_broker, "artifacts/receipts/#", "replies/#",
                        "artifact-router/pool/#")
    daemon = start_subscribed(start_daemon, ws)
    hashed, plus = _valid("x"), _valid("y")
    hashed["id"], plus["id"] = "run#1", "run+2"
    responses = {"ok-rt-wild": "replies/#", "ok-rt-plus": "replies/+/x",
                 "ok-rt-dollar": "$SYS/x", "ok-rt-pool": "artifact-router/pool/routers/router-b"}
    first = [("artifacts/a", json.dumps(hashed).encode()),
             ("artifacts/a", json.dumps(plus).encode())] + [
        ("artifacts/a", json.dumps(_valid(name.removeprefix("ok-"))).encode())
        for name in responses]
    topics = list(responses.values())
    publish_all(mqtt_broker, first, properties=lambda i: v5_properties(
        ResponseTopic=topics[i - 2], CorrelationData=b"c") if i >= 2 else None)
    ws.wait_settled(len(first))
    publish_all(mqtt_broker, [("artifacts/b", json.dumps(metrics_manifest(i)).encode())
                              for i in range(3)])
    expected = {"artifacts/receipts/run_1", "artifacts/receipts/run_2"} | {
        f"artifacts/receipts/{name}" for name in responses} | {
        f"artifacts/receipts/evt-{i:05d}" for i in range(3)}
    try:
        got = replies.wait_for(len(expected), timeout=60)
    except AssertionError:
        raise AssertionError(f"receipts: {[m.topic for m in replies.messages]}; "
                             f"{daemon.log()[-3000:]}") from None
    time.sleep(1)
    replies.close()
    assert {m.topic for m in replies.messages} == expected
    by_topic = {m.topic: m for m in got}
    assert json.loads(by_topic["artifacts/receipts/run_1"].payload)["event_id"] == "run#1"
    assert by_topic["artifacts/receipts/ok-rt-wild"].properties.CorrelationData == b"c"
    refused = {row["topic"] for row in log_events(daemon, "mqtt response topic refused; the "
                                                  "receipt goes to receipt_topic")}
    assert refused == set(responses.values())


async def test_a_receipt_paho_refuses_is_dropped_and_the_others_still_go_out(
    tmp_path: Path, mqtt_broker: Broker
) -> None:
    """A receipt whose topic paho refuses (ValueError: a wildcard, say, in a reply_to
    journaled before topics were checked) is logged and dropped; the receipt task lives on.
    """
    settings = MqttSettings(**mqtt_broker.mqtt_settings(receipts=True))
    moved: list[str] = []

    async def mark_moved(ids: Any) -> None:
        moved.extend(ids)

    source = MqttSource(settings, SimpleNamespace(mark_moved=mark_moved),  # type: ignore[arg-type]
                        SimpleNamespace(), preflight=lambda _e: None,  # type: ignore[arg-type]
                        metrics=RouterMetrics(), state_dir=tmp_path / "state")

    async def receipt(event: FinishedEvent) -> tuple[str, bytes, Any]:
        assert event.reply_to is not None
        return event.reply_to["topic"], event.event_id.encode(), None

    source._receipt = receipt  # type: ignore[method-assign]
    replies = await asyncio.to_thread(Collector, mqtt_broker, "ok/#")
    client = mqtt_source._make_client(settings, client_id=f"{settings.client_id}-t",
                                      persistent=False)
    async with client:
        task = asyncio.create_task(source._receipt_loop(client))
        source._queue_receipts([
            FinishedEvent(event_id=name, bundle=None, source="mqtt", state="done",
                          reply_to={"topic": topic})
            for name, topic in (("bad", "replies/#"), ("one", "ok/1"), ("two", "ok/2"))])
        got = await asyncio.to_thread(replies.wait_for, 2, 20)
        assert not task.done(), task
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    replies.close()
    assert sorted(m.topic for m in got) == ["ok/1", "ok/2"]
    assert moved == ["bad", "one", "two"]  # dropped for good: not tried again at next start


@needs_v5
def test_a_manifest_on_a_topic_like_the_receipt_topic_is_read_on_v5(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon
) -> None:
    """Pipeline "receipts" publishes to artifacts/receipts/run-1, which receipt_topic could
    render: under v5 only the router's user property marks its own messages."""
    mqtt = {"receipts": True, "topics": ["artifacts/+/+"]}
    ws = mqtt_workspace(tmp_path / "ws", mqtt_broker, mqtt=mqtt)
    replies = Collector(mqtt_broker, "artifacts/receipts/#")
    start_subscribed(start_daemon, ws)
    settings = MqttSettings(**mqtt_broker.mqtt_settings(**mqtt))
    asyncio.run(publish_manifest(settings, metrics_manifest(1, pipeline="receipts"), []))
    status = ws.wait_settled(1, timeout=30)
    assert status["events"].get("done") == 1, status
    receipts = [m for m in replies.wait_for(2) if m.topic == "artifacts/receipts/evt-00001"]
    replies.close()
    assert receipts, "no receipt"
    time.sleep(1)  # our receipt on artifacts/receipts/evt-00001 is not read as a manifest
    assert ws.status()["events"].get("rejected", 0) == 0


def test_a_manifest_on_the_receipt_topic_is_rejected_with_the_reason_on_v311(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon
) -> None:
    """MQTT 3.1.1 has no user properties: a manifest on a topic receipt_topic could render
    is recorded as rejected, saying why, instead of acknowledged and dropped; the router's
    own receipts and dead letters there are still skipped."""
    mqtt = {"receipts": True, "topics": ["artifacts/+/+"], "protocol": "3.1.1",
            "dead_letter_topic": "artifacts/dead/letters"}
    ws = mqtt_workspace(tmp_path / "ws", mqtt_broker, mqtt=mqtt)
    dead = Collector(mqtt_broker, "artifacts/dead/letters", "artifacts/receipts/#")
    start_subscribed(start_daemon, ws)
    settings = MqttSettings(**mqtt_broker.mqtt_settings(**mqtt))
    asyncio.run(publish_manifest(settings, metrics_manifest(1, pipeline="receipts"), []))
    asyncio.run(publish_manifest(settings, metrics_manifest(2), []))
    status = ws.wait_settled(2, timeout=30)
    dead.wait_for(3)  # the dead letter, the receipt of evt-00002, the manifest itself
    time.sleep(1)  # both came back through our subscription: neither is a new rejection
    dead.close()
    status = ws.status()
    assert status["events"].get("done") == 1 and status["events"].get("rejected") == 1, status
    (row,) = json.loads(ws.cli("artifacts", "--rejected", "--json").stdout)
    assert row["id"] == "evt-00001"
    assert "topic = 'artifacts/receipts/run-1': matches router.mqtt.receipt_topic" in row["error"]


# --- the crash window between commit and PUBACK, deterministically ------------------------------


@needs_v5
async def test_redelivery_after_commit_without_ack_is_a_journal_no_op(
    tmp_path: Path, mqtt_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commit, then 'crash' before the PUBACK: the broker redelivers, the journal says
    duplicate, and the redelivered messages are acknowledged without new work."""
    from router import config as router_config
    from router.daemon import Daemon
    from router.sources import mqtt as mqtt_source

    ws = mqtt_workspace(tmp_path / "ws", mqtt_broker)
    daemon = Daemon(router_config.load_config(ws.config_path))
    await daemon.db.migrate()
    n = 40

    async def run_until(source: mqtt_source.MqttSource, done: Callable[[], bool]) -> None:
        task = asyncio.create_task(source.run())
        deadline = time.monotonic() + 60
        while not done():
            assert not task.done(), task
            assert time.monotonic() < deadline, source.stats
            await asyncio.sleep(0.05)
        source.stop()
        await asyncio.wait_for(task, 30)

    try:
        with monkeypatch.context() as patch:
            patch.setattr(mqtt_source, "_ack", lambda _client, _message: True)  # never sent
            first = mqtt_source.MqttSource.from_daemon(daemon)
            subscribed = asyncio.create_task(run_until(first, lambda: first.healthy))
            await subscribed
            first = mqtt_source.MqttSource.from_daemon(daemon)
            await asyncio.to_thread(publish_all, mqtt_broker, stream(n))
            await run_until(first, lambda: first.stats["accepted"] == n)
        assert len(await asyncio.to_thread(catalog_event_ids, ws.journal_url)) == n

        second = mqtt_source.MqttSource.from_daemon(daemon)
        await run_until(second, lambda: second.stats["duplicate"] == n)
        assert second.stats["accepted"] == 0 and second.stats["received"] == n

        # They are acknowledged now: a third session gets only what is new.
        await asyncio.to_thread(publish_all, mqtt_broker, stream(n + 1)[n:])
        third = mqtt_source.MqttSource.from_daemon(daemon)
        await run_until(third, lambda: third.stats["received"] >= 1)
        assert third.stats["received"] == 1 and third.stats["accepted"] == 1, third.stats
        ids = await asyncio.to_thread(catalog_event_ids, ws.journal_url)
        assert Counter(ids.values()) == Counter({1: n + 1})
    finally:
        await daemon.close()


@needs_v5
def test_emit_cli_publishes_over_mqtt(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon
) -> None:
    """`artifact-router emit --mqtt`: the shell path for jobs that publish instead."""
    files_dir = tmp_path / "out"
    files_dir.mkdir()
    model = files_dir / "model.pkl"
    model.write_bytes(os.urandom(20_000))  # over the cap: sent as a file:// URI
    ws = mqtt_workspace(tmp_path / "ws", mqtt_broker, mqtt={
        "allowed_roots": [str(files_dir)], "inline_max_bytes": 4096})
    start_subscribed(start_daemon, ws)
    out = ws.cli("emit", "--mqtt", "--pipeline", "shell", "--run-id", "r7", "--step", "train",
                 "--type", "model", "--name", "clf", "--upload", "--metric", "acc=0.9",
                 "--json", str(model))
    published = json.loads(out.stdout)
    assert published["topic"] == "artifacts/shell/r7/train"
    ws.wait_settled(1, timeout=60)
    rows = {r["kind"]: r for r in json.loads(ws.cli("artifacts", "--json").stdout)}
    assert rows["model"]["event_id"] == published["event_id"]
    stored = [loc["uri"] for loc in rows["model"]["locations"]]
    assert stored and Path(stored[0].removeprefix("file://")).read_bytes() == model.read_bytes()
    assert rows["metrics"]["values"] == {"acc": 0.9}
    bad = ws.cli("emit", "--mqtt", "--pipeline", "shell", "--run-id", "r8", "--step", "t",
                 "--type", "metrics", "--metric", "acc=1", "--topic", "nobody/listens",
                 check=False)
    assert bad.returncode == 1 and "could not publish" in bad.stderr


def test_paho_decodes_v5_properties_with_shared_tables() -> None:
    """The shared-table Properties (router/sources/paho_tables.py) reads a PUBLISH's
    properties exactly as paho's own does, and a cleared one forgets what it held."""
    sent = v5_properties(ResponseTopic="replies/7", CorrelationData=b"\x00c",
                         UserProperty=[("a", "1"), ("b", "2")], ContentType="json")
    topic = b"artifacts/x"
    body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", 9) + sent.pack() + b"{}"
    packet = paho_packet.decode_publish(0x32, body, MQTTProtocolVersion.MQTTv5)
    got = packet.properties
    assert isinstance(got, SharedTableProperties) and packet.mid == 9 and packet.payload == b"{}"
    assert (got.ResponseTopic, got.CorrelationData, got.UserProperty, got.ContentType) == (
        "replies/7", b"\x00c", [("a", "1"), ("b", "2")], "json")
    assert str(got) == str(sent) and got.pack() == sent.pack()
    other = SharedTableProperties(PacketTypes.PUBLISH)
    assert other.names is got.names and other.isEmpty()
    got.clear()
    assert got.isEmpty() and not hasattr(got, "ResponseTopic")
    assert got.pack() == Properties(PacketTypes.PUBLISH).pack()
    got.UserProperty = ("c", "3")  # paho's checks still apply after a clear
    assert got.UserProperty == [("c", "3")]
    with pytest.raises(MQTTException, match="does not apply"):
        got.SessionExpiryInterval = 5


def test_the_read_buffer_hands_paho_the_bytes_it_asks_for_from_one_socket_read() -> None:
    """paho_reads.ReadBuffer over a real socket: small reads come out of one large one,
    a read with nothing waiting raises as the socket does, the end of the stream is
    b"", and the rest of a large payload goes straight through."""
    left, right = socket.socketpair()
    try:
        right.setblocking(False)
        reads: list[int] = []

        def socket_recv(n: int) -> bytes:
            reads.append(n)
            return right.recv(n)

        buffer = paho_reads.ReadBuffer(socket_recv)
        with pytest.raises(BlockingIOError):
            buffer(1)
        left.sendall(b"\x30\x05hello\x30\x02ok")
        assert [buffer(1), buffer(1), buffer(5)] == [b"\x30", b"\x05", b"hello"]
        assert buffer.pending() == 4 and reads == [paho_reads.CHUNK] * 2
        assert buffer(10) == b"\x30\x02ok"  # no more than it holds: paho asks again
        assert buffer.pending() == 0 and buffer.consumed == 11 and len(reads) == 2
        big = os.urandom(3 * paho_reads.CHUNK)
        left.sendall(big)
        got = b""
        while len(got) < len(big):
            got += buffer(len(big) - len(got))
        assert got == big and all(n == paho_reads.CHUNK or n > paho_reads.CHUNK for n in reads)
        left.close()
        assert buffer(1) == b""  # the end of the stream reaches paho as such
    finally:
        left.close()
        right.close()


@needs_v5
async def test_packets_read_together_are_all_decoded_and_the_bound_still_pauses_reading(
    mqtt_broker: Broker,
) -> None:
    """A burst arrives in a few socket reads, not three or four per message; every
    message read with another is decoded without the socket becoming readable again;
    and a consumer that takes nothing stops decoding at its queue bound, though the
    bytes of more messages are already read."""
    bound, n = 20, 300
    settings = MqttSettings(host="127.0.0.1", port=mqtt_broker.port, protocol="5")
    client = mqtt_source._make_client(settings, client_id="reads-together", persistent=False,
                                      receive_maximum=1000)
    assert isinstance(client, mqtt_source._BoundedClient)
    client._queue_limit = bound  # the broker may send 1,000; the queue holds 20
    async with client:
        await client.subscribe("reads/#", qos=1)
        buffer = client._client._sock_recv
        assert isinstance(buffer, paho_reads.ReadBuffer)
        socket_recv, reads = buffer._socket_recv, []
        buffer._socket_recv = lambda size: reads.append(size) or socket_recv(size)
        sent = [(f"reads/{i}", f"message {i}".encode()) for i in range(n)]
        await asyncio.to_thread(publish_all, mqtt_broker, sent)
        deadline = time.monotonic() + 30
        while client._queue.qsize() < bound:
            assert time.monotonic() < deadline, client._queue.qsize()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # room for any decoding past the bound to show
        assert client._queue.qsize() == bound and client._paused
        got: list[bytes] = []
        # Well inside the keepalive (60 s): a packet left undecoded in the buffer would
        # wait for the next PINGRESP to make the socket readable.
        async with asyncio.timeout(20):
            async for message in client.messages:
                got.append(message.payload)  # type: ignore[arg-type]
                client._client.ack(message.mid, message.qos)
                client.drained()
                if len(got) == n:
                    break
        assert sorted(got) == sorted(payload for _, payload in sent)
        assert len(reads) < n // 3, f"{len(reads)} socket reads for {n} messages"


def test_the_mqtt_source_runs_on_paho_2_1_which_has_no_packet_module(tmp_path: Path) -> None:
    """aiomqtt 2 accepts paho 2.1, which has no `paho.mqtt._packet` (its client decodes
    packets itself): importing the router's MQTT source failed there with
    ModuleNotFoundError. Against the real paho 2.1, fetched from the package index, in a
    process of its own: the import works and the client decodes with shared tables."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "-q", "-d", str(tmp_path), "paho-mqtt==2.1.0"], check=True, timeout=180)
    site = tmp_path / "site"
    zipfile.ZipFile(next(tmp_path.glob("paho_mqtt-2.1.0-*.whl"))).extractall(site)
    code = (
        "import paho.mqtt.client as client\n"
        f"assert client.__file__.startswith({str(site)!r}), client.__file__\n"
        "import router.sources.mqtt\n"
        "from paho.mqtt.packettypes import PacketTypes\n"
        "from paho.mqtt.properties import Properties\n"
        "from router.sources.paho_tables import SharedTableProperties\n"
        "assert client.Properties is SharedTableProperties, client.Properties\n"
        "sent = Properties(PacketTypes.PUBLISH); sent.ResponseTopic = 'replies/7'\n"
        "got = client.Properties(PacketTypes.PUBLISH); got.unpack(sent.pack())\n"
        "assert got.ResponseTopic == 'replies/7' and got.pack() == sent.pack()\n"
        "from router.sources import paho_reads\n"  # paho 2.1 reads through _sock_recv too
        "c = client.Client(client.CallbackAPIVersion.VERSION2)\n"
        "buffer = paho_reads.install(c)\n"
        "assert c._sock_recv is buffer and buffer._socket_recv.__func__ is "
        "client.Client._sock_recv\n"
    )
    root = Path(__file__).parent.parent
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=root, timeout=60,
                          env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{root}"})
    assert done.returncode == 0, done.stderr
