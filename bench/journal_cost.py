"""The journal's own cost per event, in one process: accept (plan, journal, catalog,
deliveries claimed at intake) and completion (done, locations, event finished) of
inline metrics events, as mqtt-intake sends them, on SQLite, with no broker, sink or
daemon around it. For before/after comparisons of journal changes, which the daemon
probes (bench/probe.py) cannot resolve under this machine's noise of 15 % or more.

    PYTHONPATH=<tree> python bench/journal_cost.py [N]              # CPU us per event
    PYTHONPATH=<tree> python bench/journal_cost.py --callgrind [N]  # instructions
    ... --ticks    # deliveries claimed by dispatcher ticks, not at intake
    ... --busy     # wall-clock us per event next to a thread that never waits

Under a burst the daemon's dispatcher slots are full when a batch is journaled, so most
deliveries (88 % in a 20,000-message mqtt-intake run) are claimed by a later tick's
transaction, which reads them back; `--ticks` measures that path: each batch is
accepted with no slots, and claimed by the cycle that completes the batch before it.

`--callgrind` runs this under valgrind with N and 3N events, and again only building
them (the manifests parsed); the difference of the differences over 2N is the journal's
instructions per event, start-up and the test events left out, the same from run to run
whatever else the machine is doing. The journal is written under $TMPDIR.

`--busy` runs a thread of pure Python beside the journal, standing in for the daemon's
event loop under a burst, and reports the journal's wall-clock time per event: each
time the driver lets go of the GIL (sqlite3 does at every step of a statement, one
per row of an executemany or of a RETURNING), the journal's thread must win it back
from that thread, which instructions and CPU time do not show.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench.scenarios_mqtt import _payloads
from router.config import load_config
from router.db import Database
from router.delivery import DeliveryResult
from router.intake import AcceptedEvent
from router.journal import ClaimedDelivery, Completion, DeliveryJournal
from router.manifest import parse_manifest
from router.rules import RoutePlan, plan_event

BATCH = 250  # about what the MQTT source hands the journal under a burst
STACK = load_config(discover=False).config.stacks["local"]  # jsonl tracker


class _AllSlots:
    """The dispatcher's side of a claim at intake, with room for every delivery."""

    lease_seconds = 120.0

    def __init__(self) -> None:
        self.adopted: list[ClaimedDelivery] = []

    def take(self, sink_id: str, stack: str, component: str) -> bool:
        return True

    def give_back(self, sink_ids: Sequence[str]) -> None:
        pass

    def slots_for_intake(self) -> _AllSlots:
        return self

    def adopt(self, claimed: list[ClaimedDelivery], waiting: bool) -> None:
        self.adopted += claimed


def _events(n: int) -> list[AcceptedEvent]:
    """mqtt-intake's own manifests (bench.scenarios_mqtt), parsed as its source would."""
    return [
        AcceptedEvent(
            event_id=event_id, source="mqtt", bundle=None, files=[[]], detected=[{}],
            digest=hashlib.sha256(payload).hexdigest(), received_at=time.time(),
            manifest=parse_manifest(json.loads(payload)),
        )
        for event_id, _topic, payload in _payloads(n, "cost")
    ]


def _plan(event: AcceptedEvent, versions: list[str]) -> RoutePlan:
    return plan_event(event.manifest, event_id=event.event_id, stack=STACK,
                      versions=versions, received_at=datetime.now(UTC))


def _done(claimed: Sequence[ClaimedDelivery], result: DeliveryResult) -> list[Completion]:
    return [
        Completion(key=c.key, event_id=c.event_id, artifact_index=c.artifact_index,
                   sink_id=c.sink_id, action=c.action, outcome="done", result=result,
                   attempts=c.attempts)
        for c in claimed
    ]


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(100))


async def _run(n: int, work: Path, ticks: bool, busy: bool) -> float:
    """CPU seconds of the journal work for `n` events (the events built beforehand),
    or with `busy` its wall-clock seconds next to a spinning thread."""
    db = Database(f"sqlite+aiosqlite:///{work / 'journal.db'}")
    await db.migrate()
    journal = DeliveryJournal(db, owner="cost")
    events = _events(n)
    handoff = _AllSlots()
    done = DeliveryResult(uri=f"file://{work}/tracking.jsonl")
    gc.collect()
    gc.freeze()  # as the daemon does once started: the prepared events are not its heap
    stop = threading.Event()
    if busy:
        threading.Thread(target=_spin, args=(stop,), daemon=True).start()
    clock = time.perf_counter if busy else time.process_time
    start = clock()
    claimed: list[ClaimedDelivery] = []
    finishes = 0
    for first in range(0, n, BATCH):
        if ticks:  # this batch is claimed by the tick that completes the one before
            await journal.accept(events[first:first + BATCH], _plan)
            finished, claimed = await journal.cycle(_done(claimed, done), BATCH)
        else:
            handoff.adopted = []
            await journal.accept(events[first:first + BATCH], _plan, handoff)
            finished, _ = await journal.cycle(_done(handoff.adopted, done), 0)
        finishes += len(finished)
    if ticks:
        finished, _ = await journal.cycle(_done(claimed, done), 0)
        finishes += len(finished)
    assert finishes == n, f"every event finishes: {finishes} of {n}"
    spent = clock() - start
    stop.set()
    await db.dispose()
    return spent


def _instructions(n: int, *flags: str) -> int:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--callgrind needs valgrind on PATH")
    out = subprocess.run(
        [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         __file__, str(n), *flags], capture_output=True, text=True, check=True, env=os.environ,
    ).stderr
    match = re.search(r"Collected : (\d+)", out)
    assert match, out[-2000:]
    return int(match.group(1))


def main(argv: list[str]) -> None:
    callgrind = "--callgrind" in argv
    args = [a for a in argv if not a.startswith("--")]
    n = int(args[0]) if args else (1000 if callgrind else 10_000)
    if "--events-only" in argv:  # what --callgrind takes off: building the test events
        _events(n)
        return
    ticks, busy = "--ticks" in argv, "--busy" in argv
    if callgrind:
        mode = ("--ticks",) if ticks else ()
        journal = _instructions(3 * n, *mode) - _instructions(n, *mode)
        building = _instructions(3 * n, "--events-only") - _instructions(n, "--events-only")
        per_event = (journal - building) / (2 * n)
        print(f"journal: {per_event:,.0f} instructions per event (callgrind, "
              f"{3 * n} - {n} events{', claimed by ticks' if ticks else ''})")
        return
    work = Path(tempfile.mkdtemp(prefix="journal-cost-"))
    try:
        spent = asyncio.run(_run(n, work, ticks, busy))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"journal: {spent / n * 1e6:.0f} us {'wall-clock' if busy else 'CPU'} per event "
          f"({n} events, batches of {BATCH}{', claimed by ticks' if ticks else ''}"
          f"{', next to a busy thread' if busy else ''})")


if __name__ == "__main__":
    main(sys.argv[1:])
