"""Helpers for the fault suite (tests/test_faults.py): read-back of every sink the suite
routes to (S3 through boto3, MLflow through its REST API, the jsonl tracker from its
files), memory sampling from /proc, a small tmpfs for "disk full", and a bundle stream
written at a fixed pace from a thread."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sinks.trackers.jsonl import read_jsonl
from tests.conftest import DaemonProcess, Workspace, model_manifest, write_bundle

MiB = 1024 * 1024


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- what the suite emits ------------------------------------------------------------------


@dataclass
class Emitted:
    """One bundle: a model file (stored) and a metrics artifact (tracked)."""

    index: int
    bundle: str
    run_id: str
    file_name: str
    data: bytes

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.data)


def model_and_metrics(pipeline: str, index: int, *, runs: int, rng: random.Random,
                      size: tuple[int, int] = (1000, 4000)) -> tuple[Emitted, dict[str, Any]]:
    """Bundle `index`: model file m<index>.bin plus metrics at MLflow step `index`."""
    run_id = f"run-{index % runs}"
    emitted = Emitted(index=index, bundle=f"b{index:05d}", run_id=run_id,
                      file_name=f"m{index:05d}.bin", data=rng.randbytes(rng.randint(*size)))
    manifest = model_manifest("clf", run_id=run_id, files=[emitted.file_name])
    manifest["pipeline"] = pipeline
    manifest["artifacts"].append({
        "type": "metrics", "name": "eval", "step": index,
        "values": {"accuracy": round(index / 10_000, 6), "loss": round(1 - index / 10_000, 6)},
    })
    return emitted, manifest


def emit(spool: Path, pipeline: str, index: int, *, runs: int, rng: random.Random) -> Emitted:
    emitted, manifest = model_and_metrics(pipeline, index, runs=runs, rng=rng)
    write_bundle(spool, emitted.bundle, manifest, {emitted.file_name: emitted.data})
    return emitted


class PacedEmitter(threading.Thread):
    """Writes bundles at a fixed rate (bundles per second) until stopped."""

    def __init__(self, spool: Path, pipeline: str, *, rate: float, runs: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.spool, self.pipeline, self.rate, self.runs = spool, pipeline, rate, runs
        self.rng = random.Random(seed)
        self.emitted: list[Emitted] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        try:
            while not self._halt.is_set():
                due = start + len(self.emitted) / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    self._halt.wait(delay)
                    continue
                self.emitted.append(
                    emit(self.spool, self.pipeline, len(self.emitted), runs=self.runs,
                         rng=self.rng)
                )
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> list[Emitted]:
        self._halt.set()
        self.join(30)
        if self.error is not None:
            raise AssertionError(f"emitter failed: {self.error!r}")
        return self.emitted


# --- read-back --------------------------------------------------------------------------------


def s3_client(settings: dict[str, Any]) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings["endpoint_url"],
        region_name=settings.get("region") or "us-east-1",
        aws_access_key_id=settings["aws_access_key_id"],
        aws_secret_access_key=settings["aws_secret_access_key"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )


def s3_objects(settings: dict[str, Any], prefix: str) -> dict[str, dict[str, Any]]:
    """Every object under `prefix/`: key -> {sha256 of the body, metadata sha256, size}."""
    client = s3_client(settings)
    out: dict[str, dict[str, Any]] = {}
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=settings["bucket_name"], Prefix=prefix + "/"
    ):
        keys += [o["Key"] for o in page.get("Contents", [])]
    assert len(keys) == len(set(keys)), "a key listed twice"
    for key in keys:
        got = client.get_object(Bucket=settings["bucket_name"], Key=key)
        body = got["Body"].read()
        out[key] = {
            "sha256": sha256_bytes(body),
            "meta_sha256": {k.lower(): v for k, v in got.get("Metadata", {}).items()}.get(
                "sha256"),
            "size": len(body),
        }
    return out


def assert_s3_exactly(settings: dict[str, Any], prefix: str, pipeline: str,
                      emitted: list[Emitted], *, server_restarted: bool = False) -> None:
    """Each model once at its templated key, body and metadata sha256 right, nothing else.

    `rclone serve s3` over a plain directory keeps user metadata in memory only: after
    the server restarts, objects written before carry none (their bodies are checked
    all the same)."""
    objects = s3_objects(settings, prefix)
    expected = {f"{prefix}/{pipeline}/{e.run_id}/train/clf/{e.file_name}": e for e in emitted}
    missing = sorted(set(expected) - set(objects))
    extra = sorted(set(objects) - set(expected))
    assert not missing, f"{len(missing)} objects missing, e.g. {missing[:5]}"
    assert not extra, f"{len(extra)} unexpected objects, e.g. {extra[:5]}"
    wrong = [k for k, e in expected.items() if objects[k]["sha256"] != e.sha256]
    assert not wrong, f"{len(wrong)} objects with a wrong checksum, e.g. {wrong[:5]}"
    bad_meta = [k for k, e in expected.items()
                if objects[k]["meta_sha256"] != e.sha256
                and not (server_restarted and objects[k]["meta_sha256"] is None)]
    assert not bad_meta, f"{len(bad_meta)} objects with wrong sha256 metadata: {bad_meta[:5]}"


def jsonl_points(tracking: Path) -> Counter[tuple[str, int]]:
    """(run_id, step) of every metrics line in the jsonl tracker, with its count."""
    seen: Counter[tuple[str, int]] = Counter()
    for path in tracking.rglob("*.jsonl"):
        for row in read_jsonl(path):
            if row.get("kind") == "metrics":
                seen[(str(row["run_id"]), int(row["step"]))] += 1  # type: ignore[call-overload]
    return seen


def jsonl_line_count(tracking: Path) -> int:
    total = 0
    for path in tracking.rglob("*.jsonl"):
        with contextlib.suppress(OSError):
            total += path.read_bytes().count(b"\n")
    return total


def assert_jsonl_exactly(tracking: Path, emitted: list[Emitted]) -> None:
    points = jsonl_points(tracking)
    expected = {(e.run_id, e.index) for e in emitted}
    assert set(points) == expected, (
        f"missing {sorted(expected - set(points))[:5]}, extra {sorted(set(points) - expected)[:5]}")
    twice = sorted(k for k, v in points.items() if v > 1)
    assert not twice, f"{len(twice)} jsonl metric points logged twice, e.g. {twice[:5]}"
    keys = [row["key"] for p in tracking.rglob("*.jsonl") for row in read_jsonl(p)]
    assert len(keys) == len(set(keys)), "a delivery key appears twice in the jsonl tracker"


def mlflow_api(url: str, method: str, endpoint: str, body: dict[str, Any] | None = None,
               **query: Any) -> dict[str, Any]:
    import urllib.parse

    full = f"{url}/api/2.0/mlflow/{endpoint}"
    if query:
        full += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    request = urllib.request.Request(
        full, data=json.dumps(body).encode() if body is not None else None, method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return dict(json.loads(resp.read() or b"{}"))


def mlflow_points(url: str, experiment: str,
                  keys: tuple[str, ...] = ("accuracy", "loss")) -> dict[str, Counter[tuple]]:
    """run_id tag -> Counter of (metric key, step, timestamp, value) over the full history."""
    found = mlflow_api(url, "GET", "experiments/get-by-name", experiment_name=experiment)
    experiment_id = found["experiment"]["experiment_id"]
    runs: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        page = mlflow_api(url, "POST", "runs/search", {
            "experiment_ids": [experiment_id], "max_results": 1000,
            **({"page_token": token} if token else {})})
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            break
    out: dict[str, Counter[tuple]] = {}
    for run in runs:
        tags = {t["key"]: t.get("value") for t in run["data"].get("tags", [])}
        run_tag = str(tags.get("router.run_id"))
        assert run_tag not in out, f"two MLflow runs for pipeline run {run_tag}"
        points: Counter[tuple] = Counter()
        for key in keys:
            page_token: str | None = None
            while True:
                got = mlflow_api(url, "GET", "metrics/get-history", run_id=run["info"]["run_id"],
                                 metric_key=key, max_results=25000, page_token=page_token)
                for m in got.get("metrics", []):
                    points[(key, int(m.get("step", 0)), int(m["timestamp"]),
                            float(m["value"]))] += 1
                page_token = got.get("next_page_token") or None
                if page_token is None:
                    break
        out[run_tag] = points
    return out


def assert_mlflow_exactly(url: str, experiment: str, emitted: list[Emitted]) -> None:
    """One MLflow run per pipeline run; each (key, step) logged exactly once."""
    by_run = mlflow_points(url, experiment)
    assert set(by_run) == {e.run_id for e in emitted}, sorted(by_run)
    for run_id, points in by_run.items():
        twice = [p for p, n in points.items() if n > 1]
        assert not twice, f"MLflow run {run_id}: points logged twice: {twice[:5]}"
        steps: Counter[tuple[str, int]] = Counter((k, s) for k, s, _t, _v in points)
        again = [k for k, n in steps.items() if n > 1]
        assert not again, f"MLflow run {run_id}: (key, step) logged more than once: {again[:5]}"
        expected = {(k, e.index) for e in emitted if e.run_id == run_id
                    for k in ("accuracy", "loss")}
        assert set(steps) == expected, (
            f"MLflow run {run_id}: missing {sorted(expected - set(steps))[:5]}, "
            f"extra {sorted(set(steps) - expected)[:5]}")


# --- process and HTTP probes ---------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a live process, from /proc (None once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class Sampler(threading.Thread):
    """Calls `probe()` every `every` seconds from a thread; keeps (monotonic time, value)."""

    def __init__(self, probe: Callable[[], Any], every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.probe, self.every = probe, every
        self.samples: list[tuple[float, Any]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            with contextlib.suppress(Exception):
                self.samples.append((time.monotonic(), self.probe()))
            self._halt.wait(self.every)

    def stop(self) -> list[tuple[float, Any]]:
        self._halt.set()
        self.join(10)
        return self.samples


def rate_between(samples: list[tuple[float, int]], start: float, end: float) -> float:
    """Completions per second over [start, end] from cumulative count samples."""
    inside = [(t, n) for t, n in samples if start <= t <= end]
    assert len(inside) >= 2, f"not enough samples in [{start}, {end}]"
    (t0, n0), (t1, n1) = inside[0], inside[-1]
    return (n1 - n0) / (t1 - t0)


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


# --- a small filesystem for the journal -------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[bool]:
    """Mount a tmpfs of `size` at `path` (yields True), or yield False where mounting is
    not allowed (the caller then simulates the quota at the file layer).
    ROUTER_TEST_NO_MOUNT=1 takes the fallback on purpose."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = os.environ.get("ROUTER_TEST_NO_MOUNT") != "1" and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    ).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            for _ in range(50):
                if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.2)
            else:
                subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> int:
    """Write a ballast file until the filesystem says ENOSPC; returns its size."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1024 * 1024, 4096, 512):
            block = b"\0" * chunk
            while True:
                try:
                    written += os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


def wal_checkpoint_truncate(db_path: Path) -> None:
    """Truncate the journal's WAL to zero bytes (as SQLite's own checkpoint would), so the
    next write must grow it: the disk being full is then felt by the very next commit."""
    import sqlite3

    conn = sqlite3.connect(db_path, timeout=60)
    try:
        busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0, "the WAL checkpoint was blocked"
    finally:
        conn.close()


def file_size_quota(pid: int, limit: int | None) -> None:
    """The fallback where no filesystem can be mounted: a quota at the file layer.
    RLIMIT_FSIZE on a running process (prlimit): no file it writes may grow past
    `limit` bytes (EFBIG; Python ignores SIGXFSZ); None lifts it again."""
    import resource

    _soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard if limit is None else limit, hard))


@contextlib.contextmanager
def read_only_dir(path: Path) -> Iterator[None]:
    """A directory read-only even for root: a read-only bind mount, else chattr +i."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)],
                             capture_output=True).returncode == 0
    immutable = not mounted and subprocess.run(
        ["chattr", "+i", str(path)], capture_output=True).returncode == 0
    if not (mounted or immutable):
        pytest.skip("cannot make a directory read-only here (no bind mount, no chattr)")
    try:
        yield
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)


class PipedDaemon(DaemonProcess):
    """`artifact-router run` whose output reaches its log file through a pipe and a
    thread of ours: the daemon itself writes no file for its log, so a file-size quota
    on it (file_size_quota) limits what it stores, not what it says."""

    def __init__(self, workspace: Workspace) -> None:
        import sys

        self.workspace = workspace
        self.log_path = workspace.root / f"daemon-{time.time_ns()}.log"
        self._log = open(self.log_path, "wb", buffering=0)  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "run", "--config", str(workspace.config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=workspace.root,
            env={**os.environ, **workspace.env},
        )
        self._pump = threading.Thread(target=self._copy, daemon=True)
        self._pump.start()

    def _copy(self) -> None:
        assert self.proc.stdout is not None
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
            self._log.write(chunk)

    def _close(self) -> None:
        self._pump.join(10)
        if not self._log.closed:
            self._log.close()

    def terminate(self, timeout: float = 60.0) -> int:
        self.proc.terminate()
        code = self.proc.wait(timeout=timeout)
        self._close()
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._close()


@contextlib.contextmanager
def piped_daemon(workspace: Workspace) -> Iterator[PipedDaemon]:
    daemon = PipedDaemon(workspace)
    try:
        daemon.wait_started()
        yield daemon
    finally:
        daemon.stop()
