"""router.block_digests: the MD5s of a large file's blocks, taken beside intake's sha256."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from router import block_digests
from router.block_digests import BlockDigester
from router.delivery import FileIdentity
from router.intake import sha256_file

MiB = 1024 * 1024


def block_md5s(path: Path, block: int) -> list[bytes]:
    data = path.read_bytes()
    return [hashlib.md5(data[i:i + block]).digest() for i in range(0, len(data), block)]


def settled_file(path: Path, size: int) -> Path:
    """Random bytes, written long enough ago for intake to trust the file's stat."""
    path.write_bytes(os.urandom(size))
    while time.time_ns() - path.stat().st_ctime_ns < 100_000_000:
        time.sleep(0.02)
    return path


def wait_for(digests: list[bytes], count: int) -> None:
    deadline = time.monotonic() + 30
    while len(digests) < count:
        assert time.monotonic() < deadline, f"{len(digests)} of {count} blocks hashed"
        time.sleep(0.01)


@pytest.fixture
def want() -> Iterator[Callable[..., None]]:
    """block_digests.want, given back after the test."""
    asked: list[tuple[int, ...]] = []

    def asking(*sizes: int) -> None:
        block_digests.want(*sizes)
        asked.append(sizes)

    yield asking
    for sizes in asked:
        block_digests.unwant(*sizes)


def test_blocks_of_every_wanted_size_are_hashed_whatever_their_alignment(
    tmp_path: Path,
) -> None:
    """Part sizes need not be whole MiB: reads stop at each size's block boundaries."""
    path = settled_file(tmp_path / "model.bin", 7 * MiB + 12345)
    odd, even = 3 * MiB // 2 + 7, 2 * MiB
    fd = os.open(path, os.O_RDONLY)
    try:
        digester = BlockDigester(fd, path.stat().st_size, (odd, even))
    finally:
        os.close(fd)  # it reads through a duplicate of its own

    wait_for(digester.digests[odd], len(block_md5s(path, odd)))
    wait_for(digester.digests[even], len(block_md5s(path, even)))
    assert digester.digests[odd] == block_md5s(path, odd)
    assert digester.digests[even] == block_md5s(path, even)


def test_intake_keeps_the_digests_it_took_under_the_files_identity(
    tmp_path: Path, want: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(block_digests, "COMPANION_MIN_BYTES", MiB)
    path = settled_file(tmp_path / "model.bin", 48 * MiB + 5)
    want(5 * MiB)

    hashed = sha256_file(path)

    assert hashed.identity is not None
    taken = block_digests.lookup(hashed.identity, 5 * MiB)
    assert isinstance(taken, list), "kept, however far the companion got"
    time.sleep(0.1)  # it finishes the block under way, or gives it up
    assert list(taken) == block_md5s(path, 5 * MiB)[:len(taken)]
    assert block_digests.lookup(hashed.identity, 8 * MiB) == (), "only wanted sizes"


def test_nothing_is_hashed_or_kept_unless_a_store_wants_it_and_the_file_settled(
    tmp_path: Path, want: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(block_digests, "COMPANION_MIN_BYTES", MiB)
    path = settled_file(tmp_path / "model.bin", 4 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert BlockDigester.for_file(fd, 4 * MiB) is None, "no store wants digests"
        want(MiB, 3 * MiB, 5 * MiB)
        assert BlockDigester.for_file(fd, MiB - 1) is None, "too small to gain anything"
        assert BlockDigester.for_file(fd, 3 * MiB - 1) is None, "the store puts it whole"
        assert BlockDigester.for_file(fd, 5 * MiB + 1) is None, "its parts grow past MiB"
        digester = BlockDigester.for_file(fd, 4 * MiB)
    finally:
        os.close(fd)
    assert digester is not None
    wait_for(digester.digests[MiB], 4)

    digester.stop(None)  # no settled identity: a later write might not show in the stat

    assert block_digests.lookup(FileIdentity.of(path.stat()), MiB) == ()


def test_intake_hashes_without_a_companion_when_none_can_start(
    tmp_path: Path, want: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of file descriptors or threads, the companion is skipped, never the file."""
    monkeypatch.setattr(block_digests, "COMPANION_MIN_BYTES", MiB)
    path = settled_file(tmp_path / "model.bin", 3 * MiB)
    want(MiB)

    def no_fds(fd: int) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(block_digests.os, "dup", no_fds)
    hashed = sha256_file(path)

    assert hashed.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert hashed.identity is not None
    assert block_digests.lookup(hashed.identity, MiB) == ()
