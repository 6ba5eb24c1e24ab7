"""Authorization: scopes (exact and wildcards) per method or for all methods, the method as the
gateway sees it, the per-key IP allowlist on the derived client address, and route environments."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.errors import GatewayError
from gateway.http.exchange import Exchange
from gateway.keys.cache import CachedKey
from gateway.keys.model import KeyRecord
from gateway.metrics import Metrics
from gateway.proxy import ProxyServer
from gateway.stages.authorize import IPAllowStage, grants
from tests.helpers.gateway import RunningGateway
from tests.helpers.upstream import RecordingUpstream

from .conftest import Start
from .support import Conn, bearer, call, new_key, problem


def test_grants() -> None:
    g = frozenset(["orders:read", "billing:*", "a:b:*"])
    assert grants(g, "orders:read")
    assert not grants(g, "orders:write")
    assert not grants(g, "orders")
    assert not grants(g, "orders:read:all")
    assert grants(g, "billing:read")
    assert grants(g, "billing:invoices:read")
    assert not grants(g, "billing")
    assert grants(g, "a:b:c")
    assert not grants(g, "a:c")
    assert grants(frozenset(["*"]), "anything:at:all")
    assert not grants(frozenset(), "orders:read")
    assert not grants(frozenset(["orders:rea*"]), "orders:read")


async def test_scopes_exact_wildcard_and_star(gw: RunningGateway, up: RecordingUpstream) -> None:
    _, exact = await new_key(gw, scopes=["orders:read"])
    _, wild = await new_key(gw, scopes=["orders:*"])
    _, star = await new_key(gw, scopes=["*"])
    _, other = await new_key(gw, scopes=["reports:read", "ordersx:read"])
    _, none = await new_key(gw)
    assert (await call(gw, "GET", "/orders/1", bearer(exact))).status == 200
    doc = problem(await call(gw, "POST", "/orders", bearer(exact), b"{}"), 403, "insufficient_scope")
    assert "orders:write" in doc["detail"]
    for key in (wild, star):
        assert (await call(gw, "GET", "/orders/1", bearer(key))).status == 200
        assert (await call(gw, "POST", "/orders", bearer(key), b"{}")).status == 200
    for key in (other, none):
        doc = problem(await call(gw, "GET", "/orders/1", bearer(key)), 403, "insufficient_scope")
        assert "orders:read" in doc["detail"]
    # plain list: every method needs it
    for method in ("GET", "POST", "DELETE", "PUT"):
        assert (await call(gw, method, "/reports/x", bearer(other), b"x" if method != "GET" else b"")).status == 200
        doc = problem(await call(gw, method, "/reports/x", bearer(exact)), 403, "insufficient_scope")
        assert "reports:read" in doc["detail"]
    # no scopes on the route: any valid key
    assert (await call(gw, "DELETE", "/any/x", bearer(none))).status == 200
    assert [r.method for r in up.requests].count("POST") == 3


async def test_per_method_scopes(gw: RunningGateway, up: RecordingUpstream) -> None:
    _, reader = await new_key(gw, scopes=["orders:read"])
    _, star = await new_key(gw, scopes=["*"])
    conn = await Conn.open(gw.port)
    try:
        r = await conn.request("HEAD", "/orders/1", bearer(reader))
        assert r.status == 200  # HEAD needs GET's scopes
    finally:
        await conn.close()
    assert (await call(gw, "OPTIONS", "/orders/1", bearer(reader))).status == 200
    # a method the route does not list is refused, whatever the key holds
    for method in ("DELETE", "PUT", "PATCH"):
        doc = problem(await call(gw, method, "/orders/1", bearer(star), b"x"), 403, "insufficient_scope")
        assert method in doc["detail"]
    assert [r.method for r in up.requests] == ["HEAD", "OPTIONS"]


async def test_lowercase_method_cannot_bypass_scopes(gw: RunningGateway, up: RecordingUpstream) -> None:
    _, reader = await new_key(gw, scopes=["orders:read"])
    for method in ("post", "Post", "delete", "get"):
        r = await call(gw, method, "/orders/1", bearer(reader), b"{}" if method != "get" else b"")
        assert r.status in (400, 403), (method, r.status)
    assert all(req.method == "GET" for req in up.requests)
    assert not [req for req in up.requests if req.method in ("POST", "DELETE")]


async def test_method_override_is_stripped(gw: RunningGateway, up: RecordingUpstream) -> None:
    _, reader = await new_key(gw, scopes=["orders:read"])
    overrides = [("X-HTTP-Method-Override", "DELETE"), ("X-Method-Override", "DELETE"), ("X-HTTP-Method", "DELETE"),
                 ("x-http-method-override", "POST")]
    assert (await call(gw, "GET", "/orders/1", bearer(reader) + overrides)).status == 200
    req = up.requests[-1]
    assert req.method == "GET"
    names = {n.lower() for n, _ in req.headers}
    assert not names & {b"x-http-method-override", b"x-method-override", b"x-http-method"}
    # the override does not lend POST the scopes of GET either
    problem(await call(gw, "POST", "/orders", [*bearer(reader), ("X-HTTP-Method-Override", "GET")], b"{}"),
            403, "insufficient_scope")
    assert len(up.requests) == 1


async def test_ip_allowlist_ipv4(gw: RunningGateway, up: RecordingUpstream) -> None:
    _, local = await new_key(gw, allow_ips=["127.0.0.0/8"])
    _, single = await new_key(gw, allow_ips=["10.0.0.1", "127.0.0.1/32"])
    _, elsewhere = await new_key(gw, allow_ips=["10.0.0.0/8", "2001:db8::/32"])
    assert (await call(gw, "GET", "/any/x", bearer(local))).status == 200
    assert (await call(gw, "GET", "/any/x", bearer(single))).status == 200
    problem(await call(gw, "GET", "/any/x", bearer(elsewhere)), 403, "ip_not_allowed")
    # an untrusted peer's X-Forwarded-For is not believed
    problem(await call(gw, "GET", "/any/x", [*bearer(elsewhere), ("X-Forwarded-For", "10.1.2.3")]),
            403, "ip_not_allowed")
    assert len(up.requests) == 2


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
async def test_ip_allowlist_ipv6_and_ipv4_mapped(gw: RunningGateway, up: RecordingUpstream) -> None:
    _, v6 = await new_key(gw, allow_ips=["::1/128"])
    _, v4 = await new_key(gw, allow_ips=["127.0.0.1/32"])
    mapped_rec, mapped_entry = await new_key(gw, allow_ips=["::ffff:127.0.0.0/104"])
    assert mapped_rec.allow_ips == ("127.0.0.0/8",)  # stored as IPv4
    # a dual-stack listener: IPv4 clients arrive as ::ffff:127.0.0.1
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", 0))
    sock.listen(64)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    proxy = ProxyServer(gw.services.config, asyncio.get_running_loop(), gw.services)
    await proxy.start(sock=sock)
    try:
        async def get(key: str, host: str) -> int:
            conn = await Conn.open(port, host)
            try:
                r = await conn.request("GET", "/any/x", bearer(key))
                return r.status
            finally:
                await conn.close()

        assert await get(v6, "::1") == 200
        assert await get(v4, "::1") == 403
        assert await get(v4, "127.0.0.1") == 200  # peer ::ffff:127.0.0.1 matched as IPv4
        assert await get(mapped_entry, "127.0.0.1") == 200
        assert await get(v6, "127.0.0.1") == 403
        xff = [r.header("x-forwarded-for") for r in up.requests]
        assert xff == ["::1", "127.0.0.1", "127.0.0.1"]
    finally:
        await proxy.close()


async def test_ip_allowlist_with_trusted_proxies(start: Start, up: RecordingUpstream) -> None:
    gw = await start(trusted_proxies=["127.0.0.1/32"])
    _, office = await new_key(gw, allow_ips=["203.0.113.0/24"])
    _, v6 = await new_key(gw, allow_ips=["2001:db8::/32"])
    _, local = await new_key(gw, allow_ips=["127.0.0.1"])
    xff = [("X-Forwarded-For", "198.51.100.7, 203.0.113.9")]
    assert (await call(gw, "GET", "/any/x", bearer(office) + xff)).status == 200
    assert (await call(gw, "GET", "/any/x", [*bearer(v6), ("X-Forwarded-For", "2001:db8::5")])).status == 200
    assert (await call(gw, "GET", "/any/x", [*bearer(office), ("X-Forwarded-For", "::ffff:203.0.113.4")])).status == 200
    problem(await call(gw, "GET", "/any/x", bearer(local) + xff), 403, "ip_not_allowed")
    problem(await call(gw, "GET", "/any/x", [*bearer(office), ("X-Forwarded-For", "198.51.100.7")]),
            403, "ip_not_allowed")
    # without a forwarded header the peer itself is the client
    assert (await call(gw, "GET", "/any/x", bearer(local))).status == 200
    problem(await call(gw, "GET", "/any/x", bearer(office)), 403, "ip_not_allowed")
    # garbage from the trusted proxy: the client is the last address we could vouch for (the proxy)
    problem(await call(gw, "GET", "/any/x", [*bearer(office), ("X-Forwarded-For", "not-an-ip")]), 403, "ip_not_allowed")
    assert len(up.requests) == 4


def _principal(allow: list[str]) -> CachedKey:
    record = KeyRecord(id="key_x", owner="o", name="", env="live", digest=b"d", pepper_version=1, hint="h",
                       allow_ips=allow)
    return CachedKey(record, 0.0)


@pytest.mark.parametrize(
    ("client", "allow", "ok"),
    [
        ("192.0.2.1", ["192.0.2.0/24"], True),
        ("192.0.2.1", ["192.0.3.0/24"], False),
        ("2001:db8::1", ["2001:db8::/32"], True),
        ("2001:db9::1", ["2001:db8::/32"], False),
        ("::ffff:192.0.2.1", ["192.0.2.0/24"], True),
        ("[2001:db8::1]", ["2001:db8::/32"], True),
        ("192.0.2.1", ["::ffff:192.0.2.0/120"], True),
        ("", ["0.0.0.0/0"], False),
        ("garbage", ["0.0.0.0/0", "::/0"], False),
        ("999.1.1.1", ["0.0.0.0/0"], False),
        ("fe80::1%eth0", ["::/0"], False),
        ("192.0.2.1", ["::/0"], False),  # families never mix
    ],
)
def test_ip_allow_stage(client: str, allow: list[str], ok: bool) -> None:
    from gateway.keys.inputs import check_ips

    stage = IPAllowStage(Metrics())
    ex = Exchange(0.0, 0.0)
    ex.client_ip = client
    ex.principal = _principal(check_ips(allow))
    if ok:
        stage(ex)
    else:
        with pytest.raises(GatewayError) as e:
            stage(ex)
        assert e.value.code == "ip_not_allowed"


async def test_route_env(gw: RunningGateway, up: RecordingUpstream) -> None:
    _, live = await new_key(gw, env="live")
    _, test = await new_key(gw, env="test")
    assert (await call(gw, "GET", "/live/x", bearer(live))).status == 200
    problem(await call(gw, "GET", "/live/x", bearer(test)), 403, "wrong_environment")
    assert (await call(gw, "GET", "/any/x", bearer(test))).status == 200
    assert [r.header("x-consumer-env") for r in up.requests] == ["live", "test"]
