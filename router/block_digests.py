"""MD5s of a large file's fixed-size blocks, taken on an idle core while intake hashes it.

An S3 multipart upload sends every part with its Content-MD5. During the upload those
MD5s are CPU the router competes for with the server on the same cores, while intake's
sha256 of the same file, just before, leaves a core idle. A companion thread at the
lowest CPU priority hashes the file's blocks meanwhile, so that the store finds the MD5s
of the first parts already taken and only reads them.

Digests are kept only for a file with a settled identity (see
`router.intake.settled_identity`). A store uses them only while the file's stat is
still that identity, and the server checks every part's bytes against them anyway.
Sizes are asked for by the stores that can use them (`want`), so nothing runs for a
router without one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence

from router.delivery import FileIdentity

__all__ = ["BlockDigester", "forget", "lookup", "unwant", "want", "wanted"]

# Below this size a file is hashed too fast for a companion to get far (and a store
# sends it in one request anyway).
COMPANION_MIN_BYTES = 64 * 1024 * 1024
_READ = 1024 * 1024
_KEPT = 64  # files whose digests are kept; each is at most 10,000 x 16 bytes per size

# (block size, from file size, to file size): how many stores look such digests up
_wanted: Counter[tuple[int, int, int]] = Counter()
_kept: OrderedDict[tuple[FileIdentity, int], list[bytes]] = OrderedDict()
_lock = threading.Lock()


def want(block_size: int, from_size: int = 0, to_size: int = 2**63) -> None:
    """A store will look up digests of this block size for files of `from_size` to
    `to_size` bytes (S3: from its multipart threshold to the largest file its part size
    fits in 10,000 parts), until `unwant`."""
    with _lock:
        _wanted[(block_size, from_size, to_size)] += 1


def unwant(block_size: int, from_size: int = 0, to_size: int = 2**63) -> None:
    key = (block_size, from_size, to_size)
    with _lock:
        _wanted[key] -= 1
        if _wanted[key] <= 0:
            del _wanted[key]


def wanted(size: int) -> tuple[int, ...]:
    """The block sizes some store would look up for a file of `size` bytes."""
    with _lock:
        return tuple(sorted({block for block, least, most in _wanted
                             if least <= size <= most}))


def lookup(identity: FileIdentity, block_size: int) -> Sequence[bytes]:
    """The MD5s of the file's first blocks taken so far (a live list: it may still
    grow for a moment after intake), or none."""
    with _lock:
        return _kept.get((identity, block_size), ())


def forget(identity: FileIdentity, block_size: int) -> None:
    """Drop digests an upload could not use, so that a retry takes its own."""
    with _lock:
        _kept.pop((identity, block_size), None)


class BlockDigester:
    """Hashes `fd`'s blocks of every wanted size, from the start, until `stop`.

    It reads with its own duplicate of the fd (the caller may close its own) and at the
    lowest priority, so that it only takes CPU nothing else wants.
    """

    def __init__(self, fd: int, size: int, block_sizes: Sequence[int]) -> None:
        self._fd = os.dup(fd)
        self._size = size
        self.digests: dict[int, list[bytes]] = {block: [] for block in block_sizes}
        self._stopped = threading.Event()
        try:
            threading.Thread(target=self._run, name="router-block-md5", daemon=True).start()
        except RuntimeError:
            os.close(self._fd)
            raise

    @classmethod
    def for_file(cls, fd: int, size: int) -> BlockDigester | None:
        """A companion for intake's hash of `fd`, if a store wants one; never an error:
        without a companion (no fd or thread to spare) the store hashes the parts."""
        if size < COMPANION_MIN_BYTES or not (sizes := wanted(size)):
            return None
        try:
            return cls(fd, size, sizes)
        except (OSError, RuntimeError):  # EMFILE; "can't start new thread"
            return None

    def stop(self, identity: FileIdentity | None) -> None:
        """Stop after the current read; keep what was taken if `identity` is settled."""
        self._stopped.set()
        if identity is None:
            return
        with _lock:
            for block, digests in self.digests.items():
                _kept[(identity, block)] = digests
                _kept.move_to_end((identity, block))
            while len(_kept) > _KEPT:
                _kept.popitem(last=False)

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: a thread's own nice
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            self._hash_blocks()
        except OSError:
            pass  # the intake's own read reports what is wrong with the file
        finally:
            os.close(self._fd)

    def _hash_blocks(self) -> None:
        buffer = memoryview(bytearray(_READ))
        states = {block: hashlib.md5(usedforsecurity=False) for block in self.digests}
        offset = 0
        while offset < self._size and not self._stopped.is_set():
            # A read stops at the next boundary of every block size, so never straddles one.
            length = min(_READ, self._size - offset, *(b - offset % b for b in states))
            n = os.preadv(self._fd, [buffer[:length]], offset)
            if n <= 0:
                return
            chunk, end = buffer[:n], offset + n
            for block, state in states.items():
                state.update(chunk)
                if end % block == 0 or end == self._size:
                    self.digests[block].append(state.digest())
                    states[block] = hashlib.md5(usedforsecurity=False)
            offset = end
