"""`make demo`: a small echo API as the upstream, and the gateway in front of it."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from gateway.app import Gateway, install_uvloop
from gateway.config.schema import GatewayConfig


async def echo(request: web.Request) -> web.StreamResponse:
    """Answer with what arrived: method, path, query, headers and the body's size."""
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
    doc = {
        "method": request.method,
        "path": request.raw_path,
        "headers": dict(request.headers),
        "body_bytes": size,
    }
    return web.json_response(doc, dumps=lambda o: json.dumps(o, indent=2))


async def start_echo(host: str, port: int) -> web.AppRunner:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def _demo(config: GatewayConfig, upstream_port: int) -> int:
    upstream = await start_echo("127.0.0.1", upstream_port)
    gw = Gateway(config)
    serving = asyncio.ensure_future(gw.serve())
    while not gw.state["ready"] and not serving.done():  # noqa: ASYNC110 - readiness is a plain flag
        await asyncio.sleep(0.05)
    if serving.done():
        return await serving
    host, port = config.listen
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"
    scopes = sorted({s for r in config.routes for s in _scopes(r.scopes)})
    assert gw.services is not None
    record, raw = await gw.services.keys.create(
        "demo", name="demo key", scopes=scopes, ttl="1d", actor="demo", source_ip="local"
    )
    print("\nThe gateway is running in front of a demo echo API.")
    print(f"\nA demo key (id {record.id}, scopes: {' '.join(scopes) or '-'}), shown this once:\n\n  {raw}\n")
    for route in config.routes:
        print(f'  curl -i -H "Authorization: Bearer {raw}" {base}{route.path}/hello')
        print(f"  curl -i -X POST -H 'X-API-Key: {raw}' --data 'hi' {base}{route.path}/hello")
        print(f"  curl -i {base}{route.path}/hello        # no key: 401")
    ahost, aport = config.admin.listen
    print(f"  curl -i http://{ahost}:{aport}/readyz\n\nCtrl-C stops it.", flush=True)
    try:
        return await serving
    finally:
        await upstream.cleanup()


def _scopes(spec: dict[str, list[str]] | list[str]) -> list[str]:
    return [s for v in spec.values() for s in v] if isinstance(spec, dict) else list(spec)


def run_demo(config: GatewayConfig, upstream_port: int = 9901) -> int:
    install_uvloop()
    return asyncio.run(_demo(config, upstream_port))
