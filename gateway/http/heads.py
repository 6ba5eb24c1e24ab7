"""Header hygiene and the bytes of the heads the gateway writes, in both directions."""

from __future__ import annotations

import re

from gateway.http.exchange import BODY_CHUNKED, BODY_LENGTH, Exchange
from gateway.routing import Route, Upstream

# Never forwarded in either direction (RFC 9110 §7.6.1, plus httpoxy's Proxy and framing the gateway sets).
HOP_BY_HOP = frozenset(
    [
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
        b"upgrade", b"proxy", b"proxy-authenticate", b"proxy-authorization", b"content-length",
        b"expect", b"host",
    ]
)

# Only the gateway may set these upstream; a client's copy is dropped, in any `-`/`_`/`.` spelling.
RESERVED_REQUEST = frozenset(
    [
        b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
        b"x-forwarded-prefix", b"forwarded", b"x-real-ip", b"x-request-id", b"x-http-method-override",
        b"x-method-override", b"x-http-method", b"x-consumer-id", b"x-consumer-username",
        b"x-consumer-scopes", b"x-consumer-env", b"x-credential-identifier", b"x-gateway-identity",
        b"x-authenticated-user", b"x-authenticated-scope", b"x-authenticated-userid", b"x-gateway-scopes",
        b"x-gateway-route", b"x-api-key-id",
    ]
)

# A response header the gateway owns: an upstream's copy is replaced, not duplicated.
RESERVED_RESPONSE = frozenset([b"x-request-id"])


_UNSAFE_IN_VALUE = re.compile(rb"[\x00-\x1f\x7f-\xff%]")


def header_value(text: str) -> bytes:
    """A stored value (a key's owner, its scopes) as a header value: control characters, and any
    byte past ASCII, percent-encoded (`%` too, so the encoding reads back). Input checks already
    refuse them; this holds for rows written before those checks, or by hand."""
    raw = text.encode()
    if not _UNSAFE_IN_VALUE.search(raw):
        return raw
    return _UNSAFE_IN_VALUE.sub(lambda m: b"%%%02X" % m.group()[0], raw)


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Every token of every Connection line, lower-cased (a second line must not escape)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            for t in value.split(b","):
                t = t.strip().lower()
                if t:
                    tokens.add(t)
    return frozenset(tokens)


def canonical_name(name: bytes) -> bytes:
    """Fold `_` and `.` spellings onto `-`, so `X_Consumer.ID` is caught as `x-consumer-id`."""
    if b"_" in name or b"." in name:
        return name.replace(b"_", b"-").replace(b".", b"-")
    return name


def request_head(
    ex: Exchange, route: Route, upstream: Upstream, extra: list[tuple[bytes, bytes]], websocket: bool
) -> bytes:
    """The request line and headers sent upstream; framing set from what the gateway will send."""
    drop = connection_tokens(ex.headers) if ex.has_connection_header else ()
    path = route.upstream_path(ex.path, upstream)
    target = path + b"?" + ex.query if ex.query else path
    lines = [ex.method.encode(), b" ", target, b" HTTP/1.1\r\nhost: "]
    if route.config.preserve_host and ex.host_raw:
        lines.append(ex.host_raw)
    else:
        lines.append(upstream.host_header)
    lines.append(b"\r\n")
    credential = ex.credential_header
    for name, value in ex.headers:
        if name in HOP_BY_HOP or name in drop or name == credential or canonical_name(name) in RESERVED_REQUEST:
            continue
        lines += (name, b": ", value, b"\r\n")
    for name, value in extra:
        lines += (name, b": ", value, b"\r\n")
    if ex.body_kind == BODY_LENGTH:
        lines += (b"content-length: ", str(ex.content_length).encode(), b"\r\n")
    elif ex.body_kind == BODY_CHUNKED:
        lines.append(b"transfer-encoding: chunked\r\n")
    elif ex.method in ("POST", "PUT", "PATCH"):
        lines.append(b"content-length: 0\r\n")
    if websocket:
        lines.append(b"connection: upgrade\r\nupgrade: websocket\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


# What an upstream response header needs besides copying: the framing the gateway redoes, and every
# name that is never passed on.
_RESPONSE_SPECIAL = HOP_BY_HOP | RESERVED_RESPONSE


def response_headers(raw: list[tuple[bytes, bytes]], drop_upgrade: bool) -> tuple[list[bytes], bytes | None, bool]:
    """Filter an upstream response's headers; return (header lines, content-length, chunked).

    One pass in the common case. The names a Connection line lists are dropped too, and they are
    known only at its end: when it lists any name not dropped anyway, a second pass drops them.
    """
    out, length, chunked, listed = _filter_response(raw, drop_upgrade, frozenset())
    if listed:
        extra = connection_tokens([(b"connection", v) for v in listed]) - _RESPONSE_SPECIAL
        if extra:
            out, length, chunked, _ = _filter_response(raw, drop_upgrade, extra)
    return out, length, chunked


def _filter_response(
    raw: list[tuple[bytes, bytes]], drop_upgrade: bool, tokens: frozenset[bytes]
) -> tuple[list[bytes], bytes | None, bool, list[bytes]]:
    """One pass of response_headers, dropping `tokens` too; also returns the Connection lines' values."""
    out: list[bytes] = []
    length: bytes | None = None
    chunked = False
    listed: list[bytes] = []
    for name, value in raw:
        low = name.lower()
        if low in _RESPONSE_SPECIAL or low in tokens:
            if low == b"content-length":
                length = value
            elif low == b"transfer-encoding":
                chunked = True
            elif not drop_upgrade and low in (b"upgrade", b"connection"):
                out += (name, b": ", value, b"\r\n")
            if low == b"connection":
                listed.append(value)
            continue
        out += (name, b": ", value, b"\r\n")
    return out, length, chunked, listed
