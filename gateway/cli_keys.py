"""`gateway keys …`, `gateway audit` and `gateway migrate`: the service layer from the shell."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.config.schema import GatewayConfig
from gateway.keys.inputs import Conflict, InvalidInput, KeyNotFound
from gateway.keys.model import KeyRecord
from gateway.keys.peppers import PepperMissing
from gateway.services import Services
from gateway.store import StoreUnavailable
from gateway.usage.report import as_csv, as_json, as_table, usage_rows

Action = Callable[[Services, argparse.Namespace], Awaitable[int]]


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _who() -> dict[str, str]:
    return {"actor": _actor(), "source_ip": "local"}


def _print_key(record: KeyRecord, as_json: bool, raw: str | None = None) -> None:
    doc = record.public()
    if raw is not None:
        doc["key"] = raw
    if as_json:
        print(json.dumps(doc))
        return
    if raw is not None:
        print(f"key:        {raw}")
        print("            (shown this once: store it in your secrets manager now)")
    for field in ("id", "name", "owner", "env", "status", "hint", "created_at", "expires_at", "last_used_at"):
        print(f"{field + ':':<12}{doc[field] if doc[field] is not None else '-'}")
    for field in ("scopes", "allow_ips", "limits"):
        values = doc[field]
        assert isinstance(values, list)
        print(f"{field + ':':<12}{' '.join(values) if values else '-'}")
    if doc["rotated_to"]:
        print(f"{'rotated_to:':<12}{doc['rotated_to']}")
    if doc["revoke_reason"]:
        print(f"{'reason:':<12}{doc['revoke_reason']}")


async def _create(s: Services, a: argparse.Namespace) -> int:
    record, raw = await s.keys.create(
        a.owner, name=a.name or "", env=a.env, scopes=a.scope, allow_ips=a.allow_ip, limits=a.limit,
        ttl=a.ttl, no_expiry=a.no_expiry, **_who(),
    )
    _print_key(record, a.json, raw)
    return 0


async def _list(s: Services, a: argparse.Namespace) -> int:
    records = await s.keys.list_keys(a.owner)
    if a.json:
        print(json.dumps([r.public() for r in records]))
        return 0
    print(f"{'ID':<26}{'NAME':<20}{'OWNER':<20}{'ENV':<6}{'STATUS':<10}{'HINT':<18}{'EXPIRES':<29}"
          f"{'LAST USED':<29}SCOPES")
    for r in records:
        d = r.public()
        print(f"{r.id:<26}{_cell(r.name or '-', 19):<20}{_cell(r.owner, 19):<20}{r.env:<6}{d['status']!s:<10}"
              f"{r.hint:<18}{d['expires_at'] or 'never'!s:<29}{d['last_used_at'] or 'never'!s:<29}"
              f"{' '.join(r.scopes)}")
    return 0


def _cell(text: str, width: int) -> str:
    """A column's text, cut with an ellipsis so the next column stays aligned."""
    return text if len(text) <= width else text[: width - 1] + "…"


async def _show(s: Services, a: argparse.Namespace) -> int:
    _print_key(await s.keys.get(a.id), a.json)
    return 0


async def _update(s: Services, a: argparse.Namespace) -> int:
    record = await s.keys.update(
        a.id, name=a.name, scopes=a.scope, allow_ips=a.allow_ip, limits=a.limit, ttl=a.ttl,
        no_expiry=a.no_expiry, **_who(),
    )
    _print_key(record, a.json)
    return 0


async def _revoke(s: Services, a: argparse.Namespace) -> int:
    record = await s.keys.revoke(a.id, reason=a.reason or "", **_who())
    _print_key(record, a.json)
    return 0


async def _rotate(s: Services, a: argparse.Namespace) -> int:
    new, raw, old = await s.keys.rotate(a.id, grace=a.grace, **_who())
    if a.json:
        print(json.dumps({**new.public(), "key": raw, "previous": old.public()}))
        return 0
    _print_key(new, False, raw)
    print(f"\nthe previous key {old.id} keeps working until {old.public()['expires_at']}")
    return 0


async def _suspend(s: Services, a: argparse.Namespace) -> int:
    _print_key(await s.keys.suspend(a.id, reason=a.reason or "", **_who()), a.json)
    return 0


async def _unsuspend(s: Services, a: argparse.Namespace) -> int:
    _print_key(await s.keys.unsuspend(a.id, **_who()), a.json)
    return 0


async def _anomalies(s: Services, a: argparse.Namespace) -> int:
    entries = await s.keys.audit(a.since, a.key, 1000, action="anomaly")
    if a.json:
        print(json.dumps([e.public() for e in entries]))
        return 0
    for e in entries:
        change = dict(e.change)
        kind, subject = change.pop("kind", "?"), change.pop("subject", "")
        print(f"{e.public()['at']}  {kind!s:<22} {subject!s:<26} {json.dumps(change, sort_keys=True)}")
    return 0


async def _usage(s: Services, a: argparse.Namespace) -> int:
    if a.json and a.csv:
        raise InvalidInput("format", "give --json or --csv, not both")
    rows = await usage_rows(s.store, s.clock.now(), a.since, a.by, a.key, a.owner)
    if a.json:
        print(as_json(rows))
    elif a.csv:
        print(as_csv(rows), end="")
    else:
        print(as_table(rows, a.by))
    return 0


async def _audit(s: Services, a: argparse.Namespace) -> int:
    entries = await s.keys.audit(a.since, a.key)
    if a.json:
        print(json.dumps([e.public() for e in entries]))
        return 0
    for e in entries:
        d = e.public()
        print(f"{d['at']}  {e.action:<18} {e.actor:<22} {e.source_ip:<16} {e.key_id or '-':<26} "
              f"{json.dumps(e.change, sort_keys=True)}")
    return 0


async def _migrate(s: Services, a: argparse.Namespace) -> int:
    # Opening the store already applied what was pending: report that too, not "up to date".
    applied = list(getattr(s.store, "migrations_applied", [])) + await s.store.migrate()
    if a.json:
        print(json.dumps({"applied": applied}))
    else:
        print("up to date" if not applied else "applied: " + ", ".join(applied))
    return 0


ACTIONS: dict[str, Action] = {
    "create": _create, "list": _list, "show": _show, "update": _update, "revoke": _revoke,
    "rotate": _rotate, "audit": _audit, "migrate": _migrate, "suspend": _suspend, "unsuspend": _unsuspend,
    "anomalies": _anomalies, "usage": _usage,
}


async def _run(config: GatewayConfig, action: Action, args: argparse.Namespace) -> int:
    services = await Services.open(config)
    try:
        return await action(services, args)
    finally:
        await services.close()


def run_action(config: GatewayConfig, name: str, args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(config, ACTIONS[name], args))
    except InvalidInput as e:
        print(f"gateway: invalid {e.field}: {e.message}", file=sys.stderr)
    except KeyNotFound as e:
        print(f"gateway: no key with id {e.key_id!r}", file=sys.stderr)
    except Conflict as e:
        print(f"gateway: {e}", file=sys.stderr)
    except StoreUnavailable as e:
        print(f"gateway: the key store is unavailable: {e}", file=sys.stderr)
    except PepperMissing as e:
        print(f"gateway: {e}", file=sys.stderr)
    return 1


def add_parsers(sub: Any, common: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int]) -> None:
    keys = sub.add_parser("keys", parents=[common], help="create, list, change, revoke and rotate keys")
    ksub = keys.add_subparsers(dest="action", required=True)

    def lists(p: argparse.ArgumentParser, default: list[str] | None) -> None:
        p.add_argument("--scope", action="append", default=default, help="repeatable")
        p.add_argument("--allow-ip", action="append", default=default, help="CIDR; repeatable")
        p.add_argument("--limit", action="append", default=default, help="e.g. 100/minute; repeatable")

    p = ksub.add_parser("create", parents=[common], help="create a key (printed once)")
    p.add_argument("--owner", required=True)
    p.add_argument("--name")
    p.add_argument("--env", default="live", choices=["live", "test"])
    lists(p, [])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ttl", help="e.g. 30d (default: keys.default_ttl)")
    g.add_argument("--no-expiry", action="store_true")
    p = ksub.add_parser("list", parents=[common], help="keys without secrets")
    p.add_argument("--owner")
    p = ksub.add_parser("show", parents=[common])
    p.add_argument("id")
    p = ksub.add_parser("update", parents=[common], help="each list option replaces that list")
    p.add_argument("id")
    p.add_argument("--name")
    lists(p, None)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ttl", help="new lifetime from now, e.g. 30d")
    g.add_argument("--no-expiry", action="store_true")
    p = ksub.add_parser("revoke", parents=[common], help="kill switch")
    p.add_argument("id")
    p.add_argument("--reason")
    p = ksub.add_parser("rotate", parents=[common], help="issue a successor; the old key works for the grace")
    p.add_argument("id")
    p.add_argument("--grace", default="24h")
    p = ksub.add_parser("suspend", parents=[common], help="refuse the key (403 key_suspended) until lifted")
    p.add_argument("id")
    p.add_argument("--reason")
    p = ksub.add_parser("unsuspend", parents=[common], help="lift a suspension")
    p.add_argument("id")
    keys.set_defaults(func=func)
    p = sub.add_parser("usage", parents=[common], help="requests, errors, refusals, bytes and latency percentiles")
    p.add_argument("--key", help="only this key id")
    p.add_argument("--owner", help="only this owner")
    p.add_argument("--since", default="24h")
    p.add_argument("--by", default="key", choices=["key", "owner", "route", "day"])
    p.add_argument("--csv", action="store_true")
    p.set_defaults(func=func, action="usage")
    p = sub.add_parser("anomalies", parents=[common], help="anomalies detected (rate spikes, shared keys, …)")
    p.add_argument("--since", default="7d")
    p.add_argument("--key", help="only this key id")
    p.set_defaults(func=func, action="anomalies")
    p = sub.add_parser("audit", parents=[common], help="who did what to which key, when, from where")
    p.add_argument("--since", default="7d")
    p.add_argument("--key", help="only this key id")
    p.set_defaults(func=func, action="audit")
    p = sub.add_parser("migrate", parents=[common], help="create or upgrade the store's schema")
    p.set_defaults(func=func, action="migrate")
