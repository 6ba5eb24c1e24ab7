"""`memory://` under `gateway run --workers N`: the supervisor holds the counters, the workers ask it.

Each worker used to keep counters of its own, so a key admitted N times its limits across N workers:
the kernel spreads a client's connections over them (SO_REUSEPORT). Now the supervisor runs the one
MemoryLimiter, and each worker reaches it over a Unix socket pair made before the fork. As with
Redis, every hit of one event-loop tick goes in one frame, and the supervisor answers each frame
with one. A worker whose supervisor does not answer within `ratelimit.timeout` applies
`ratelimit.on_backend_error`, its share being the limit ÷ the number of workers.

Frames, both ways: a 4-byte sequence number, a 4-byte length, then a marshal body. A request is a
list of (counters, cost). The counters are the marshal of (storage keys, ((name, count, period), ...)),
encoded once for each Counters object. A reply is a list with one item per hit:
[allowed, remaining, reset, retry, remaining, reset, retry, ...].
Both ends are this gateway's own processes (a pair made before the fork, never a listening socket);
marshal, not pickle, because the bodies are plain data and marshal calls no constructor.
"""

from __future__ import annotations

import asyncio
import marshal
import socket
import struct
from dataclasses import dataclass

from gateway.ratelimit.base import LATE, Counters, Limiter, LimiterUnavailable
from gateway.ratelimit.memory import MemoryLimiter
from gateway.ratelimit.policy import Decision, Limit, Outcome

_HEAD = struct.Struct("!II")
MAX_FRAME = 64 * 1024 * 1024  # bytes: a length beyond it means the stream is out of step
MAX_DECODED = 100_000  # counters whose decoded form the supervisor keeps; then it starts again

# One queued hit: counters, cost and the caller's future.
Entry = tuple[Counters, int, "asyncio.Future[Decision]"]


@dataclass(frozen=True)
class WorkerLink:
    """What a worker gets from the supervisor: its end of the socket pair, and how many workers share."""

    sock: socket.socket
    workers: int


class _Frames(asyncio.Protocol):
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


# --- the worker's end ------------------------------------------------------------------------------


class _WorkerEnd(_Frames):
    def __init__(self, limiter: SharedLimiter) -> None:
        super().__init__()
        self.limiter = limiter

    def on_frame(self, seq: int, body: bytes) -> None:
        self.limiter._answered(seq, body)

    def on_lost(self) -> None:
        self.limiter._lost()


class SharedLimiter(Limiter):
    """A worker's limiter: the hits of one tick go to the supervisor in one frame."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self._queue: list[Entry] = []
        self._flush_scheduled = False
        self._end: _WorkerEnd | None = None
        self._connecting = False
        self._pending: dict[int, tuple[list[Entry], asyncio.TimerHandle]] = {}
        self._seq = 0
        self._closed = False
        self.frames = 0

    def hit(self, counters: Counters, cost: int = 1) -> asyncio.Future[Decision]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Decision] = loop.create_future()
        if self._closed or (self._end is not None and self._end.lost):
            fut.set_exception(LimiterUnavailable("supervisor: not reachable"))
            return fut
        self._queue.append((counters, cost, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._queue:
            return
        end = self._end
        if end is None:
            if not self._connecting:  # the queue goes out once connected
                self._connecting = True
                asyncio.get_running_loop().create_task(self._connect())
            return
        batch, self._queue = self._queue, []
        if end.lost:
            _fail(batch, LimiterUnavailable("supervisor: not reachable"))
            return
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        body = marshal.dumps([(c.encoded or _encode(c), cost) for c, cost, _ in batch])
        end.send(seq, body)
        self.frames += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        self._pending[seq] = (batch, loop.call_at(deadline, self._expired, seq, deadline, True))

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, end = await loop.create_unix_connection(lambda: _WorkerEnd(self), sock=self.sock)
        except OSError as e:
            self._closed = True
            queued, self._queue = self._queue, []
            _fail(queued, LimiterUnavailable(f"supervisor: {type(e).__name__}"))
            return
        finally:
            self._connecting = False
        self._end = end
        self._flush()

    def _expired(self, seq: int, deadline: float, first: bool) -> None:
        loop = asyncio.get_running_loop()
        entry = self._pending.get(seq)
        if entry is None:
            return
        if first and loop.time() - deadline > LATE:
            # This loop woke late: the answer may be waiting unread. One more timeout from now.
            self._pending[seq] = (entry[0], loop.call_later(self.timeout, self._expired, seq, deadline, False))
            return
        del self._pending[seq]
        # The supervisor may still decide these hits and answer: that answer is dropped (as a slow
        # Redis's is), and the failure policy decides them now.
        _fail(entry[0], LimiterUnavailable("supervisor: timeout"))

    def _answered(self, seq: int, body: bytes) -> None:
        entry = self._pending.pop(seq, None)
        if entry is None:
            return  # answered after its timeout
        batch, timer = entry
        timer.cancel()
        try:
            replies = marshal.loads(body)  # noqa: S302 - from our own supervisor, over a socket pair
        except (ValueError, EOFError, TypeError):
            _fail(batch, LimiterUnavailable("supervisor: unreadable answer"))
            return
        for (counters, _, fut), reply in zip(batch, replies, strict=False):
            if fut.done():
                continue  # the caller went away
            try:
                outcomes = []
                i = 1
                for limit in counters.limits:
                    outcomes.append(Outcome(limit, reply[i], reply[i + 1], reply[i + 2]))
                    i += 3
                fut.set_result(Decision(bool(reply[0]), outcomes))
            except (TypeError, IndexError):  # never a hang
                fut.set_exception(LimiterUnavailable("supervisor: unexpected answer"))
        _fail(batch[len(replies) :], LimiterUnavailable("supervisor: answer too short"))

    def _lost(self) -> None:
        pending, self._pending = self._pending, {}
        for batch, timer in pending.values():
            timer.cancel()
            _fail(batch, LimiterUnavailable("supervisor: not reachable"))
        queued, self._queue = self._queue, []
        _fail(queued, LimiterUnavailable("supervisor: not reachable"))

    async def close(self) -> None:
        self._closed = True
        if self._end is not None and self._end.transport is not None:
            self._end.transport.close()
        else:
            self.sock.close()
        self._lost()


def _encode(counters: Counters) -> bytes:
    blob = marshal.dumps((counters.keys, tuple((lim.name, lim.count, lim.period) for lim in counters.limits)))
    counters.encoded = blob
    return blob


def _fail(entries: list[Entry], err: LimiterUnavailable) -> None:
    for _, _, fut in entries:
        if not fut.done():
            fut.set_exception(err)


# --- the supervisor's end --------------------------------------------------------------------------


class _HostEnd(_Frames):
    def __init__(self, host: LimiterHost) -> None:
        super().__init__()
        self.host = host

    def on_frame(self, seq: int, body: bytes) -> None:
        try:
            reply = self.host.answer(body)
        except (ValueError, EOFError, TypeError):
            self.abort()  # not a frame of ours: the worker's calls fail over to its policy
            return
        self.send(seq, reply)


class LimiterHost:
    """The supervisor's end: one MemoryLimiter deciding for every worker."""

    def __init__(self, limiter: MemoryLimiter) -> None:
        self.limiter = limiter
        self._counters: dict[bytes, Counters] = {}
        self._limits: dict[tuple[str, int, int], Limit] = {}
        self._ends: list[_HostEnd] = []

    async def serve(self, sock: socket.socket) -> None:
        """Answer the worker at the other end of `sock` until it closes."""
        loop = asyncio.get_running_loop()
        _, end = await loop.create_unix_connection(lambda: _HostEnd(self), sock=sock)
        self._ends.append(end)

    def answer(self, body: bytes) -> bytes:
        hit, decoded = self.limiter.hit, self._counters
        out = []
        for blob, cost in marshal.loads(body):  # noqa: S302 - from our own worker, over a socket pair
            counters = decoded.get(blob)
            if counters is None:
                counters = self._decode(blob)
            d = hit(counters, cost)
            flat: list[object] = [d.allowed]
            for o in d.outcomes:
                flat += (o.remaining, o.reset, o.retry_after)
            out.append(flat)
        return marshal.dumps(out)

    def _decode(self, blob: bytes) -> Counters:
        keys, specs = marshal.loads(blob)  # noqa: S302 - from our own worker
        limits = []
        for spec in specs:
            limit = self._limits.get(spec)
            if limit is None:
                if len(self._limits) >= MAX_DECODED:
                    self._limits.clear()
                name, count, period = spec
                limit = self._limits[spec] = Limit(name, count, period)
            limits.append(limit)
        if len(keys) != len(limits) or not all(type(k) is str for k in keys):
            raise ValueError("counters and limits do not match")
        counters = Counters(tuple(keys), tuple(limits))
        if len(self._counters) >= MAX_DECODED:
            self._counters.clear()
        self._counters[blob] = counters
        return counters

    def close(self) -> None:
        for end in self._ends:
            if end.transport is not None:
                end.transport.close()
        self._ends.clear()
