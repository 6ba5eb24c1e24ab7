"""CORS per route, answered by the gateway (no key, nothing upstream); aiohttp-cors on the admin listener."""

from __future__ import annotations

import json

import aiohttp
import pytest

from tests.e2e.support import GatewayProcess, Launcher, Server

TIMEOUT = aiohttp.ClientTimeout(total=10)
APP = "https://app.example"


@pytest.fixture(scope="module")
def env(module_launch: Launcher) -> tuple[GatewayProcess, Server]:
    up = module_launch.server()
    cors = {
        "origins": [APP, "https://other.example"],
        "methods": ["GET", "POST", "DELETE"],
        "headers": ["authorization", "content-type", "x-api-key"],
        "expose_headers": ["x-request-id"],
        "credentials": True,
        "max_age": "10m",
    }
    gw = module_launch.gateway(
        [
            {"name": "secure", "path": "/secure", "upstream": up.url, "auth": "required", "cors": cors},
            {"name": "open", "path": "/open", "upstream": up.url, "auth": "none", "cors": cors},
            {"name": "public", "path": "/public", "upstream": up.url, "auth": "none", "cors": {"origins": ["*"]}},
            {"name": "nocors", "path": "/nocors", "upstream": up.url, "auth": "none"},
        ],
        admin={"cors_origins": ["https://console.example"]},
    )
    return gw, up


def forwarded(up: Server, path: str) -> list[list[str]]:
    return [r for r in up.seen() if r[1] == path]


async def test_preflight_answered_by_the_gateway_without_a_key(env: tuple[GatewayProcess, Server]) -> None:
    gw, up = env
    headers = {
        "Origin": APP,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Content-Type, Authorization",
    }
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.options(gw.url + "/secure/pf1", headers=headers) as r:
        assert r.status == 204
        assert await r.read() == b""
        h = r.headers
    assert h["Access-Control-Allow-Origin"] == APP
    assert {m.strip() for m in h["Access-Control-Allow-Methods"].split(",")} == {"GET", "POST", "DELETE"}
    assert {x.strip().lower() for x in h["Access-Control-Allow-Headers"].split(",")} == {
        "authorization", "content-type", "x-api-key"
    }
    assert h["Access-Control-Max-Age"] == "600"
    assert h["Access-Control-Allow-Credentials"] == "true"
    assert "Origin" in [v.strip() for v in h.getall("Vary")[0].split(",")]
    assert forwarded(up, "/secure/pf1") == []


@pytest.mark.parametrize(
    "extra",
    [
        {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        {"Origin": APP, "Access-Control-Request-Method": "PATCH"},
        {"Origin": APP, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "x-secret"},
    ],
    ids=["origin", "method", "header"],
)
async def test_disallowed_preflight_is_refused(env: tuple[GatewayProcess, Server], extra: dict[str, str]) -> None:
    gw, up = env
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.options(gw.url + "/secure/pf2", headers=extra) as r:
        assert r.status == 403
        assert r.headers["Content-Type"] == "application/problem+json"
        assert json.loads(await r.read())["code"] == "cors_rejected"
        assert "Access-Control-Allow-Origin" not in r.headers
    assert forwarded(up, "/secure/pf2") == []


async def test_simple_request_gets_the_origin_headers(env: tuple[GatewayProcess, Server]) -> None:
    gw, up = env
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(gw.url + "/open/simple", headers={"Origin": APP}) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == APP
            assert r.headers["Access-Control-Allow-Credentials"] == "true"
            assert r.headers["Access-Control-Expose-Headers"].lower() == "x-request-id"
            assert "Origin" in r.headers.get("Vary", "")
            assert (await r.json())["path"] == "/open/simple"
        async with s.get(gw.url + "/open/simple", headers={"Origin": "https://evil.example"}) as r:
            assert r.status == 200  # the browser, not the gateway, withholds the answer
            assert "Access-Control-Allow-Origin" not in r.headers
        async with s.get(gw.url + "/open/simple") as r:
            assert r.status == 200
            assert "Access-Control-Allow-Origin" not in r.headers
    assert len(forwarded(up, "/open/simple")) == 3


async def test_wildcard_origin(env: tuple[GatewayProcess, Server]) -> None:
    gw, _ = env
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(gw.url + "/public/x", headers={"Origin": "https://anyone.example"}) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "Access-Control-Allow-Credentials" not in r.headers
        headers = {"Origin": "https://anyone.example", "Access-Control-Request-Method": "PUT"}
        async with s.options(gw.url + "/public/x", headers=headers) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "*"


async def test_options_that_is_not_a_preflight_goes_upstream(env: tuple[GatewayProcess, Server]) -> None:
    gw, up = env
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.options(gw.url + "/open/plain-options", headers={"Origin": APP}) as r:
            assert r.status == 200
            assert (await r.json())["method"] == "OPTIONS"
        headers = {"Origin": APP, "Access-Control-Request-Method": "GET"}
        async with s.options(gw.url + "/nocors/pf", headers=headers) as r:
            assert r.status == 200  # no cors on the route: the upstream answers whatever it is
            assert "Access-Control-Allow-Origin" not in r.headers
    assert forwarded(up, "/open/plain-options") == [["OPTIONS", "/open/plain-options"]]
    assert forwarded(up, "/nocors/pf") == [["OPTIONS", "/nocors/pf"]]


async def test_admin_listener_cors(env: tuple[GatewayProcess, Server]) -> None:
    gw, _ = env
    console = "https://console.example"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        headers = {"Origin": console, "Access-Control-Request-Method": "GET"}
        async with s.options(gw.admin_url + "/healthz", headers=headers) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == console
        async with s.get(gw.admin_url + "/healthz", headers={"Origin": console}) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == console
        async with s.get(gw.admin_url + "/readyz", headers={"Origin": console}) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == console
        headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
        async with s.options(gw.admin_url + "/healthz", headers=headers) as r:
            assert r.status == 403
            assert "Access-Control-Allow-Origin" not in r.headers
        async with s.get(gw.admin_url + "/healthz", headers={"Origin": "https://evil.example"}) as r:
            assert r.status == 200
            assert "Access-Control-Allow-Origin" not in r.headers


async def test_refusal_on_a_cors_route_is_readable_by_the_browser(env: tuple[GatewayProcess, Server]) -> None:
    """A request without a key is refused (401), with the CORS headers, so the page can read why."""
    gw, up = env
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
        s.get(gw.url + "/secure/needs-key", headers={"Origin": APP}) as r,
    ):
        assert r.status == 401
        assert json.loads(await r.read())["code"] == "missing_api_key"
        assert r.headers["Access-Control-Allow-Origin"] == APP
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
    assert forwarded(up, "/secure/needs-key") == []
