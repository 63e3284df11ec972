"""A real MQTT broker for the MQTT source tests (DESIGN section 8).

mosquitto (the Debian package) when it is installed: each broker gets a free port, its
own config file, persistence in a temp directory (so a restart keeps queued messages
and sessions) and raised queue limits; it is stopped by its own process id and can be
restarted on the same port.  Where mosquitto is absent, amqtt from PyPI runs instead
(MQTT 3.1.1 only: tests that need v5 features or persistence across restarts skip);
`BROKER_KIND` says which, and the fixtures put it in every test id.

ROUTER_TEST_MQTT_BROKER=amqtt forces the fallback; AMQTT_PYTHONPATH points the broker
process at an amqtt installed elsewhere (`pip install --target DIR amqtt`).

Also here: a test CA with server and client certificates (the `cryptography` package),
password files (mosquitto_passwd), and paho-based publishers and collectors that run
in threads so synchronous tests can drive them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.servers_common import free_port

__all__ = [
    "BROKER_KIND",
    "Broker",
    "Collector",
    "StreamPublisher",
    "TestCA",
    "make_ca",
    "mqtt_broker",
    "mqtt_broker_factory",
    "publish_all",
]


def _find_mosquitto() -> str | None:
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("mosquitto")


# Where amqtt lives when it is not installed in this environment (a `pip install
# --target` directory): handed to the broker process only, never imported here.
AMQTT_PYTHONPATH = os.environ.get("AMQTT_PYTHONPATH", "")


def _amqtt_available() -> bool:
    if AMQTT_PYTHONPATH:
        return (Path(AMQTT_PYTHONPATH) / "amqtt").is_dir()
    return importlib.util.find_spec("amqtt") is not None


def _broker_kind() -> str:
    forced = os.environ.get("ROUTER_TEST_MQTT_BROKER", "").strip().lower()
    if forced:  # mosquitto | amqtt, to run the fallback on a machine that has both
        return forced
    if MOSQUITTO:
        return "mosquitto"
    return "amqtt" if _amqtt_available() else "none"


MOSQUITTO = _find_mosquitto()
BROKER_KIND = _broker_kind()


# --- TLS material ------------------------------------------------------------------------


@dataclass
class TestCA:
    """A throwaway CA with a server certificate for 127.0.0.1/localhost and a client one."""

    __test__ = False  # not a test class, whatever its name

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_ca(directory: Path, common_name: str = "artifact-router test CA") -> TestCA:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(name: str, usage: Any, san: list[Any] | None) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server_cert, server_key = leaf(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_cert, client_key = leaf("artifact-router", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    out = TestCA(
        ca_file=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
    pem = serialization.Encoding.PEM
    out.ca_file.write_bytes(ca_cert.public_bytes(pem))
    out.server_cert.write_bytes(server_cert.public_bytes(pem))
    out.client_cert.write_bytes(client_cert.public_bytes(pem))
    write_key(server_key, out.server_key)
    write_key(client_key, out.client_key)
    return out


# --- the broker ----------------------------------------------------------------------------


@dataclass
class Broker:
    """One broker process on its own port; restartable on that port."""

    root: Path
    port: int = field(default_factory=free_port)
    users: dict[str, str] = field(default_factory=dict)
    ca: TestCA | None = None
    require_certificate: bool = False
    kind: str = BROKER_KIND
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def supports_v5(self) -> bool:
        return self.kind == "mosquitto"

    @property
    def log_path(self) -> Path:
        return self.root / "broker.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _mosquitto_config(self) -> Path:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "per_listener_settings false",
            f"allow_anonymous {'false' if self.users else 'true'}",
            "persistence true",
            f"persistence_location {data}/",
            "persistence_file broker.db",
            # Sessions of offline durable clients keep this many messages (default 1,000,
            # then mosquitto drops new ones silently).
            "max_queued_messages 1000000",
            "max_queued_bytes 0",
            # Inflight towards MQTT v3.1.1 clients (v5 clients send a receive maximum).
            "max_inflight_messages 1000",
            "set_tcp_nodelay true",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to 'mosquitto' and cannot
            # read our temp files
        if self.users:
            passwd = self.root / "passwd"
            passwd.write_text("")
            for user, password in self.users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(passwd), user, password],
                    check=True, capture_output=True,
                )
            passwd.chmod(0o600)
            lines.append(f"password_file {passwd}")
        if self.ca is not None:
            lines += [
                f"cafile {self.ca.ca_file}",
                f"certfile {self.ca.server_cert}",
                f"keyfile {self.ca.server_key}",
                f"require_certificate {'true' if self.require_certificate else 'false'}",
            ]
        conf = self.root / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _amqtt_config(self) -> Path:
        """amqtt 0.12: MQTT 3.1.1 only, sessions in memory (lost on restart), no $share."""
        import yaml

        if self.users:
            pytest.skip("password files are set up for mosquitto only")
        listener: dict[str, Any] = {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}
        if self.ca is not None:
            listener |= {"ssl": True, "cafile": str(self.ca.ca_file),
                         "certfile": str(self.ca.server_cert), "keyfile": str(self.ca.server_key)}
        config: dict[str, Any] = {
            "listeners": {"default": listener},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        }
        conf = self.root / "amqtt.yaml"
        conf.write_text(yaml.safe_dump(config))
        return conf

    def start(self, timeout: float = 20.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.kind == "mosquitto":
            assert MOSQUITTO is not None
            cmd = [MOSQUITTO, "-c", str(self._mosquitto_config())]
        elif self.kind == "amqtt":
            cmd = [sys.executable, "-m", "amqtt.scripts.broker_script", "-c",
                   str(self._amqtt_config())]
        else:
            pytest.skip("no MQTT broker: install mosquitto (apt) or amqtt (pip)")
        env = dict(os.environ)
        if self.kind == "amqtt" and AMQTT_PYTHONPATH:
            env["PYTHONPATH"] = AMQTT_PYTHONPATH
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.root, env=env)
        finally:
            log.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.5
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} did not listen on {self.port}: {self.log()}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (mosquitto saves its persistence file), then wait; SIGKILL if stuck."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    # --- client settings for this broker -----------------------------------------------

    def mqtt_settings(self, **extra: Any) -> dict[str, Any]:
        """A `router.mqtt` section pointing at this broker."""
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "client_id": f"router-{uuid.uuid4().hex[:10]}",
        }
        if not self.supports_v5:
            settings["protocol"] = "3.1.1"
        if self.ca is not None:
            settings |= {"tls": True, "ca_file": str(self.ca.ca_file)}
            if self.require_certificate:
                settings |= {"cert_file": str(self.ca.client_cert),
                             "key_file": str(self.ca.client_key)}
        if self.users:
            user, password = next(iter(self.users.items()))
            settings |= {"username": user, "password": password}
        return settings | extra

    def client(self, client_id: str | None = None, *, v5: bool | None = None) -> paho.Client:
        """A connected, looping paho client (the caller disconnects it)."""
        use_v5 = self.supports_v5 if v5 is None else v5
        c = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{uuid.uuid4().hex[:10]}",
            protocol=paho.MQTTv5 if use_v5 else paho.MQTTv311,
        )
        if self.users:
            user, password = next(iter(self.users.items()))
            c.username_pw_set(user, password)
        if self.ca is not None:
            context = ssl.create_default_context(cafile=str(self.ca.ca_file))
            if self.require_certificate:
                context.load_cert_chain(str(self.ca.client_cert), str(self.ca.client_key))
            c.tls_set_context(context)
        c.max_inflight_messages_set(200)
        connected = threading.Event()
        c.on_connect = lambda *_args: connected.set()
        c.connect("127.0.0.1", self.port, keepalive=30)
        c.loop_start()
        if not connected.wait(20):
            c.loop_stop()
            raise RuntimeError(f"could not connect to the broker on {self.port}: {self.log()}")
        return c


@pytest.fixture(params=[BROKER_KIND])
def mqtt_broker_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Broker]]:
    """Start brokers (with users, TLS...) on their own ports; all stopped at the end."""
    started: list[Broker] = []

    def start(**options: Any) -> Broker:
        broker = Broker(root=tmp_path_factory.mktemp("broker"), **options)
        broker.start()
        started.append(broker)
        print(f"MQTT broker: {broker.kind} on port {broker.port}")
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def mqtt_broker(mqtt_broker_factory: Callable[..., Broker]) -> Broker:
    """An anonymous broker with persistence, on a free port."""
    return mqtt_broker_factory()


# --- publishing and collecting --------------------------------------------------------------


def publish_all(
    broker: Broker,
    messages: Sequence[tuple[str, bytes]],
    *,
    properties: Callable[[int], Properties | None] | None = None,
    timeout: float = 120.0,
) -> None:
    """Publish at QoS 1 and wait for every PUBACK."""
    client = broker.client()
    try:
        infos = []
        for index, (topic, payload) in enumerate(messages):
            props = properties(index) if properties else None
            infos.append(client.publish(topic, payload, qos=1, properties=props))
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise AssertionError("a message was not acknowledged by the broker")
    finally:
        client.disconnect()
        client.loop_stop()


class StreamPublisher(threading.Thread):
    """Publishes a stream in windows, each acknowledged before the next; survives a broker
    restart by reconnecting and publishing the unacknowledged window again (at least
    once, as a real emitter would)."""

    def __init__(self, broker: Broker, messages: Sequence[tuple[str, bytes]],
                 window: int = 25, pause: float = 0.02, hold_at: int | None = None) -> None:
        super().__init__(daemon=True)
        self.broker = broker
        self.messages = list(messages)
        self.window = window
        self.pause = pause
        self.hold_at = hold_at  # stop there until release() (a deterministic "mid-stream")
        self.held = threading.Event()
        self._release = threading.Event()
        self.acked = 0
        self.reconnects = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 300
        client: paho.Client | None = None
        try:
            while self.acked < len(self.messages) and not self._halt.is_set():
                if time.monotonic() > deadline:
                    raise TimeoutError("stream publisher gave up")
                if self.hold_at is not None and self.acked >= self.hold_at:
                    self.held.set()
                    self._release.wait(300)
                    self.hold_at = None
                try:
                    if client is None:
                        client = self.broker.client()
                    end = self.acked + self.window
                    if self.hold_at is not None:
                        end = min(end, self.hold_at)
                    chunk = self.messages[self.acked:end]
                    infos = [client.publish(t, p, qos=1) for t, p in chunk]
                    for info in infos:
                        info.wait_for_publish(timeout=5)
                        if not info.is_published():
                            raise ConnectionError("no PUBACK")
                    self.acked += len(chunk)
                    time.sleep(self.pause)
                except (OSError, RuntimeError, ValueError, ConnectionError):
                    self.reconnects += 1
                    if client is not None:
                        with contextlib.suppress(Exception):
                            client.loop_stop()
                            client.disconnect()
                    client = None
                    time.sleep(0.2)
        except BaseException as exc:  # reported by join_checked
            self.error = exc
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.disconnect()
                    client.loop_stop()

    def stop(self) -> None:
        self._halt.set()
        self._release.set()

    def wait_held(self, timeout: float = 120.0) -> None:
        if not self.held.wait(timeout):
            raise AssertionError(f"publisher did not reach {self.hold_at} ({self.error!r})")

    def release(self) -> None:
        self._release.set()

    def join_checked(self, timeout: float = 240.0) -> None:
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"publisher still running after {timeout}s ({self.acked} acked)")
        if self.error is not None:
            raise AssertionError(f"publisher failed: {self.error!r}")


@dataclass
class Received:
    topic: str
    payload: bytes
    properties: Any


class Collector:
    """Subscribes (QoS 1) and keeps every message it receives."""

    def __init__(self, broker: Broker, *filters: str) -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self.client = broker.client()
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_args: subscribed.set()
        self.client.subscribe([(f, 1) for f in filters])
        if not subscribed.wait(10):
            raise RuntimeError("subscription not acknowledged")

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(message.topic, bytes(message.payload),
                                          getattr(message, "properties", None)))

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.1)
        raise AssertionError(f"got {len(self.messages)} messages, expected {count}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def v5_properties(**values: Any) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    for key, value in values.items():
        setattr(props, key, value)
    return props
