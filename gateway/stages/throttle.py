"""Brute-force throttle: too many failed authentications from one client IP → 429 for a cool-down.

Keyed on the client IP as derived from `trusted_proxies`, so a rotating spoofed X-Forwarded-For
from an untrusted peer changes nothing. State is an LRU of at most `max_tracked` addresses.

Under `gateway run --workers N` each worker also reports its failures to the limits process, which
counts them for all workers and tells every worker when an address is to cool down (`block`):
the kernel spreads a client's connections over the workers, which otherwise gave it N times the
failures.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from gateway.clock import Clock
from gateway.config.schema import AuthThrottleConfig
from gateway.errors import GatewayError


class AuthThrottle:
    def __init__(self, cfg: AuthThrottleConfig, clock: Clock, report: Callable[[str], None] | None = None) -> None:
        self.report = report  # a worker's way to the limits process's count
        self.max_failures = cfg.max_failures
        self.window = cfg.window
        self.cooldown = cfg.cooldown
        self.max_tracked = cfg.max_tracked
        self.clock = clock
        # ip -> [window start, failures in it, blocked until]
        self.state: OrderedDict[str, list[float]] = OrderedDict()

    def check(self, ip: str) -> None:
        """Raise 429 while the IP is cooling down."""
        entry = self.state.get(ip)
        if entry is None:
            return
        wait = entry[2] - self.clock.time()
        if wait > 0:
            raise GatewayError(
                "rate_limited",
                "too many failed authentications from your address; wait before trying again",
                [(b"Retry-After", str(math.ceil(wait)).encode())],
            )

    def fail(self, ip: str) -> None:
        now = self.clock.time()
        entry = self.state.get(ip)
        if entry is None or now - entry[0] >= self.window:
            entry = [now, 0.0, entry[2] if entry else 0.0]
            self._put(ip, entry)
        self.state.move_to_end(ip)
        entry[1] += 1
        if entry[1] > self.max_failures:
            entry[2] = max(entry[2], now + self.cooldown)
        if self.report is not None:
            self.report(ip)

    def blocked_until(self, ip: str) -> float:
        entry = self.state.get(ip)
        return entry[2] if entry is not None else 0.0

    def block(self, ip: str, until: float) -> None:
        """Cool the address down until `until` (epoch seconds): the limits process's count said so."""
        entry = self.state.get(ip)
        if entry is None:
            entry = [-math.inf, 0.0, 0.0]  # no window of failures seen here yet
            self._put(ip, entry)
        self.state.move_to_end(ip)
        entry[2] = max(entry[2], until)

    def _put(self, ip: str, entry: list[float]) -> None:
        self.state[ip] = entry
        if len(self.state) > self.max_tracked:
            self.state.popitem(last=False)
