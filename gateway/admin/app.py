"""The admin listener (aiohttp): health and readiness now; the admin API and /metrics join it later."""

from __future__ import annotations

import aiohttp_cors
from aiohttp import web

from gateway.config.schema import GatewayConfig

READY = web.AppKey("ready", dict)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[READY]
    if state["ready"]:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": state["reason"]}, status=503)


def build_admin_app(config: GatewayConfig, state: dict[str, object]) -> web.Application:
    app = web.Application()
    app[READY] = state
    routes = [app.router.add_get("/healthz", healthz), app.router.add_get("/readyz", readyz)]
    if config.admin.cors_origins:
        cors = aiohttp_cors.setup(
            app,
            defaults={
                origin: aiohttp_cors.ResourceOptions(allow_headers=("Authorization", "Content-Type"))
                for origin in config.admin.cors_origins
            },
        )
        for route in routes:
            cors.add(route)
    return app
