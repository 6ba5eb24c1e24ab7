"""Parsing of the config's human units: durations, sizes, addresses and rates."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import BeforeValidator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_BYTES = {
    None: 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
RATE_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "month": 30 * 86400}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day|month)\s*$")


def parse_duration(value: Any) -> float:
    """Return seconds for `30s`, `15m`, `24h`, `90d`, `250ms` (bare numbers are refused: ambiguous)."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError("expected a duration such as 30s, 15m, 24h or 90d")
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a duration (use e.g. 500ms, 30s, 15m, 24h, 90d)")
    return float(m.group(1)) * _DURATION_SECONDS[m.group(2)]


def parse_size(value: Any) -> int:
    """Return bytes for an integer or `512KiB`, `10MiB`, `1GB`."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576 or 10MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a size such as 1048576 or 10MiB")
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a size (use e.g. 65536, 512KiB, 10MiB, 1GiB)")
    unit = m.group(2).lower() if m.group(2) else None
    return int(m.group(1)) * _SIZE_BYTES[unit]


def parse_rate(value: Any) -> tuple[int, int]:
    """Return (count, period seconds) for `100/minute`."""
    if not isinstance(value, str):
        raise ValueError("expected a rate such as 100/minute")
    m = _RATE.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a rate (use N/second, N/minute, N/hour, N/day or N/month)")
    count = int(m.group(1))
    if count < 1:
        raise ValueError("a rate must allow at least 1 request")
    return count, RATE_PERIODS[m.group(2)]


def parse_hostport(value: Any) -> tuple[str, int]:
    """Return (host, port) for `0.0.0.0:8080`, `[::1]:8080` or `:8080`."""
    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT")
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{value!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        host = "0.0.0.0"
    n = int(port)
    if not 0 <= n <= 65535:
        raise ValueError(f"port {n} is out of range")
    return host, n


def parse_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Return a network for a CIDR or a single address; IPv4-mapped IPv6 becomes IPv4."""
    if not isinstance(value, str):
        raise ValueError("expected an IP address or CIDR")
    try:
        net = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR") from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped and net.prefixlen >= 96:
        return ipaddress.IPv4Network((net.network_address.ipv4_mapped, net.prefixlen - 96))
    return net


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
HostPort = Annotated[tuple[str, int], BeforeValidator(parse_hostport)]
Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(parse_network)]
