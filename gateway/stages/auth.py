"""Authentication: find the key in the request, check its format without I/O, then cache → store.

Unknown, malformed and revoked keys get the same answer (`invalid_api_key`), so the answer tells
an attacker nothing about which keys exist. Only an expired key is told so: its holder needs to
know to renew, and the key was real.
"""

from __future__ import annotations

from collections.abc import Awaitable
from urllib.parse import unquote_to_bytes

from gateway.clock import Clock
from gateway.errors import GatewayError
from gateway.http.exchange import Exchange
from gateway.keys.cache import CachedKey, KeyCache
from gateway.keys.digest import Peppers
from gateway.keys.format import KeyFormat
from gateway.metrics import Metrics
from gateway.stages.throttle import AuthThrottle
from gateway.store.base import StoreUnavailable

# Outcomes that count towards the brute-force throttle (a request without any key does not).
_FAILURES = frozenset(["invalid_api_key", "expired_api_key", "multiple_api_keys"])
REDACTED = b"REDACTED-API-KEY"
QUERY_WARNING = b'api-key-in-query; send the key in the Authorization or X-API-Key header instead'


# Headers that may carry a copy of the key (a page URL with ?api_key=…, a cookie): checked once the
# key is known, and the copy replaced, so only the credential header holds it (and that is dropped).
CARRIERS = frozenset([b"referer", b"cookie", b"x-original-url", b"x-forwarded-uri"])


def _scrub(ex: Exchange, key: bytes, source: bytes | None, carriers: bool) -> None:
    """Replace copies of the key in carrier headers and in other query parameters."""
    if carriers:
        ex.headers = [
            (name, value.replace(key, REDACTED)) if name in CARRIERS and name != source else (name, value)
            for name, value in ex.headers
        ]
    query = ex.query
    if len(query) >= len(key) and key in query:
        ex.query = query.replace(key, REDACTED)


def _scrub_lookalikes(ex: Exchange, fmt: KeyFormat) -> None:
    """No credential came, yet a carrier header may hold a key (a page URL with ?api_key=…): replace
    whatever has the shape of one of our keys (prefix, env, checksum), so it never goes upstream."""
    marks = fmt.marks
    headers = ex.headers
    for i, (name, value) in enumerate(headers):
        if name not in CARRIERS or not any(m in value for m in marks):
            continue
        for m in marks:
            start = value.find(m)
            while start != -1:
                candidate = value[start : start + fmt.length]
                if fmt.env_of(candidate) is not None:
                    value = value[:start] + REDACTED + value[start + fmt.length :]
                start = value.find(m, start + 1)
        headers[i] = (name, value)


def _keys_in(text: bytes, fmt: KeyFormat) -> list[bytes]:
    """Our keys anywhere in `text` (prefix, env and checksum all right)."""
    found = []
    for m in fmt.marks:
        start = text.find(m)
        while start != -1:
            candidate = text[start : start + fmt.length]
            if fmt.env_of(candidate) is not None:
                found.append(candidate)
            start = text.find(m, start + 1)
    return found


def _query_refusal() -> GatewayError:
    return GatewayError(
        "api_key_in_query",
        "API keys are not accepted in the URL, where logs and proxies keep them; "
        "send it in the Authorization: Bearer or X-API-Key header",
    )


def _invalid() -> GatewayError:
    return GatewayError("invalid_api_key", "the API key is not valid")


class KeyAuth:
    """What every route's authentication stage shares: format, peppers, cache, last-use buffer."""

    def __init__(
        self,
        fmt: KeyFormat,
        peppers: Peppers,
        cache: KeyCache,
        clock: Clock,
        metrics: Metrics,
        headers: list[str],
        query_names: list[str],
        warn_before: float,
    ) -> None:
        self.fmt = fmt
        self.peppers = peppers
        self.cache = cache
        self.clock = clock
        self.metrics = metrics
        self.headers = frozenset(h.encode() for h in headers)
        self.watched = self.headers | CARRIERS
        self.query_names = frozenset(n.encode() for n in query_names)
        self.query_needles = tuple(n.encode() + b"=" for n in query_names)
        self.warn_before = warn_before
        # `sk_live_` and four random characters: enough to group guesses, far too little to use.
        self.prefix_length = len(fmt.prefix) + 10
        self.last_used: dict[str, float] = {}

    def reject(self, reason: str, err: GatewayError) -> GatewayError:
        self.metrics.auth_rejected(reason)
        return err

    def admit(self, ex: Exchange, entry: CachedKey, now: float) -> None:
        """Status and expiry of a found key; on success the request carries it as its principal."""
        record = entry.record
        if record.status != "active":
            if record.status == "suspended":
                raise self.reject(
                    "suspended",
                    GatewayError("key_suspended", "this key is suspended after unusual activity; ask an admin to lift it"),
                )
            raise self.reject("revoked", _invalid())
        if entry.expiry <= now:
            raise self.reject("expired", GatewayError("expired_api_key", "the API key has expired; renew it"))
        ex.principal = entry
        self.last_used[record.id] = now
        if entry.rotating:
            self.metrics.rotated_key_requests.inc()
            ex.response_extra.append((b"Sunset", entry.sunset or b""))
        elif entry.sunset is not None and entry.expiry - now <= self.warn_before:
            ex.response_extra.append((b"Sunset", entry.sunset))

    def verify(self, key: bytes, now: float) -> CachedKey | Awaitable[CachedKey | None] | None:
        """Check a raw key as sent; None for a malformed or known-unknown key, else the entry or a lookup."""
        if len(key) != self.fmt.length:  # before hashing: a header may hold kilobytes
            return None
        digest = self.peppers.current.digest(key)
        entry = self.cache.fresh(digest, now)
        if entry is not None:  # its format was checked when it was cached
            self.metrics.cache("hit")
            return entry
        if self.fmt.env_of(key) is None:
            return None
        if self.cache.known_unknown(digest, now):
            self.metrics.cache("negative")
            return None
        self.metrics.cache("miss")
        return self.cache.lookup(key, digest)


class AuthStage:
    """Per route: `auth: required | optional`, with the route's query-string policy."""

    def __init__(
        self, auth: KeyAuth, mode: str, query_policy: str, route: str, throttle: AuthThrottle | None = None
    ) -> None:
        self.auth = auth
        self.throttle = throttle
        self.required = mode == "required"
        self.query_policy = query_policy
        self.route = route
        self._query_warned = auth.metrics.query_key.labels(route, "warned")
        self._query_rejected = auth.metrics.query_key.labels(route, "rejected")

    def __call__(self, ex: Exchange) -> Awaitable[None] | None:
        throttle = self.throttle
        if throttle is None:
            return self._check(ex)
        if ex.client_ip in throttle.state:
            throttle.check(ex.client_ip)
        try:
            pending = self._check(ex)
        except GatewayError as e:
            if e.code in _FAILURES:
                throttle.fail(ex.client_ip)
            raise
        return None if pending is None else self._counted(ex, pending, throttle)

    async def _counted(self, ex: Exchange, pending: Awaitable[None], throttle: AuthThrottle) -> None:
        try:
            await pending
        except GatewayError as e:
            if e.code in _FAILURES:
                throttle.fail(ex.client_ip)
            raise

    def _check(self, ex: Exchange) -> Awaitable[None] | None:
        key = self._extract(ex)
        auth = self.auth
        if key is None:
            if self.required:
                raise auth.reject("missing", GatewayError("missing_api_key", "this route needs an API key"))
            return None
        ex.key_prefix = key[: auth.prefix_length].decode("latin-1")
        now = auth.clock.time()
        found = auth.verify(key, now)
        if found is None:
            raise auth.reject("invalid", _invalid())
        if isinstance(found, CachedKey):
            auth.admit(ex, found, now)
            return None
        return self._finish(ex, found)

    async def _finish(self, ex: Exchange, pending: Awaitable[CachedKey | None]) -> None:
        try:
            entry = await pending
        except StoreUnavailable:
            raise self.auth.reject(
                "store_unavailable",
                GatewayError("service_unavailable", "keys cannot be checked right now; try again shortly"),
            ) from None
        if entry is None:
            raise self.auth.reject("invalid", _invalid())
        self.auth.admit(ex, entry, self.auth.clock.time())

    def _extract(self, ex: Exchange) -> bytes | None:
        """The one key in the request; two keys, or one header given twice, is a 400."""
        auth = self.auth
        found: bytes | None = None
        source: bytes | None = None
        carriers = False
        for name, value in ex.headers:
            if name not in auth.watched:
                continue
            if name not in auth.headers:
                carriers = True
                continue
            if name == b"authorization":
                scheme, _, cred = value.strip().partition(b" ")
                if scheme.lower() != b"bearer":
                    continue  # Basic and other schemes are not ours to read
                value = cred
            value = value.strip()
            if found is not None:
                raise auth.reject(
                    "ambiguous", GatewayError("multiple_api_keys", "send exactly one API key, in one header")
                )
            found, source = value, name
        ex.credential_header = source
        query = ex.query
        # A percent-encoded name (`api%5Fkey=`) is the same parameter to the upstream's decoder; a key
        # under another name (`apikey[]=`, `token=`) is found by its shape.
        if query and (
            b"%" in query or any(n in query for n in auth.query_needles) or any(m in query for m in auth.fmt.marks)
        ):
            found = self._from_query(ex, found)
        if found is not None and (carriers or query):
            _scrub(ex, found, source, carriers)
        elif carriers and not self.required:  # without a key a required route refuses: nothing goes upstream
            _scrub_lookalikes(ex, auth.fmt)
        return found

    def _from_query(self, ex: Exchange, header_key: bytes | None) -> bytes | None:
        kept: list[bytes] = []
        keys: list[bytes] = []
        names, fmt = self.auth.query_names, self.auth.fmt
        embedded: list[bytes] = []
        for part in ex.query.split(b"&"):
            name, _, value = part.partition(b"=")
            name, value = unquote_to_bytes(name), unquote_to_bytes(value)
            # `apikey[]` is `apikey` to PHP and Rails; any parameter holding one of our keys is a key.
            if name in names or name.removesuffix(b"[]") in names or fmt.env_of(value) is not None:
                keys.append(value)
            else:
                kept.append(part)
                # One of our keys inside another parameter (after `;`, as `Bearer …`, in a URL in
                # `next=`), decoded as its reader will.
                embedded += _keys_in(name, fmt) + _keys_in(value, fmt)
        if embedded:
            # Only a copy of the key this request authenticates with can be taken out (replaced where
            # it stands, in `_scrub`), and only where it is written plainly; any other is refused.
            accepted = keys[0] if keys else header_key
            if accepted is None or any(k != accepted for k in embedded) or (
                b"&".join(kept).count(accepted) < len(embedded)
            ):
                self._query_rejected.inc()
                raise self.auth.reject("query", _query_refusal())
        if not keys:
            return header_key
        if self.query_policy == "reject":
            self._query_rejected.inc()
            raise self.auth.reject("query", _query_refusal())
        if len(keys) > 1 or (header_key is not None and keys[0] != header_key):
            raise self.auth.reject(
                "ambiguous", GatewayError("multiple_api_keys", "send exactly one API key, in one header")
            )
        self._query_warned.inc()
        ex.query = b"&".join(kept)
        ex.response_extra.append((b"X-Gateway-Warning", QUERY_WARNING))
        return keys[0]
