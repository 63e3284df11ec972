"""Reading accepted files for upload, shared by the object stores.

Files are hashed and read in worker threads, in chunks or into caller-owned buffers,
never whole (except small ones, below a size the caller picks); bodies are sent from
those buffers without copies. A file whose bytes no longer match what intake
journaled raises FileChanged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from router.delivery import StagedFile
from sinks.base import PermanentError, TransientError

__all__ = [
    "HASH_CHUNK",
    "BufferReader",
    "Checksum",
    "FileChanged",
    "FileDigests",
    "MiB",
    "accepted_size",
    "hash_file",
    "read_into",
    "read_small",
    "verified_checksum",
    "verified_digests",
]

MiB = 1024 * 1024
HASH_CHUNK = MiB


class FileChanged(Exception):
    """The file on disk no longer matches what intake journaled (size or sha256)."""


@dataclass
class FileDigests:
    md5: bytes
    sha256: str
    size: int

    @property
    def md5_b64(self) -> str:
        """As HTTP carries it (Content-MD5, GCS md5Hash)."""
        return base64.b64encode(self.md5).decode("ascii")


async def accepted_size(path: Path, staged: StagedFile, uri: str) -> int:
    """The size of an accepted file about to be uploaded to `uri`, checked against the
    size intake journaled: a file gone or edited since cannot be delivered as accepted
    (permanent); one that cannot be read now may be readable later (transient)."""
    try:
        size = (await asyncio.to_thread(os.stat, path)).st_size
    except FileNotFoundError as exc:
        raise PermanentError(f"{path} no longer exists; it cannot be uploaded to {uri}") from exc
    except OSError as exc:
        raise TransientError(f"cannot read {path}: {exc.strerror}") from exc
    if size != staged.size:
        raise PermanentError(
            f"{path} changed after it was accepted (now {size} bytes, journaled "
            f"{staged.size}); emit a new bundle instead of editing an accepted one"
        )
    return size


def hash_file(path: Path) -> FileDigests:
    md5 = hashlib.md5(usedforsecurity=False)
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            md5.update(chunk)
            sha.update(chunk)
            size += len(chunk)
    return FileDigests(md5.digest(), sha.hexdigest(), size)


class Checksum(Protocol):
    """hashlib's interface, which google_crc32c.Checksum shares."""

    def update(self, data: bytes, /) -> object: ...
    def digest(self) -> bytes: ...


ChecksumT = TypeVar("ChecksumT", bound=Checksum)


def verified_checksum(path: Path, staged: StagedFile, checksum: ChecksumT) -> ChecksumT:
    """`checksum` fed the bytes of `path`, once they are known to be the file journaled
    as `staged` (else FileChanged): by its identity where the intake recorded one and
    the stat matches it before and after the read, else by its sha256, taken again here.
    The server then checks what it receives against that checksum."""
    size = 0
    with open(path, "rb") as fh:
        identity = staged.identity
        trusted = identity is not None and identity.matches(os.fstat(fh.fileno()))
        sha = None if trusted else hashlib.sha256()
        while chunk := fh.read(HASH_CHUNK):
            checksum.update(chunk)
            if sha is not None:
                sha.update(chunk)
            size += len(chunk)
        if identity is not None and trusted and not identity.matches(os.fstat(fh.fileno())):
            raise FileChanged("its size or times changed while it was read")
    sha256 = staged.sha256 if sha is None else sha.hexdigest()
    if sha256 != staged.sha256 or size != staged.size:
        raise FileChanged(f"sha256 now {sha256[:12]}..., journaled {staged.sha256[:12]}...")
    return checksum


def verified_digests(path: Path, staged: StagedFile) -> FileDigests:
    """The MD5 to upload `path` with (see verified_checksum)."""
    md5 = verified_checksum(path, staged, hashlib.md5(usedforsecurity=False))
    return FileDigests(md5.digest(), staged.sha256, staged.size)


def read_small(path: Path, limit: int) -> tuple[bytes, FileDigests]:
    """Read and hash a file of at most `limit` bytes in one go (one thread hop).

    A longer file is read to `limit + 1` bytes, so its size shows it has changed.
    """
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    md5 = hashlib.md5(data, usedforsecurity=False).digest()
    return data, FileDigests(md5, hashlib.sha256(data).hexdigest(), len(data))


def read_into(fd: int, offset: int, view: memoryview) -> None:
    """Fill `view` with the file's bytes from `offset` (in a worker thread)."""
    got = 0
    while got < len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[got:]], offset + got)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, min(len(view) - got, HASH_CHUNK), offset + got)
            n = len(data)
            view[got : got + n] = data
        if n == 0:
            raise FileChanged(f"file ended at byte {offset + got}, expected {offset + len(view)}")
        got += n


class BufferReader:
    """A read-only, seekable file over bytes already in memory (a part, a chunk).

    It is also an async iterable, which aiohttp sends as is: 1 MiB slices written
    straight from the buffer, with no worker-thread hop per 64 KiB as for a file
    object and no copy of the whole part (a BytesIO is copied when aiohttp takes its
    buffer; a bytes body is copied into the transport's buffer). botocore uses the
    file methods to rewind it for a retry.
    """

    piece = MiB

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def __len__(self) -> int:
        return len(self._view)

    @property
    def view(self) -> memoryview:
        """The whole buffer, whatever has been read of it."""
        return self._view

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, min(len(self._view), base + offset))
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        total = len(self._view)
        end = total if size is None or size < 0 else min(total, self._pos + size)
        chunk = bytes(self._view[self._pos : end])
        self._pos = end
        return chunk

    async def __aiter__(self) -> AsyncIterator[memoryview]:
        while self._pos < len(self._view):
            end = min(len(self._view), self._pos + self.piece)
            piece = self._view[self._pos : end]
            self._pos = end
            yield piece

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self._view.release()
