"""curl as a third-party client: keep-alive, HTTP/1.0, HEAD, Expect: 100-continue, uploads, errors."""

from __future__ import annotations

import json
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.e2e.support import GatewayProcess, Launcher


@pytest.fixture(scope="module")
def gw(module_launch: Launcher) -> GatewayProcess:
    up = module_launch.server()
    return module_launch.gateway([{"name": "api", "path": "/api", "upstream": up.url, "auth": "none"}])


class Out:
    def __init__(self, done: subprocess.CompletedProcess[bytes]) -> None:
        # decoded by hand: text mode would turn the CRLFs of `-i` output into LFs
        self.stdout = done.stdout.decode("latin-1")
        self.stderr = done.stderr.decode("latin-1")


def curl(*args: str) -> Out:
    return Out(subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True, check=True))


def split_response(raw: str) -> tuple[int, dict[str, str], str]:
    head, _, body = raw.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_two_urls_share_one_connection(gw: GatewayProcess) -> None:
    out = curl(
        "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code} %{num_connects}\n",
        gw.url + "/api/one", gw.url + "/api/two",
    )
    assert out.stdout.split("\n")[:2] == ["200 1", "200 0"]
    assert "Re-using existing connection" in curl("-v", "-o", "/dev/null", "-o", "/dev/null",
                                                   gw.url + "/api/a", gw.url + "/api/b").stderr


def test_http_1_0(gw: GatewayProcess) -> None:
    out = curl("--http1.0", "-i", gw.url + "/api/old")
    status, headers, body = split_response(out.stdout)
    assert status == 200
    assert headers.get("connection", "").lower() == "close"
    assert json.loads(body)["path"] == "/api/old"
    assert int(headers["content-length"]) == len(body.encode())


def test_http_1_0_keep_alive(gw: GatewayProcess) -> None:
    out = curl(
        "--http1.0", "-H", "Connection: keep-alive", "-o", "/dev/null", "-o", "/dev/null",
        "-w", "%{http_code} %{num_connects}\n", gw.url + "/api/one", gw.url + "/api/two",
    )
    assert out.stdout.split("\n")[:2] == ["200 1", "200 0"]


def test_head(gw: GatewayProcess) -> None:
    out = curl("-I", gw.url + "/api/head")
    status, headers, body = split_response(out.stdout)
    assert status == 200
    assert int(headers["content-length"]) > 0  # the length a GET would have had
    assert body == ""
    # a HEAD then a GET on one connection stay in step
    out = curl(
        "-I", "-o", "/dev/null", "-w", "%{num_connects} ", gw.url + "/api/h1",
        "--next", "-o", "/dev/null", "-w", "%{http_code} %{num_connects}", gw.url + "/api/g1",
    )
    assert out.stdout == "1 200 0"


def test_expect_100_continue_upload(gw: GatewayProcess, tmp_path: Path) -> None:
    body = bytes(range(256)) * (8 * 1024)  # 2 MiB
    path = tmp_path / "body.bin"
    path.write_bytes(body)
    out = curl(
        "-v", "-H", "Expect: 100-continue", "-H", "Content-Type: application/octet-stream",
        "--data-binary", f"@{path}", gw.url + "/api/upload",
    )
    assert "< HTTP/1.1 100 Continue" in out.stderr
    doc = json.loads(out.stdout)
    assert doc["bytes"] == len(body)
    assert doc["crc32"] == zlib.crc32(body)
    assert doc["content_length"] == str(len(body))


def test_data_binary_upload(gw: GatewayProcess) -> None:
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--data-binary", "@-", gw.url + "/api/upload"],
        input=b"\x00\x01binary\r\n\xff" * 1000, capture_output=True, check=True,
    )
    doc = json.loads(out.stdout)
    assert doc["bytes"] == 11000
    assert doc["crc32"] == zlib.crc32(b"\x00\x01binary\r\n\xff" * 1000)


def test_no_route_is_problem_json(gw: GatewayProcess) -> None:
    out = curl("-i", gw.url + "/nowhere")
    status, headers, body = split_response(out.stdout)
    assert status == 404
    assert headers["content-type"] == "application/problem+json"
    doc = json.loads(body)
    assert doc["code"] == "no_route" and doc["status"] == 404
    assert doc["request_id"] == headers["x-request-id"]


@pytest.mark.parametrize("path", ["/api/%2e%2e/x", "/api/.%2E/x", "/api/%2fsecret", "/api/..;/x", "/api/a%5cb"])
def test_ambiguous_path_is_problem_json(gw: GatewayProcess, path: str) -> None:
    out = curl("-i", "--path-as-is", gw.url + path)
    status, headers, body = split_response(out.stdout)
    assert status == 400
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(body)["code"] == "invalid_path"


def test_literal_dot_segments_are_resolved_before_routing(gw: GatewayProcess) -> None:
    out = curl("-i", "--path-as-is", gw.url + "/api/../x")
    status, _, body = split_response(out.stdout)
    assert status == 404  # "/api/../x" is "/x": no route, and nothing under /api is reached
    assert json.loads(body)["code"] == "no_route"
    out = curl("--path-as-is", gw.url + "/api/a/./b/../c")
    assert json.loads(out.stdout)["path"] == "/api/a/c"
