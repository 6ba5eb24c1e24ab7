"""A real Prometheus server scrapes a running gateway with config/prometheus.yml.

The repo's file is checked as it is (`promtool check config`), then copied with only the target
and the intervals changed, and given to `prometheus`, whose HTTP API must then show the gateway's
series. promtool and prometheus come from the Debian package `prometheus` (`make test` installs it).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.helpers.net import free_port
from tests.helpers.processes import REPO, stop_process
from tests.helpers.upstream import RecordingUpstream
from tests.usage.conftest import Start
from tests.usage.support import call

CONFIG = REPO / "config" / "prometheus.yml"
DEADLINE = 30.0


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{program} not found: install the Debian package `prometheus` (`make test` does)",
                    pytrace=False)
    return path


def test_the_shipped_config_is_valid_and_points_at_the_default_admin_listener() -> None:
    result = subprocess.run([need("promtool"), "check", "config", str(CONFIG)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = yaml.safe_load(CONFIG.read_text())
    (job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "gateway"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8081"]  # admin.listen's default
    assert CONFIG.read_text().startswith("#")  # documented at the top


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def launch(target: str) -> tuple[str, subprocess.Popen[bytes], Path]:
        doc = yaml.safe_load(CONFIG.read_text())
        doc["global"]["scrape_interval"] = doc["global"]["evaluation_interval"] = "1s"
        for job in doc["scrape_configs"]:
            if job["job_name"] == "gateway":
                job["scrape_interval"], job["scrape_timeout"] = "1s", "1s"
                job["static_configs"] = [{"targets": [target]}]
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump(doc))
        port = free_port()
        log = tmp_path / "prometheus.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [need("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=tmp_path,
            )
        procs.append((proc, log))
        return f"http://127.0.0.1:{port}", proc, log

    try:
        yield launch
    finally:
        for proc, _ in procs:
            stop_process(proc, timeout=15)


async def query(session: aiohttp.ClientSession, base: str, promql: str) -> list[dict[str, Any]]:
    try:
        async with session.get(f"{base}/api/v1/query", params={"query": promql},
                               timeout=aiohttp.ClientTimeout(total=2)) as resp:
            if resp.status != 200:
                return []
            doc = await resp.json()
    except (aiohttp.ClientError, TimeoutError):
        return []  # not listening yet
    assert doc["status"] == "success", doc
    result: list[dict[str, Any]] = doc["data"]["result"]
    return result


async def test_prometheus_scrapes_the_gateway(start: Start, up: RecordingUpstream, prometheus: Any) -> None:
    gw = await start()
    for i in range(5):
        assert (await call(gw.port, "GET", f"/open/{i}")).status == 200
    assert (await call(gw.port, "GET", "/nowhere")).status == 404
    base, proc, log = prometheus(f"127.0.0.1:{gw.admin_port}")
    deadline = time.monotonic() + DEADLINE
    up_series: list[dict[str, Any]] = []
    requests: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            up_series = await query(session, base, 'up{job="gateway"}')
            requests = await query(session, base, 'gateway_requests_total{job="gateway"}')
            if up_series and up_series[0]["value"][1] == "1" and len(requests) >= 2:
                break
            await asyncio.sleep(0.25)
        else:
            raise AssertionError(f"no gateway series in Prometheus after {DEADLINE}s: up={up_series} "
                                 f"requests={requests}\n{log.read_text()[-3000:]}")
        values = {(r["metric"]["route"], r["metric"]["method"], r["metric"]["code"]): float(r["value"][1])
                  for r in requests}
        assert values == {("open", "GET", "200"): 5, ("-", "GET", "404"): 1}
        assert all(r["metric"]["instance"] == f"127.0.0.1:{gw.admin_port}" for r in requests)
        hist = await query(session, base, 'gateway_request_duration_seconds_count{job="gateway"}')
        assert hist and float(hist[0]["value"][1]) == 6
        # the scrape itself never failed
        targets_ok = await query(session, base, 'scrape_samples_scraped{job="gateway"} > 0')
        assert targets_ok
