"""AnomalyDetector on its own: a fake clock, hand-built exchanges, every kind and its threshold.

Windows are aligned: the fake clock starts on a window boundary, so `at(w, s)` is `s` seconds into
window `w`. Each test builds the detector with the thresholds it exercises and collects the events.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from typing import Any

import pytest

from gateway.anomalies import Anomaly, AnomalyDetector
from gateway.clock import FakeClock
from gateway.config.anomalies import AnomaliesConfig
from gateway.http.exchange import Exchange
from gateway.keys.cache import CachedKey
from gateway.keys.model import KeyRecord

WINDOW = 60.0
START = 1_800_000_000.0  # a multiple of WINDOW


class Harness:
    def __init__(self, **cfg: Any) -> None:
        self.cfg = AnomaliesConfig.model_validate({"window": f"{WINDOW:g}s", **cfg})
        self.clock = FakeClock(START)
        self.events: list[Anomaly] = []
        self.detector = AnomalyDetector(self.cfg, self.clock, self.events.append)
        self._keys: dict[str, CachedKey] = {}

    def at(self, window: int, second: float = 0.0) -> Harness:
        assert 0 <= second < WINDOW
        self.clock.t = START + window * WINDOW + second
        return self

    def principal(self, key_id: str) -> CachedKey:
        entry = self._keys.get(key_id)
        if entry is None:
            record = KeyRecord(id=key_id, owner="acme", name="", env="live", digest=b"d" * 32,
                               pepper_version=1, hint="sk_live_…abcd")
            entry = self._keys[key_id] = CachedKey(record, self.clock.time())
        return entry

    def request(self, key: str | None = "k1", ip: str = "10.0.0.1", code: str = "", prefix: str = "",
                n: int = 1) -> None:
        """`n` finished exchanges at the clock's current time."""
        for _ in range(n):
            ex = Exchange(self.clock.time(), 0.0)
            ex.principal = self.principal(key) if key is not None else None
            ex.client_ip = ip
            ex.error_code = code
            ex.key_prefix = prefix
            ex.status = 403 if code else 200
            self.detector.observe(ex)

    def window_of(self, window: int, count: int, key: str = "k1", ips: list[str] | None = None) -> None:
        """`count` requests spread evenly over window `window`, cycling through `ips`."""
        ips = ips or ["10.0.0.1"]
        for i in range(count):
            self.at(window, WINDOW * i / count)
            self.request(key, ips[i % len(ips)])

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def of(self, kind: str) -> list[Anomaly]:
        return [e for e in self.events if e.kind == kind]


# --- no false alarm --------------------------------------------------------------------------------

ADDRESSES = ["10.1.2.3", "10.1.2.4", "10.1.2.5", "192.0.2.10", "192.0.2.11"]  # 5 addresses, 2 networks

SENSITIVE: dict[str, Any] = {
    "rate_spike": {"factor": 1.5, "min_requests": 50, "warmup_windows": 3},
    "shared_key": {"max_addresses": 5},
    "new_network": {"stable_after": "2m"},
    "auth_failures": {"per_ip": 5, "per_prefix": 5},
    "scope_refusals": {"threshold": 5},
}


@pytest.mark.parametrize("cfg", [{}, SENSITIVE], ids=["defaults", "sensitive"])
def test_steady_traffic_raises_no_alarm(cfg: dict[str, Any]) -> None:
    """10 windows of ~200 requests (±10 %) from 5 addresses in 2 networks, with the usual noise:
    a few scope refusals and a few mistyped keys per window. Nothing of it is an anomaly."""
    h = Harness(**cfg)
    rng = random.Random(5)
    for w in range(10):
        count = rng.randint(180, 220)
        for i in range(count):
            h.at(w, WINDOW * i / count)
            ip = ADDRESSES[rng.randrange(len(ADDRESSES))]
            code = "insufficient_scope" if i % 50 == 7 else ""
            h.request("k1", ip, code=code)
            h.request("k2", ADDRESSES[i % 2], n=1 if i % 3 else 0)  # a second, quieter key
        for j in range(3):
            h.request(None, ADDRESSES[j], code="invalid_api_key", prefix=f"sk_live_{w}{j}aaaaaaaa")
    assert h.events == []
    # with the same traffic, the detector did judge: every window after warm-up was eligible
    assert h.detector.keys["k1"].windows_seen == 9


# --- rate_spike ------------------------------------------------------------------------------------

SPIKE_CFG: dict[str, Any] = {"factor": 3, "min_requests": 10, "warmup_windows": 3, "alpha": 0.5}
SPIKE: dict[str, Any] = {"rate_spike": SPIKE_CFG}


def warmed(count: int = 20, windows: int = 3, **cfg: Any) -> Harness:
    h = Harness(**{**SPIKE, **cfg})
    for w in range(windows):
        h.window_of(w, count)
    return h


def test_rate_spike_fires_once_per_window_and_key() -> None:
    h = warmed(20)
    h.at(3, 1)
    h.request(n=60)  # 3 x the baseline of 20: not above it
    assert h.events == []
    h.request()
    assert h.kinds() == ["rate_spike"]
    e = h.events[0]
    assert (e.key_id, e.subject, e.action) == ("k1", "k1", "alert")
    assert e.detail == {"requests": 61, "baseline": 20.0}
    assert e.at == h.clock.time()
    h.request(n=500)
    assert len(h.events) == 1, "one event per window, however far above"
    # the next window is judged afresh, against the baseline that now includes the spike
    h.at(4, 1)
    h.request(n=1000)
    assert h.kinds() == ["rate_spike", "rate_spike"]
    assert h.events[1].detail["baseline"] == pytest.approx(0.5 * 561 + 0.5 * 20, abs=0.01)


def test_rate_spike_is_per_key() -> None:
    h = Harness(**SPIKE)
    for w in range(3):
        h.window_of(w, 20, key="a")
        h.window_of(w, 200, key="b")
    h.at(3, 1)
    h.request("a", n=100)  # 5 x a's baseline
    h.request("b", n=100)  # half of b's
    assert [(e.kind, e.subject) for e in h.events] == [("rate_spike", "a")]


def test_no_rate_spike_during_warmup() -> None:
    h = Harness(**SPIKE)
    h.at(0, 1)
    h.request(n=1000)  # a brand-new key's first window has nothing to compare with
    h.window_of(1, 5)
    h.window_of(2, 1000)  # two windows of history: still warming up
    assert h.events == []
    h.window_of(3, 1000)  # three windows seen: now judged (baseline ~ 0.5·1000 + 0.25·5 + 0.25·1000)
    assert h.events == []
    h.at(4, 1)
    h.request(n=5000)
    assert h.kinds() == ["rate_spike"]


def test_rate_spike_needs_min_requests() -> None:
    h = warmed(2, rate_spike={**SPIKE_CFG, "min_requests": 50})
    h.at(3, 1)
    h.request(n=49)  # 24 x the baseline, but a small window is never a spike
    assert h.events == []
    h.request()
    assert h.kinds() == ["rate_spike"] and h.events[0].detail["requests"] == 50


def test_rate_spike_needs_factor_times_the_baseline() -> None:
    """The first window seeds the baseline: after steady warm-up windows of 100 it *is* 100, so a
    window needs more than factor x 100 requests, not more than factor x a fraction of it."""
    h = warmed(100)
    h.at(3, 1)
    h.request(n=300)
    assert h.events == []
    h.request()
    assert h.kinds() == ["rate_spike"] and h.events[0].detail == {"requests": 301, "baseline": 100.0}


def test_baseline_follows_ewma() -> None:
    h = Harness(**SPIKE)
    for w, count in enumerate([40, 80, 20, 60]):
        h.window_of(w, count)
    h.at(4, 1)
    h.request()  # closes window 3
    expected = 40.0
    for count in (80, 20, 60):
        expected = 0.5 * count + 0.5 * expected
    assert h.detector.keys["k1"].baseline == pytest.approx(expected)
    assert h.detector.keys["k1"].windows_seen == 4


def test_baseline_decays_over_empty_windows() -> None:
    """Each empty window closes into the baseline as a zero: after two idle windows the baseline of
    40 is 40 · 0.5² = 10, and a window of 31 (under the undecayed threshold of 120) is a spike."""
    h = warmed(40, windows=4)
    h.at(6, 1)  # windows 4 and 5 were empty
    h.request(n=30)
    assert h.events == []
    h.request()
    assert h.kinds() == ["rate_spike"]
    assert h.events[0].detail == {"requests": 31, "baseline": 10.0}


def test_key_back_from_a_long_idle_warms_up_again() -> None:
    """Idle for warmup_windows windows or more, a key's history is stale: it is not judged against
    its decayed baseline (that would flag every key back from a quiet night at its usual volume),
    but warms up again, seeded by its first window back, and is then judged as before."""
    h = warmed(40, windows=4)
    h.window_of(30, 40)  # 25 idle windows, then the usual amount
    h.at(31, 1)
    h.request(n=200)  # even a burst right after: still warming up
    assert h.events == []
    h.window_of(32, 40)
    h.window_of(33, 40)
    h.at(34, 1)
    h.request()
    st = h.detector.keys["k1"]
    assert st.windows_seen == 4
    assert st.baseline == pytest.approx(60.0)  # 40 seeds; then 200, 40, 40 with alpha 0.5
    h.request(n=179)  # 180 = 3 x 60
    assert h.events == []
    h.request()
    assert h.kinds() == ["rate_spike"] and h.events[0].detail == {"requests": 181, "baseline": 60.0}


@pytest.mark.parametrize(("idle", "baseline"), [(1, 20.0), (2, 10.0), (3, None), (1000, None)])
def test_idle_gap_decays_or_restarts(idle: int, baseline: float | None) -> None:
    """Fewer empty windows than warmup_windows (3): judged against the decayed baseline.
    As many or more: warming up again, so even a large first window back is not judged."""
    h = warmed(40, windows=4)
    h.at(4 + idle, 1)
    if baseline is None:
        h.request(n=1000)
        assert h.events == []
        assert h.detector.keys["k1"].windows_seen == 0
        return
    h.request(n=int(3 * baseline))
    assert h.events == []
    h.request()
    assert h.kinds() == ["rate_spike"] and h.events[0].detail["baseline"] == baseline


def test_rate_spike_action_comes_from_config() -> None:
    h = warmed(20, rate_spike={**SPIKE_CFG, "action": "suspend"})
    h.at(3, 1)
    h.request(n=100)
    assert [(e.kind, e.action) for e in h.events] == [("rate_spike", "suspend")]


# --- new_network -----------------------------------------------------------------------------------

NET = {"new_network": {"stable_after": "1h"}}


def test_new_network_after_a_stable_set() -> None:
    h = Harness(**NET)
    h.at(0, 1)
    h.request(ip="10.0.0.1")
    h.request(ip="10.0.1.1")
    for w in range(1, 70):  # an hour and more from the same two /24s, other hosts in them too
        h.at(w, 5)
        h.request(ip=f"10.0.0.{w}")
        h.request(ip=f"10.0.1.{255 - w}")
    assert h.events == []
    h.at(70, 5)
    h.request(ip="203.0.113.5")
    assert h.kinds() == ["new_network"]
    e = h.events[0]
    assert (e.key_id, e.subject) == ("k1", "k1")
    assert e.detail == {"network": "203.0.113.0/24", "known": 2}
    # a second new network straight after: the set is no longer stable, no second event
    h.request(ip="198.51.100.1")
    h.at(71, 5)
    h.request(ip="198.51.101.1")
    assert len(h.events) == 1
    # known networks stay known
    h.at(72, 5)
    h.request(ip="203.0.113.200")
    assert len(h.events) == 1
    # stable again for stable_after: the next new network is an event again
    h.at(72 + 61, 5)
    h.request(ip="172.16.0.1")
    assert h.kinds() == ["new_network", "new_network"]


def test_no_new_network_while_the_set_is_still_growing() -> None:
    h = Harness(**NET)
    for i in range(20):  # a new /24 every 30 minutes: never stable for an hour
        h.clock.t = START + i * 1800
        h.request(ip=f"10.0.{i}.1")
    assert h.events == []


def test_first_network_of_a_key_is_not_new() -> None:
    h = Harness(**NET)
    h.at(0, 1)
    h.request("fresh", ip="203.0.113.9")
    h.at(500, 1)
    h.request("other", ip="198.51.100.9")
    assert h.events == []


def test_ipv6_networks_use_prefix_v6() -> None:
    h = Harness(**NET)
    h.at(0, 1)
    h.request(ip="2001:db8:1:2::1")
    h.at(100, 1)
    h.request(ip="2001:db8:1:ffff:1234::9")  # same /48
    assert h.events == []
    h.request(ip="2001:db8:2::1")
    assert [e.detail["network"] for e in h.events] == ["2001:db8:2::/48"]


def test_prefix_v6_and_prefix_v4_are_configurable() -> None:
    h = Harness(new_network={"stable_after": "1h", "prefix_v6": 64, "prefix_v4": 16})
    h.at(0, 1)
    h.request(ip="2001:db8:1:2::1")
    h.request(ip="10.7.0.1")
    h.at(100, 1)
    h.request(ip="10.7.200.1")  # same /16
    assert h.events == []
    h.request(ip="2001:db8:1:3::1")  # same /48, another /64
    assert [e.detail["network"] for e in h.events] == ["2001:db8:1:3::/64"]


def test_ipv4_mapped_addresses_are_ipv4_networks() -> None:
    """A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d: those are IPv4 /24s, not all
    one IPv6 /48."""
    h = Harness(**NET)
    h.at(0, 1)
    h.request(ip="::ffff:10.0.0.1")
    h.at(100, 1)
    h.request(ip="::ffff:10.0.0.77")
    h.request(ip="10.0.0.78")
    assert h.events == []
    h.request(ip="::ffff:192.0.2.1")
    assert [e.detail["network"] for e in h.events] == ["192.0.2.0/24"]


# --- shared_key ------------------------------------------------------------------------------------

def test_shared_key_above_max_addresses_in_one_window() -> None:
    h = Harness(shared_key={"max_addresses": 5})
    h.at(0, 1)
    for i in range(5):
        h.request(ip=f"10.0.0.{i}", n=3)
    h.request("other", ip="10.9.9.9")
    assert h.events == []
    h.request(ip="10.0.0.5")
    assert h.kinds() == ["shared_key"]
    assert h.events[0].detail == {"addresses": 6} and h.events[0].subject == "k1"
    for i in range(6, 40):
        h.request(ip=f"10.0.0.{i}")
    assert len(h.events) == 1
    # addresses are counted per window: five new ones in the next window are fine…
    h.at(1, 1)
    for i in range(100, 105):
        h.request(ip=f"10.0.0.{i}")
    assert len(h.events) == 1
    # …a sixth is the next window's event
    h.request(ip="10.0.0.1")
    assert h.kinds() == ["shared_key", "shared_key"]


# --- auth failures ---------------------------------------------------------------------------------

AUTH = {"auth_failures": {"per_ip": 5, "per_prefix": 3}}


def test_auth_failures_per_ip() -> None:
    h = Harness(**AUTH)
    h.at(0, 1)
    codes = ["invalid_api_key", "expired_api_key", "multiple_api_keys", "invalid_api_key", "invalid_api_key"]
    for i, code in enumerate(codes):
        h.request(None, "198.51.100.7", code=code, prefix=f"sk_live_{i:010d}")
    h.request(None, "198.51.100.7", code="missing_api_key", n=100)  # no key presented: not a failure
    h.request(None, "198.51.100.8", code="invalid_api_key", n=5)
    assert h.events == []
    h.request(None, "198.51.100.7", code="invalid_api_key", prefix="sk_live_x")
    assert h.kinds() == ["auth_failures_ip"]
    e = h.events[0]
    assert (e.key_id, e.subject, e.action, e.detail) == (None, "198.51.100.7", "alert", {"failures": 6})
    h.request(None, "198.51.100.7", code="invalid_api_key", n=50)
    assert len(h.events) == 1
    h.at(1, 1)
    h.request(None, "198.51.100.7", code="invalid_api_key", n=5)
    assert len(h.events) == 1
    h.request(None, "198.51.100.7", code="invalid_api_key")
    assert h.kinds() == ["auth_failures_ip", "auth_failures_ip"]


def test_auth_failures_per_key_prefix() -> None:
    h = Harness(**AUTH)
    h.at(0, 1)
    prefix = "sk_live_AbCdEfGhIj"
    for i in range(3):  # guesses around one key, each from another address
        h.request(None, f"203.0.113.{i}", code="invalid_api_key", prefix=prefix)
    h.request(None, "203.0.113.50", code="invalid_api_key", prefix="sk_live_ZZZZZZZZZZ", n=3)
    h.request(None, "203.0.113.60", code="invalid_api_key", n=5)  # no prefix (no key): per IP only
    assert h.events == []
    h.request(None, "203.0.113.9", code="invalid_api_key", prefix=prefix)
    assert [(e.kind, e.subject, e.key_id) for e in h.events] == [("auth_failures_prefix", prefix, None)]
    assert h.events[0].detail == {"failures": 4}
    h.request(None, "203.0.113.10", code="invalid_api_key", prefix=prefix, n=10)
    assert len(h.of("auth_failures_prefix")) == 1
    h.at(1, 1)
    h.request(None, "203.0.113.11", code="invalid_api_key", prefix=prefix, n=4)
    assert len(h.of("auth_failures_prefix")) == 2


def test_authenticated_requests_are_not_auth_failures() -> None:
    h = Harness(**AUTH)
    h.at(0, 1)
    h.request("k1", "198.51.100.7", code="rate_limited", prefix="sk_live_AbCdEfGhIj", n=50)
    h.request(None, "198.51.100.7", code="key_suspended", prefix="sk_live_AbCdEfGhIj", n=50)
    assert h.events == []


# --- scope_refusals --------------------------------------------------------------------------------

def test_scope_refusals_per_key_and_window() -> None:
    h = Harness(scope_refusals={"threshold": 3})
    h.at(0, 1)
    h.request(code="insufficient_scope", n=3)
    h.request(code="rate_limited", n=20)
    h.request("other", code="insufficient_scope", n=3)
    assert h.events == []
    h.request(code="insufficient_scope")
    assert [(e.kind, e.subject, e.detail) for e in h.events] == [("scope_refusals", "k1", {"refusals": 4})]
    h.request(code="insufficient_scope", n=20)
    assert len(h.events) == 1
    h.at(1, 1)
    h.request(code="insufficient_scope", n=3)
    assert len(h.events) == 1
    h.request(code="insufficient_scope")
    assert h.kinds() == ["scope_refusals", "scope_refusals"]


def test_scope_refusal_action_comes_from_config() -> None:
    h = Harness(scope_refusals={"threshold": 1, "action": "suspend"})
    h.at(0, 1)
    h.request(code="insufficient_scope", n=2)
    assert [(e.kind, e.action, e.key_id) for e in h.events] == [("scope_refusals", "suspend", "k1")]


# --- bounded state ---------------------------------------------------------------------------------

def _watch(h: Harness, check: Callable[[], None]) -> None:
    """Run `check` after every observation."""
    original = h.detector.observe

    def observe(ex: Exchange) -> None:
        original(ex)
        check()

    h.detector.observe = observe  # type: ignore[method-assign]


def test_state_is_bounded_under_ten_times_more_subjects() -> None:
    cap = 100
    h = Harness(max_tracked=cap, shared_key={"max_addresses": 10}, new_network={"max_networks": 8})
    d = h.detector
    peak = {"keys": 0, "ips": 0, "prefixes": 0, "addresses": 0, "networks": 0}

    def check() -> None:
        peak["keys"] = max(peak["keys"], len(d.keys))
        peak["ips"] = max(peak["ips"], len(d.ips))
        peak["prefixes"] = max(peak["prefixes"], len(d.prefixes))
        for st in d.keys.values():
            peak["addresses"] = max(peak["addresses"], len(st.addresses))
            peak["networks"] = max(peak["networks"], len(st.networks))

    _watch(h, check)
    for w in range(3):
        for i in range(10 * cap):
            h.at(w, i * WINDOW / (10 * cap))
            h.request(f"key-{i}", ip=f"10.{i // 256}.{i % 256}.1")
            h.request(None, ip=f"172.16.{i // 256}.{i % 256}", code="invalid_api_key", prefix=f"sk_live_{i:010d}")
            h.request("hot", ip=str(ipaddress.ip_address("2001:db8::") + (i << 80)))  # a new /48 each time
            if i % 10 == 0:
                h.request("steady", ip="192.0.2.1")
    assert peak["keys"] == cap and peak["ips"] == cap and peak["prefixes"] == cap
    assert peak["addresses"] <= 11  # max_addresses + the one that made it a shared key
    assert peak["networks"] <= 8
    # least recently seen forgotten first: a key in regular use is still tracked, with its history
    assert "steady" in d.keys and "hot" in d.keys
    assert d.keys["steady"].windows_seen == 2
    assert "key-0" not in d.keys
