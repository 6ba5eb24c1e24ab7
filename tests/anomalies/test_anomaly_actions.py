"""Anomalies through the proxy: what an event does (metric, log, audit, admin API, CLI) and what the
`suspend` action does to the key, on a SQLite store and a fake clock."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.clock import FakeClock
from gateway.keys.model import AuditEntry
from tests.helpers.configs import write_config
from tests.helpers.gateway import RunningGateway
from tests.helpers.upstream import RecordingUpstream

from .conftest import Start
from .support import (
    ADMIN,
    anomalies_total,
    assert_problem,
    call,
    calls,
    cli,
    config_data,
    eventually,
)

# One window of history is enough here; 5 requests, then more than 2 x 5 (and at least 10) is a spike.
SPIKE = {"factor": 2, "min_requests": 10, "warmup_windows": 1}


async def spike(gw: RunningGateway, key: str, clock: FakeClock) -> None:
    """5 requests in one window, 11 in the next: the 11th is the spike. All of them are served."""
    assert await calls(gw, key, 5) == [200] * 5
    clock.advance(60)
    assert await calls(gw, key, 11) == [200] * 11


async def audited(gw: RunningGateway, action: str, key_id: str | None = None) -> list[AuditEntry]:
    return [e for e in await gw.services.keys.audit(action=action) if key_id is None or e.key_id == key_id]


async def suspended(gw: RunningGateway, key_id: str) -> bool:
    return (await gw.services.keys.get(key_id)).status == "suspended"


async def test_rate_spike_with_suspend_action(start: Start, up: RecordingUpstream, clock: FakeClock,
                                              caplog: pytest.LogCaptureFixture) -> None:
    gw = await start({"rate_spike": {**SPIKE, "action": "suspend"}})
    record, raw = await gw.services.keys.create("acme")
    _, other = await gw.services.keys.create("acme")
    assert "rate_spike" not in anomalies_total(gw)

    await spike(gw, raw, clock)
    [event] = await eventually(lambda: audited(gw, "anomaly"))
    await eventually(lambda: suspended(gw, record.id))

    # the event: audit entry, metric, log line
    assert event.key_id == record.id and event.actor == "detector"
    assert event.change["kind"] == "rate_spike" and event.change["subject"] == record.id
    assert event.change["action"] == "suspend"
    assert event.change["requests"] == 11 and event.change["baseline"] == 5.0
    assert anomalies_total(gw) == {"rate_spike": 1.0}
    warnings = [r for r in caplog.records if r.name.startswith("gateway") and r.levelno == logging.WARNING]
    assert any("rate_spike" in r.getMessage() and "anomaly" in r.getMessage() for r in warnings)
    [suspension] = await audited(gw, "suspend", record.id)
    assert suspension.actor == "detector" and "rate_spike" in str(suspension.change["reason"])

    # the key is refused from then on, and nothing more reaches the upstream
    forwarded = len(up.requests)
    assert forwarded == 16
    for _ in range(3):
        assert_problem(await call(gw, raw), 403, "key_suspended")
    clock.advance(3600)  # past the key cache's TTL and many windows: still suspended
    assert_problem(await call(gw, raw), 403, "key_suspended")
    assert len(up.requests) == forwarded
    # other keys are not affected; refusals of the suspended key are not further anomalies
    assert (await call(gw, other)).status == 200
    assert anomalies_total(gw) == {"rate_spike": 1.0}

    # the admin API lists it
    async with aiohttp.ClientSession(gw.admin_url) as s:
        async with s.get("/admin/anomalies", headers=ADMIN) as r:
            assert r.status == 200
            listed = (await r.json())["anomalies"]
        async with s.get("/admin/anomalies") as r:
            assert r.status == 401
        async with s.get("/admin/anomalies", params={"key_id": "nope"}, headers=ADMIN) as r:
            assert (await r.json())["anomalies"] == []
    assert [(a["action"], a["key_id"], a["change"]["kind"]) for a in listed] == [("anomaly", record.id, "rate_spike")]
    assert listed[0]["actor"] == "detector"


async def test_admin_unsuspend_lifts_the_suspension(start: Start, up: RecordingUpstream, clock: FakeClock) -> None:
    gw = await start({"rate_spike": {**SPIKE, "action": "suspend"}})
    record, raw = await gw.services.keys.create("acme")
    await spike(gw, raw, clock)
    await eventually(lambda: suspended(gw, record.id))
    assert_problem(await call(gw, raw), 403, "key_suspended")

    async with aiohttp.ClientSession(gw.admin_url, headers=ADMIN) as s:
        async with s.get(f"/admin/keys/{record.id}") as r:
            assert (await r.json())["status"] == "suspended"
        async with s.post(f"/admin/keys/{record.id}/unsuspend") as r:
            assert r.status == 200
            assert (await r.json())["status"] == "active"
        async with s.post(f"/admin/keys/{record.id}/unsuspend") as r:
            assert r.status == 409  # not suspended any more
    forwarded = len(up.requests)
    assert await calls(gw, raw, 5) == [200] * 5  # at once: the suspension lifted in this process
    assert len(up.requests) == forwarded + 5
    [lifted] = await audited(gw, "unsuspend", record.id)
    assert lifted.actor == "admin-token"
    # the rest of that window is no second spike; the key goes on working
    clock.advance(60)
    assert await calls(gw, raw, 10) == [200] * 10
    assert anomalies_total(gw) == {"rate_spike": 1.0}


async def test_cli_lists_anomalies_and_unsuspends(start: Start, up: RecordingUpstream, clock: FakeClock,
                                                  db: Path, tmp_path: Path) -> None:
    anomalies = {"rate_spike": {**SPIKE, "action": "suspend"}}
    gw = await start(anomalies)
    config = write_config(tmp_path / "gateway.yaml", config_data(db, up.url, anomalies))
    record, raw = await gw.services.keys.create("acme")
    await spike(gw, raw, clock)
    await eventually(lambda: suspended(gw, record.id))

    listed = await cli(config, "anomalies", "--json")
    assert listed.code == 0, listed.err
    assert [(a["action"], a["key_id"], a["change"]["kind"], a["change"]["action"]) for a in listed.json()] == [
        ("anomaly", record.id, "rate_spike", "suspend")
    ]
    human = await cli(config, "anomalies", "--key", record.id)
    assert human.code == 0, human.err
    assert "rate_spike" in human.out and record.id in human.out
    assert raw not in listed.out + human.out

    lifted = await cli(config, "keys", "unsuspend", record.id, "--json")
    assert lifted.code == 0, lifted.err
    assert lifted.json()["status"] == "active"
    again = await cli(config, "keys", "unsuspend", record.id)
    assert again.code == 1 and "not suspended" in again.err

    # another process lifted it: this one sees it once its cached entry is re-read (keys.cache_ttl)
    clock.advance(31)
    forwarded = len(up.requests)
    assert await calls(gw, raw, 3) == [200] * 3
    assert len(up.requests) == forwarded + 3

    # and `keys suspend` from the CLI: refused here once re-read, too
    made = await cli(config, "keys", "suspend", record.id, "--reason", "checking")
    assert made.code == 0, made.err
    clock.advance(31)
    assert_problem(await call(gw, raw), 403, "key_suspended")


@pytest.mark.parametrize("anomalies", [{"rate_spike": SPIKE}, {"rate_spike": {**SPIKE, "action": "alert"}}],
                         ids=["default", "explicit"])
async def test_alert_action_keeps_the_key_working(start: Start, up: RecordingUpstream, clock: FakeClock,
                                                  anomalies: dict[str, Any],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    gw = await start(anomalies)
    record, raw = await gw.services.keys.create("acme")
    await spike(gw, raw, clock)
    [event] = await eventually(lambda: audited(gw, "anomaly"))
    assert event.change["kind"] == "rate_spike" and event.change["action"] == "alert"
    assert anomalies_total(gw) == {"rate_spike": 1.0}
    assert any(r.levelno == logging.WARNING and "rate_spike" in r.getMessage() for r in caplog.records)

    assert await calls(gw, raw, 30) == [200] * 30
    assert len(up.requests) == 16 + 30
    assert (await gw.services.keys.get(record.id)).status == "active"
    assert await audited(gw, "suspend") == []


async def test_auth_failure_bursts_through_the_proxy(start: Start, up: RecordingUpstream) -> None:
    """Guesses around one key: the key prefix and the client address reach the detector; the
    audit entries name the prefix, never a whole key."""
    gw = await start({"auth_failures": {"per_ip": 5, "per_prefix": 3}})
    _, raw = await gw.services.keys.create("acme")
    guesses = [raw[:-3] + suffix for suffix in ("aaa", "bbb", "ccc", "ddd", "eee", "fff")]
    for guess in guesses:
        assert_problem(await call(gw, guess), 401, "invalid_api_key")
    assert_problem(await call(gw, None), 401, "missing_api_key")
    assert up.requests == []

    events = await eventually(lambda: _two(audited(gw, "anomaly")))
    by_kind = {e.change["kind"]: e for e in events}
    assert set(by_kind) == {"auth_failures_ip", "auth_failures_prefix"}
    ip, prefix = by_kind["auth_failures_ip"], by_kind["auth_failures_prefix"]
    assert ip.change["subject"] == "127.0.0.1" and ip.source_ip == "127.0.0.1" and ip.key_id is None
    assert ip.change["failures"] == 6
    subject = str(prefix.change["subject"])
    assert raw.startswith(subject) and 8 < len(subject) < len(raw) // 2 and prefix.key_id is None
    assert prefix.change["failures"] == 4
    for e in events:
        assert not any(g in str(e.change) for g in [raw, *guesses])
    assert anomalies_total(gw) == {"auth_failures_ip": 1.0, "auth_failures_prefix": 1.0}


async def _two(entries: Any) -> list[AuditEntry] | None:
    got: list[AuditEntry] = await entries
    return got if len(got) >= 2 else None


async def test_scope_refusals_through_the_proxy_with_suspend(start: Start, up: RecordingUpstream) -> None:
    gw = await start({"scope_refusals": {"threshold": 3, "action": "suspend"}})
    record, raw = await gw.services.keys.create("acme", scopes=["reports:read"])
    for _ in range(4):
        assert_problem(await call(gw, raw, "/orders/1"), 403, "insufficient_scope")
    [event] = await eventually(lambda: audited(gw, "anomaly"))
    assert event.key_id == record.id and event.change["kind"] == "scope_refusals"
    assert event.change["refusals"] == 4
    await eventually(lambda: suspended(gw, record.id))
    assert_problem(await call(gw, raw, "/api/x"), 403, "key_suspended")
    assert up.requests == []


async def test_disabled_detection_records_nothing(start: Start, up: RecordingUpstream, clock: FakeClock) -> None:
    gw = await start({"enabled": False, "rate_spike": {**SPIKE, "action": "suspend"}})
    assert gw.services.anomalies is None
    _, raw = await gw.services.keys.create("acme")
    await spike(gw, raw, clock)
    assert await calls(gw, raw, 20) == [200] * 20
    assert await gw.services.keys.audit(action="anomaly") == []
    assert anomalies_total(gw) == {}
