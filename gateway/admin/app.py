"""The admin listener (aiohttp): health, readiness, /metrics, the admin API and its OpenAPI document."""

from __future__ import annotations

import aiohttp_cors
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway.admin import keys
from gateway.admin.auth import admin_auth
from gateway.admin.openapi import DOCUMENT
from gateway.config.schema import GatewayConfig
from gateway.services import Services

READY = web.AppKey("ready", dict)
SERVICES = keys.SERVICES_KEY
REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[READY]
    if state["ready"]:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": state["reason"]}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(DOCUMENT)


def build_admin_app(
    config: GatewayConfig,
    state: dict[str, object],
    services: Services | None,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """`registry`: what /metrics serves (default: this process's; the supervisor passes the fleet's)."""
    middlewares: list[Middleware] = [keys.errors]
    if services is not None:
        middlewares.insert(0, admin_auth(services, config.admin.token))
    app = web.Application(middlewares=middlewares)
    app[READY] = state
    routes = [app.router.add_get("/healthz", healthz), app.router.add_get("/readyz", readyz)]
    if services is not None:
        app[SERVICES] = services
        app[REGISTRY] = registry or services.metrics.registry
        app[keys.SERVICE] = services.keys
        routes.append(app.router.add_get("/metrics", metrics))
        routes.append(app.router.add_get("/admin/openapi.json", openapi))
        routes += keys.add_routes(app)
    if config.admin.cors_origins:
        cors = aiohttp_cors.setup(
            app,
            defaults={
                origin: aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
                    allow_headers=("Authorization", "Content-Type"), allow_methods="*"
                )
                for origin in config.admin.cors_origins
            },
        )
        for route in routes:
            cors.add(route)
    return app
