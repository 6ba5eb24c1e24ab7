"""The admin API for keys and the audit trail, over the same service layer as the CLI."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.admin.auth import ACTOR, problem
from gateway.keys.inputs import Conflict, InvalidInput, KeyNotFound
from gateway.keys.service import KeyService
from gateway.services import Services
from gateway.store.base import StoreUnavailable
from gateway.usage.report import as_csv, as_dicts, usage_rows

SERVICE = web.AppKey("key_service", KeyService)
SERVICES_KEY = web.AppKey("services", Services)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CREATE = {"owner", "name", "env", "scopes", "allow_ips", "limits", "ttl", "no_expiry"}
_UPDATE = {"name", "scopes", "allow_ips", "limits", "ttl", "no_expiry"}


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Service errors become problem+json answers, in one place."""
    try:
        return await handler(request)
    except InvalidInput as e:
        resp = problem(400, "invalid_input", f"{e.field}: {e.message}")
        return resp
    except KeyNotFound as e:
        return problem(404, "key_not_found", f"no key with id {e.key_id!r}")
    except Conflict as e:
        return problem(409, "conflict", str(e))
    except StoreUnavailable:
        return problem(503, "service_unavailable", "the key store is unavailable; try again shortly")


async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    try:
        data = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidInput("body", "must be a JSON object") from None
    if not isinstance(data, dict):
        raise InvalidInput("body", "must be a JSON object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidInput(unknown[0], f"unknown field (allowed: {', '.join(sorted(allowed))})")
    for field in ("name", "owner", "env", "ttl"):
        if field in data and data[field] is not None and not isinstance(data[field], str):
            raise InvalidInput(field, "must be a string")
    if "no_expiry" in data and not isinstance(data["no_expiry"], bool):
        raise InvalidInput("no_expiry", "must be true or false")
    return data


def _who(request: web.Request) -> dict[str, str]:
    return {"actor": request.get(ACTOR, "admin"), "source_ip": request.remote or ""}


async def create_key(request: web.Request) -> web.Response:
    data = await _body(request, _CREATE)
    if "owner" not in data:
        raise InvalidInput("owner", "required")
    record, raw = await request.app[SERVICE].create(
        data["owner"],
        name=data.get("name") or "",
        env=data.get("env") or "live",
        scopes=data.get("scopes"),
        allow_ips=data.get("allow_ips"),
        limits=data.get("limits"),
        ttl=data.get("ttl"),
        no_expiry=bool(data.get("no_expiry")),
        **_who(request),
    )
    return web.json_response({**record.public(), "key": raw}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    records = await request.app[SERVICE].list_keys(request.query.get("owner"))
    return web.json_response({"keys": [r.public() for r in records]})


async def show_key(request: web.Request) -> web.Response:
    record = await request.app[SERVICE].get(request.match_info["id"])
    return web.json_response(record.public())


async def update_key(request: web.Request) -> web.Response:
    data = await _body(request, _UPDATE)
    record = await request.app[SERVICE].update(
        request.match_info["id"],
        name=data.get("name"),
        scopes=data.get("scopes"),
        allow_ips=data.get("allow_ips"),
        limits=data.get("limits"),
        ttl=data.get("ttl"),
        no_expiry=bool(data.get("no_expiry")),
        **_who(request),
    )
    return web.json_response(record.public())


async def revoke_key(request: web.Request) -> web.Response:
    data = await _body(request, {"reason"}) if request.can_read_body else {}
    reason = data.get("reason") or ""
    if not isinstance(reason, str):
        raise InvalidInput("reason", "must be a string")
    record = await request.app[SERVICE].revoke(request.match_info["id"], reason=reason, **_who(request))
    return web.json_response(record.public())


async def rotate_key(request: web.Request) -> web.Response:
    data = await _body(request, {"grace"}) if request.can_read_body else {}
    grace = data.get("grace") or "24h"
    if not isinstance(grace, str):
        raise InvalidInput("grace", "must be a duration string such as 24h")
    new, raw, old = await request.app[SERVICE].rotate(request.match_info["id"], grace=grace, **_who(request))
    return web.json_response({**new.public(), "key": raw, "previous": old.public()}, status=201)


async def suspend_key(request: web.Request) -> web.Response:
    data = await _body(request, {"reason"}) if request.can_read_body else {}
    reason = data.get("reason") or ""
    if not isinstance(reason, str):
        raise InvalidInput("reason", "must be a string")
    record = await request.app[SERVICE].suspend(request.match_info["id"], reason=reason, **_who(request))
    return web.json_response(record.public())


async def unsuspend_key(request: web.Request) -> web.Response:
    record = await request.app[SERVICE].unsuspend(request.match_info["id"], **_who(request))
    return web.json_response(record.public())


async def anomalies(request: web.Request) -> web.Response:
    entries = await request.app[SERVICE].audit(
        request.query.get("since", "7d"), request.query.get("key_id"), 1000, action="anomaly"
    )
    return web.json_response({"anomalies": [e.public() for e in entries]})


async def usage(request: web.Request) -> web.Response:
    q = request.query
    services = request.app[SERVICES_KEY]
    rows = await usage_rows(
        services.store, services.clock.now(), q.get("since", "24h"), q.get("by", "key"), q.get("key"), q.get("owner")
    )
    if q.get("format") == "csv":
        return web.Response(text=as_csv(rows), content_type="text/csv")
    return web.json_response({"by": q.get("by", "key"), "rows": as_dicts(rows)})


async def audit(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        raise InvalidInput("limit", "must be a whole number") from None
    entries = await request.app[SERVICE].audit(
        request.query.get("since"), request.query.get("key_id"), max(1, min(limit, 10000))
    )
    return web.json_response({"entries": [e.public() for e in entries]})


def add_routes(app: web.Application) -> list[web.AbstractRoute]:
    r = app.router
    return [
        r.add_post("/admin/keys", create_key),
        r.add_get("/admin/keys", list_keys),
        r.add_get("/admin/keys/{id}", show_key),
        r.add_patch("/admin/keys/{id}", update_key),
        r.add_post("/admin/keys/{id}/revoke", revoke_key),
        r.add_post("/admin/keys/{id}/rotate", rotate_key),
        r.add_post("/admin/keys/{id}/suspend", suspend_key),
        r.add_post("/admin/keys/{id}/unsuspend", unsuspend_key),
        r.add_get("/admin/audit", audit),
        r.add_get("/admin/anomalies", anomalies),
        r.add_get("/admin/usage", usage),
    ]
