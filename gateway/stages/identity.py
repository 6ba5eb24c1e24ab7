"""Identity upstream: who called, added after every client copy of these headers was removed."""

from __future__ import annotations

from gateway.clock import Clock
from gateway.http.exchange import Exchange
from gateway.identity import identity_claims, sign


class IdentityStage:
    def __init__(self, signing_key: bytes | None, lifetime: float, clock: Clock) -> None:
        self.signing_key = signing_key
        self.lifetime = lifetime
        self.clock = clock

    def __call__(self, ex: Exchange) -> None:
        p = ex.principal
        if p is None:
            return
        r = p.record
        extra = ex.upstream_extra
        extra.append((b"x-consumer-id", p.owner_header))
        extra.append((b"x-credential-identifier", r.id.encode()))
        extra.append((b"x-consumer-scopes", p.scopes_header))
        extra.append((b"x-consumer-env", r.env.encode()))
        if self.signing_key is not None:
            claims = identity_claims(
                r.id, r.owner, r.scopes, r.env, ex.request_id, self.clock.time(), self.lifetime
            )
            extra.append((b"x-gateway-identity", sign(claims, self.signing_key)))
