"""Canonicalise a request path once, so routing, authorisation and forwarding see the same bytes.

Literal dot segments and repeated slashes are resolved; escapes of unreserved characters are decoded
(RFC 3986 §6.2.2.2) and other escapes upper-cased. Anything an upstream could read differently from us
is refused instead: encoded `/`, `\\`, NUL and control bytes, a dot segment spelled with escapes,
`..;x` (Tomcat path parameters), a raw backslash, a fragment, bytes outside visible ASCII.
"""

from __future__ import annotations

_HEX = b"0123456789ABCDEFabcdef"
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Visible ASCII that may stand raw in a path (RFC 3986 pchar plus '/'); '%' handled apart.
_RAW_OK_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/"
_RAW_OK = frozenset(_RAW_OK_BYTES)
# Escapes that would change the path's structure or hide control bytes upstream.
_FORBIDDEN_ESCAPES = frozenset([0x2F, 0x5C, 0x7F, *range(0x20)])


class PathError(ValueError):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _fast_ok(path: bytes) -> bool:
    """True when the path is already canonical: no escapes, dots after a slash, or doubled slashes."""
    # translate() deletes every allowed byte in C: anything left ('%' included) needs the slow path.
    return path.startswith(b"/") and b"/." not in path and b"//" not in path and not path.translate(None, _RAW_OK_BYTES)


def canonical_path(path: bytes) -> bytes:
    """Return the canonical form of an origin-form path, or raise PathError."""
    if _fast_ok(path):
        return path
    if not path.startswith(b"/"):
        raise PathError("the request target must be a path starting with '/'")
    segments: list[bytes] = []
    raw_segments = path[1:].split(b"/")
    last = len(raw_segments) - 1
    for index, raw in enumerate(raw_segments):
        seg, had_escape = _decode_segment(raw)
        name = seg.split(b";", 1)[0]
        if name in (b".", b".."):
            if had_escape:
                raise PathError("a dot segment is spelled with percent-escapes")
            if seg != name:
                raise PathError("a dot segment carries parameters (';')")
            if name == b".." and segments:
                segments.pop()
            if index == last:
                segments.append(b"")  # "/a/b/.." → "/a/": the trailing slash stays
            continue
        if not seg and index != last:
            continue  # repeated slash
        segments.append(seg)
    return b"/" + b"/".join(segments)


def without_parameters(path: bytes) -> bytes:
    """The path as an upstream that drops each segment's `;` parameters reads it."""
    return b"/".join(seg.split(b";", 1)[0] for seg in path.split(b"/"))


def _decode_segment(raw: bytes) -> tuple[bytes, bool]:
    if b"%" not in raw:
        for c in raw:
            if c not in _RAW_OK:
                raise PathError(_raw_problem(c))
        return raw, False
    out = bytearray()
    i, n = 0, len(raw)
    had_escape = False
    while i < n:
        c = raw[i]
        if c == 0x25:  # '%'
            if i + 2 >= n:
                raise PathError("a '%' is not followed by two hex digits")
            h1, h2 = raw[i + 1], raw[i + 2]
            if h1 not in _HEX or h2 not in _HEX:
                raise PathError("a '%' is not followed by two hex digits")
            value = int(raw[i + 1 : i + 3], 16)
            if value in _FORBIDDEN_ESCAPES:
                raise PathError(f"the path contains an encoded control byte, '/' or '\\' (%{value:02X})")
            if value in _UNRESERVED:
                out.append(value)
                if value == 0x2E:
                    had_escape = True
            else:
                out += b"%" + raw[i + 1 : i + 3].upper()
            i += 3
            continue
        if c not in _RAW_OK:
            raise PathError(_raw_problem(c))
        out.append(c)
        i += 1
    return bytes(out), had_escape


def _raw_problem(c: int) -> str:
    if c == 0x5C:
        return "the path contains a backslash"
    if c == 0x23:
        return "the request target contains a fragment ('#')"
    return f"the path contains a byte that must be percent-encoded (0x{c:02X})"
