"""TLS on the listener (`tls: {cert, key}`) and to https upstreams (verified; `upstream_ca` names the CA).

A throwaway CA and a server certificate for 127.0.0.1/localhost come from tests/helpers/pki.py.
"""

from __future__ import annotations

import json
import subprocess
import zlib

import aiohttp
import pytest

from tests.e2e.servers import stream_crc
from tests.e2e.support import GatewayProcess, Launcher, Server
from tests.helpers.pki import Certs, make_certs

TIMEOUT = aiohttp.ClientTimeout(total=20)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def plain_upstream(module_launch: Launcher) -> Server:
    return module_launch.server()


@pytest.fixture(scope="module")
def tls_upstream(module_launch: Launcher, certs: Certs) -> Server:
    return module_launch.server("--tls", str(certs.cert), str(certs.key))


@pytest.fixture(scope="module")
def gw(module_launch: Launcher, certs: Certs, plain_upstream: Server, tls_upstream: Server) -> GatewayProcess:
    https = f"https://127.0.0.1:{tls_upstream.port}"
    return module_launch.gateway(
        [
            {"name": "plain", "path": "/plain", "upstream": plain_upstream.url, "auth": "none"},
            {
                "name": "secure", "path": "/secure", "upstream": https, "upstream_ca": str(certs.ca),
                "auth": "none", "max_body": "64MiB",
            },
            {
                "name": "byname", "path": "/byname", "upstream": f"https://localhost:{tls_upstream.port}",
                "upstream_ca": str(certs.ca), "auth": "none", "max_body": "64MiB",
            },
            {"name": "system", "path": "/system", "upstream": https, "auth": "none"},
            {
                "name": "live", "path": "/live", "upstream": https, "upstream_ca": str(certs.ca),
                "auth": "none", "websocket": True,
            },
        ],
        tls={"cert": str(certs.cert), "key": str(certs.key)},
    )


def https_url(gw: GatewayProcess) -> str:
    return f"https://127.0.0.1:{gw.port}"


async def test_tls_listener_serves_https(gw: GatewayProcess, certs: Certs) -> None:
    conn = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=conn) as s:
        for i in range(3):
            async with s.get(https_url(gw) + f"/plain/hello{i}") as r:
                assert r.status == 200
                doc = await r.json()
            assert doc["path"] == f"/plain/hello{i}"
            seen = {k.lower(): v for k, v in doc["headers"]}
            assert seen["x-forwarded-proto"] == "https"
        async with s.post(https_url(gw) + "/plain/upload", data=b"x" * (3 * 1024 * 1024)) as r:
            assert (await r.json())["bytes"] == 3 * 1024 * 1024


async def test_tls_listener_rejects_untrusting_and_plain_clients(gw: GatewayProcess) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await s.get(https_url(gw) + "/plain/x")  # the system CAs do not know this one
        with pytest.raises(aiohttp.ClientError):
            await s.get(f"http://127.0.0.1:{gw.port}/plain/x")


def test_curl_over_tls(gw: GatewayProcess, certs: Certs) -> None:
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(certs.ca), https_url(gw) + "/plain/curl"],
        capture_output=True, check=True,
    )
    assert json.loads(out.stdout)["path"] == "/plain/curl"


@pytest.mark.parametrize("route", ["secure", "byname"])
async def test_https_upstream_with_upstream_ca(gw: GatewayProcess, certs: Certs, route: str) -> None:
    conn = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=conn) as s:
        for _ in range(3):  # the pooled TLS connection is used again
            async with s.get(https_url(gw) + f"/{route}/x") as r:
                assert r.status == 200
                assert (await r.json())["path"] == f"/{route}/x"
        size = 24 * 1024 * 1024  # through both TLS legs
        crc = n = 0
        async with s.get(https_url(gw) + f"/{route}/download?size={size}&framing=chunked&seed=3") as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                n += len(chunk)
                crc = zlib.crc32(chunk, crc)
        assert n == size and crc == stream_crc(size, 3)
        async with s.post(https_url(gw) + f"/{route}/upload", data=b"y" * size) as r:
            assert r.status == 200
            assert (await r.json())["bytes"] == size


async def test_https_upstream_not_trusted_by_system_cas(gw: GatewayProcess, certs: Certs) -> None:
    conn = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=conn) as s, s.get(https_url(gw) + "/system/x") as r:
        assert r.status == 502
        assert r.headers["Content-Type"] == "application/problem+json"
        doc = json.loads(await r.read())
    assert doc["code"] == "upstream_unavailable"


async def test_websocket_over_tls_both_ways(gw: GatewayProcess, certs: Certs) -> None:
    conn = aiohttp.TCPConnector(ssl=certs.client_context())
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT, connector=conn) as s,
        s.ws_connect(f"wss://127.0.0.1:{gw.port}/live/ws") as ws,
    ):
        for i in range(5):
            await ws.send_str(f"secret {i}")
            assert await ws.receive_str(timeout=5) == f"secret {i}"
        payload = bytes(range(256)) * 8192  # 2 MiB
        await ws.send_bytes(payload)
        assert await ws.receive_bytes(timeout=10) == payload
        await ws.close()
        assert ws.close_code == 1000
