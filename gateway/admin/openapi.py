"""The OpenAPI 3.1 document served at /admin/openapi.json."""

from __future__ import annotations

from typing import Any

_STR_LIST = {"type": "array", "items": {"type": "string"}}
_KEY = {
    "type": "object",
    "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "owner": {"type": "string"},
        "env": {"type": "string", "enum": ["live", "test"]}, "scopes": _STR_LIST, "allow_ips": _STR_LIST,
        "limits": _STR_LIST, "status": {"type": "string", "enum": ["active", "rotating", "expired", "suspended", "revoked"]},
        "hint": {"type": "string"}, "created_at": {"type": "string", "format": "date-time"},
        "expires_at": {"type": ["string", "null"], "format": "date-time"},
        "revoked_at": {"type": ["string", "null"], "format": "date-time"},
        "revoke_reason": {"type": ["string", "null"]}, "rotated_to": {"type": ["string", "null"]},
        "rotated_from": {"type": ["string", "null"]},
        "last_used_at": {"type": ["string", "null"], "format": "date-time"},
    },
}
_KEY_WITH_SECRET = {"allOf": [{"$ref": "#/components/schemas/Key"},
                              {"type": "object", "properties": {"key": {"type": "string", "description": "shown once"}}}]}
_CHANGES: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "name": {"type": "string"}, "scopes": _STR_LIST, "allow_ips": _STR_LIST, "limits": _STR_LIST,
        "ttl": {"type": "string", "examples": ["30d"]}, "no_expiry": {"type": "boolean"},
    },
}
_PROBLEM = {"description": "problem+json", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op(summary: str, responses: dict[str, Any], body: dict[str, Any] | None = None, params: list[Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {**responses, "401": _PROBLEM}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_KEY_REF = {"$ref": "#/components/schemas/Key"}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "API-key gateway admin API", "version": "1"},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Key": _KEY,
            "Problem": {"type": "object", "properties": {
                "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                "code": {"type": "string"}, "detail": {"type": "string"}}},
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/admin/keys": {
            "post": _op("Create a key (the raw key is in this answer only)",
                        {"201": _json(_KEY_WITH_SECRET, "Created"), "400": _PROBLEM},
                        body={**_CHANGES, "required": ["owner"], "properties": {
                            **_CHANGES["properties"], "owner": {"type": "string"},
                            "env": {"type": "string", "enum": ["live", "test"]}}}),
            "get": _op("List keys", {"200": _json({"type": "object", "properties": {"keys": {"type": "array", "items": _KEY_REF}}})},
                       params=[{"name": "owner", "in": "query", "schema": {"type": "string"}}]),
        },
        "/admin/keys/{id}": {
            "get": _op("Show a key", {"200": _json(_KEY_REF), "404": _PROBLEM}, params=[_ID]),
            "patch": _op("Change a key (each list given replaces that list)",
                         {"200": _json(_KEY_REF), "400": _PROBLEM, "404": _PROBLEM, "409": _PROBLEM},
                         body=_CHANGES, params=[_ID]),
        },
        "/admin/keys/{id}/revoke": {
            "post": _op("Revoke a key", {"200": _json(_KEY_REF), "404": _PROBLEM},
                        body={"type": "object", "properties": {"reason": {"type": "string"}}}, params=[_ID]),
        },
        "/admin/keys/{id}/rotate": {
            "post": _op("Issue a successor; the old key works until the grace ends",
                        {"201": _json(_KEY_WITH_SECRET, "Created"), "404": _PROBLEM, "409": _PROBLEM},
                        body={"type": "object", "properties": {"grace": {"type": "string", "examples": ["24h"]}}},
                        params=[_ID]),
        },
        "/admin/keys/{id}/suspend": {
            "post": _op("Suspend a key: 403 key_suspended until lifted", {"200": _json(_KEY_REF), "404": _PROBLEM},
                        body={"type": "object", "properties": {"reason": {"type": "string"}}}, params=[_ID]),
        },
        "/admin/keys/{id}/unsuspend": {
            "post": _op("Lift a suspension", {"200": _json(_KEY_REF), "404": _PROBLEM, "409": _PROBLEM}, params=[_ID]),
        },
        "/admin/usage": {
            "get": _op("Requests, errors, refusals by code, bytes, latency p50/p95/p99",
                       {"200": _json({"type": "object", "properties": {"by": {"type": "string"}, "rows": {"type": "array"}}}),
                        "400": _PROBLEM},
                       params=[{"name": "since", "in": "query", "schema": {"type": "string", "examples": ["24h"]}},
                               {"name": "by", "in": "query", "schema": {"type": "string", "enum": ["key", "owner", "route", "day"]}},
                               {"name": "key", "in": "query", "schema": {"type": "string"}},
                               {"name": "owner", "in": "query", "schema": {"type": "string"}},
                               {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["json", "csv"]}}]),
        },
        "/admin/anomalies": {
            "get": _op("Anomalies detected, newest first", {"200": _json({"type": "object"})},
                       params=[{"name": "since", "in": "query", "schema": {"type": "string", "examples": ["7d"]}},
                               {"name": "key_id", "in": "query", "schema": {"type": "string"}}]),
        },
        "/admin/audit": {
            "get": _op("The audit trail, newest first", {"200": _json({"type": "object"})},
                       params=[{"name": "since", "in": "query", "schema": {"type": "string", "examples": ["7d"]}},
                               {"name": "key_id", "in": "query", "schema": {"type": "string"}},
                               {"name": "limit", "in": "query", "schema": {"type": "integer"}}]),
        },
    },
}
