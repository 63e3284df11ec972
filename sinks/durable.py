"""Making many small writes durable at once, for the sinks that write local files.

On Linux `syncfs(2)` flushes one file system in a single call: a batch of files costs
one flush instead of an fsync each (the local store, the jsonl tracker).  But syncfs
also writes back whatever else on that file system is dirty: right after a training
step wrote a 2 GiB checkpoint there, one syncfs took 1.2 s instead of a few ms. So
`flush` uses it only while the system holds little dirty data, and otherwise (and
where there is no syncfs) fsyncs the batch's own files and folders one by one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["HAVE_SYNCFS", "dirty_bytes", "flush", "fsync_paths", "syncfs"]

# Above this much dirty or in-flight page cache, a syncfs may wait on others' writes.
SYNCFS_DIRTY_LIMIT = 256 * 1024 * 1024


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        found: Callable[[int], int] = libc.syncfs
        return found
    except (OSError, AttributeError):
        return None


_SYNCFS = _load_syncfs()
HAVE_SYNCFS = _SYNCFS is not None


def syncfs(path: Path) -> None:
    """Flush the file system holding `path` (data and metadata of every file on it)."""
    assert _SYNCFS is not None, "syncfs is Linux-only: check HAVE_SYNCFS"
    fd = os.open(path, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


def fsync_paths(paths: Iterable[Path]) -> None:
    """fsync each file or directory, where syncfs is not available."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def dirty_bytes() -> int | None:
    """Page cache waiting for or under write-back, system-wide (/proc/meminfo's Dirty
    plus Writeback); None where that is not known."""
    try:
        with open("/proc/meminfo", "rb") as fh:
            text = fh.read()
    except OSError:
        return None
    total, found = 0, 0
    for line in text.splitlines():
        if line.startswith((b"Dirty:", b"Writeback:")):
            total += int(line.split()[1]) * 1024  # "Dirty:   1234 kB"
            found += 1
    return total if found == 2 else None


def flush(root: Path, paths: Iterable[Path]) -> None:
    """Make `paths` (files and folders on the file system of `root`) durable: one
    syncfs while that is cheap, else an fsync each.

    The dirty figure is for the whole system, not `root`'s file system alone: another
    disk's backlog makes this fsync file by file too, which is slower, never unsafe.
    """
    dirty = dirty_bytes() if HAVE_SYNCFS else None
    if dirty is not None and dirty <= SYNCFS_DIRTY_LIMIT:
        syncfs(root)
    else:
        fsync_paths(paths)
