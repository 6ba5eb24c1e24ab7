"""What a user gives key management (the CLI, the admin API), checked before anything is written:
each check returns the value in its stored form or raises InvalidInput naming the field."""

from __future__ import annotations

import re

from gateway.config.common import SCOPE, check_rates
from gateway.config.units import parse_duration, parse_network
from gateway.keys.format import ENVS

# Matched whole (fullmatch): `$` also matches before a final newline, which would reach a header upstream.
_OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:+-]{0,127}")
_KEY_ID = re.compile(r"key_[0-9A-Za-z]{20}")


class InvalidInput(ValueError):
    """A bad value from a user: `field` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class KeyNotFound(LookupError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"no key with id {key_id!r}")
        self.key_id = key_id


class Conflict(ValueError):
    """The change is not possible in the key's current state (rotating a revoked key, say)."""


def check_owner(owner: str) -> str:
    if not isinstance(owner, str) or not _OWNER.fullmatch(owner):
        raise InvalidInput("owner", "1-128 characters: letters, digits and _ . @ : + -, starting with a letter or digit")
    return owner


def check_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > 128 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InvalidInput("name", "at most 128 printable characters")
    return name


def check_env(env: str) -> str:
    if env not in ENVS:
        raise InvalidInput("env", f"must be one of: {', '.join(ENVS)}")
    return env


def check_scopes(scopes: list[str]) -> tuple[str, ...]:
    if not isinstance(scopes, list):
        raise InvalidInput("scopes", "must be a list")
    for s in scopes:
        if not isinstance(s, str) or not SCOPE.fullmatch(s):
            raise InvalidInput("scopes", f"{s!r} is not a scope (like orders:read, orders:* or *)")
    return tuple(dict.fromkeys(scopes))


def check_ips(ips: list[str]) -> tuple[str, ...]:
    if not isinstance(ips, list):
        raise InvalidInput("allow_ips", "must be a list")
    out = []
    for ip in ips:
        try:
            out.append(str(parse_network(ip)))
        except ValueError as e:
            raise InvalidInput("allow_ips", str(e)) from None
    return tuple(dict.fromkeys(out))


def check_limits(limits: list[str]) -> tuple[str, ...]:
    if not isinstance(limits, list) or not all(isinstance(lim, str) for lim in limits):
        raise InvalidInput("limits", "must be a list of rates such as 100/minute")
    try:
        check_rates(limits)
    except ValueError as e:
        raise InvalidInput("limits", str(e)) from None
    return tuple(limits)


def check_duration(field: str, value: str) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        raise InvalidInput(field, str(e)) from None
    if seconds <= 0:
        raise InvalidInput(field, "must be longer than zero")
    return seconds


def check_key_id(key_id: str) -> str:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise KeyNotFound(str(key_id)[:64])
    return key_id


def parse_grace(grace: str) -> float:
    if grace in ("0", "0s", "none"):
        return 0.0
    return check_duration("grace", grace)
