"""ProxyServer.reload (SIGHUP, gateway/reload.py) in-process: the new routes take over at once, and a
config whose routes do not compile leaves the running ones whole."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from tests.helpers.gateway import make_config
from tests.helpers.upstream import RecordingUpstream, ok

from .wire import get, route


async def test_reload_swaps_the_routes_or_nothing(gateway, tmp_path: Path) -> None:
    a = await RecordingUpstream(respond=lambda r: ok(b"a")).start()
    b = await RecordingUpstream(respond=lambda r: ok(b"b")).start()
    try:
        h = await gateway([route(a.url)], limits={"max_header_line": 4096})
        proxy = h.gw.proxy
        assert (await h.one(get("/"))).body == b"a"
        proxy.reload(make_config([route(b.url)], limits={"max_header_line": 2048}))
        assert (await h.one(get("/"))).body == b"b"
        assert proxy.max_header_line == 2048
        not_pem = tmp_path / "ca.pem"
        not_pem.write_text("not a certificate")
        bad = make_config([route("https://127.0.0.1:9", upstream_ca=str(not_pem))], limits={"max_header_line": 1024})
        with pytest.raises(ssl.SSLError):
            proxy.reload(bad)
        assert proxy.max_header_line == 2048 and proxy.config.routes[0].upstream == b.url  # nothing half-done
        assert (await h.one(get("/"))).body == b"b"
    finally:
        await a.close()
        await b.close()


def test_a_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        make_config([route("https://127.0.0.1:9", upstream_ca=str(tmp_path / "missing.pem"))])
