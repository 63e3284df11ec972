"""`jsonl` tracker: metrics and parameters as JSON lines, one file per run.

The local default so a fresh install logs metrics with no server.  Each line carries
its delivery key; a replay finds the key already in the file and writes nothing, so a
SIGKILL between the append and the journal update never duplicates a metric point.
"""

from __future__ import annotations

import asyncio
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

    def __init__(self, sink_id: str, settings: JsonlTrackerSettings) -> None:
        super().__init__(sink_id, settings)
        self.root = settings.path.expanduser().resolve()
        self._keys: dict[Path, set[str]] = {}
        self._locks: dict[Path, asyncio.Lock] = {}

    def file_for(self, pipeline: str, run_id: str) -> Path:
        return self.root / sanitise_segment(pipeline) / f"{sanitise_segment(run_id)}.jsonl"

    async def deliver(self, item: DeliveryItem) -> DeliveryResult:
        path = self.file_for(item.context.pipeline, item.context.run_id)
        lock = self._locks.setdefault(path, asyncio.Lock())
        async with lock:
            if path not in self._keys:
                self._keys[path] = await asyncio.to_thread(
                    lambda: {str(r.get("key")) for r in read_jsonl(path)}
                )
            if item.key in self._keys[path]:
                return DeliveryResult(uri=f"file://{path}", skipped=True)
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
            try:
                await asyncio.to_thread(self._append, path, orjson.dumps(row) + b"\n")
            except OSError as exc:
                raise TransientError(f"{path}: {exc.strerror}") from exc
            self._keys[path].add(item.key)
        return DeliveryResult(uri=f"file://{path}")

    def _append(self, path: Path, line: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:
            # A crash may have torn the last line; start ours on a fresh one.
            if fh.tell() > 0:
                with open(path, "rb") as check:
                    check.seek(-1, os.SEEK_END)
                    if check.read(1) != b"\n":
                        fh.write(b"\n")
            fh.write(line)
            if self.settings.fsync:
                fh.flush()
                os.fsync(fh.fileno())
