"""Pool membership and takeover of a dead member's MQTT session (DESIGN section 7).

A pool shares work through a shared subscription (`$share/<group>/...`), but mosquitto
(2.0.11, checked) keeps a member's unacknowledged messages, and its share of every
message published after it died, in that member's persistent session until a client
with the same client id connects.  Without help they wait for the member to return.

Membership goes through the broker, no table of our own:

- each member's connection carries a Will, a retained QoS 1 "offline" status on
  `artifact-router/pool/<group>/<client id>`, which mosquitto publishes when the
  connection ends without a DISCONNECT (a kill, a crash, a network cut); the member
  publishes a retained "online" status once subscribed, again every
  `router.mqtt.heartbeat_seconds`, and a retained "offline" one when it stops (its
  session still collects its share while it is down); a broker that crashes publishes
  no Will, so a member whose "online" status has not come for three of its heartbeats
  counts as offline (it died while the broker was down);
- every member watches those statuses (its own small clean-session client); a member
  seen offline for `router.mqtt.takeover_after` seconds is taken over by the live member
  with the lowest client id, one takeover at a time, so that two survivors do not fight
  over one client id (each would kick the other off);
- the taker drains the session through the ordinary intake (`MqttSource.drain_session`)
  and then deletes the retained status, so the member is not taken over again.

A member that returns under its own id during a takeover gets its session back (mosquitto
closes the taker's connection) with whatever the taker had not acknowledged: the event id
makes those redeliveries journal no-ops.  If a takeover is cut short, the member is tried
again after another grace period when it is still offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiomqtt
import structlog

from router.config import MqttSettings

if TYPE_CHECKING:
    from router.sources.mqtt import MqttSource

__all__ = ["Drained", "Pool", "status_filter", "status_payload", "status_topic"]

log = structlog.get_logger("router.mqtt")

POOL_PREFIX = "artifact-router/pool"
_TICK = 1.0  # how often statuses are checked for members due for a takeover
_HEAL_EVERY = 5.0  # at most one "online" repair per this many seconds
_SILENT_BEATS = 3  # heartbeats missed before a member that says "online" is offline
_STOP_WAIT = 15.0


def status_topic(settings: MqttSettings, client_id: str | None = None) -> str:
    """Where a member's retained status lives (its client id is one topic level)."""
    return f"{POOL_PREFIX}/{settings.shared_group}/{client_id or settings.client_id}"


def status_filter(settings: MqttSettings) -> str:
    return f"{POOL_PREFIX}/{settings.shared_group}/+"


def status_payload(client_id: str, state: str, **extra: Any) -> bytes:
    body = {"client_id": client_id, "state": state, "at": round(time.time(), 3), **extra}
    return json.dumps(body).encode()


def _parse_status(payload: Any) -> dict[str, Any] | None:
    """The status document, or None for an empty payload or garbage."""
    if not isinstance(payload, bytes | bytearray | str) or not payload:
        return None
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("state") not in ("online", "offline"):
        return None
    return body


@dataclass
class Drained:
    """What a takeover did: `outcome` is drained, interrupted, stopped or failed."""

    member: str
    outcome: str = "failed"
    session_present: bool = False
    stats: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    adopted: int = 0  # its held messages (router/sources/mqtt.py), now journaled by us


@dataclass
class _Member:
    client_id: str
    state: str
    since: float  # our monotonic clock when we saw it enter this state
    seen: float = 0.0  # ... when its status last came (a heartbeat, or a change)
    heartbeat: float = 0.0  # seconds between its "online" statuses; 0: it does not beat

    def offline_since(self, now: float) -> float | None:
        """Since when it is offline: by its status, or silent for three heartbeats
        (it died where no Will could be published: while the broker was down)."""
        if self.state == "offline":
            return self.since
        if self.heartbeat and now - self.seen > _SILENT_BEATS * self.heartbeat:
            return self.seen + _SILENT_BEATS * self.heartbeat
        return None


class Pool:
    """Watches the pool's statuses and takes over members that stay offline."""

    def __init__(self, source: MqttSource) -> None:
        self.source = source
        self.settings = source.settings
        self.me = source.settings.client_id
        self.grace = float(source.settings.takeover_after or 0)
        self.members: dict[str, _Member] = {}
        self.takeover: asyncio.Task[Drained] | None = None
        self.watching = False
        self._client: aiomqtt.Client | None = None
        self._healed_at = -math.inf  # not 0.0: monotonic time counts from boot
        self._beat_at = -math.inf
        self.heartbeat = float(source.settings.heartbeat_seconds or 0)
        self._heal: asyncio.Task[None] | None = None
        self._beating: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Until the source stops; then lets a running takeover finish its batch."""
        watcher = asyncio.create_task(self._watch_loop(), name="mqtt-pool-watch")
        try:
            while not await self.source.wait_stopping(_TICK):
                self._tick()
        finally:
            if self.takeover is not None:
                await asyncio.wait({self.takeover}, timeout=_STOP_WAIT)
                self.takeover.cancel()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher

    # --- statuses -----------------------------------------------------------------

    async def _watch_loop(self) -> None:
        while not self.source.stopping:
            try:
                await self._watch()
            except aiomqtt.MqttError as exc:
                log.debug("mqtt pool watcher disconnected", error=str(exc))
            self.watching, self._client = False, None
            # The main connection reports broker trouble; here a short jittered wait does.
            await self.source.wait_stopping(random.uniform(1.0, 3.0))

    async def _watch(self) -> None:
        client = self.source.watcher_client()
        async with client:
            self.members.clear()  # the retained statuses come again with the subscription
            await client.subscribe(status_filter(self.settings), qos=0)
            self._client, self.watching = client, True
            async for message in client.messages:
                self._on_status(message.topic.value.rsplit("/", 1)[-1], message.payload)

    def _on_status(self, key: str, payload: Any) -> None:
        if not payload:  # a cleared (empty retained) status: drained, or gone for good
            self.members.pop(key, None)
            return
        status = _parse_status(payload)
        if status is None:
            # Not a status (say, something another client published here): forgetting
            # the member for it would leave a dead member's session never taken over.
            log.warning("mqtt pool: not a member status; ignored", member=key)
            return
        now = time.monotonic()
        known = self.members.get(key)
        if known is None or known.state != status["state"]:
            client_id = status.get("client_id")
            known = self.members[key] = _Member(
                client_id if isinstance(client_id, str) and client_id else key,
                status["state"],
                now,
            )
        known.seen = now
        beat = status.get("heartbeat")
        known.heartbeat = float(beat) if isinstance(beat, int | float) and beat > 0 else 0.0

    # --- deciding -----------------------------------------------------------------

    def due(self, now: float) -> list[str]:
        """Members (status keys) this member should take over now, lowest id first.

        Only the live member with the lowest client id takes over, so survivors that
        agree on who is online never connect with the same client id at once.
        """
        offline = {key: m.offline_since(now) for key, m in self.members.items()}
        online = {m.client_id for key, m in self.members.items() if offline[key] is None}
        if min(online | {self.me}) != self.me:
            return []
        return sorted(
            key for key, m in self.members.items()
            if (since := offline[key]) is not None and m.client_id != self.me
            and now - since >= self.grace
        )

    def _tick(self) -> None:
        now = time.monotonic()
        if self.heartbeat and self.source.healthy and now - self._beat_at >= self.heartbeat:
            self._beat_at = now  # through our own session: the watcher may be down
            self._beating = asyncio.create_task(self.source.announce_online(),
                                                name="mqtt-heartbeat")
        if not (self.watching and self.source.healthy):
            return  # a stale view, or no session of our own: leave it to the others
        mine = self.members.get(self.me)
        if (mine is None or mine.state != "online") and now - self._healed_at > _HEAL_EVERY:
            # We are connected but our status says otherwise (a taker cleared it just
            # after we came back): say it again, or someone would take our session.
            self._healed_at = now
            self._heal = asyncio.create_task(self.source.announce_online(), name="mqtt-heal")
        if self.takeover is not None and not self.takeover.done():
            return  # one at a time: each drains with a full intake's memory
        due = self.due(now)
        if due:
            self.takeover = asyncio.create_task(self._take_over(due[0]), name="mqtt-takeover")

    # --- taking over --------------------------------------------------------------

    async def _take_over(self, key: str) -> Drained:
        member = self.members[key]
        now = time.monotonic()
        offline_for = round(now - (member.offline_since(now) or member.since), 1)
        log.info("mqtt takeover started", member=member.client_id, offline_for=offline_for)
        try:
            result = await self.source.drain_session(member.client_id)
        except Exception as exc:
            log.exception("mqtt takeover failed", member=member.client_id)
            result = Drained(member=member.client_id, error=repr(exc))
        self.source.metrics.takeovers.labels(outcome=result.outcome).inc()
        (log.warning if result.outcome == "failed" else log.info)(
            "mqtt takeover",
            member=result.member,
            outcome=result.outcome,
            drained=result.stats.get("received", 0),
            accepted=result.stats.get("accepted", 0),
            duplicate=result.stats.get("duplicate", 0),
            rejected=result.stats.get("rejected", 0),
            session_present=result.session_present,
            adopted=result.adopted,
            error=result.error,
        )
        if result.outcome == "drained":
            await self._release(key)
        elif key in self.members:  # again after a grace period (or three heartbeats)
            self.members[key].since = self.members[key].seen = time.monotonic()
        return result

    async def _release(self, key: str) -> None:
        """Delete the drained member's retained status (an empty retained message)."""
        known = self.members.get(key)
        if known is None or known.offline_since(time.monotonic()) is None or self._client is None:
            return  # it came back (its own status stands), or we cannot say so now
        try:
            await self._client.publish(
                status_topic(self.settings, key), b"", qos=1, retain=True
            )
        except aiomqtt.MqttError as exc:
            # Harmless: the next takeover finds no session, drains nothing, clears it.
            log.warning("mqtt pool status not cleared", member=key, error=str(exc))
            return
        self.members.pop(key, None)
