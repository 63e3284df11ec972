"""paho's socket reads, served from one large read instead of three or four per packet.

paho reads an MQTT packet as `recv(1)` for its type, `recv(1)` per byte of its
length, then `recv` of the rest, and its `loop_read` takes one packet per call: under
a burst of small PUBLISHes that is three or four system calls, and one event loop
turn, per message, though the socket holds hundreds of them.  `ReadBuffer` stands in
for paho's `_sock_recv` on one connection: it reads up to `CHUNK` bytes at a time and
hands paho the bytes it asks for from there, and its `pending` tells the reader to
go on decoding without waiting for the socket to be readable again (no new bytes
would come to make it so).  paho's packet decoding, and its handling of errors and
of TLS, are unchanged: every read that reaches the socket is paho's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["CHUNK", "ReadBuffer", "install"]

CHUNK = 64 * 1024  # a burst of small manifests: a few hundred messages per read


class ReadBuffer:
    """`recv(n)` for paho, from one `recv(CHUNK)` of the socket at a time.

    `socket_recv` is paho's own `_sock_recv` (so TLS's want-read and a closed socket
    are reported as paho reports them): it raises BlockingIOError when nothing waits,
    and returns b"" at the end of the stream, which reaches paho as such.
    """

    __slots__ = ("_data", "_pos", "_socket_recv", "consumed")

    def __init__(self, socket_recv: Callable[[int], bytes]) -> None:
        self._socket_recv = socket_recv
        self._data = b""
        self._pos = 0
        self.consumed = 0  # bytes handed to paho: the reader's check that it advanced

    def __call__(self, bufsize: int) -> bytes:
        data, pos = self._data, self._pos
        if pos >= len(data):
            if bufsize >= CHUNK:  # the rest of a large payload: straight to paho
                got = self._socket_recv(bufsize)
                self.consumed += len(got)
                return got
            data, pos = self._socket_recv(CHUNK), 0
            if not data:
                return data  # end of stream
            self._data = data
        end = min(pos + bufsize, len(data))
        self._pos = end
        self.consumed += end - pos
        return data[pos:end]

    def pending(self) -> int:
        """Bytes read from the socket that paho has not taken yet."""
        return len(self._data) - self._pos


def install(client: Any) -> ReadBuffer:
    """Give paho `client` a fresh buffer for the socket it just opened (leftovers of
    an earlier connection are never read as this one's)."""
    buffer = ReadBuffer(type(client)._sock_recv.__get__(client))
    client._sock_recv = buffer
    return buffer
