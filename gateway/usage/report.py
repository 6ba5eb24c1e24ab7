"""Usage reports for `gateway usage` and GET /admin/usage: validated options, rendered three ways."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta

from gateway.keys.inputs import InvalidInput, check_duration
from gateway.store.base import UsageReport, UsageStore

GROUPS = ("key", "owner", "route", "day")
COLUMNS = ("group", "requests", "errors", "refusals", "bytes_in", "bytes_out", "p50_ms", "p95_ms", "p99_ms")


async def usage_rows(
    store: object, now: datetime, since: str, by: str, key_id: str | None, owner: str | None
) -> list[UsageReport]:
    if by not in GROUPS:
        raise InvalidInput("by", f"must be one of: {', '.join(GROUPS)}")
    if not isinstance(store, UsageStore):
        raise InvalidInput("store", "this store keeps no usage records")
    start = now - timedelta(seconds=check_duration("since", since))
    return await store.usage_report(start, by, key_id=key_id, owner=owner)


def as_dicts(rows: list[UsageReport]) -> list[dict[str, object]]:
    return [dict(zip(COLUMNS, (*row[:3], dict(row.refusals), *row[4:]), strict=True)) for row in rows]


def as_json(rows: list[UsageReport]) -> str:
    return json.dumps(as_dicts(rows))


def as_csv(rows: list[UsageReport]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for row in rows:
        refusals = ";".join(f"{code}={n}" for code, n in sorted(row.refusals.items()))
        writer.writerow([row.group, row.requests, row.errors, refusals, row.bytes_in, row.bytes_out,
                         *(_ms(v) for v in row[6:])])
    return out.getvalue()


def as_table(rows: list[UsageReport], by: str) -> str:
    lines = [f"{by.upper():<28}{'REQUESTS':>10}{'5XX':>7}{'REFUSED':>9}{'BYTES IN':>12}{'BYTES OUT':>12}"
             f"{'P50 MS':>9}{'P95 MS':>9}{'P99 MS':>9}  REFUSALS"]
    for r in rows:
        refusals = " ".join(f"{code}={n}" for code, n in sorted(r.refusals.items()))
        lines.append(
            f"{r.group[:27]:<28}{r.requests:>10}{r.errors:>7}{sum(r.refusals.values()):>9}{r.bytes_in:>12}"
            f"{r.bytes_out:>12}{_ms(r.p50_ms):>9}{_ms(r.p95_ms):>9}{_ms(r.p99_ms):>9}  {refusals}"
        )
    if not rows:
        lines.append("(no requests in this period)")
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"
