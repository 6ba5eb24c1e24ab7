"""httpbin under gunicorn as a third-party upstream: methods, status codes, encodings, streams, headers."""

from __future__ import annotations

import gzip
import json
import subprocess

import aiohttp
import pytest

from tests.e2e.support import GatewayProcess, Launcher

TIMEOUT = aiohttp.ClientTimeout(total=20)


@pytest.fixture(scope="module")
def gw(module_launch: Launcher, httpbin_url: str) -> GatewayProcess:
    return module_launch.gateway(
        [{"name": "httpbin", "path": "/", "upstream": httpbin_url, "auth": "none", "max_body": "64MiB"}]
    )


def curl(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], input=stdin, capture_output=True, check=True)


async def test_get_with_query(gw: GatewayProcess) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.get(gw.url + "/get?a=1&b=two&b=three") as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["args"] == {"a": "1", "b": ["two", "three"]}
    assert doc["url"].endswith("/get?a=1&b=two&b=three")


async def test_post_json(gw: GatewayProcess) -> None:
    payload = {"name": "widget", "tags": ["a", "b"], "n": 3}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.post(gw.url + "/post", json=payload) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["json"] == payload
    assert doc["headers"]["Content-Type"] == "application/json"


def test_chunked_upload_with_curl(gw: GatewayProcess) -> None:
    body = b"".join(b"line %06d of a chunked upload\n" % i for i in range(20000))  # ~580 KB
    out = curl(
        "-H", "Transfer-Encoding: chunked", "-H", "Content-Type: text/plain", "--data-binary", "@-",
        gw.url + "/post", stdin=body,
    )
    doc = json.loads(out.stdout)
    assert doc["data"] == body.decode()
    assert doc["headers"].get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in doc["headers"]


async def test_large_upload_echoed_intact(gw: GatewayProcess) -> None:
    body = b"0123456789abcdef" * (512 * 1024)  # 8 MiB of text, echoed back inside JSON
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.put(gw.url + "/anything/big", data=body) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["method"] == "PUT"
    assert doc["headers"]["Content-Length"] == str(len(body))
    assert doc["data"] == body.decode()


@pytest.mark.parametrize("status", [200, 201, 400, 418, 500, 503])
async def test_status_codes_pass_through(gw: GatewayProcess, status: int) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.get(gw.url + f"/status/{status}") as r:
        assert r.status == status
        body = await r.read()
    if status == 418:
        assert b"teapot" in body


async def test_status_204_has_no_body(gw: GatewayProcess) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(gw.url + "/status/204") as r:
            assert r.status == 204
            assert await r.read() == b""
            assert "Transfer-Encoding" not in r.headers
        async with s.get(gw.url + "/get") as r:  # the connection is still in step
            assert r.status == 200


async def test_redirect_is_passed_not_followed(gw: GatewayProcess) -> None:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
        s.get(gw.url + "/redirect/1", allow_redirects=False) as r,
    ):
        assert r.status == 302
        assert r.headers["Location"] == "/get"


async def test_gzip_passed_compressed(gw: GatewayProcess) -> None:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT, auto_decompress=False) as s,
        s.get(gw.url + "/gzip", headers={"Accept-Encoding": "gzip"}) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Encoding"] == "gzip"
        raw = await r.read()
    assert raw[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(raw))["gzipped"] is True


async def test_streamed_response_is_chunked(gw: GatewayProcess) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.get(gw.url + "/stream/20") as r:
        assert r.status == 200
        assert r.headers.get("Transfer-Encoding") == "chunked"
        lines = [line async for line in r.content if line.strip()]
    docs = [json.loads(line) for line in lines]
    assert [d["id"] for d in docs] == list(range(20))


async def test_stream_bytes_intact(gw: GatewayProcess, httpbin_url: str) -> None:
    path = "/stream-bytes/102400?seed=11&chunk_size=1000"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(httpbin_url + path) as r:
            direct = await r.read()
        async with s.get(gw.url + path) as r:
            assert r.status == 200
            via = await r.read()
    assert len(direct) == 102400
    assert via == direct


async def test_large_random_body_intact(gw: GatewayProcess, httpbin_url: str) -> None:
    # httpbin caps /bytes at 100 KiB whatever is asked; the seeded bytes through the gateway match.
    path = "/bytes/5000000?seed=42"
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(httpbin_url + path) as r:
            direct = await r.read()
        async with s.get(gw.url + path) as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == str(len(direct))
            via = await r.read()
    assert len(direct) >= 100 * 1024
    assert via == direct


def test_headers_seen_by_the_upstream(gw: GatewayProcess) -> None:
    out = curl(
        "-D", "-",
        "-H", "Connection: keep-alive, X-Hop-Secret",
        "-H", "X-Hop-Secret: do-not-forward",
        "-H", "Keep-Alive: timeout=5",
        "-H", "TE: trailers",
        "-H", "Trailer: X-Checksum",
        "-H", "Proxy-Connection: keep-alive",
        "-H", "Proxy-Authorization: Basic Zm9vOmJhcg==",
        "-H", "X-Forwarded-For: 203.0.113.9",
        "-H", "X-Request-ID: client-chosen",
        "-H", "X-Consumer-ID: someone-else",
        "-H", "X-Custom: kept",
        gw.url + "/headers?show_env=1",
    )
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    response_headers = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(":") for line in head.decode().split("\r\n")[1:])
    }
    seen = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
    assert seen["x-request-id"] != "client-chosen"
    assert seen["x-request-id"] == response_headers["x-request-id"]
    assert seen["x-custom"] == "kept"
    assert "x-consumer-id" not in seen
    for hop in ("connection", "x-hop-secret", "keep-alive", "te", "trailer", "proxy-connection", "proxy-authorization"):
        assert hop not in seen, f"{hop} reached the upstream"
