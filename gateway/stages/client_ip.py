"""The client's address: the socket peer, or the first untrusted hop of X-Forwarded-For from the right."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def normalise(text: str) -> IPAddress | None:
    """Parse an address as written by a peer or a proxy; IPv4-mapped IPv6 becomes IPv4."""
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.scope_id:
            return None
    return addr


class ClientIP:
    """Derives the client IP once per request; only trusted peers' X-Forwarded-For is believed."""

    def __init__(self, trusted: list[IPNetwork]) -> None:
        self.trusted = tuple(trusted)
        self._is_trusted = lru_cache(maxsize=4096)(self._check)

    def _check(self, addr: str) -> bool:
        ip = normalise(addr)
        return ip is not None and any(ip in net for net in self.trusted)

    def derive(self, peer: str, headers: list[tuple[bytes, bytes]]) -> tuple[str, bytes]:
        """Return (client ip, the X-Forwarded-For value to send upstream)."""
        if not self.trusted or not self._is_trusted(peer):
            return peer, peer.encode()  # the common case: no header scan
        forwarded = [v for n, v in headers if n == b"x-forwarded-for"]
        if not forwarded:
            return peer, peer.encode()
        hops = [h.strip() for line in forwarded for h in line.decode("latin-1").split(",")]
        client = peer
        for hop in reversed(hops):
            ip = normalise(hop)
            if ip is None:
                break  # garbage from a trusted hop: stop at the last address we could vouch for
            client = str(ip)
            if not self._is_trusted(client):
                break
        chain = ", ".join(h for h in hops if h) + ", " + peer
        return client, chain.encode()
