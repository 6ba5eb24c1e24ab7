"""Errors are data: every refusal is a GatewayError, rendered as problem+json in one place."""

from __future__ import annotations

import json
from http import HTTPStatus

# code -> (status, title). The codes are part of the contract: never rename one.
CODES: dict[str, tuple[int, str]] = {
    "bad_request": (400, "Malformed request"),
    "invalid_path": (400, "Ambiguous or malformed path"),
    "invalid_host": (400, "Missing or invalid Host header"),
    "websocket_not_allowed": (400, "WebSocket is not enabled on this route"),
    "missing_api_key": (401, "API key required"),
    "invalid_api_key": (401, "Invalid API key"),
    "expired_api_key": (401, "Expired API key"),
    "api_key_in_query": (400, "API key sent in the query string"),
    "multiple_api_keys": (400, "More than one API key"),
    "insufficient_scope": (403, "Insufficient scope"),
    "ip_not_allowed": (403, "Client IP not allowed"),
    "wrong_environment": (403, "Key environment not allowed on this route"),
    "key_suspended": (403, "Key suspended"),
    "cors_rejected": (403, "Cross-origin request not allowed"),
    "no_route": (404, "No route matches"),
    "method_not_allowed": (405, "Method not allowed"),
    "request_timeout": (408, "Request timeout"),
    "payload_too_large": (413, "Payload too large"),
    "expectation_failed": (417, "Expectation failed"),
    "rate_limited": (429, "Rate limit exceeded"),
    "headers_too_large": (431, "Request header fields too large"),
    "internal_error": (500, "Internal error"),
    "upstream_unavailable": (502, "Upstream unavailable"),
    "service_unavailable": (503, "Service unavailable"),
    "upstream_timeout": (504, "Upstream timeout"),
}

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


class GatewayError(Exception):
    """A refusal with its status, stable code, a human detail and extra response headers."""

    __slots__ = ("close", "code", "detail", "headers", "status")

    def __init__(
        self,
        code: str,
        detail: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        close: bool = False,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.status = CODES[code][0]
        self.detail = detail
        self.headers = headers or []
        self.close = close

    def body(self, request_id: str | None) -> bytes:
        """Render the RFC 9457 problem document."""
        doc: dict[str, object] = {
            "type": f"urn:problem-type:gateway:{self.code}",
            "title": CODES[self.code][1],
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
        }
        if request_id:
            doc["request_id"] = request_id
        return json.dumps(doc, separators=(",", ":")).encode()


class DirectResponse(Exception):
    """A stage answers the client itself (a CORS preflight, say): nothing goes upstream."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
        super().__init__(status)
        self.status = status
        self.headers = headers
        self.body = body
