"""`jsonl` tracker: metrics and parameters as JSON lines, one file per run.

The local default so a fresh install logs metrics with no server.  Each line carries
its delivery key; a replay finds the key already in the file and writes nothing, so a
SIGKILL between the append and the journal update never duplicates a metric point.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from datetime import UTC, datetime
from pathlib import Path

import orjson

from router.rules import sanitise_segment
from sinks.base import BaseSink, DeliveryItem, DeliveryResult, SinkSettings, TransientError

__all__ = ["JsonlTracker", "JsonlTrackerSettings", "read_jsonl"]


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


class JsonlTracker(BaseSink):
    Settings = JsonlTrackerSettings
    settings: JsonlTrackerSettings
    # Appends are serialised per file anyway; more in flight only makes the dispatcher's
    # ticks (one journal transaction each) bigger and fewer.
    default_concurrency = 256

    def __init__(self, sink_id: str, settings: JsonlTrackerSettings) -> None:
        super().__init__(sink_id, settings)
        self.root = settings.path.expanduser().resolve()
        self._seen: dict[Path, tuple[set[str], int]] = {}  # keys read, up to byte offset
        self._locks: dict[Path, asyncio.Lock] = {}

    def file_for(self, pipeline: str, run_id: str) -> Path:
        return self.root / sanitise_segment(pipeline) / f"{sanitise_segment(run_id)}.jsonl"

    async def deliver(self, item: DeliveryItem) -> DeliveryResult:
        path = self.file_for(item.context.pipeline, item.context.run_id)
        artifact = item.artifact
        values = artifact.values if artifact.values else artifact.metadata.get("metrics", {})
        row = {
            "key": item.key,
            "logged_at": datetime.now(UTC).isoformat(),
            "pipeline": item.context.pipeline,
            "run_id": item.context.run_id,
            "step_name": item.context.step_name,
            "kind": artifact.kind.value,
            "name": artifact.name,
            "step": artifact.step,
            "values": values,
        }
        lock = self._locks.setdefault(path, asyncio.Lock())
        async with lock:
            try:
                written = await asyncio.to_thread(
                    self._append_once, path, item.key, orjson.dumps(row) + b"\n"
                )
            except OSError as exc:
                raise TransientError(f"{path}: {exc.strerror}") from exc
        return DeliveryResult(uri=f"file://{path}", skipped=not written)

    def _append_once(self, path: Path, key: str, line: bytes) -> bool:
        """Append unless the key is already in the file; False when it was.

        An exclusive flock makes check-and-append atomic across processes too: daemons
        of a pool sharing a tracking directory (one may replay another's delivery after
        taking over its lease) never write the same point twice.  Keys already seen are
        cached with the file size they were read up to; only what others appended since
        is read again.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                keys, offset = self._seen.get(path, (set(), 0))
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
                self._seen[path] = (keys, offset)
                if key in keys:
                    return False
                if size > 0:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        line = b"\n" + line  # a crash tore the last line: start afresh
                fh.write(line)
                fh.flush()
                if self.settings.fsync:
                    os.fsync(fh.fileno())
                keys.add(key)
                return True
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
