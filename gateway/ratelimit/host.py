"""The other end of `shared.py`: one MemoryLimiter deciding for every worker, and one brute-force
throttle counting every worker's failed authentications, in a process of their own.

The supervisor forks it before the workers. Not the supervisor's own event loop: that one also serves
the admin API, and an answer such as the list of 100,000 keys held it for a third of a second (its
JSON is encoded in one C call, which keeps the GIL), past every worker's `ratelimit.timeout`. The
process ignores SIGTERM and SIGINT, so it keeps answering while the workers drain, and exits once
every worker's end has closed.
"""

from __future__ import annotations

import asyncio
import gc
import marshal
import signal
import socket

from gateway.anomalies import Anomaly, AnomalyDetector
from gateway.clock import Clock
from gateway.config.anomalies import AnomaliesConfig
from gateway.config.schema import GatewayConfig
from gateway.ratelimit.base import Counters
from gateway.ratelimit.frames import NOTICE, Frames
from gateway.ratelimit.memory import MemoryLimiter
from gateway.ratelimit.policy import Limit
from gateway.stages.throttle import AuthThrottle

MAX_DECODED = 100_000  # counters whose decoded form the limits process keeps; then it starts again


class _HostEnd(Frames):
    def __init__(self, host: LimiterHost) -> None:
        super().__init__()
        self.host = host

    def on_lost(self) -> None:
        self.host.lost(self)

    def on_frame(self, seq: int, body: bytes) -> None:
        try:
            if seq == NOTICE:
                self.host.notice(self, body)
                return
            reply = self.host.answer(body)
        except (ValueError, EOFError, TypeError):
            self.abort()  # not a frame of ours: the worker's calls fail over to its policy
            return
        self.send(seq, reply)


class LimiterHost:
    """The limits process's end: one MemoryLimiter deciding for every worker, one throttle counting."""

    def __init__(
        self, limiter: MemoryLimiter, throttle: AuthThrottle, anomalies: AnomaliesConfig | None = None
    ) -> None:
        self.limiter = limiter
        self.throttle = throttle
        self._events: list[tuple[object, ...]] = []
        self.detector = AnomalyDetector(anomalies, throttle.clock, self._event) if anomalies is not None else None
        self._counters: dict[bytes, Counters] = {}
        self._limits: dict[tuple[str, int, int], Limit] = {}
        self._ends: list[_HostEnd] = []
        self._open = 0
        self.all_closed = asyncio.Event()

    async def serve(self, sock: socket.socket) -> None:
        """Answer the worker at the other end of `sock` until it closes."""
        loop = asyncio.get_running_loop()
        _, end = await loop.create_unix_connection(lambda: _HostEnd(self), sock=sock)
        self._ends.append(end)
        self._open += 1

    def lost(self, end: _HostEnd) -> None:
        self._open -= 1
        if self._open <= 0:
            self.all_closed.set()

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

    def notice(self, end: _HostEnd, body: bytes) -> None:
        """A worker's failed authentications and finished exchanges: every worker hears of each address
        now cooling down, and the reporting worker of each anomaly its exchanges set off, to record it."""
        failures, seen = marshal.loads(body)  # noqa: S302 - from our own worker, over a socket pair
        throttle = self.throttle
        blocks = []
        for ip in failures:
            if type(ip) is not str:
                raise TypeError("not an address")
            before = throttle.blocked_until(ip)
            throttle.fail(ip)
            until = throttle.blocked_until(ip)
            if until > before:
                blocks.append((ip, until))
        if blocks:
            everyone = marshal.dumps((blocks, []))
            for e in self._ends:
                if not e.lost:
                    e.send(NOTICE, everyone)
        if seen and self.detector is not None:
            events = self._events = []
            observe = self.detector.observe_fields
            for key_id, ip, code, prefix in seen:
                observe(key_id, ip, code, prefix)
            if events and not end.lost:
                end.send(NOTICE, marshal.dumps(([], events)))

    def _event(self, a: Anomaly) -> None:
        self._events.append((a.kind, a.key_id, a.subject, a.detail, a.at, a.action))

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


def serve_limits(cfg: GatewayConfig, socks: list[socket.socket]) -> int:
    """The limits process: answer the workers until the last of them has gone."""
    from gateway.app import install_uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    install_uvloop()
    return asyncio.run(_serve(cfg, socks))


async def _serve(cfg: GatewayConfig, socks: list[socket.socket]) -> int:
    clock = Clock()
    host = LimiterHost(
        MemoryLimiter(clock), AuthThrottle(cfg.auth, clock), cfg.anomalies if cfg.anomalies.enabled else None
    )
    for sock in socks:
        await host.serve(sock)
    gc.freeze()  # what start-up made is never garbage: full collections walk only the counters
    await host.all_closed.wait()
    return 0
