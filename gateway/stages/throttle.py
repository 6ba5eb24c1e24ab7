"""Brute-force throttle: too many failed authentications from one client IP → 429 for a cool-down.

Keyed on the client IP as derived from `trusted_proxies`, so a rotating spoofed X-Forwarded-For
from an untrusted peer changes nothing. State is an LRU of at most `max_tracked` addresses.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from gateway.clock import Clock
from gateway.config.schema import AuthThrottleConfig
from gateway.errors import GatewayError


class AuthThrottle:
    def __init__(self, cfg: AuthThrottleConfig, clock: Clock) -> None:
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
        state = self.state
        entry = state.get(ip)
        if entry is None or now - entry[0] >= self.window:
            entry = [now, 0.0, entry[2] if entry else 0.0]
            state[ip] = entry
            if len(state) > self.max_tracked:
                state.popitem(last=False)
        state.move_to_end(ip)
        entry[1] += 1
        if entry[1] > self.max_failures:
            entry[2] = now + self.cooldown
