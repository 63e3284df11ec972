"""One writer per key at a time within a sink, and listings that know they are stale.

Two deliveries that render to the same key can run at once (two items of one batch,
two batches, two events). Each store checks whether the key is taken and then writes;
without this, both can find it free and the second silently replaces the first. Holding
a key's claim from the check to the write makes the second wait, then find the first's
object (a no-op if it is the same content, else the usual conflict). This covers one
process; other processes are covered by the server's conditional writes where it has
them (S3 If-None-Match, GCS ifGenerationMatch=0).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

__all__ = ["KeyClaims"]


class KeyClaims:
    """Keys being written by one sink, and the keys written since each listing began."""

    def __init__(self) -> None:
        self._busy: dict[str, asyncio.Event] = {}
        self._watches: list[set[str]] = []

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Be the only writer of `key` in this sink until the block ends."""
        while (busy := self._busy.get(key)) is not None:
            await busy.wait()
        done = self._busy[key] = asyncio.Event()
        try:
            yield
        finally:
            del self._busy[key]
            for written in self._watches:
                written.add(key)
            done.set()

    @contextlib.contextmanager
    def watch(self) -> Iterator[set[str]]:
        """The keys whose claim was released while the block runs (a write may have
        landed): a listing taken inside the block can no longer vouch for them."""
        written: set[str] = set()
        self._watches.append(written)
        try:
            yield written
        finally:
            self._watches = [w for w in self._watches if w is not written]
