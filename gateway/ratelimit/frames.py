"""The frames between a worker and the limits process (`shared.py`, `host.py`), over a socket pair.

Frames, both ways: a 4-byte sequence number, a 4-byte length, then a marshal body. A request is a
list of (counters, cost). The counters are the marshal of (storage keys, ((name, count, period), ...)),
encoded once for each Counters object. A reply is a list with one item per hit:
[allowed, remaining, reset, retry, remaining, reset, retry, ...]. Sequence number 0 is a notice, not a
request, and is not answered. From a worker: (client addresses that failed to authenticate, finished
exchanges as (key id or None, client address, error code, key prefix)). From the limits process:
((address, cooled down until in epoch seconds), ...) for every worker, and the anomalies the
receiving worker's exchanges set off, as (kind, key id, subject, detail, at, action), for it to record.
"""

from __future__ import annotations

import asyncio
import struct

_HEAD = struct.Struct("!II")
MAX_FRAME = 64 * 1024 * 1024  # bytes: a length beyond it means the stream is out of step
NOTICE = 0  # the sequence number of a frame that answers nothing: failures, or cool-downs


class Frames(asyncio.Protocol):
    """Cuts a stream into (sequence number, body) frames for `on_frame`; `on_lost` when it ends."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= _HEAD.size:
            seq, size = _HEAD.unpack_from(buf)
            if size > MAX_FRAME:
                self.abort()
                return
            end = _HEAD.size + size
            if len(buf) < end:
                return
            body = bytes(buf[_HEAD.size : end])
            del buf[:end]
            self.on_frame(seq, body)

    def send(self, seq: int, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(_HEAD.pack(seq, len(body)) + body)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.on_lost()

    def on_frame(self, seq: int, body: bytes) -> None:
        raise NotImplementedError

    def on_lost(self) -> None:
        return None
