"""Anomaly detection over the requests a process serves, with an injected clock and bounded state.

Kinds (each with its threshold in `anomalies.*`):
- `rate_spike`: a key's requests in a window far above its own EWMA baseline of earlier windows;
- `new_network`: a request from a network (/24, /48) new to a key whose set of networks was stable;
- `shared_key`: one key seen from more than N addresses in a window;
- `auth_failures_ip` / `auth_failures_prefix`: bursts of failed authentications from one address,
  or with keys sharing a prefix (someone trying variations of one key);
- `scope_refusals`: bursts of insufficient-scope refusals for one key.
Each event is reported once per kind, subject and window to `on_event`, which records it.

Thresholds are exceeded, not reached: `max_addresses: 50` allows 50 addresses, the 51st is the
event; likewise `per_ip`, `per_prefix` and `scope_refusals.threshold`. Windows are aligned on the
clock (`time // window`).

Rate spikes. A key's baseline is an EWMA (weight `alpha` for the newest window) of its requests per
window; its first window seeds it, so steady traffic has a baseline of its own level rather than one
climbing from zero. A window is a spike once its count is at least `min_requests` and more than
`factor` x the baseline, provided `warmup_windows` windows have closed before it. Empty windows close
into the baseline as zeros, so it decays while the key is idle: after a short gap (fewer empty windows
than `warmup_windows`) the key is judged against the decayed baseline. After a longer gap the history
is stale: judging against a baseline decayed towards zero would flag every key coming back at its
usual volume (an hourly job, a quiet night), so the key warms up again, seeded by its first window
back. A dormant key's reuse from somewhere new is what `new_network` reports.

New networks. An address belongs to its /`prefix_v4` or /`prefix_v6` network (an IPv4-mapped IPv6
address counts as IPv4). A key's set is stable when it gained no network for `stable_after`; the
first network of a key is never new, and after an event the set must be stable again before the
next one. A key's first request in this process starts the clock.

State: keys, failing addresses and failing prefixes are each kept in an LRU of `max_tracked`
entries (least recently seen forgotten first; a forgotten key warms up again); per key at most
`max_addresses` + 1 addresses per window and `max_networks` networks.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.clock import Clock
from gateway.config.anomalies import AnomaliesConfig
from gateway.http.exchange import Exchange

AUTH_FAILURES = frozenset(["invalid_api_key", "expired_api_key", "multiple_api_keys"])


class Detector(Protocol):
    """What telemetry hands each finished exchange to: the detector here, or a worker's way to the one
    in the limits process (ratelimit/shared.py)."""

    def observe(self, ex: Exchange) -> None: ...


@dataclass(slots=True)
class Anomaly:
    kind: str
    key_id: str | None
    subject: str  # the key id, address or key prefix the event is about
    detail: dict[str, object]
    at: float
    action: str = "alert"


@dataclass(slots=True)
class _KeyState:
    window: int = -1
    count: int = 0
    baseline: float = 0.0
    windows_seen: int = 0
    spiked: bool = False
    # A dict used as a set: a dict holding only strings is not tracked by the garbage collector, a
    # set always is, and a full collection walks every key's state (bench `keys_100k`).
    addresses: dict[str, None] = field(default_factory=dict)
    shared: bool = False
    scope_refusals: int = 0
    scope_alerted: bool = False
    networks: dict[str, float] = field(default_factory=dict)
    first_seen: float = 0.0
    last_new_network: float = 0.0


@dataclass(slots=True)
class _Tally:
    window: int = -1
    count: int = 0
    alerted: bool = False

    def add(self, window: int) -> int:
        if window != self.window:
            self.window, self.count, self.alerted = window, 0, False
        self.count += 1
        return self.count


def _network(ip: str, v4: int, v6: int) -> str:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 6 and addr.ipv4_mapped is not None:  # ::ffff:a.b.c.d from a dual-stack listener
        addr = addr.ipv4_mapped
    bits = v4 if addr.version == 4 else v6
    return str(ipaddress.ip_network((addr, bits), strict=False))


class AnomalyDetector:
    def __init__(self, cfg: AnomaliesConfig, clock: Clock, on_event: Callable[[Anomaly], None]) -> None:
        self.cfg = cfg
        self.clock = clock
        self.on_event = on_event
        self.keys: OrderedDict[str, _KeyState] = OrderedDict()
        self.ips: OrderedDict[str, _Tally] = OrderedDict()
        self.prefixes: OrderedDict[str, _Tally] = OrderedDict()
        self.window = cfg.window
        self._net_of: dict[str, str] = {}

    def observe(self, ex: Exchange) -> None:
        """Called once per finished exchange; O(1) in the common case. (observe_fields, inlined: this
        runs for every request of a single-process gateway.)"""
        now = self.clock.time()
        window = int(now // self.window)
        p = ex.principal
        code = ex.error_code
        if p is not None:
            self._key(p.record.id, ex.client_ip, code, now, window)
        elif code in AUTH_FAILURES:
            self._auth_failure(ex.client_ip, ex.key_prefix, now, window)

    def observe_fields(self, key_id: str | None, ip: str, code: str | None, prefix: str) -> None:
        """One exchange as plain data (what a worker of `--workers N` sends the limits process)."""
        now = self.clock.time()
        window = int(now // self.window)
        if key_id is not None:
            self._key(key_id, ip, code, now, window)
        elif code in AUTH_FAILURES:
            self._auth_failure(ip, prefix, now, window)

    # --- per key -------------------------------------------------------------------------------
    def _state(self, key_id: str, now: float) -> _KeyState:
        keys = self.keys
        st = keys.get(key_id)
        if st is None:
            st = keys[key_id] = _KeyState(first_seen=now, last_new_network=now)
            if len(keys) > self.cfg.max_tracked:
                keys.popitem(last=False)
        else:
            keys.move_to_end(key_id)
        return st

    def _key(self, key_id: str, ip: str, code: str | None, now: float, window: int) -> None:
        cfg = self.cfg
        st = self._state(key_id, now)
        if window != st.window:
            self._roll(st, window)
        st.count += 1
        spike = cfg.rate_spike
        if (
            not st.spiked
            and st.windows_seen >= spike.warmup_windows
            and st.count >= spike.min_requests
            and st.count > spike.factor * max(st.baseline, 1.0)
        ):
            st.spiked = True
            self._emit("rate_spike", key_id, key_id, {"requests": st.count, "baseline": round(st.baseline, 2)}, now,
                       spike.action)
        if not st.shared and ip not in st.addresses:
            st.addresses[ip] = None
            if len(st.addresses) > cfg.shared_key.max_addresses:
                st.shared = True
                self._emit("shared_key", key_id, key_id, {"addresses": len(st.addresses)}, now, cfg.shared_key.action)
        self._networks(st, key_id, ip, now)
        if code == "insufficient_scope":
            st.scope_refusals += 1
            if not st.scope_alerted and st.scope_refusals > cfg.scope_refusals.threshold:
                st.scope_alerted = True
                self._emit("scope_refusals", key_id, key_id, {"refusals": st.scope_refusals}, now,
                           cfg.scope_refusals.action)

    def _roll(self, st: _KeyState, window: int) -> None:
        """Close the windows since the last request: each one, empty or not, updates the baseline."""
        spike = self.cfg.rate_spike
        alpha = spike.alpha
        if st.window >= 0:
            missed = max(window - st.window - 1, 0)
            if st.windows_seen == 0:
                st.baseline = float(st.count)  # the first window seeds the average: no ramp up from 0
            else:
                st.baseline = alpha * st.count + (1 - alpha) * st.baseline
            st.windows_seen += 1
            if missed >= spike.warmup_windows:
                st.baseline, st.windows_seen = 0.0, 0  # stale after so long idle: warm up again
            elif missed:
                st.baseline *= (1 - alpha) ** missed
                st.windows_seen += missed
        st.window = window
        st.count = 0
        st.spiked = st.shared = st.scope_alerted = False
        st.addresses.clear()
        st.scope_refusals = 0

    def _networks(self, st: _KeyState, key_id: str, ip: str, now: float) -> None:
        cfg = self.cfg.new_network
        net = self._net_of.get(ip)
        if net is None:
            # Parsing an address costs microseconds; clients repeat theirs.
            if len(self._net_of) >= self.cfg.max_tracked:
                self._net_of.clear()
            net = self._net_of[ip] = _network(ip, cfg.prefix_v4, cfg.prefix_v6)
        nets = st.networks
        if net in nets:
            nets[net] = now
            return
        stable = bool(nets) and now - st.last_new_network >= cfg.stable_after
        if len(nets) >= cfg.max_networks:
            oldest = min(nets, key=nets.__getitem__)
            del nets[oldest]
        nets[net] = now
        st.last_new_network = now
        if stable:
            self._emit("new_network", key_id, key_id, {"network": net, "known": len(nets) - 1}, now, cfg.action)

    # --- authentication failures ---------------------------------------------------------------
    def _auth_failure(self, ip: str, prefix: str, now: float, window: int) -> None:
        cfg = self.cfg.auth_failures
        tally = _bounded(self.ips, ip, self.cfg.max_tracked)
        if tally.add(window) > cfg.per_ip and not tally.alerted:
            tally.alerted = True
            self._emit("auth_failures_ip", None, ip, {"failures": tally.count}, now, "alert")
        if prefix:
            tally = _bounded(self.prefixes, prefix, self.cfg.max_tracked)
            if tally.add(window) > cfg.per_prefix and not tally.alerted:
                tally.alerted = True
                self._emit("auth_failures_prefix", None, prefix, {"failures": tally.count}, now, "alert")

    def _emit(self, kind: str, key_id: str | None, subject: str, detail: dict[str, object], now: float, action: str) -> None:
        self.on_event(Anomaly(kind, key_id, subject, detail, now, action))


def _bounded(table: OrderedDict[str, _Tally], name: str, cap: int) -> _Tally:
    tally = table.get(name)
    if tally is None:
        tally = table[name] = _Tally()
        if len(table) > cap:
            table.popitem(last=False)
    else:
        table.move_to_end(name)
    return tally
