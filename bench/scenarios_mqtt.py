"""MQTT scenarios of `python -m bench` (issue 8): mqtt-intake and scale-out.

mqtt-intake: inline metrics manifests published at QoS 1 into a mosquitto of our own
(tests/servers_mqtt.py, own port, persistence on), routed to the jsonl tracker and the
catalog by a real `artifact-router run` process; its peer is a bare aiomqtt subscriber
process that only counts the same messages at QoS 1 (the ceiling of broker + client).

Both are timed the same way: from the first publish (the publisher in this process
sends at full speed and waits for every PUBACK) to the moment the last message was
"catalogued" (the router: the latest `events.finished_at`, set in the transaction
that records the last delivery's location in the catalog and marks the event done)
or counted (the peer: its receipt time of the last message).

The latency run offers a fixed 500 msg/s and takes, per message, `events.finished_at`
minus the wall-clock time of its `publish()` call.

scale-out: the same intake on PostgreSQL, with one daemon and with two daemons sharing
the topic through an MQTT v5 shared subscription (`router.mqtt.shared_group`); the
ratio is the speed-up of two over one.

`python -m bench.scenarios_mqtt peer HOST PORT FILTER N` is the peer process.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import DaemonUnderTest, ScenarioResult, _wait_rusage, median, p99

__all__ = ["SCENARIOS_MQTT", "mqtt_intake", "scale_out"]

TOPIC_FILTER = "artifacts/#"
RUNS = 50  # metric points spread over this many runs (one jsonl file per run)


# --- servers ---------------------------------------------------------------------------------


def _broker(root: Path) -> Any:
    """mosquitto on a free port, own config, persistence on, queue limits raised."""
    from tests.servers_mqtt import Broker

    broker = Broker(root=root, kind="mosquitto")
    broker.start()
    return broker


# --- payloads and publishing -----------------------------------------------------------------


def _payloads(n: int, tag: str) -> list[tuple[str, str, bytes]]:
    """(event id, topic, payload) of `n` inline metrics manifests, built before timing."""
    out = []
    for i in range(n):
        event_id = f"{tag}-{i:06d}"
        run = f"run-{i % RUNS:03d}"
        doc = {
            "manifest_version": 1, "id": event_id, "pipeline": "bench", "run_id": run,
            "step_name": "eval",
            "artifacts": [{"type": "metrics", "name": "evaluation", "step": i,
                           "values": {"accuracy": 0.9 + (i % 100) / 1000, "loss": 1.0 / (i + 1),
                                      "f1_score": 0.8}}],
        }
        out.append((event_id, f"artifacts/bench/{run}/eval",
                    json.dumps(doc, separators=(",", ":")).encode()))
    return out


def _publisher(port: int) -> Any:
    import paho.mqtt.client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2,
                         client_id=f"bench-pub-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    connected = __import__("threading").Event()
    client.on_connect = lambda *_args: connected.set()
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    if not connected.wait(20):
        client.loop_stop()
        raise RuntimeError(f"publisher could not connect to 127.0.0.1:{port}")
    return client


def _close(client: Any) -> None:
    client.disconnect()
    client.loop_stop()


def _wait_acked(infos: list[Any], timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    for info in infos:
        info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
        if not info.is_published():
            raise RuntimeError("the broker did not acknowledge a published message")
    return time.time()


def _publish_burst(port: int, messages: list[tuple[str, str, bytes]]) -> tuple[float, float]:
    """Publish at full speed, QoS 1; (wall time of the first publish, of the last PUBACK)."""
    client = _publisher(port)
    try:
        t0 = time.time()
        infos = [client.publish(topic, payload, qos=1) for _, topic, payload in messages]
        return t0, _wait_acked(infos)
    finally:
        _close(client)


def _publish_paced(port: int, messages: list[tuple[str, str, bytes]],
                   rate: float) -> dict[str, float]:
    """Publish at a fixed rate; the wall time of each message's publish() call, by id."""
    client = _publisher(port)
    sent: dict[str, float] = {}
    try:
        infos = []
        start = time.monotonic()
        for i, (event_id, topic, payload) in enumerate(messages):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent[event_id] = time.time()
            infos.append(client.publish(topic, payload, qos=1))
        _wait_acked(infos)
    finally:
        _close(client)
    return sent


# --- the router under test -----------------------------------------------------------------------


def _stack(root: Path) -> dict[str, Any]:
    return {
        "artifact_store": {"type": "local", "path": str(root / "store")},
        "experiment_tracker": {"type": "jsonl", "path": str(root / "tracking")},
        "artifact_routing": {
            "Metrics": {"log_to_tracker": True},
            "Parameters": {"log_to_tracker": True},
            "default": {"store": "local", "path": "{run_id}/{name}"},
        },
    }


class MqttDaemon(DaemonUnderTest):
    """A daemon fed by MQTT; ready once /healthz says its subscription is up (the base
    class's check: every source ready).

    With `pg_url` the journal and catalog are on PostgreSQL and the counts come from
    there (asyncpg); else from the SQLite file as in DaemonUnderTest.
    """

    def __init__(self, root: Path, broker: Any, *, pg_url: str | None = None,
                 shared_group: str | None = None, mqtt: dict[str, Any] | None = None,
                 **router: Any) -> None:
        self.pg_url = pg_url
        mqtt = broker.mqtt_settings(client_id=f"bench-router-{uuid.uuid4().hex[:8]}",
                                    topics=[TOPIC_FILTER], **(mqtt or {}))
        if shared_group:
            mqtt["shared_group"] = shared_group
        settings: dict[str, Any] = {"mqtt": mqtt, "drain_seconds": 10, **router}
        if pg_url:
            settings["journal_url"] = pg_url
        super().__init__(root, _stack(root), settings)

    start_timeout = 60.0

    def received(self) -> int:
        """Messages this daemon took from the broker (its /metrics counter)."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith('router_component_received_events_total{component="mqtt"'):
                return int(float(line.rsplit(" ", 1)[1]))
        return 0

    # --- reading the journal ------------------------------------------------------------

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        if self.pg_url is None:
            return super()._query(sql)
        return _pg_query(self.pg_url, sql)


_PG: dict[str, Any] = {}  # url -> one asyncpg connection, on one event loop


def _pg_query(url: str, sql: str) -> list[tuple[Any, ...]]:
    import asyncpg

    loop = _PG.setdefault("loop", asyncio.new_event_loop())

    async def run() -> list[tuple[Any, ...]]:
        if url not in _PG:
            _PG[url] = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        return [tuple(r) for r in await _PG[url].fetch(sql)]

    return list(loop.run_until_complete(run()))


def _pg_close(url: str) -> None:
    conn = _PG.pop(url, None)
    if conn is not None:
        _PG["loop"].run_until_complete(conn.close())


def _wait_done(daemons: list[MqttDaemon], n: int, timeout: float = 900) -> None:
    """Until `n` events are done (all daemons share one journal, or there is one)."""
    deadline = time.monotonic() + timeout
    # the figures come from finished_at, not from when the poll saw them
    poll = 0.05 if daemons[0].pg_url is None else 0.25
    while daemons[0].count() < n:
        for d in daemons:
            if d.proc is not None and d.proc.poll() is not None:
                raise RuntimeError(f"daemon died: {d.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {daemons[0].count()}/{n} done after {timeout}s: "
                               f"{daemons[0].log.read_text()[-2000:]}")
        time.sleep(poll)


def _router_run(root: Path, messages: list[tuple[str, str, bytes]], *, daemons: int = 1,
                pg_url: str | None = None) -> tuple[float, float, float, list[int]]:
    """(msg/s from first publish to last catalogued, publisher msg/s, max peak RSS MiB,
    messages taken by each daemon)."""
    group = "bench" if daemons > 1 else None
    broker = _broker(root / "broker")
    try:
        started = [MqttDaemon(root / f"d{i}", broker, pg_url=pg_url, shared_group=group)
                   for i in range(daemons)]
        try:
            for d in started:
                d.start()
            t0, acked = _publish_burst(broker.port, messages)
            _wait_done(started, len(messages))
            end = started[0].last_finished()
            split = [d.received() for d in started]
        except BaseException:
            for d in started:
                d.kill()
            raise
        rss = max(d.stop() for d in started)
    finally:
        broker.stop()
    n = len(messages)
    return n / (end - t0), n / (acked - t0), rss, split


# --- the peer: a bare aiomqtt subscriber that only counts ------------------------------------


async def _peer_main(host: str, port: int, topic_filter: str, n: int) -> None:
    import aiomqtt

    async with asyncio.timeout(900), aiomqtt.Client(
        host, port, identifier=f"bench-peer-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe(topic_filter, qos=1)
        print("ready", flush=True)
        count = 0
        first = 0.0
        async for _message in client.messages:
            if count == 0:
                first = time.time()
            count += 1
            if count >= n:
                break
        last = time.time()
    print(json.dumps({"count": count, "first": first, "last": last}), flush=True)


def _peer_run(root: Path, messages: list[tuple[str, str, bytes]]) -> tuple[float, float, float]:
    """(msg/s from first publish to last received, publisher msg/s, peer peak RSS MiB)."""
    broker = _broker(root / "broker")
    try:
        return _peer_on(broker, messages)
    finally:
        broker.stop()


def _peer_on(broker: Any, messages: list[tuple[str, str, bytes]]) -> tuple[float, float, float]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.scenarios_mqtt", "peer", "127.0.0.1", str(broker.port),
         TOPIC_FILTER, str(len(messages))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"peer did not subscribe: {proc.stderr.read().decode()[-2000:]}")
        t0, acked = _publish_burst(broker.port, messages)
        out = proc.stdout.read()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    code, rss = _wait_rusage(proc)
    if code != 0:
        raise RuntimeError(f"peer failed ({code}): {proc.stderr.read().decode()[-2000:]}")
    result = json.loads(out)
    n = len(messages)
    return n / (result["last"] - t0), n / (acked - t0), rss


# --- scenarios ---------------------------------------------------------------------------------


def _latency(root: Path, rate: float, seconds: float) -> dict[str, float]:
    """Offered load at a fixed rate; publish() call to events.finished_at, per message.

    One second at the same rate goes first and is left out of the figures: it warms
    the daemon's statement caches and opens the tracker files, as in steady state.
    """
    warmup = _payloads(int(rate), "warm")
    messages = _payloads(int(rate * seconds), "lat")
    broker = _broker(root / "broker")
    try:
        daemon = MqttDaemon(root / "d0", broker)
        daemon.start()
        try:
            _publish_paced(broker.port, warmup, rate)
            _wait_done([daemon], len(warmup))
            sent = _publish_paced(broker.port, messages, rate)
            _wait_done([daemon], len(warmup) + len(messages))
            finished = daemon.finished_at()
        except BaseException:
            daemon.kill()
            raise
        rss = daemon.stop()
    finally:
        broker.stop()
    latencies = [(finished[event_id] - t) * 1000 for event_id, t in sent.items()]
    return {"offered_per_s": rate, "latency_messages": len(messages),
            "p50_ms": median(latencies), "p99_ms": p99(latencies), "max_ms": max(latencies),
            "latency_rss_mib": rss}


def mqtt_intake(work: Path, quick: bool, reps: int) -> list[ScenarioResult]:
    n = 5000 if quick else 20_000
    runs: dict[str, list[float]] = {"router": [], "peer": []}
    pub: dict[str, list[float]] = {"router": [], "peer": []}
    rss: dict[str, list[float]] = {"router": [], "peer": []}
    for rep in range(reps):
        # alternate who goes first; each run gets a fresh broker (no sessions left over)
        order = ["router", "peer"] if rep % 2 == 0 else ["peer", "router"]
        for who in order:
            messages = _payloads(n, f"{who}{rep}")
            root = work / f"intake-{rep}-{who}"
            if who == "router":
                rate, pub_rate, peak, _ = _router_run(root, messages)
            else:
                rate, pub_rate, peak = _peer_run(root, messages)
            runs[who].append(rate)
            pub[who].append(pub_rate)
            rss[who].append(peak)
            shutil.rmtree(root, ignore_errors=True)
    latency = _latency(work / "intake-latency", 500.0, 5.0 if quick else 20.0)
    shutil.rmtree(work / "intake-latency", ignore_errors=True)
    r, p = median(runs["router"]), median(runs["peer"])
    return [ScenarioResult(
        scenario="mqtt-intake", peer="aiomqtt subscriber (count only)", unit="msg/s",
        router=r, peer_value=p, ratio=r / p, router_peak_rss_mib=max(rss["router"]),
        peer_peak_rss_mib=max(rss["peer"]),
        target="ratio >= 0.5; p99 < 50 ms at 500/s",
        met=r / p >= 0.5 and latency["p99_ms"] < 50, repetitions=reps,
        details={"messages": n, **latency,
                 "publish_per_s_router": median(pub["router"]),
                 "publish_per_s_peer": median(pub["peer"]),
                 "router_runs": runs["router"], "peer_runs": runs["peer"]},
    )]


def scale_out(work: Path, quick: bool, reps: int) -> list[ScenarioResult]:
    from tests.conftest import create_pg_database, drop_pg_database

    n = 5000 if quick else 20_000
    runs: dict[int, list[float]] = {1: [], 2: []}
    rss: dict[int, list[float]] = {1: [], 2: []}
    splits: list[list[int]] = []
    for rep in range(reps):
        for daemons in ([1, 2] if rep % 2 == 0 else [2, 1]):
            url = create_pg_database()
            root = work / f"scale-{rep}-{daemons}"
            try:
                rate, _, peak, split = _router_run(root, _payloads(n, f"s{daemons}-{rep}"),
                                                   daemons=daemons, pg_url=url)
            finally:
                _pg_close(url)
                drop_pg_database(url)
            runs[daemons].append(rate)
            rss[daemons].append(peak)
            if daemons == 2:
                splits.append(split)
            shutil.rmtree(root, ignore_errors=True)
    two, one = median(runs[2]), median(runs[1])
    return [ScenarioResult(
        scenario="scale-out", peer="1 daemon (same PostgreSQL, same broker)", unit="msg/s",
        router=two, peer_value=one, ratio=two / one, router_peak_rss_mib=max(rss[2]),
        peer_peak_rss_mib=max(rss[1]),
        target="speed-up > 1 (none set)", met=two / one > 1.0, repetitions=reps,
        details={"messages": n, "daemons_router": 2, "daemons_peer": 1,
                 "per_daemon_messages": splits, "router_runs": runs[2], "peer_runs": runs[1]},
    )]


SCENARIOS_MQTT: dict[str, Callable[[Path, bool, int], list[ScenarioResult]]] = {
    "mqtt-intake": mqtt_intake,
    "scale-out": scale_out,
}


if __name__ == "__main__" and sys.argv[1:2] == ["peer"]:
    host, port, topic_filter, count = sys.argv[2:6]
    asyncio.run(_peer_main(host, int(port), topic_filter, int(count)))
