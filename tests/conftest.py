"""Suite-wide fixtures: the services `make test` starts, and an httpbin upstream.

PostgreSQL and Redis come from scripts/test-services.sh through GATEWAY_TEST_* variables. Without
them the tests that need them are skipped, except under `make test` or CI, where they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

# `from tests.helpers... import ...` works from every test folder, whichever way pytest is started.
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tests.helpers.net import free_port  # noqa: E402
from tests.helpers.processes import stop_process  # noqa: E402
from tests.helpers.stores import private_pg_schema  # noqa: E402
from tests.helpers.upstream import RecordingUpstream  # noqa: E402

HTTPBIN_START_TIMEOUT = 30.0


def _service_url(variable: str, service: str) -> str:
    url = os.environ.get(variable, "").strip()
    if url:
        return url
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    if os.environ.get("GATEWAY_TEST_SERVICES") == "1" or ci:
        pytest.fail(
            f"{variable} is not set, so the tests that need {service} cannot run; "
            f"`make test` (scripts/test-services.sh) starts {service} and sets it",
            pytrace=False,
        )
    pytest.skip(f"run through `make test` to get {service}")


@pytest.fixture(scope="session")
def pg_url() -> str:
    """postgresql://… of an empty throwaway database `gateway_test`."""
    return _service_url("GATEWAY_TEST_PG_URL", "PostgreSQL")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """redis://… of a throwaway Redis (database 0)."""
    return _service_url("GATEWAY_TEST_REDIS_URL", "Redis")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _start_httpbin(log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    for _attempt in range(3):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", "2", "-k", "sync"]
        argv += ["--graceful-timeout", "5", "httpbin:app"]
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + HTTPBIN_START_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if _answers(f"{url}/get"):
                return proc, url
            time.sleep(0.1)
        stop_process(proc)
        if time.monotonic() >= deadline:
            break  # too slow, not a port taken in between: another try would not help
    log_tail = log_path.read_text(errors="replace")[-3000:]
    pytest.fail(f"httpbin did not start; its log:\n{log_tail}", pytrace=False)


@pytest.fixture(scope="session")
def httpbin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of httpbin served by gunicorn on 127.0.0.1, for the whole session."""
    proc, url = _start_httpbin(tmp_path_factory.mktemp("httpbin") / "gunicorn.log")
    try:
        yield url
    finally:
        stop_process(proc)


# --- stores and upstreams shared by the suites -------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    """Run the test once on the embedded store and once on PostgreSQL."""
    return str(request.param)


@pytest.fixture
async def store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty store of the backend under test; several stores may open it."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.db'}"
        return
    async with private_pg_schema(request.getfixturevalue("pg_url")) as url:
        yield url


@pytest.fixture
async def pg_store_url(pg_url: str) -> AsyncIterator[str]:
    """An empty PostgreSQL store (for the tests that only make sense there)."""
    async with private_pg_schema(pg_url) as url:
        yield url


@pytest.fixture
async def up() -> AsyncIterator[RecordingUpstream]:
    """A recording upstream (tests/helpers/upstream.py) answering 200 "ok"."""
    upstream = await RecordingUpstream().start()
    try:
        yield upstream
    finally:
        await upstream.close()
