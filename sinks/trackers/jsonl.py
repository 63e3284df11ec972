"""`jsonl` tracker: metrics and parameters as JSON lines, one file per run.

The local default so a fresh install logs metrics with no server.  A manifest's
`run_status` adds a line of kind `run_end` with the status and the event's time.  Each line carries
its delivery key; a replay finds the key already in the file and writes nothing (but
flushes the file again), so a SIGKILL between the append and the journal update never
duplicates a metric point.
A batch of deliveries is appended file by file and made durable with one flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import orjson

from router.delivery import Action
from router.rules import sanitise_segment
from sinks.base import BaseBatchSink, DeliveryItem, DeliveryResult, SinkSettings, TransientError
from sinks.durable import flush

__all__ = ["JsonlTracker", "JsonlTrackerSettings", "read_jsonl"]

_LOCK_STRIPES = 64
# Run files whose keys stay in memory, the most recently appended to: a long-lived
# daemon sees runs without end. One evicted is read again when next appended to.
CACHED_FILES = 128


class JsonlTrackerSettings(SinkSettings):
    path: Path
    fsync: bool = True


def read_jsonl(path: Path) -> list[dict[str, object]]:
    """Complete lines of a tracker file (a torn last line from a crash is skipped)."""
    rows: list[dict[str, object]] = []
    if not path.exists():
        return rows
    for line in path.read_bytes().splitlines():
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    return rows


@functools.lru_cache(maxsize=4096)
def _run_file(root: Path, pipeline: str, run_id: str) -> Path:
    """Remembered: a run's metrics come as many small deliveries, and the sanitising and
    the Path joins cost more than the line written."""
    return root / sanitise_segment(pipeline) / f"{sanitise_segment(run_id)}.jsonl"


def _open_to_append(path: Path) -> BinaryIO:
    """The run's file; its pipeline's folder is made when missing, not tried per batch."""
    try:
        return open(path, "a+b")
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a+b")


class JsonlTracker(BaseBatchSink):
    Settings = JsonlTrackerSettings
    settings: JsonlTrackerSettings
    # Appends are serialised per file anyway; more in flight only makes the dispatcher's
    # ticks (one journal transaction each) bigger and fewer.
    default_concurrency = 256
    max_batch = 256

    def __init__(self, sink_id: str, settings: JsonlTrackerSettings) -> None:
        super().__init__(sink_id, settings)
        self.root = settings.path.expanduser().resolve()
        # Keys read, up to a byte offset, per file; in the order last used (see _remember).
        self._seen: dict[Path, tuple[set[str], int]] = {}
        self._seen_lock = threading.Lock()  # files of different lock stripes share it
        # Appends to one file are serialised (in-process; flock covers other processes).
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    def file_for(self, pipeline: str, run_id: str) -> Path:
        return _run_file(self.root, pipeline, run_id)

    async def deliver_batch(self, items: list[DeliveryItem]) -> list[DeliveryResult | Exception]:
        """Rows grouped by file: one append and one fsync per file per batch (group
        commit), in one thread hop."""
        by_path: dict[Path, list[tuple[int, str, bytes]]] = {}
        logged_at = datetime.now(UTC).isoformat()
        for index, item in enumerate(items):
            path = self.file_for(item.context.pipeline, item.context.run_id)
            by_path.setdefault(path, []).append((index, item.key, self._line(item, logged_at)))
        return await asyncio.to_thread(self._append_all, by_path, len(items))

    @staticmethod
    def _line(item: DeliveryItem, logged_at: str) -> bytes:
        row: dict[str, object] = {
            "key": item.key,
            "logged_at": logged_at,
            "pipeline": item.context.pipeline,
            "run_id": item.context.run_id,
            "step_name": item.context.step_name,
        }
        if item.action is Action.END_RUN:  # the manifest's run_status: the run ended
            row |= {"kind": "run_end", "status": item.context.run_status,
                    "ended_at": item.context.received_at.isoformat()}
        else:
            artifact = item.artifact
            row |= {
                "kind": artifact.kind.value,
                "name": artifact.name,
                "step": artifact.step,
                "values": artifact.values or artifact.metadata.get("metrics", {}),
            }
        return orjson.dumps(row) + b"\n"

    def _append_all(self, by_path: dict[Path, list[tuple[int, str, bytes]]], n: int
                    ) -> list[DeliveryResult | Exception]:
        """Append to each file under its lock, then make the whole batch durable with one
        flush (sinks.durable.flush) before any delivery is reported done."""
        out: list[DeliveryResult | Exception] = [TransientError("not attempted")] * n
        # Every file the batch relies on is flushed, not only those appended to: a key
        # already present may be a line whose own flush failed (the attempt raised
        # TransientError) or whose writer died before flushing; skipping it unflushed
        # would mark it delivered though it was never known durable.
        touched: list[Path] = []
        for path, rows in by_path.items():
            try:
                with self._locks[hash(path) % _LOCK_STRIPES]:
                    written = self._append_once(path, [(key, line) for _, key, line in rows])
            except OSError as exc:
                for index, _, _ in rows:
                    out[index] = TransientError(f"{path}: {exc.strerror}")
                continue
            touched.append(path)
            for index, key, _ in rows:
                out[index] = DeliveryResult(uri=f"file://{path}", skipped=key not in written)
        if touched and self.settings.fsync:
            try:
                flush(self.root, touched)
            except OSError as exc:  # not known durable: retried (a replay writes nothing)
                return [TransientError(f"{self.root}: {exc.strerror}")] * n
        return out

    def _recall(self, path: Path) -> tuple[set[str], int]:
        """The keys cached for `path`, taken out of the cache while the caller, holding
        the file's lock, works on them (_remember puts them back)."""
        with self._seen_lock:
            return self._seen.pop(path, None) or (set(), 0)

    def _remember(self, path: Path, keys: set[str], offset: int) -> None:
        """Cache `path`'s keys as the most recently used; forget the least recently used
        files past CACHED_FILES, so memory stays bounded however many runs go by."""
        with self._seen_lock:
            self._seen[path] = (keys, offset)
            while len(self._seen) > CACHED_FILES:
                del self._seen[next(iter(self._seen))]

    def _append_once(self, path: Path, rows: list[tuple[str, bytes]]) -> set[str]:
        """Append the rows whose key is not already in the file; the keys written.

        An exclusive flock makes check-and-append atomic across processes too: daemons
        of a pool sharing a tracking directory (one may replay another's delivery after
        taking over its lease) never write the same point twice.  Keys already seen are
        cached with the file size they were read up to; only what others appended since
        is read again (all of it for a file the cache has forgotten).
        """
        with _open_to_append(path) as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            keys, offset = self._recall(path)
            try:
                size = os.fstat(fh.fileno()).st_size
                if size < offset:  # truncated or replaced: start over
                    keys, offset = set(), 0
                if size > offset:
                    fh.seek(offset)
                    chunk = fh.read(size - offset)
                    complete = chunk[: chunk.rfind(b"\n") + 1]
                    for raw in complete.splitlines():
                        with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                            keys.add(str(orjson.loads(raw).get("key")))
                    offset += len(complete)
                written: dict[str, bytes] = {}
                for key, line in rows:
                    if key not in keys and key not in written:
                        written[key] = line
                if not written:
                    return set()
                lead = b""
                if size > 0:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        lead = b"\n"  # a crash tore the last line: start afresh
                data = lead + b"".join(written.values())
                fh.write(data)
                fh.flush()  # durable once the batch is flushed (_append_all)
                keys.update(written)
                # Under the lock nobody else appended: our own lines need no re-reading.
                offset = size + len(data)
                return set(written)
            finally:
                self._remember(path, keys, offset)
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
