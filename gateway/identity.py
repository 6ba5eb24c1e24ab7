"""Signed identity for upstreams: a compact HS256 JWS in `X-Gateway-Identity`.

An upstream that shares `identity.signing_key` can check that a request really passed the gateway
(headers alone can be forged by anything that reaches the upstream directly):

    from gateway.identity import verify
    claims = verify(request.headers["X-Gateway-Identity"], SIGNING_KEY)
    claims["sub"], claims["scopes"], claims["kid"], claims["env"], claims["rid"]
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from typing import Any

_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def sign(claims: dict[str, Any], key: bytes) -> bytes:
    payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signing_input = _HEADER + b"." + payload
    sig = _b64(hmac.digest(key, signing_input, "sha256"))
    return signing_input + b"." + sig


def identity_claims(
    key_id: str, owner: str, scopes: Sequence[str], env: str, request_id: str, now: float, lifetime: float
) -> dict[str, Any]:
    return {
        "kid": key_id,
        "sub": owner,
        "scopes": scopes,
        "env": env,
        "rid": request_id,
        "iat": int(now),
        "exp": int(now + lifetime),
    }


class InvalidIdentity(ValueError):
    pass


def verify(token: str, key: bytes | str, now: float | None = None, leeway: float = 5.0) -> dict[str, Any]:
    """Return the claims of a valid, unexpired token; raise InvalidIdentity otherwise."""
    if isinstance(key, str):
        key = key.encode()
    try:
        header, payload, sig = token.split(".")
        head = json.loads(_unb64(header))
    except (ValueError, json.JSONDecodeError):
        raise InvalidIdentity("not a compact JWS") from None
    if head.get("alg") != "HS256":
        raise InvalidIdentity("unexpected algorithm")
    expected = _b64(hmac.digest(key, f"{header}.{payload}".encode(), hashlib.sha256))
    if not hmac.compare_digest(expected, sig.encode()):
        raise InvalidIdentity("bad signature")
    claims: dict[str, Any] = json.loads(_unb64(payload))
    t = time.time() if now is None else now
    if not isinstance(claims.get("exp"), int) or claims["exp"] + leeway < t:
        raise InvalidIdentity("expired")
    return claims
