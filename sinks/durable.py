"""Making many small writes durable at once, for the sinks that write local files.

On Linux `syncfs(2)` flushes one file system in a single call: a batch of files costs
one flush instead of an fsync each (the local store, the jsonl tracker).  Elsewhere
`HAVE_SYNCFS` is false and callers fsync file by file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["HAVE_SYNCFS", "fsync_paths", "syncfs"]


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
