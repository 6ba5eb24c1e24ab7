"""The gateway (and test servers) as subprocesses: its CLI, a blocking GET, readiness, and stopping."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """A blocking GET that returns (status, body) for every status; raises OSError when unreachable."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(proc: subprocess.Popen[bytes], admin_url: str, log: Callable[[], str], timeout: float) -> None:
    """Until the gateway's /readyz answers 200; AssertionError with the end of its log if it exits or
    takes longer than `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the gateway exited with {proc.returncode}:\n{log()[-3000:]}")
        try:
            if http_get(admin_url + "/readyz", timeout=1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"the gateway did not become ready:\n{log()[-3000:]}")


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    """Signal a process, wait for it, kill it if it lingers; return its exit code."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def cli_env() -> dict[str, str]:
    """This checkout's gateway, and none of the caller's GATEWAY_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = str(REPO)
    return env


async def cli(config: Path, *args: str, timeout: float = 60.0) -> Run:
    """`python -m gateway -c CONFIG ARGS…` in a subprocess, without blocking the test's loop."""
    argv = [sys.executable, "-m", "gateway", "-c", str(config), *args]

    def run() -> Run:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=cli_env(),
                           cwd=config.parent, check=False)
        return Run(p.returncode, p.stdout, p.stderr)

    return await asyncio.to_thread(run)
