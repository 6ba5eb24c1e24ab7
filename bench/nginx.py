"""nginx configs: the upstream (`return 200 'ok'`, a 1 MiB file) and the gateway anchor (PERFORMANCE.md row 1)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from bench.procs import BenchError, Proc, Procs, wait_port

BIG_PATH = "/big"
BIG_SIZE = 1 << 20

_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_binary() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BenchError("nginx not found (Debian: apt-get install nginx-light; `make bench` does it)")


def _head(prefix: Path, workers: int) -> str:
    """Everything nginx writes stays under its prefix directory; as root the workers stay root."""
    temps = "\n".join(f"    {kind}_temp_path {prefix / 'tmp' / kind};" for kind in _TEMP_KINDS)
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes {workers};
daemon off;
master_process on;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    server_tokens off;
    default_type text/plain;
{temps}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
"""


def upstream_conf(prefix: Path, port: int) -> str:
    return _head(prefix, 1) + f"""
    sendfile on;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = {BIG_PATH} {{ root {prefix / "www"}; default_type application/octet-stream; }}
        location / {{ return 200 'ok'; }}
    }}
}}
"""


def anchor_conf(
    prefix: Path, port: int, upstream_port: int, keys: Sequence[str], workers: int, directives: str = ""
) -> str:
    """A key map over the table (403 outside it), limit_req keyed on the key, a keep-alive upstream.

    The rate is high enough never to refuse; limit_req counts in milliseconds, so a burst is needed
    too, or two requests for one key within the same millisecond would be refused at any rate.
    `directives` go into the proxying location (a scenario's tuning, e.g. for large responses).
    """
    entries = "\n".join(f'        "{k}" 1;' for k in keys)
    return _head(prefix, workers) + f"""
    map_hash_max_size {max(8192, 8 * len(keys))};
    map_hash_bucket_size 128;
    map $http_x_api_key $key_ok {{
        default 0;
{entries}
    }}
    limit_req_zone $http_x_api_key zone=k:10m rate=1000000r/s;
    limit_req_status 429;
    upstream up {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096{" reuseport" if workers > 1 else ""};
        location / {{
            if ($key_ok = 0) {{ return 403; }}
            limit_req zone=k burst=1000000 nodelay;
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;
            {directives}
        }}
    }}
}}
"""


def _prepare(prefix: Path) -> None:
    for kind in _TEMP_KINDS:
        (prefix / "tmp" / kind).mkdir(parents=True, exist_ok=True)


def start_nginx(procs: Procs, name: str, prefix: Path, conf: str, port: int, cpus: Sequence[int] | None) -> Proc:
    _prepare(prefix)
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    argv = [nginx_binary(), "-p", str(prefix), "-c", str(conf_path), "-e", str(prefix / "error.log")]
    test = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True)
    if test.returncode != 0:
        raise BenchError(f"{name}: nginx -t refused the generated config:\n{test.stderr.strip()}")
    proc = procs.start(name, argv, cpus=cpus, log=prefix / "stdout.log")
    wait_port(proc, port)
    return proc


def start_upstream(procs: Procs, prefix: Path, port: int, cpus: Sequence[int] | None) -> Proc:
    www = prefix / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / BIG_PATH.lstrip("/")).write_bytes(os.urandom(BIG_SIZE))
    return start_nginx(procs, "nginx upstream", prefix, upstream_conf(prefix, port), port, cpus)


def start_anchor(
    procs: Procs, prefix: Path, port: int, upstream_port: int, keys: Sequence[str], workers: int,
    cpus: Sequence[int] | None, directives: str = "",
) -> Proc:
    conf = anchor_conf(prefix, port, upstream_port, keys, workers, directives)
    return start_nginx(procs, "nginx anchor", prefix, conf, port, cpus)
