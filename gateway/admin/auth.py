"""Admin authentication: the bearer admin token (constant-time compare) or a key with scope `admin`.

Failed attempts are audited with the source address, never with what was sent.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.keys.cache import CachedKey
from gateway.keys.model import AuditEntry
from gateway.services import Services
from gateway.store.base import StoreUnavailable

log = logging.getLogger("gateway.admin")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ACTOR = web.RequestKey("actor", str)


def problem(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"type": f"urn:problem-type:gateway:{code}", "title": code.replace("_", " "), "status": status,
         "code": code, "detail": detail},
        status=status,
        content_type="application/problem+json",
        headers=headers,
    )


def admin_auth(services: Services, token: str) -> Middleware:
    expected = token.encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/admin/") or request.path == "/admin/openapi.json":
            return await handler(request)
        if request.method == "OPTIONS":
            return await handler(request)  # CORS preflight, answered by aiohttp-cors
        header = request.headers.get("Authorization", "")
        scheme, _, cred = header.partition(" ")
        actor = None
        if scheme.lower() == "bearer" and cred:
            raw = cred.strip().encode()
            if expected and hmac.compare_digest(raw, expected):
                actor = "admin-token"
            else:
                try:
                    actor = await _key_actor(services, raw)
                except StoreUnavailable:
                    return problem(503, "service_unavailable", "the key store is unavailable")
        if actor is None:
            await _audit_failure(services, request, bool(header))
            return problem(401, "admin_unauthorized", "send the admin token or a key with scope 'admin' as a bearer token",
                           {"WWW-Authenticate": 'Bearer realm="gateway-admin"'})
        request[ACTOR] = actor
        return await handler(request)

    return middleware


async def _key_actor(services: Services, raw: bytes) -> str | None:
    now = services.clock.time()
    found = services.key_auth.verify(raw, now)
    if found is not None and not isinstance(found, CachedKey):
        found = await found
    if found is None:
        return None
    record = found.record
    # The literal scope only: `*` grants every scope of the APIs behind the gateway, and a leaked key
    # meant for those must not also be able to make, change and revoke keys.
    if record.status != "active" or found.expiry <= now or "admin" not in found.granted:
        return None
    return f"key:{record.id}"


async def _audit_failure(services: Services, request: web.Request, had_credentials: bool) -> None:
    ip = request.remote or ""
    change: dict[str, object] = {"method": request.method, "path": request.path, "credentials": had_credentials}
    try:
        await services.store.add_audit(AuditEntry("admin_auth_failed", "anonymous", ip, None, change, at=services.clock.now()))
    except StoreUnavailable:
        log.warning("failed admin authentication from %s could not be audited: store unavailable", ip)
