"""The program from outside: `gateway run [--workers N]`, health, SIGTERM drain, `gateway check`, --help."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.support import GatewayProcess, Launcher, children, http_get, listeners, socket_owners
from tests.helpers.net import free_port

TIMEOUT = aiohttp.ClientTimeout(total=20)


def gateway_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m gateway ARGS` to its end (30 s at most); nothing it forked outlives it."""
    argv = [sys.executable, "-m", "gateway", *args]
    proc = subprocess.Popen(
        argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def refused(port: int) -> bool:
    """True when nothing accepts connections on the port any more."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


async def wait_exit(gw: GatewayProcess, timeout: float) -> int:
    return await asyncio.to_thread(gw.proc.wait, timeout)


async def slow_request(port: int, delay: float) -> tuple[bytes, bytes]:
    """A raw keep-alive request to …/slow; returns (head, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET /api/slow?delay={delay} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), delay + 10)
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        return head, body
    finally:
        writer.close()


async def wait_until(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):  # type: ignore[arg-type]
            return True
        await asyncio.sleep(0.05)
    return False


# --- health ---------------------------------------------------------------------------------------


def test_healthz_and_readyz(launch: Launcher) -> None:
    up = launch.server()
    gw = launch.gateway([{"name": "api", "path": "/api", "upstream": up.url, "auth": "none"}])
    assert http_get(gw.admin_url + "/healthz") == (200, b'{"status": "ok"}')
    status, body = http_get(gw.admin_url + "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    assert gw.stop() == 0


# --- workers --------------------------------------------------------------------------------------


async def test_workers_share_the_listener_and_stop_on_sigterm(launch: Launcher) -> None:
    up = launch.server()
    gw = await asyncio.to_thread(
        launch.gateway, [{"name": "api", "path": "/api", "upstream": up.url, "auth": "none"}], workers=2
    )
    forked = children(gw.pid)
    workers = listeners(forked, gw.port)
    assert len(workers) == 2 and len(forked) == 3  # and the limits process
    ports: set[int] = set()

    async def client(n: int) -> None:
        # a connection of its own each time: the kernel spreads new connections over the workers
        conn = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=conn) as s:
            for i in range(5):
                async with s.get(gw.url + f"/api/{n}/{i}") as r:
                    assert r.status == 200
                    doc = await r.json()
                    assert doc["path"] == f"/api/{n}/{i}"
                    ports.add(doc["peer_port"])

    await asyncio.gather(*(client(n) for n in range(40)))
    owners = socket_owners(workers, ports)  # the upstream connections each worker keeps in its pool
    assert set(owners.values()) == set(workers), f"not every worker served: {owners}"
    assert http_get(gw.admin_url + "/readyz")[0] == 200
    gw.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(gw, 15) == 0
    for pid in forked:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert refused(gw.port) and refused(gw.admin_port)


def test_workers_report_ready_only_once_they_listen(launch: Launcher) -> None:
    """/readyz says 200 only when the proxy listener accepts: a load balancer trusts it at once."""
    up = launch.server()
    for _ in range(3):
        gw = launch.gateway(
            [{"name": "api", "path": "/api", "upstream": up.url, "auth": "none"}], workers=2, wait=False
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert gw.proc.poll() is None, gw.log()
            try:
                if http_get(gw.admin_url + "/readyz", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.005)
        assert not refused(gw.port), "ready, but the proxy listener refuses connections"
        assert http_get(gw.url + "/api/x")[0] == 200
        assert gw.stop() == 0


# --- SIGTERM drain --------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [None, 2], ids=["single", "workers"])
async def test_sigterm_drains_in_flight_requests(launch: Launcher, workers: int | None) -> None:
    up = launch.server()
    gw = await asyncio.to_thread(
        launch.gateway,
        [{"name": "api", "path": "/api", "upstream": up.url, "auth": "none"}],
        workers=workers,
        shutdown_timeout="10s",
    )
    # an idle keep-alive connection: the drain closes it rather than waiting for it
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", gw.port)
    idle_writer.write(b"GET /api/first HTTP/1.1\r\nHost: gw\r\n\r\n")
    await asyncio.wait_for(idle_reader.readuntil(b"\r\n\r\n"), 5)

    inflight = asyncio.ensure_future(slow_request(gw.port, 2.0))
    await asyncio.sleep(0.5)  # the request is with the upstream now
    sent = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)

    # readiness goes false at once (503, or the admin listener is already gone)
    def not_ready() -> bool:
        try:
            return http_get(gw.admin_url + "/readyz", timeout=1)[0] == 503
        except OSError:
            return True

    assert await wait_until(not_ready, 1.0), "readiness did not go false"
    assert await wait_until(lambda: refused(gw.port), 1.0), "the listener still accepts connections"
    assert not inflight.done()
    head, body = await inflight  # the in-flight request finishes
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["slow"] is True
    assert await asyncio.wait_for(idle_reader.read(), 5) != b"x"  # closed (EOF or the rest of a body)
    idle_writer.close()
    assert await wait_exit(gw, 10) == 0
    assert time.monotonic() - sent < 6.0
    assert refused(gw.port)


async def test_shutdown_timeout_cuts_requests_that_take_too_long(launch: Launcher) -> None:
    up = launch.server()
    gw = await asyncio.to_thread(
        launch.gateway,
        [{"name": "api", "path": "/api", "upstream": up.url, "auth": "none"}],
        shutdown_timeout="1s",
    )
    inflight = asyncio.ensure_future(slow_request(gw.port, 30.0))
    await asyncio.sleep(0.3)
    sent = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(gw, 10) == 0
    assert time.monotonic() - sent < 4.0
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await inflight


# --- refusing to start ----------------------------------------------------------------------------


def test_run_refuses_an_invalid_config(tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        f'listen: "127.0.0.1:{port}"\nadmin:\n  listen: "127.0.0.1:{admin_port}"\n'
        "routes:\n  - name: api\n    path: /api\n    upstream: ftp://example.org\n"
    )
    started = time.monotonic()
    out = gateway_cli("run", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode != 0
    assert f"{cfg}:7: routes.0.upstream:" in out.stderr
    assert "refusing to start" in out.stderr
    assert time.monotonic() - started < 15
    assert refused(port) and refused(admin_port)


@pytest.mark.parametrize("workers", [None, 2], ids=["single", "workers"])
def test_run_refuses_to_start_when_it_cannot_listen(tmp_path: Path, workers: int | None) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(
            f'listen: "127.0.0.1:{port}"\nadmin:\n  listen: "127.0.0.1:{free_port()}"\n'
            f'store: "sqlite:///{tmp_path / "g.db"}"\nroutes: []\n'
        )
        argv = ["run", "-c", str(cfg)] + (["--workers", str(workers)] if workers else [])
        out = gateway_cli(*argv, cwd=tmp_path)
    assert out.returncode != 0
    assert f"127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("workers", [None, 2], ids=["single", "workers"])
def test_run_refuses_to_start_without_its_tls_certificate(tmp_path: Path, workers: int | None) -> None:
    port, admin_port = free_port(), free_port()
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        f'listen: "127.0.0.1:{port}"\nadmin:\n  listen: "127.0.0.1:{admin_port}"\n'
        f'store: "sqlite:///{tmp_path / "g.db"}"\n'
        f'tls: {{cert: "{tmp_path / "missing.pem"}", key: "{tmp_path / "missing.key"}"}}\nroutes: []\n'
    )
    argv = ["run", "-c", str(cfg)] + (["--workers", str(workers)] if workers else [])
    out = gateway_cli(*argv, cwd=tmp_path)
    assert out.returncode != 0  # never "exit 0" for a gateway that did not serve
    assert str(tmp_path / "missing.pem") in out.stderr
    assert "Traceback" not in out.stderr
    assert refused(port) and refused(admin_port)


async def test_a_dead_worker_stops_the_gateway_with_an_error(launch: Launcher) -> None:
    up = launch.server()
    gw = await asyncio.to_thread(
        launch.gateway, [{"name": "api", "path": "/api", "upstream": up.url, "auth": "none"}], workers=2
    )
    workers = listeners(children(gw.pid), gw.port)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    assert await wait_exit(gw, 15) != 0
    assert refused(gw.port)


async def test_a_dead_limits_process_stops_the_gateway_with_an_error(launch: Launcher) -> None:
    up = launch.server()
    gw = await asyncio.to_thread(
        launch.gateway, [{"name": "api", "path": "/api", "upstream": up.url, "auth": "none"}], workers=2
    )
    forked = children(gw.pid)
    [limits] = set(forked) - set(listeners(forked, gw.port))
    os.kill(limits, signal.SIGKILL)
    assert await wait_exit(gw, 15) != 0
    assert "the limits process exited" in gw.log()
    assert refused(gw.port)
    for pid in forked:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_run_refuses_a_missing_config(tmp_path: Path) -> None:
    out = gateway_cli("run", "-c", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert out.returncode != 0
    assert "nope.yaml" in out.stderr


# --- gateway check --------------------------------------------------------------------------------

GOOD = """\
listen: "127.0.0.1:18080"
admin:
  listen: "127.0.0.1:18081"
routes:
  - name: orders
    path: /orders
    upstream: http://127.0.0.1:9000
    auth: none
  - name: live
    path: /live
    upstream: [http://127.0.0.1:9001, https://127.0.0.1:9002]
    websocket: true
    cors:
      origins: ["https://app.example"]
      max_age: 10m
"""

BAD = """\
listen: "127.0.0.1:18080"
admin:
  listen: "127.0.0.1:18081"
  colour: blue
shutdown_timeout: soon
routes:
  - name: orders
    path: /orders
    upstream: http://127.0.0.1:9000
    auth: sometimes
    cors:
      origins: ["*"]
      credentials: true
"""

LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<path>[\w.]+): (?P<problem>.+)$")


def test_check_good_file(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(GOOD)
    out = gateway_cli("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert "OK" in out.stdout
    out = gateway_cli("check", "-c", str(cfg), "--json")
    assert out.returncode == 0
    assert json.loads(out.stdout)["ok"] is True


def test_check_bad_file(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(BAD)
    out = gateway_cli("check", "-c", str(cfg))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), f"not FILE:LINE: path: problem: {lines}"
    found = {(int(m["line"]), m["path"]) for m in parsed if m}
    assert {m["file"] for m in parsed if m} == {str(cfg)}
    assert found == {(4, "admin.colour"), (5, "shutdown_timeout"), (10, "routes.0.auth"), (11, "routes.0.cors")}
    assert [int(m["line"]) for m in parsed if m] == sorted(int(m["line"]) for m in parsed if m)
    out = gateway_cli("check", "-c", str(cfg), "--json")
    assert out.returncode == 2
    assert json.loads(out.stdout)["ok"] is False


def test_check_uses_gateway_yaml_in_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text(GOOD)
    out = gateway_cli("check", cwd=tmp_path)
    assert out.returncode == 0, out.stderr


# --- the program itself ---------------------------------------------------------------------------


def test_help() -> None:
    out = gateway_cli("--help")
    assert out.returncode == 0
    for command in ("run", "check"):
        assert command in out.stdout
    run_help = gateway_cli("run", "--help")
    assert run_help.returncode == 0 and "--workers" in run_help.stdout
    script = Path(sys.executable).with_name("gateway")
    if script.exists():  # the console script `pip install .` makes is the same program
        done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0 and "check" in done.stdout


def test_workers_must_be_positive() -> None:
    out = gateway_cli("run", "--workers", "0")
    assert out.returncode != 0
    assert "--workers" in out.stderr
