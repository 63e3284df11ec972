"""MqttSource: manifests published to an MQTT broker (DESIGN sections 3, 6 and 7).

A message's payload is a manifest v1 JSON document whose file entries carry `uri`
(`file://` under `router.mqtt.allowed_roots`, `s3://`, `gs://`) or `content_base64`
(at most `router.mqtt.inline_max_bytes` decoded bytes) instead of `path`.

At-least-once without loss: the client runs with paho's manual acknowledgement, and a
message's PUBACK goes out only after its event (or its rejection) is committed to the
journal.  A crash between receipt and commit leaves the message unacknowledged in the
broker's persistent session (clean_start false, a session expiry, a stable client id),
so the broker delivers it again; the event id (the manifest's `id`, else a hash of
topic and payload) makes the redelivery a journal "duplicate", which is acknowledged
and otherwise ignored.

Messages are read in batches (whatever the client has queued, up to
`router.intake_batch`), journaled in one commit, then acknowledged in receipt order.
A message whose `file://` files are over 64 MiB is held instead: committed to the
journal as a held message (db.held_messages) and acknowledged with its batch, then
hashed and journaled as an event by a task of its own, so that the seconds a checkpoint
takes to hash never hold up the messages behind it.  Later messages of its run, or
naming its run in `inputs`, are held behind it, for lineage to find it.  Held messages
not yet journaled when the router stops are journaled at its next start, or by the pool
member that takes its session over.
The broker connection is re-established with exponential backoff and jitter; a broker
that refuses the very first connection for a reason retrying cannot fix (bad
credentials, not authorised, an untrusted certificate) stops the source with an error
that says so, and the daemon exits non-zero.

In a pool (`router.mqtt.shared_group`) mosquitto keeps a dead member's unacknowledged
messages, and its share of new ones, in that member's session; router/sources/mqtt_pool.py
has a live member drain it through this same intake path (`MqttSource.drain_session`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import ssl
import stat
import string
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
import sqlalchemy as sa
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from router.catalog_read import query_artifacts
from router.config import MqttSettings
from router.db import deliveries
from router.delivery import StagedFile
from router.detect import detect_dataset_format, detect_framework, detect_framework_bytes
from router.errors import Problem
from router.intake import (
    AcceptedEvent,
    CheckedFile,
    FileChanged,
    FileHash,
    HashAbandoned,
    Rejection,
    sha256_files,
)
from router.journal import DeliveryJournal, FinishedEvent, Handoff, Planner
from router.manifest import (
    DatasetArtifact,
    Manifest,
    ManifestError,
    ModelArtifact,
    parse_manifest,
)
from router.metrics import RouterMetrics
from router.sources import inline_roots, paho_reads
from router.sources.mqtt_pool import (
    POOL_PREFIX,
    Drained,
    Pool,
    status_payload,
    status_topic,
)
from router.sources.paho_tables import install as _share_paho_tables

if TYPE_CHECKING:
    from router.daemon import Daemon

__all__ = [
    "MqttPublishError",
    "MqttSource",
    "MqttStartupError",
    "build_publication",
    "derive_event_id",
    "publish_manifest",
    "subscription_filters",
]

log = structlog.get_logger("router.mqtt")
_share_paho_tables()

# Marks the messages the router publishes itself (receipts, dead letters), so a
# subscription that happens to match their topics does not read them as manifests.
MARKER = "artifact-router"
_RECEIPT_QUEUE_MAX = 100_000
_PRUNE_EVERY = 600.0  # seconds between scans of retired inline files
_STOP_GRACE = 15.0
_STABLE_SESSION = 10.0
_INFLIGHT_BYTES = 256 * 1024 * 1024
_PARSE_IN_THREAD = 64 * 1024
# A takeover ends the dead member's session once nothing came for this long (its
# shared subscriptions are gone by then, so only what the broker had queued can come).
_DRAIN_IDLE = 2.0
_HELD_STOP_GRACE = 5.0  # seconds a stopping source waits for held messages being journaled

# CONNACK refusals that no amount of retrying fixes: a configuration error.
_FATAL_CONNACK = {
    "Bad user name or password",
    "Not authorized",
    "Client identifier not valid",
    "Unsupported protocol version",
    "Bad authentication method",
    "Banned",
}


class MqttStartupError(RuntimeError):
    """The broker refused the first connection for a reason retrying cannot fix."""


class MqttPublishError(aiomqtt.MqttError):
    """The broker did not take a published manifest (refused, or no subscriber)."""


def derive_event_id(topic: str, payload: bytes) -> str:
    """A stable event id for a message whose manifest has no `id` of its own.

    The same message redelivered (or published again byte for byte on the same topic)
    maps to the same id, so the journal treats it as a duplicate.
    """
    digest = hashlib.sha256(topic.encode("utf-8", "surrogateescape") + b"\0" + payload)
    return f"mqtt-{digest.hexdigest()[:40]}"


def subscription_filters(settings: MqttSettings) -> list[str]:
    """The topic filters to subscribe to: `$share/<group>/<filter>` in a pool."""
    if not settings.shared_group:
        return list(settings.topics)
    return [
        t if t.startswith("$share/") else f"$share/{settings.shared_group}/{t}"
        for t in settings.topics
    ]


# --- connection ---------------------------------------------------------------------


def _use_tls(settings: MqttSettings) -> bool:
    return settings.tls or bool(settings.ca_file or settings.cert_file)


def _tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    if not _use_tls(settings):
        return None
    try:
        context = ssl.create_default_context(cafile=settings.ca_file or None)
        if settings.cert_file:
            context.load_cert_chain(settings.cert_file, settings.key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise MqttStartupError(
            f"MQTT TLS settings are unusable: {exc}; check router.mqtt.ca_file, cert_file "
            "and key_file"
        ) from None
    if settings.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _BoundedClient(aiomqtt.Client):
    """aiomqtt's client that stops reading the socket while too much is queued.

    The Receive Maximum we send should keep the broker from sending more than that
    many unacknowledged messages, but mosquitto 2.0.11 (Debian 12's) exceeds it once
    PUBACKs flow: 2,700 unacknowledged with 256 asked, 17,600 in a 20,000-message
    burst (bench/RESULTS.md), each held in memory with its payload.  So the socket's
    reader is removed when `queue_limit` messages wait, and put back once the consumer
    has taken them (`drained`).  Never while a publish, subscribe or unsubscribe of
    ours waits for the broker's answer (it may sit behind the unread messages), and a
    publish started while paused resumes reading first.  A pause lasts as long as one
    batch takes to journal; one longer than the keepalive ends in a reconnect, which
    loses nothing (unacknowledged messages are delivered again).
    """

    def __init__(self, *args: Any, queue_limit: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue_limit = max(1, queue_limit)
        self._reader: Callable[[], None] | None = None
        self._reader_fd = -1
        self._paused = False
        self.session_present = False

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, *args: Any) -> None:
        # aiomqtt drops the CONNACK flags; a takeover wants to know whether a session was there.
        self.session_present = bool(getattr(flags, "session_present", False))
        super()._on_connect(client, userdata, flags, *args)

    # Same as aiomqtt's, but keeps the reader so that it can be removed and put back,
    # and decodes every packet already read (paho_reads) in one call, until paused.
    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        buffered = paho_reads.install(client)

        def reader() -> None:
            try:
                while not self._paused and client._sock is not None:
                    consumed = buffered.consumed
                    client.loop_read()
                    if buffered.consumed == consumed:
                        break  # nothing read: the socket is drained (or closed)
                    if buffered.pending() > 0:
                        continue  # packets read with this one, which no poll would report
                    pending = getattr(client._sock, "pending", None)
                    if pending is not None and pending() > 0:
                        continue  # bytes a TLS layer decoded but paho has not read yet
                    break
            except Exception as exc:
                self._lost(exc)

        def opened(fd: int) -> None:
            self._reader, self._reader_fd, self._paused = reader, fd, False
            self._loop.add_reader(fd, reader)
            self._misc_task = self._loop.create_task(self._misc_loop())

        # paho calls this from the executor thread that runs connect()
        self._loop.call_soon_threadsafe(opened, sock.fileno())

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._reader_fd, self._paused = -1, False
        super()._on_socket_close(client, userdata, sock)

    # Same as aiomqtt's, but a writer that cannot be registered ends the connection.
    # uvloop refuses add_writer on a socket whose poll handle it already closed (the
    # broker went away while paho queued a PUBACK or a ping); aiomqtt only logged that,
    # and the client then believed itself connected to a dead socket indefinitely.
    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()

        def writer() -> None:
            try:
                client.loop_write()
            except Exception as exc:
                self._lost(exc)

        def register() -> None:
            try:
                self._loop.add_writer(fd, writer)
            except (RuntimeError, ValueError, OSError) as exc:
                self._lost(exc)

        # paho may call this from the executor thread that runs connect()
        self._loop.call_soon_threadsafe(register)

    def _lost(self, exc: BaseException) -> None:
        if not self._disconnected.done():
            self._disconnected.set_exception(exc)

    def _on_message(self, client: paho.Client, userdata: Any, message: Any) -> None:
        super()._on_message(client, userdata, message)
        if (
            not self._paused
            and self._reader_fd >= 0
            and self._queue.qsize() >= self._queue_limit
            and next(self._pending_calls, None) is None
        ):
            self._loop.remove_reader(self._reader_fd)
            self._paused = True

    def _resume(self) -> None:
        if self._paused and self._reader is not None and self._reader_fd >= 0:
            self._paused = False
            try:
                self._loop.add_reader(self._reader_fd, self._reader)
            except (RuntimeError, ValueError, OSError) as exc:  # see register() above
                self._lost(exc)
                return
            self._loop.call_soon(self._reader)  # what a TLS layer may already hold

    def drained(self) -> None:
        """The consumer took messages: read again once at most half the bound waits."""
        if self._paused and self._queue.qsize() <= self._queue_limit // 2:
            self._resume()

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        self._resume()  # its PUBACK may be behind the messages we have not read
        await super().publish(*args, **kwargs)

    async def subscribe(self, *args: Any, **kwargs: Any) -> Any:
        self._resume()
        return await super().subscribe(*args, **kwargs)

    async def unsubscribe(self, *args: Any, **kwargs: Any) -> None:
        self._resume()
        await super().unsubscribe(*args, **kwargs)


def _make_client(
    settings: MqttSettings,
    *,
    client_id: str,
    persistent: bool,
    receive_maximum: int = 0,
    will: aiomqtt.Will | None = None,
) -> aiomqtt.Client:
    v5 = settings.protocol == "5"
    kwargs: dict[str, Any] = {}
    if v5:
        props = Properties(PacketTypes.CONNECT)
        if persistent and settings.session_expiry > 0:
            props.SessionExpiryInterval = settings.session_expiry
        if receive_maximum > 0:
            # Without it mosquitto keeps only 20 unacknowledged messages in flight to
            # us, which caps a batch at 20.
            props.ReceiveMaximum = min(receive_maximum, 65535)
        kwargs["properties"] = props
        kwargs["clean_start"] = not persistent
    else:
        kwargs["clean_session"] = not persistent
    if receive_maximum > 0:  # a consumer: bound what waits in memory
        kwargs["queue_limit"] = receive_maximum
    client = (_BoundedClient if receive_maximum > 0 else aiomqtt.Client)(
        settings.host,
        settings.port,
        username=settings.username,
        password=settings.password,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        keepalive=settings.keepalive,
        tls_context=_tls_context(settings),
        timeout=30,
        will=will,
        **kwargs,
    )
    # aiomqtt 2.x has no manual-ack option of its own: switch paho's on, so a QoS 1
    # message is acknowledged only when we call ack() for it.
    client._client.manual_ack_set(True)
    return client


def _queued(client: aiomqtt.Client, limit: int) -> list[aiomqtt.Message]:
    """Up to `limit` messages the client has already queued, taken at once: aiomqtt's
    iterator starts a task and an asyncio.wait for each one (3 % of the daemon's CPU
    under a burst)."""
    queue = client._queue  # private, but what aiomqtt's own iterator reads
    taken: list[aiomqtt.Message] = []
    while len(taken) < limit:
        try:
            taken.append(queue.get_nowait())
        except asyncio.QueueEmpty:
            break
    return taken


def _ack(client: aiomqtt.Client, message: aiomqtt.Message) -> bool:
    if message.qos == 0:
        return True
    rc = client._client.ack(message.mid, message.qos)
    return bool(rc == paho.MQTT_ERR_SUCCESS)


async def _end_session(client: aiomqtt.Client) -> bool:
    """Disconnect and have the broker delete the session: MQTT v5 DISCONNECT with Session
    Expiry Interval 0 (allowed because our CONNECT gave a non-zero one).  aiomqtt's own
    exit sends a DISCONNECT without properties, so this one goes out through paho."""
    props = Properties(PacketTypes.DISCONNECT)
    props.SessionExpiryInterval = 0
    if client._client.disconnect(properties=props) != paho.MQTT_ERR_SUCCESS:
        return False
    try:
        await asyncio.wait_for(asyncio.shield(client._disconnected), timeout=10)
    except (aiomqtt.MqttError, TimeoutError):
        return False
    return True


def _describe_connect_error(exc: BaseException, settings: MqttSettings) -> tuple[str, bool]:
    """(what went wrong in words, whether retrying could help)."""
    where = f"{settings.host}:{settings.port}"
    if isinstance(exc, MqttConnectError):
        rc = exc.rc
        name = rc.getName() if isinstance(rc, ReasonCode) else str(exc)
        if name in _FATAL_CONNACK:
            hint = (
                "check router.mqtt.username and router.mqtt.password"
                if name in ("Bad user name or password", "Not authorized",
                            "Bad authentication method")
                else "check router.mqtt.client_id and router.mqtt.protocol"
            )
            wording = "not authorised" if name != "Bad user name or password" else (
                "not authorised: bad user name or password"
            )
            return (
                f"MQTT broker {where} refused the connection ({name}): {wording}; {hint}",
                False,
            )
        return f"MQTT broker {where} refused the connection ({name})", True
    if _taken_over(exc):
        return (
            f"MQTT broker {where} handed our session to another client with the same "
            f"client id {settings.client_id!r}; give every daemon its own "
            "router.mqtt.client_id (they share work through router.mqtt.shared_group)",
            True,
        )
    context = exc.__context__ or exc.__cause__
    if isinstance(context, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(
        exc
    ):
        return (
            f"MQTT broker {where}: TLS certificate verification failed ({context or exc}); "
            "check router.mqtt.ca_file (tls_insecure: true skips the check, for tests only)",
            False,
        )
    if isinstance(context, ssl.SSLError):
        return f"MQTT broker {where}: TLS error ({context})", True
    return f"MQTT broker {where}: {exc or type(exc).__name__}", True


def _taken_over(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        rc = getattr(cause, "rc", None)
        if isinstance(rc, ReasonCode) and rc.getName() == "Session taken over":
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _transient(exc: BaseException) -> bool:
    """Worth retrying for ever: the journal's database or the state disk is unavailable."""
    return isinstance(exc, OSError | sa.exc.SQLAlchemyError | TimeoutError | ConnectionError)


def _payload_bytes(message: aiomqtt.Message) -> bytes:
    payload = message.payload
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return str(payload).encode() if payload is not None else b""


def _backoff(attempt: int, base: float = 0.2, cap: float = 30.0) -> float:
    """Exponential backoff with jitter: between half and all of base * 2**attempt."""
    ceiling: float = min(cap, base * 2 ** min(attempt, 20))
    return ceiling * random.uniform(0.5, 1.0)


def _unusable_reply_topic(topic: str) -> str | None:
    """Why a publisher's ResponseTopic must not get our receipt, or None.

    Wildcards make paho's publish raise; `$` topics are the broker's; the pool's status
    topics are read by the members, and a receipt there would unsettle a takeover.
    """
    if "+" in topic or "#" in topic or "\x00" in topic:
        return "contains a wildcard (+ or #) or a NUL character"
    if topic.startswith("$"):
        return "starts with $ (reserved for the broker)"
    if topic == POOL_PREFIX or topic.startswith(POOL_PREFIX + "/"):
        return f"is under {POOL_PREFIX}/, the pool's status topics"
    return None


def _template_pattern(template: str) -> re.Pattern[str]:
    """`artifacts/receipts/{event_id}` -> a regex matching the topics it renders to."""
    parts = []
    for literal, field_name, _spec, _conv in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field_name is not None:
            if field_name != "event_id":
                raise ValueError(
                    f"router.mqtt.receipt_topic {template!r}: unknown placeholder "
                    f"{{{field_name}}}; only {{event_id}} is available"
                )
            parts.append(r"[^/]+")
    return re.compile("^" + "".join(parts) + "$")


# --- payload ------------------------------------------------------------------------


# Starts every hashed name; a value starting with it is hashed too, so no id or name
# kept as it is can equal another one's hashed name.
_HASHED = "~sha256-"


def _segment(value: str) -> str:
    """A safe, short directory or file name for a (validated) manifest id or name."""
    if (
        len(value.encode("utf-8")) <= 200
        and value not in (".", "..")
        and not value.startswith(_HASHED)
    ):
        return value
    ext = os.path.splitext(value)[1][:20]
    return _HASHED + hashlib.sha256(value.encode("utf-8")).hexdigest()[:32] + ext


def _lstat_under(root: Path, resolved: Path) -> os.stat_result:
    """lstat of `resolved` (a path under `root`, symlinks already resolved), reached
    from `root` one directory at a time without following symlinks: a directory swapped
    for a symlink since resolve() raises ELOOP or ENOTDIR instead of leading outside."""
    names = resolved.relative_to(root).parts
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    fd = os.open(root, flags)
    try:
        if not names:
            return os.fstat(fd)  # the root itself: a directory, refused by the caller
        for name in names[:-1]:
            child = os.open(name, flags | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        return os.stat(names[-1], dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


def _changed(where: str, uri: str) -> Problem:
    return Problem(field=where, value=uri, message="changed while the router read it (a "
                   "directory or the file replaced, say by a symlink, after it was checked); "
                   "write the file completely before publishing and leave it in place")


def _inline_size(content: str) -> int:
    stripped = content.rstrip("=")
    return len(stripped) * 3 // 4


def _write_durably(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}"[:250])
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _declared_sha256(metadata: dict[str, Any], name: str, files: int) -> str | None:
    """An object store file's checksum, when the artifact's metadata gives one.

    `metadata.sha256` is either the hex digest (artifacts with one file) or a mapping
    from file name to hex digest.
    """
    value = metadata.get("sha256")
    if isinstance(value, str) and files == 1:
        return value
    if isinstance(value, dict) and isinstance(value.get(name), str):
        return str(value[name])
    return None


_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def _needs_io(event: AcceptedEvent) -> bool:
    """Whether staging the event writes inline content or reads local files."""
    return any(
        entry.content_base64 is not None
        or (entry.uri is not None and entry.uri.startswith("file://"))
        for artifact in event.manifest.artifacts
        for entry in artifact.files
    )


def _held_message(message: aiomqtt.Message) -> dict[str, Any]:
    """What intake reads of a message, as JSON: its topic, payload and reply properties."""
    held: dict[str, Any] = {"topic": message.topic.value,
                            "payload": base64.b64encode(_payload_bytes(message)).decode()}
    props = message.properties
    response = getattr(props, "ResponseTopic", None) if props is not None else None
    correlation = getattr(props, "CorrelationData", None) if props is not None else None
    if response:
        held["response_topic"] = str(response)
    if correlation:
        held["correlation_data"] = base64.b64encode(bytes(correlation)).decode()
    return held


def _message_from(held: dict[str, Any]) -> aiomqtt.Message:
    props: Properties | None = None
    if "response_topic" in held or "correlation_data" in held:
        props = Properties(PacketTypes.PUBLISH)
        if "response_topic" in held:
            props.ResponseTopic = held["response_topic"]
        if "correlation_data" in held:
            props.CorrelationData = base64.b64decode(held["correlation_data"])
    return aiomqtt.Message(held["topic"], base64.b64decode(held["payload"]), 1, False, 0, props)


@dataclass
class _Item:
    """One received message on its way to the journal."""

    message: aiomqtt.Message
    topic: str
    event_id: str | None = None
    event: AcceptedEvent | None = None
    rejection: Rejection | None = None
    ignored: bool = False
    outcome: str | None = None
    local_bytes: int = 0  # of its file:// files: over hash_apart_bytes, it is held apart
    held: bool = False
    problems: list[Problem] = field(default_factory=list)


class MqttSource:
    source_name = "mqtt"  # events it journals carry this source; receipts follow them

    def __init__(
        self,
        settings: MqttSettings,
        journal: DeliveryJournal,
        planner: Planner,
        *,
        preflight: Callable[[AcceptedEvent], Problem | None],
        metrics: RouterMetrics,
        handoff: Handoff | None = None,
        state_dir: Path,
        batch_size: int = 256,
        retention_days: float = 7.0,
        hash_apart_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.settings = settings
        self.journal = journal
        self.planner = planner
        self.preflight = preflight
        self.handoff = handoff  # deliveries claimed at intake go straight to the dispatcher
        self.metrics = metrics
        self.batch_size = batch_size
        # Inline files of delivered events move to retired_root, and are kept
        # `retention_days` there like the spool's done/.
        self.inline_root, self.retired_root = inline_roots(state_dir)
        self.retention_days = retention_days
        # -inf, not 0.0: monotonic time counts from boot, so 0.0 would postpone the
        # first prune until the machine has been up _PRUNE_EVERY seconds.
        self._last_prune = -math.inf
        self.allowed_roots = [Path(r).expanduser().resolve() for r in settings.allowed_roots]
        self.filters = subscription_filters(settings)
        self.qos = settings.qos
        if self.qos == 2:
            # paho answers PUBREC before the application sees a QoS 2 message, so the
            # broker would not redeliver it after a crash: QoS 1 is the safe level.
            log.warning("router.mqtt.qos 2 is read as 1: manual acknowledgement needs QoS 1")
            self.qos = 1
        elif self.qos == 0:
            log.warning("router.mqtt.qos 0: messages are never acknowledged and may be lost")
        self._receipt_pattern = _template_pattern(settings.receipt_topic)
        self.healthy = False
        self._stop = asyncio.Event()
        self._abandon = threading.Event()  # set with _stop: hashes under way give up
        self._receipts: deque[FinishedEvent] = deque()
        self._receipt_kick = asyncio.Event()
        self._ever_connected = False
        self._attempt = 0
        self._connected_at = 0.0
        # Unacknowledged messages the broker may send us at once: two batches, within a
        # memory budget for inline content.
        self.receive_maximum = max(
            16, min(2 * batch_size, 65535, _INFLIGHT_BYTES // max(settings.inline_max_bytes, 1))
        )
        self.batch_size = min(batch_size, self.receive_maximum)
        if settings.session_expiry <= 0 and settings.protocol == "5":
            log.warning("router.mqtt.session_expiry is 0: the broker forgets the session when "
                        "the router disconnects, and what is published meanwhile is lost")
        if settings.shared_group and settings.takeover_after and settings.protocol != "5":
            log.warning("router.mqtt.takeover_after needs protocol 5: a dead pool member's "
                        "messages wait in its session until it returns")
        self._client: aiomqtt.Client | None = None
        self._hashers = asyncio.Semaphore(4)
        # Messages whose file:// files are over hash_apart_bytes are held in the journal
        # and acknowledged, then hashed and journaled by tasks of their own, so the
        # seconds a checkpoint takes to hash never hold up the messages behind it.
        self.hash_apart_bytes = hash_apart_bytes
        self._owner = self  # a pool twin's held messages are the owner's to journal
        self._held_tasks: set[asyncio.Task[bool]] = set()
        self._held_tails: dict[tuple[str, str], asyncio.Task[bool]] = {}
        self._resumed = False
        self._online = asyncio.Event()  # set while a session is up (dead letters need it)
        self.stats = {"received": 0, "accepted": 0, "duplicate": 0, "rejected": 0, "ignored": 0}
        self._last_report = -math.inf
        self._reported: dict[str, int] = {}

    @classmethod
    def from_daemon(cls, daemon: Daemon) -> MqttSource:
        settings = daemon.config.router.mqtt
        if settings is None:
            raise ValueError("router.mqtt is not configured")
        return cls(
            settings,
            daemon.journal,
            daemon.plan,
            preflight=daemon.preflight,
            metrics=daemon.metrics,
            handoff=daemon.dispatcher,
            state_dir=daemon.config.router.state_dir,
            batch_size=daemon.config.router.intake_batch,
            retention_days=daemon.config.router.retention_days,
        )

    # --- lifecycle ----------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        self._abandon.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def wait_stopping(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True as soon as the source is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        return self._stop.is_set()

    async def run(self) -> None:
        """Connect, consume, reconnect with backoff; return only after stop()."""
        pool = (
            asyncio.create_task(Pool(self).run(), name="mqtt-pool")
            if self.settings.takeover_enabled() else None
        )
        try:
            while not self._stop.is_set():
                connection = asyncio.create_task(self._connection(), name="mqtt-connection")
                stopper = asyncio.create_task(self._stop.wait())
                try:
                    await asyncio.wait({connection, stopper}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopper.cancel()
                if not connection.done():
                    # Stopping: the consumer finishes the batch in hand and disconnects
                    # cleanly; a connect or a journal commit that hangs is cut short
                    # (nothing unjournaled was acknowledged, so nothing is lost).
                    await asyncio.wait({connection}, timeout=_STOP_GRACE)
                    if not connection.done():
                        connection.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await connection
                        return
                try:
                    connection.result()
                except MqttStartupError:
                    raise
                except aiomqtt.MqttError as exc:
                    await self._connection_failed(exc)
                except Exception as exc:
                    # Not the broker's doing: log it whole, and keep the source alive (a
                    # dead source would stop the daemon); nothing unjournaled was acked.
                    log.exception("mqtt session failed; reconnecting")
                    await self._connection_failed(exc)
        finally:
            self.healthy = False
            await self._stop_held()
            if pool is not None:
                self._stop.set()  # also when run() fails: the pool must not outlive it
                await asyncio.wait({pool}, timeout=_STOP_GRACE + 5)
                pool.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pool
            log.info("mqtt source stopped", **self.stats)

    async def _connection(self) -> None:
        client = _make_client(
            self.settings,
            client_id=self.settings.client_id,
            persistent=True,
            receive_maximum=self.receive_maximum,
            will=self._offline_will(),
        )
        async with client:
            await self._session(client)

    async def _connection_failed(self, exc: Exception) -> None:
        self.healthy = False
        message, retryable = _describe_connect_error(exc, self.settings)
        if not retryable and not self._ever_connected:
            log.error(message)
            raise MqttStartupError(message) from None
        self.metrics.errors.labels(
            component="mqtt", error_type="connection", stage="receive"
        ).inc()
        if self._connected_at and time.monotonic() - self._connected_at > _STABLE_SESSION:
            self._attempt = 0  # a session that lasted: start the backoff over
        self._connected_at = 0.0
        delay = _backoff(self._attempt)
        self._attempt += 1
        log_method = log.error if _taken_over(exc) else log.warning
        log_method(
            "mqtt connection lost; reconnecting" if self._ever_connected
            else "mqtt broker not reachable; retrying",
            error=message,
            retry_in=round(delay, 2),
            attempt=self._attempt,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=delay)

    async def _session(self, client: aiomqtt.Client) -> None:
        for topic_filter in self.filters:
            granted = await client.subscribe(topic_filter, qos=self.qos)
            for code in granted:
                value = code.value if isinstance(code, ReasonCode) else int(code)
                if value >= 0x80:
                    reason = code.getName() if isinstance(code, ReasonCode) else str(code)
                    message = (
                        f"MQTT broker {self.settings.host}:{self.settings.port} refused the "
                        f"subscription to {topic_filter!r} ({reason}); check the broker's "
                        "ACL for this user and router.mqtt.topics"
                    )
                    if not self._ever_connected:
                        log.error(message)
                        raise MqttStartupError(message)
                    raise aiomqtt.MqttError(message)
        self._ever_connected = True
        self._connected_at = time.monotonic()
        self.healthy = True
        log.info(
            "mqtt connected",
            broker=f"{self.settings.host}:{self.settings.port}",
            client_id=self.settings.client_id,
            topics=self.filters,
            protocol=self.settings.protocol,
            tls=_use_tls(self.settings),
        )
        self._client = client
        self._online.set()
        if not self._resumed:
            # Before any new message: one of a held run's must be journaled after it.
            await self._resume_held()
        if self.settings.takeover_enabled():
            await self._announce(client, "online")
        receipts = asyncio.create_task(self._receipt_loop(client), name="mqtt-receipts")
        try:
            await self._consume(client)
            if self._stop.is_set() and self.settings.takeover_enabled():
                # Stopped, our session still collects our share: say so, and the pool
                # drains it unless we are back within takeover_after.
                with contextlib.suppress(aiomqtt.MqttError):
                    await self._announce(client, "offline", reason="stopped")
        finally:
            self.healthy = False
            self._client = None
            self._online.clear()
            receipts.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receipts

    async def _next(
        self, messages: aiomqtt.client.MessagesIterator, idle: float | None = None
    ) -> aiomqtt.Message | None:
        """The next message; None when stopping or after `idle` seconds without one."""
        getter = asyncio.ensure_future(messages.__anext__())
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait(
                {getter, stopper}, timeout=idle, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopper.cancel()
        if getter.done():
            return getter.result()  # raises MqttError when the connection broke
        getter.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await getter
        return None

    async def _consume(self, client: aiomqtt.Client, idle: float | None = None) -> None:
        """Journal and acknowledge batches until stop(), or until `idle` seconds pass
        without a message (a takeover draining a session)."""
        messages = client.messages
        while not self._stop.is_set():
            first = await self._next(messages, idle)
            if first is None:
                return
            batch = [first, *_queued(client, self.batch_size - 1)]
            if isinstance(client, _BoundedClient):
                client.drained()
            await self._handle(client, batch)
            if idle is None:
                self._report()

    async def _handle(self, client: aiomqtt.Client, batch: list[aiomqtt.Message]) -> None:
        """Journal a batch, then acknowledge it in receipt order."""
        items = await self._journal(client, batch)
        if items is None:
            return  # stopping: unacknowledged, the broker keeps them for the next start
        ignored = sum(1 for i in items if i.ignored)
        self.stats["received"] += len(items)
        self.stats["ignored"] += ignored
        self.metrics.received.labels(component="mqtt").inc(len(items) - ignored)
        unacked = 0
        for item in items:
            if not _ack(client, item.message):
                unacked += 1
        if unacked:
            log.warning("mqtt acknowledgements not sent (connection lost); the broker will "
                        "redeliver and the journal will skip them", count=unacked)

    async def _journal(
        self, client: aiomqtt.Client, batch: list[aiomqtt.Message], *,
        received_at: float | None = None, apart: bool = True,
    ) -> list[_Item] | None:
        """Process until committed; None when asked to stop first.

        While the journal (or the state directory) is unavailable the batch is retried
        with backoff and nothing is acknowledged.  A batch that keeps failing while the
        journal answers is split, and a single message that still fails is set aside as
        rejected with the error, so one poisonous message never stops the consumer.
        """
        failures = 0
        while True:
            try:
                return await self._process(client, batch, received_at, apart)
            except aiomqtt.MqttError:
                raise
            except HashAbandoned as exc:
                log.info("stopping: a file:// hash was given up; the batch stays "
                         + ("unacknowledged" if apart else "held in the journal")
                         + " for the next start", count=len(batch), detail=str(exc))
                return None
            except Exception as exc:
                failures += 1
                self.metrics.errors.labels(
                    component="mqtt", error_type=type(exc).__name__, stage="intake"
                ).inc()
                log.exception("mqtt intake failed; messages stay unacknowledged",
                              count=len(batch), attempt=failures)
                if failures >= 3 and not _transient(exc) and await self._journal_answers():
                    if len(batch) > 1:
                        out: list[_Item] = []
                        for message in batch:
                            one = await self._journal(
                                client, [message], received_at=received_at, apart=apart)
                            if one is None:
                                return None
                            out += one
                        return out
                    try:
                        return await self._set_aside(client, batch[0], exc)
                    except aiomqtt.MqttError:
                        raise
                    except Exception:
                        log.exception("could not set the failing message aside")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._stop.wait(), timeout=_backoff(failures - 1, 0.5, 30.0)
                    )
                if self._stop.is_set():
                    return None

    async def _journal_answers(self) -> bool:
        try:
            await self.journal.known_events(["-mqtt-probe-"])
        except Exception:
            return False
        return True

    async def _set_aside(
        self, client: aiomqtt.Client, message: aiomqtt.Message, exc: BaseException
    ) -> list[_Item]:
        topic = message.topic.value
        raw = _payload_bytes(message)
        item = _Item(message=message, topic=topic, event_id=derive_event_id(topic, raw))
        item.rejection = Rejection(
            source="mqtt",
            event_id=item.event_id,
            problems=[Problem(
                field="(message)",
                message=f"the router failed on this message ({exc!r}) and set it aside so "
                "the stream goes on; please report it as a bug",
            )],
        )
        await self._reject(item)
        if self.settings.dead_letter_topic:
            await self._dead_letter(client, item)
        return [item]

    # --- intake -------------------------------------------------------------------

    def _is_own(self, message: aiomqtt.Message, topic: str) -> bool:
        """A message the router published itself (receipt, dead letter, pool status).

        MQTT v5 messages of ours carry the MARKER user property: a topic that merely looks
        like ours (a pipeline named "receipts") is read as a manifest.  Under 3.1.1 the
        topic is the only clue: see `_reserved_topic`.
        """
        if topic.startswith(POOL_PREFIX + "/"):
            return True
        props = message.properties
        users = getattr(props, "UserProperty", None) if props is not None else None
        return any(k == MARKER for k, _ in users or ())

    def _reserved_topic(self, topic: str) -> str | None:
        """Under MQTT 3.1.1, which of our own publishing settings `topic` matches."""
        if self.settings.protocol == "5":
            return None
        if topic == self.settings.dead_letter_topic:
            return "router.mqtt.dead_letter_topic"
        if self.settings.receipts and self._receipt_pattern.match(topic):
            return "router.mqtt.receipt_topic"
        return None

    def _reply_to(self, message: aiomqtt.Message, event_id: str) -> dict[str, str] | None:
        if not self.settings.receipts:
            return None
        props = message.properties
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        reply: dict[str, str] = {}
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        if correlation:
            reply["correlation_data"] = base64.b64encode(bytes(correlation)).decode()
        if response:
            refused = _unusable_reply_topic(str(response))
            if refused is None:
                return reply | {"topic": str(response)}
            log.warning("mqtt response topic refused; the receipt goes to receipt_topic",
                        topic=str(response), event_id=event_id, reason=refused)
        # An id may hold + or # (a valid name), which no published topic may.
        safe_id = _topic_segment(event_id)
        return reply | {"topic": self.settings.receipt_topic.format(event_id=safe_id)}

    def _parse(self, message: aiomqtt.Message, received_at: float) -> _Item:
        topic = message.topic.value
        item = _Item(message=message, topic=topic)
        if self._is_own(message, topic):
            item.ignored = True
            return item
        raw = _payload_bytes(message)
        reserved = self._reserved_topic(topic)
        try:
            if not raw.strip():
                raise ManifestError(
                    [Problem(field="(manifest)", message="empty payload; publish a manifest "
                             "v1 JSON document")]
                )
            manifest = parse_manifest(raw)
        except ManifestError as exc:
            if reserved is not None:
                item.ignored = True  # our own receipt or dead letter (never a manifest)
                return item
            item.event_id = derive_event_id(topic, raw)
            item.rejection = Rejection(source="mqtt", event_id=item.event_id,
                                       problems=exc.problems)
            return item
        event_id = manifest.id or derive_event_id(topic, raw)
        item.event_id = event_id
        if reserved is not None:
            # A real manifest where we publish: acknowledged, so it must not vanish.
            item.rejection = Rejection(source="mqtt", event_id=event_id, problems=[Problem(
                field="topic", value=topic, message=f"matches {reserved}, where the router "
                "publishes (under MQTT 3.1.1 it cannot tell such a manifest from its own "
                "messages); publish the manifest to another topic, change "
                f"{reserved}, or use protocol \"5\"")])
            return item
        problems, item.local_bytes = self._check_entries(manifest)
        event = AcceptedEvent(
            event_id=event_id,
            source="mqtt",
            manifest=manifest,
            files=[[] for _ in manifest.artifacts],
            detected=[{} for _ in manifest.artifacts],  # what _stage finds with no files
            digest=hashlib.sha256(raw).hexdigest(),
            received_at=received_at,
            reply_to=self._reply_to(message, event_id),
        )
        if not problems:
            problem = self.preflight(event)
            if problem is not None:
                problems.append(problem)
        if problems:
            item.rejection = Rejection(source="mqtt", event_id=event_id, problems=problems)
            return item
        item.event = event
        return item

    def _check_entries(self, manifest: Manifest) -> tuple[list[Problem], int]:
        """Cheap checks of every file entry, before anything is written; and the size of
        its file:// files, to be hashed."""
        problems: list[Problem] = []
        local_bytes = 0
        cap = self.settings.inline_max_bytes
        for a_index, artifact in enumerate(manifest.artifacts):
            for f_index, entry in enumerate(artifact.files):
                where = f"artifacts[{a_index}].files[{f_index}]"
                if entry.path is not None:
                    problems.append(
                        Problem(
                            field=f"{where}.path",
                            value=entry.path,
                            message="MQTT manifests carry files by 'uri' (file://, s3://, "
                            "gs://) or 'content_base64'; 'path' is for spool bundles",
                        )
                    )
                elif entry.content_base64 is not None:
                    size = _inline_size(entry.content_base64)
                    if size > cap:
                        problems.append(
                            Problem(
                                field=f"{where}.content_base64",
                                value=f"{size} bytes",
                                message=f"inline content is over router.mqtt.inline_max_bytes "
                                f"({cap} bytes); reference the file by uri instead",
                            )
                        )
                elif entry.uri is not None and entry.uri.startswith("file://"):
                    checked, problem = self._resolve_file_uri(entry.uri, f"{where}.uri")
                    if problem is not None:
                        problems.append(problem)
                    elif checked is not None:
                        local_bytes += checked.st.st_size
                elif entry.uri is not None:
                    assert entry.name is not None
                    declared = _declared_sha256(artifact.metadata, entry.name, len(artifact.files))
                    if declared is not None and not _HEX64.match(declared):
                        problems.append(
                            Problem(
                                field=f"artifacts[{a_index}].metadata.sha256",
                                value=declared,
                                message="must be the file's SHA-256 as 64 hex digits",
                            )
                        )
        return problems, local_bytes

    def _resolve_file_uri(
        self, uri: str, where: str
    ) -> tuple[CheckedFile | None, Problem | None]:
        """The file a `file://` URI names, under an allowed root, with the stat the checks
        passed on: hashing through CheckedFile then reads that very file or fails."""
        try:
            parts = urlsplit(uri)
        except ValueError as exc:  # say, an unclosed [ in the host: file://[::1/x
            return None, Problem(field=where, value=uri, message=f"is not a valid file:// "
                                 f"URI: {exc}; use file:///absolute/path")
        if parts.netloc not in ("", "localhost"):
            return None, Problem(
                field=where,
                value=uri,
                message=f"names host {parts.netloc!r}; only local files (file:///path) can "
                "be read",
            )
        if parts.query or parts.fragment:
            return None, Problem(field=where, value=uri,
                                 message="must not carry a query or fragment")
        path = unquote(parts.path)
        if "\x00" in path or not path.startswith("/"):
            return None, Problem(field=where, value=uri,
                                 message="must be an absolute path: file:///dir/file")
        if not self.allowed_roots:
            return None, Problem(
                field=where,
                value=uri,
                message="file:// URIs are refused: no router.mqtt.allowed_roots configured",
            )
        try:
            resolved = Path(path).resolve(strict=True)
        except FileNotFoundError:
            return None, Problem(field=where, value=uri, message="no such file")
        except (OSError, RuntimeError) as exc:
            return None, Problem(field=where, value=uri, message=f"cannot be resolved: {exc}")
        root = next(
            (r for r in self.allowed_roots if resolved == r or r in resolved.parents), None
        )
        if root is None:
            return None, Problem(
                field=where,
                value=uri,
                message="resolves (after symlinks) outside router.mqtt.allowed_roots "
                f"({', '.join(str(r) for r in self.allowed_roots)})",
            )
        try:
            st = _lstat_under(root, resolved)
        except FileNotFoundError:
            return None, Problem(field=where, value=uri, message="no such file")
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                return None, _changed(where, uri)
            return None, Problem.cannot_read(where, uri, exc)
        if not stat.S_ISREG(st.st_mode):
            return None, Problem(field=where, value=uri,
                                 message="is not a regular file; only regular files can be routed")
        if not os.access(resolved, os.R_OK):
            return None, Problem(field=where, value=uri, message="is not readable by the router")
        return CheckedFile(resolved, st), None

    def _hash_local_files(
        self, manifest: Manifest
    ) -> dict[tuple[int, int], tuple[Path, FileHash] | Problem]:
        """Resolve and hash every `file://` file of the manifest in one go, so that the
        files of a sharded checkpoint hash on every core at once (`sha256_files`)."""
        out: dict[tuple[int, int], tuple[Path, FileHash] | Problem] = {}
        wanted: list[tuple[tuple[int, int], str, CheckedFile]] = []
        for a_index, artifact in enumerate(manifest.artifacts):
            for f_index, entry in enumerate(artifact.files):
                if entry.uri is None or not entry.uri.startswith("file://"):
                    continue
                field = f"artifacts[{a_index}].files[{f_index}].uri"
                checked, problem = self._resolve_file_uri(entry.uri, field)
                if problem is not None or checked is None:
                    out[(a_index, f_index)] = problem or Problem(field=field, message="unreadable")
                else:
                    wanted.append(((a_index, f_index), entry.uri, checked))
        # CheckedFile: the file hashed must be the one checked (same device and inode),
        # not whatever a path component swapped for a symlink leads to now.
        digests = sha256_files([checked for *_, checked in wanted], self._abandon)
        for (index, uri, checked), digest in zip(wanted, digests, strict=True):
            field = f"artifacts[{index[0]}].files[{index[1]}].uri"
            if isinstance(digest, FileChanged) or (
                isinstance(digest, OSError) and digest.errno == errno.ELOOP
            ):
                out[index] = _changed(field, uri)
            elif isinstance(digest, OSError):
                out[index] = Problem.cannot_read(field, uri, digest)
            else:
                out[index] = (checked.path, digest)
        return out

    def _stage(self, event: AcceptedEvent) -> AcceptedEvent | list[Problem]:
        """Write inline content (fsynced) and hash local files: runs in a thread."""
        manifest = event.manifest
        if not any(artifact.files for artifact in manifest.artifacts):
            return event  # metrics, parameters: nothing to write, hash or detect
        base = self.inline_root / _segment(event.event_id)
        problems: list[Problem] = []
        files: list[list[StagedFile]] = []
        detected: list[dict[str, str]] = []
        written_dirs: set[Path] = set()
        local = self._hash_local_files(manifest)
        for a_index, artifact in enumerate(manifest.artifacts):
            staged: list[StagedFile] = []
            for f_index, entry in enumerate(artifact.files):
                where = f"artifacts[{a_index}].files[{f_index}]"
                assert entry.name is not None and entry.type is not None
                if entry.content_base64 is not None:
                    data = binascii.a2b_base64(entry.content_base64.encode("ascii"))
                    if len(data) > self.settings.inline_max_bytes:
                        problems.append(Problem(
                            field=f"{where}.content_base64", value=f"{len(data)} bytes",
                            message="inline content is over router.mqtt.inline_max_bytes "
                            f"({self.settings.inline_max_bytes} bytes)"))
                        continue
                    # One directory per artifact: two artifacts may hold the same name.
                    path = base / str(a_index) / _segment(entry.name)
                    _write_durably(path, data)
                    written_dirs.add(path.parent)
                    staged.append(StagedFile(
                        name=entry.name, type=entry.type, path=path,
                        sha256=hashlib.sha256(data).hexdigest(), size=len(data)))
                elif entry.uri is not None and entry.uri.startswith("file://"):
                    found = local[(a_index, f_index)]
                    if isinstance(found, Problem):
                        problems.append(found)
                        continue
                    resolved, digest = found
                    staged.append(StagedFile(
                        name=entry.name, type=entry.type, path=resolved, sha256=digest.sha256,
                        size=digest.size, identity=digest.identity))
                elif entry.uri is not None:
                    declared = _declared_sha256(artifact.metadata, entry.name, len(artifact.files))
                    staged.append(StagedFile(
                        name=entry.name, type=entry.type, path=None, uri=entry.uri,
                        sha256=(declared or "").lower(), size=0))
            files.append(staged)
            detected.append(_detect(artifact, staged))
        if problems:
            return problems
        for directory in sorted(written_dirs):
            _fsync_dir(directory)
            _fsync_dir(directory.parent)
        if written_dirs:
            _fsync_dir(base.parent)
        return event.model_copy(update={"files": files, "detected": detected})

    async def _process(self, client: aiomqtt.Client, batch: list[aiomqtt.Message],
                       received_at: float | None = None, apart: bool = True) -> list[_Item]:
        received_at = received_at or time.time()
        items: list[_Item] = []
        for message in batch:
            size = len(message.payload) if isinstance(message.payload, bytes | bytearray) else 0
            if size > _PARSE_IN_THREAD:
                items.append(await asyncio.to_thread(self._parse, message, received_at))
            else:
                items.append(self._parse(message, received_at))
        held = self._apart(items) if apart else []
        # The same event id twice in one batch: the later one goes into a later round,
        # so its files are never written over the first one's before the journal
        # has said which is which.
        pending = [i for i in items if not i.ignored and not i.held]
        while pending:
            round_items: list[_Item] = []
            later: list[_Item] = []
            seen: set[str] = set()
            for item in pending:
                assert item.event_id is not None
                (later if item.event_id in seen else round_items).append(item)
                seen.add(item.event_id)
            await self._round(client, round_items)
            pending = later
        if held:  # last: a failure before it retries the batch, which must not hold twice
            await self._hold(held, received_at)
        return items

    # --- held apart: large file:// checkpoints ---------------------------------------

    def _apart(self, items: list[_Item]) -> list[_Item]:
        """The messages to hold apart: those with file:// files over hash_apart_bytes,
        and, after one, those of its run or naming it in `inputs` (and so on), which
        must be journaled after it for lineage to find it."""
        runs = set(self._held_tails)  # runs with held messages not journaled yet
        held: list[_Item] = []
        for item in items:
            if item.event is None or (not runs and item.local_bytes <= self.hash_apart_bytes):
                continue  # the usual case, and the hot path: nothing held, nothing large
            linked = item.event.manifest.linked_runs()
            if item.local_bytes > self.hash_apart_bytes or not runs.isdisjoint(linked):
                item.held = True
                held.append(item)
                runs.update(linked)
        return held

    async def _hold(self, items: list[_Item], received_at: float) -> None:
        """Keep the messages in the journal (then they are acknowledged with the batch),
        and journal them as events in a task of their own."""
        runs = {run for i in items if i.event for run in i.event.manifest.linked_runs()}
        record = {
            "received_at": received_at,
            "runs": sorted(runs),
            "messages": [_held_message(i.message) for i in items],
        }
        owner = self._owner
        held_id = await self.journal.hold(owner.settings.client_id, record)
        large = [i.event_id for i in items if i.local_bytes > self.hash_apart_bytes]
        # info for a checkpoint; debug for the messages of its run held behind it
        (log.info if large else log.debug)(
            "mqtt messages held apart: a file:// hash under way must not hold up the "
            "messages behind it", held=held_id, large=large, messages=len(items),
            local_bytes=sum(i.local_bytes for i in items))
        owner._start_held(held_id, record)

    async def _resume_held(self) -> None:
        """Journal what an earlier run held and did not journal before it stopped."""
        rows = await self.journal.held(self.settings.client_id)
        for held_id, record in rows:
            self._start_held(held_id, record)
        if rows:
            log.info("mqtt held messages resumed: journaled once hashed", batches=len(rows),
                     messages=sum(len(r["messages"]) for _, r in rows))
        self._resumed = True

    def _start_held(self, held_id: int, record: dict[str, Any]) -> None:
        runs = [(str(p), str(r)) for p, r in record["runs"]]
        after = {task for run in runs if (task := self._held_tails.get(run)) is not None}
        task = asyncio.create_task(self._journal_held(held_id, record, after),
                                   name=f"mqtt-held-{held_id}")
        self._held_tasks.add(task)
        for run in runs:
            self._held_tails[run] = task
        self.metrics.held.inc(len(record["messages"]))

        def finished(done: asyncio.Task[bool]) -> None:
            self.metrics.held.dec(len(record["messages"]))
            self._held_tasks.discard(done)
            for run in runs:
                if self._held_tails.get(run) is done:
                    del self._held_tails[run]

        task.add_done_callback(finished)

    async def _journal_held(self, held_id: int, record: dict[str, Any],
                            after: set[asyncio.Task[bool]]) -> bool:
        """Journal held messages, after the earlier held messages of their runs; True
        once journaled. Not journaled (stopping), they stay held for the next start."""
        if after:  # wait, unlike gather, never cancels them when this task is cancelled
            await asyncio.wait(after)
            if not all(not t.cancelled() and t.result() for t in after):
                return False  # an earlier one stays held: these stay behind it
        try:
            if not await self._journal_held_now(record):
                return False
        except Exception:  # a bug, not bad input (that is set aside by _journal)
            log.exception("held messages could not be journaled; they stay held for the "
                          "next start", held=held_id)
            return False
        try:
            await self.journal.release(held_id)
        except Exception as exc:  # journaled: the next start finds duplicates, no more
            log.warning("held messages journaled but not released; the next start "
                        "releases them", held=held_id, error=str(exc))
        return True

    async def _journal_held_now(self, record: dict[str, Any]) -> bool:
        messages = [_message_from(m) for m in record["messages"]]
        while True:
            # Connected: a message rejected after its hash goes to the dead-letter topic.
            while not self._online.is_set() or self._client is None:
                if await self.wait_stopping(0.2):
                    return False
            try:
                items = await self._journal(self._client, messages,
                                            received_at=record["received_at"], apart=False)
            except aiomqtt.MqttError:
                if await self.wait_stopping(0.5):
                    return False
                continue  # the session broke mid-way: journaled again, as duplicates
            return items is not None

    async def _stop_held(self) -> None:
        """Let held messages being journaled finish (a hash gives up within a MiB), then
        cancel the rest: they stay held for the next start."""
        tasks = list(self._held_tasks)
        if not tasks:
            return
        await asyncio.wait(tasks, timeout=_HELD_STOP_GRACE)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _round(self, client: aiomqtt.Client, items: list[_Item]) -> None:
        candidates = [i for i in items if i.event is not None]
        # Events with files to write (inline content) or hash (file:// URIs) are staged
        # in threads, and only when the journal does not hold them yet (a redelivery
        # must not write its files again).  The others (metrics, parameters, object
        # store URIs) need no I/O: staged right here, without a query or a thread hop,
        # which were most of the intake's cost for small messages.
        heavy: list[_Item] = []
        for item in candidates:
            assert item.event is not None
            if _needs_io(item.event):
                heavy.append(item)
            else:
                self._staged(item, self._stage(item.event))
        if heavy:
            known = await self.journal.known_events(i.event_id for i in heavy if i.event_id)
            to_stage = [i for i in heavy if known.get(i.event_id or "") in (None, "rejected")]

            async def stage(item: _Item) -> None:
                assert item.event is not None
                async with self._hashers:
                    self._staged(item, await asyncio.to_thread(self._stage, item.event))

            await asyncio.gather(*(stage(i) for i in to_stage))
        events = [i.event for i in items if i.event is not None]
        by_id = {i.event_id: i for i in items if i.event is not None}
        outcomes = (
            await self.journal.accept(events, self.planner, self.handoff) if events else []
        )
        finished: list[FinishedEvent] = []  # nothing to deliver: done at intake
        for outcome in outcomes:
            item = by_id[outcome.event_id]
            item.outcome = outcome.outcome
            if outcome.outcome == "accepted":
                self.stats["accepted"] += 1
                if outcome.deliveries == 0 and item.event is not None:
                    finished.append(FinishedEvent(
                        event_id=outcome.event_id, bundle=None, source=self.source_name,
                        state="done", reply_to=item.event.reply_to,
                    ))
                if outcome.detail:
                    log.warning("event accepted with plan errors", event_id=outcome.event_id,
                                errors=outcome.detail)
            elif outcome.outcome == "duplicate":
                self.stats["duplicate"] += 1
                log.debug("duplicate message: already journaled", event_id=outcome.event_id)
            else:
                item.rejection = Rejection(
                    source="mqtt", event_id=outcome.event_id,
                    problems=[outcome.problem or Problem(
                        field="id", value=outcome.event_id, message="duplicate id")],
                )
        if finished:  # no dispatcher tick will report them: receipt and retire now
            await self.on_finished(finished)
        duplicates = [i.event_id for i in items if i.outcome == "duplicate" and i.event_id]
        if duplicates and self.settings.receipts:
            await self._resend_receipts(duplicates, by_id)
        rejected = [i for i in items if i.rejection is not None]
        for item in rejected:
            assert item.rejection is not None
            await self._reject(item)
        if rejected and self.settings.dead_letter_topic:
            await asyncio.gather(*(self._dead_letter(client, i) for i in rejected))

    @staticmethod
    def _staged(item: _Item, result: AcceptedEvent | list[Problem]) -> None:
        if isinstance(result, list):
            item.rejection = Rejection(source="mqtt", event_id=item.event_id, problems=result)
            item.event = None
        else:
            item.event = result

    async def _resend_receipts(self, ids: list[str], by_id: dict[str | None, _Item]) -> None:
        """A redelivered message whose event already finished: the receipt may be lost."""
        states = await self.journal.known_events(ids)
        for event_id in ids:
            state = states.get(event_id)
            item = by_id.get(event_id)
            if state in ("done", "failed") and item is not None and item.event is not None:
                self._queue_receipts([FinishedEvent(
                    event_id=event_id, bundle=None, source="mqtt",
                    state="done" if state == "done" else "failed",
                    reply_to=item.event.reply_to)])

    async def _reject(self, item: _Item) -> None:
        assert item.rejection is not None
        self.stats["rejected"] += 1
        log.warning("mqtt message rejected", topic=item.topic, event_id=item.event_id,
                    errors=item.rejection.summary)
        self.metrics.discarded.labels(component="mqtt", reason="invalid").inc()
        self.metrics.errors.labels(component="mqtt", error_type="invalid", stage="intake").inc()
        await self.journal.reject(item.rejection)

    async def _dead_letter(self, client: aiomqtt.Client, item: _Item) -> None:
        assert item.rejection is not None and self.settings.dead_letter_topic
        raw = _payload_bytes(item.message)
        body = {
            "reason": item.rejection.summary,
            "errors": [p.model_dump(mode="json") for p in item.rejection.problems],
            "event_id": item.event_id,
            "topic": item.topic,
            "rejected_at": item.rejection.rejected_at,
            "payload_base64": base64.b64encode(raw).decode(),
        }
        await client.publish(
            self.settings.dead_letter_topic,
            json.dumps(body, default=str).encode(),
            qos=1,
            properties=self._properties("dead-letter"),
        )

    def _properties(self, kind: str, correlation: bytes | None = None) -> Properties | None:
        if self.settings.protocol != "5":
            return None
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        props.PayloadFormatIndicator = 1
        props.UserProperty = [(MARKER, kind)]
        if correlation:
            props.CorrelationData = correlation
        return props

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._last_report >= 10 and self.stats != self._reported:
            self._last_report = now
            self._reported = dict(self.stats)
            log.info("mqtt intake", **self.stats)

    # --- pool (router/sources/mqtt_pool.py) -------------------------------------------

    def _offline_will(self) -> aiomqtt.Will | None:
        """Published by the broker if our connection ends without a DISCONNECT."""
        if not self.settings.takeover_enabled():
            return None
        payload = status_payload(self.settings.client_id, "offline", reason="connection lost")
        return aiomqtt.Will(status_topic(self.settings), payload, qos=1, retain=True)

    async def _announce(self, client: aiomqtt.Client, state: str, **extra: Any) -> None:
        if state == "online" and self.settings.heartbeat_seconds:
            extra["heartbeat"] = self.settings.heartbeat_seconds  # watchers time it so
        await client.publish(
            status_topic(self.settings),
            status_payload(self.settings.client_id, state, **extra),
            qos=1,
            retain=True,
            properties=self._properties("pool-status"),
        )

    async def announce_online(self) -> None:
        """Publish our "online" status again, if our session is up."""
        client = self._client
        if client is not None and self.healthy:
            try:
                await self._announce(client, "online")
            except aiomqtt.MqttError as exc:
                log.debug("mqtt pool status not published", error=str(exc))

    def watcher_client(self) -> aiomqtt.Client:
        """A clean-session client for the pool's status topics (QoS 0, retained)."""
        return _make_client(
            self.settings, client_id=f"{self.settings.client_id}-pool", persistent=False
        )

    def _twin(self) -> MqttSource:
        """This source's intake for another member's session, with counters of its own;
        the journal, the stop signal, the receipt queue and the hashing limit are shared."""
        twin = copy.copy(self)
        twin.stats = dict.fromkeys(self.stats, 0)
        twin._reported = {}
        twin._client = None
        twin.healthy = False
        return twin

    async def drain_session(self, member: str) -> Drained:
        """Take over a dead pool member's session and run it through our own intake.

        We connect with its client id (clean_start false, no will): mosquitto resumes the
        session and delivers what it holds, in-flight messages first, without a subscribe
        of ours.  Its shared subscriptions are removed first, so new messages go to the
        live members only, while what the broker had queued for the session still comes
        (checked on mosquitto 2.0.11).  Each batch is journaled, then acknowledged, as in
        our own session; after `_DRAIN_IDLE` seconds without a message the session is
        deleted (DISCONNECT, Session Expiry Interval 0).  If the member comes back,
        mosquitto closes our connection (2.0.11 gives no reason code) and redelivers to it
        what we had not acknowledged: "interrupted", and the event ids make those no-ops.
        """
        twin = self._twin()
        result = Drained(member=member, stats=twin.stats)
        client = _make_client(
            self.settings, client_id=member, persistent=True,
            receive_maximum=self.receive_maximum,
        )
        try:
            async with client:
                result.session_present = bool(getattr(client, "session_present", False))
                for topic_filter in self.filters:
                    await client.unsubscribe(topic_filter)
                # Its messages held apart were acknowledged, so no session holds them:
                # ours now, taken first so that what the session holds of their runs
                # is journaled after them. (Should it return, duplicates are no-ops.)
                for held_id, record in await self.journal.adopt_held(
                        member, self.settings.client_id):
                    self._start_held(held_id, record)
                    result.adopted += len(record["messages"])
                await twin._consume(client, idle=_DRAIN_IDLE)
                if self._stop.is_set():
                    result.outcome = "stopped"  # the session stays for the next taker
                    return result
                ended = await _end_session(client)
                result.outcome = "drained" if ended else "interrupted"
        except aiomqtt.MqttError as exc:
            result.outcome, result.error = "interrupted", str(exc)
        return result

    # --- receipts -------------------------------------------------------------------

    async def on_finished(self, finished: list[FinishedEvent]) -> None:
        """Called by the daemon when events finish; receipts go out from the session."""
        done = [e.event_id for e in finished if e.source == "mqtt" and e.state == "done"]
        if done or time.monotonic() - self._last_prune > _PRUNE_EVERY:
            await asyncio.to_thread(self._retire_inline, done)
        if not self.settings.receipts:
            return
        self._queue_receipts([e for e in finished if e.source == "mqtt" and e.reply_to])

    def _retire_inline(self, event_ids: list[str]) -> None:
        """Move delivered events' inline files aside, and prune those past retention.

        A failed event keeps its files where they are, for `artifact-router retry`.
        """
        for event_id in event_ids:
            name = _segment(event_id)
            staged = self.inline_root / name
            if not staged.is_dir():
                continue  # no inline files, or retired by another pool member
            retired = self.retired_root / name
            try:
                self.retired_root.mkdir(parents=True, exist_ok=True)
                if retired.exists():  # the same id delivered again after a fix
                    shutil.rmtree(retired)
                os.rename(staged, retired)
                os.utime(retired)  # retention counts from delivery
            except OSError as exc:
                log.warning("could not retire inline files", event_id=event_id, error=str(exc))
        if time.monotonic() - self._last_prune <= _PRUNE_EVERY or self.retention_days <= 0:
            return
        self._last_prune = time.monotonic()
        cutoff = time.time() - self.retention_days * 86400
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.retired_root):
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                        shutil.rmtree(entry.path)

    def _queue_receipts(self, events: Sequence[FinishedEvent]) -> None:
        for event in events:
            if len(self._receipts) >= _RECEIPT_QUEUE_MAX:
                dropped = self._receipts.popleft()
                log.warning("receipt queue full; oldest receipt dropped",
                            event_id=dropped.event_id)
            self._receipts.append(event)
        if events:
            self._receipt_kick.set()

    async def _receipt_loop(self, client: aiomqtt.Client) -> None:
        while True:
            if not self._receipts:
                self._receipt_kick.clear()
                await self._receipt_kick.wait()
                continue
            event = self._receipts[0]
            built = None
            for attempt in range(5):
                try:
                    built = await self._receipt(event)
                    break
                except Exception:
                    log.exception("could not build receipt", event_id=event.event_id,
                                  attempt=attempt + 1)
                    await asyncio.sleep(_backoff(attempt, 0.5, 5.0))
            if built is None:
                self._receipts.popleft()
                continue
            topic, body, props = built
            try:
                await client.publish(topic, body, qos=1, properties=props)
            except aiomqtt.MqttError as exc:
                log.warning("receipt not published; will retry after reconnect",
                            event_id=event.event_id, error=str(exc))
                return  # the session is ending; the receipt stays queued
            except ValueError as exc:
                # paho refuses the topic itself (a wildcard, say, in a reply_to journaled
                # before topics were checked): retrying cannot help, and the receipts
                # queued behind this one must still go out.
                log.error("receipt dropped: its topic cannot be published to",
                          event_id=event.event_id, topic=topic, error=str(exc))
            self._receipts.popleft()
            with contextlib.suppress(Exception):
                await self.journal.mark_moved([event.event_id])

    async def _receipt(self, event: FinishedEvent) -> tuple[str, bytes, Properties | None]:
        assert event.reply_to is not None
        record = await self.journal.event_record(event.event_id)
        manifest = record["manifest"]
        async with self.journal.db.read() as conn:
            rows = await query_artifacts(
                conn,
                pipeline=manifest["pipeline"],
                run_id=manifest["run_id"],
                step_name=manifest["step_name"],
                limit=100_000,
            )
            dead = (
                await conn.execute(
                    sa.select(deliveries.c.sink_id, deliveries.c.action, deliveries.c.last_error)
                    .where(deliveries.c.event_id == event.event_id, deliveries.c.state == "dead")
                )
            ).all()
        rows = sorted((r for r in rows if r.event_id == event.event_id), key=lambda r: r.id)
        body = {
            "event_id": event.event_id,
            "state": event.state,
            "pipeline": manifest["pipeline"],
            "run_id": manifest["run_id"],
            "step_name": manifest["step_name"],
            "versions": record.get("versions", []),
            "artifacts": [
                {
                    "name": r.name,
                    "type": r.kind,
                    "version": r.version,
                    "checksum": r.checksum,
                    "size": r.size,
                    "locations": [
                        loc.model_dump(mode="json", exclude_none=True) for loc in r.locations
                    ],
                    "decision": r.decision,
                    "plan_errors": r.plan_errors,
                }
                for r in rows
            ],
            "errors": [
                {"sink": d.sink_id, "action": d.action, "error": d.last_error} for d in dead
            ],
        }
        correlation = event.reply_to.get("correlation_data")
        props = self._properties(
            "receipt", base64.b64decode(correlation) if correlation else None
        )
        return event.reply_to["topic"], json.dumps(body, default=str).encode(), props


def _detect(artifact: object, staged: list[StagedFile]) -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(artifact, ModelArtifact) and not artifact.framework and staged:
        fallback: str | None = None
        for f in staged:
            found = (
                detect_framework(f.path, f.name) if f.path is not None
                else detect_framework_bytes(b"", f.name)
            )
            if found and found != "pickle":
                out["framework"] = found
                break
            fallback = fallback or found
        else:
            if fallback:
                out["framework"] = fallback
    if isinstance(artifact, DatasetArtifact) and not artifact.format and staged:
        found = detect_dataset_format(staged[0].name)
        if found:
            out["format"] = found
    return out


# --- publishing (the emit side) ---------------------------------------------------------


def _topic_segment(value: str) -> str:
    cleaned = re.sub(r"[+#/\x00]", "_", value)
    return cleaned or "_"


def default_topic(settings: MqttSettings, manifest: dict[str, Any]) -> str:
    """A topic the router subscribes to: the first filter with its wildcards filled.

    `+` takes the pipeline, then the run id, then the step; `#` takes what is left of
    pipeline/run_id/step_name.
    """
    if not settings.topics:
        raise ValueError("router.mqtt.topics is empty; give a topic")
    filt = settings.topics[0]
    values = [
        _topic_segment(str(manifest.get(k, "_")))
        for k in ("pipeline", "run_id", "step_name")
    ]
    out = []
    for level in filt.split("/"):
        if level == "+":
            out.append(values.pop(0) if values else "_")
        elif level == "#":
            out.extend(values or ["_"])
            values = []
        else:
            out.append(level)
    return "/".join(out)


def build_publication(
    settings: MqttSettings,
    manifest: dict[str, Any],
    files: Sequence[Path],
    topic: str | None = None,
) -> tuple[str, bytes]:
    """The topic and payload `publish_manifest` sends (validated against the schema).

    File entries given by `path` are matched to `files` by relative path or base name;
    a file of at most `inline_max_bytes` is inlined as `content_base64`, a larger one
    is referenced by its absolute `file://` URI (the router must be able to read it
    under one of its `allowed_roots`).
    """
    doc = json.loads(json.dumps(manifest))
    paths = [Path(f) for f in files]
    used: set[int] = set()
    for a_index, artifact in enumerate(doc.get("artifacts") or []):
        if not isinstance(artifact, dict):
            continue
        for f_index, entry in enumerate(artifact.get("files") or []):
            if not isinstance(entry, dict) or "path" not in entry:
                continue
            rel = str(entry["path"])
            match = next(
                (i for i, p in enumerate(paths) if p.as_posix().endswith("/" + rel)
                 or p.as_posix() == rel),
                None,
            )
            if match is None:
                match = next(
                    (i for i, p in enumerate(paths) if p.name == os.path.basename(rel)), None
                )
            if match is None:
                raise ValueError(
                    f"artifacts[{a_index}].files[{f_index}].path {rel!r} matches none of the "
                    f"files given ({', '.join(str(p) for p in paths) or 'none'})"
                )
            used.add(match)
            local = paths[match]
            if not local.is_file():
                raise ValueError(f"{local}: no such file")
            entry.pop("path")
            entry.setdefault("name", os.path.basename(rel))
            if local.stat().st_size <= settings.inline_max_bytes:
                entry["content_base64"] = base64.b64encode(local.read_bytes()).decode()
            else:
                entry["uri"] = local.resolve().as_uri()
    unused = [str(p) for i, p in enumerate(paths) if i not in used]
    if unused:
        raise ValueError(
            f"files not named by any artifact's 'files' entry: {', '.join(unused)}; add "
            '{"path": "<name>"} entries for them'
        )
    payload = json.dumps(doc, separators=(",", ":")).encode()
    parse_manifest(payload)  # raises ManifestError naming every bad field
    return topic or default_topic(settings, doc), payload


async def publish_manifest(
    settings: MqttSettings,
    manifest: dict[str, Any],
    files: list[Path],
    topic: str | None = None,
) -> None:
    """Publish one manifest at QoS 1 and wait for the broker's PUBACK.

    Raises ManifestError for an invalid manifest, ValueError for files that do not
    match it, MqttStartupError when the broker refuses the connection for good (credentials,
    certificate), aiomqtt.MqttError when it cannot be reached, and MqttPublishError
    when it refuses the message or has no subscriber for the topic.
    """
    target, payload = build_publication(settings, manifest, files, topic)
    client = _make_client(
        settings, client_id=f"{settings.client_id}-emit-{uuid.uuid4().hex[:12]}",
        persistent=False,
    )
    codes: list[ReasonCode] = []
    original: Any = client._client.on_publish

    def on_publish(c: Any, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        codes.append(reason)
        if original is not None:
            original(c, userdata, mid, reason, props)

    client._client.on_publish = on_publish
    props: Properties | None = None
    if settings.protocol == "5":
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        props.PayloadFormatIndicator = 1
    try:
        async with client:
            await client.publish(target, payload, qos=1, properties=props)
    except aiomqtt.MqttError as exc:
        message, retryable = _describe_connect_error(exc, settings)
        if not retryable:
            raise MqttStartupError(message) from None
        raise
    for code in codes:
        if code.is_failure:
            raise MqttPublishError(
                f"the broker refused the manifest on {target!r} ({code.getName()})"
            )
        if code.getName() == "No matching subscribers":
            raise MqttPublishError(
                f"the broker accepted the manifest but no one subscribes to {target!r}: it was "
                "dropped; start the router (its persistent session keeps the subscription) "
                "or publish to a topic it subscribes to",
            )
