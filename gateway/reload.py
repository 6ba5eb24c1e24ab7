"""`kill -HUP`: gateway.yaml read again, and what can change live changed without a restart.

Live: `routes` (paths, upstreams, auth, scopes, default limits, CORS, timeouts, outlier checks),
`limits` (request sizes and deadlines), `trusted_proxies`, `headers_with_underscores` and
`identity`. A request already routed finishes under the route it started with; the next ones use the
new routes. Everything else (listeners, the store, the rate-limit backend, keys, the throttle, usage,
metrics, anomalies, the upstream pool) was built into the running services: a file changing any of
it is refused whole, naming those fields, and the gateway goes on with what it had, as it does with
a file that does not load. Under `--workers N` the supervisor checks the file and passes the signal
on to every worker, each of which reloads it.
"""

from __future__ import annotations

import logging

from gateway.config import ConfigError, load_config
from gateway.config.schema import GatewayConfig

log = logging.getLogger("gateway")

LIVE = frozenset({"routes", "limits", "trusted_proxies", "headers_with_underscores", "identity"})


def reloaded(path: str, current: GatewayConfig) -> GatewayConfig | None:
    """The file's config if it loads and changes only what can change live; None (logged) otherwise."""
    try:
        new = load_config(path)
    except ConfigError as e:
        log.error("reload of %s refused, still serving the previous config: %s", path, "; ".join(e.errors))
        return None
    fixed = [name for name in GatewayConfig.model_fields if name not in LIVE and getattr(new, name) != getattr(current, name)]
    if fixed:
        log.error(
            "reload of %s refused, still serving the previous config: %s cannot change without a restart",
            path,
            ", ".join(fixed),
        )
        return None
    return new

