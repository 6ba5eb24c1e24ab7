"""What every section of the config schema shares: strict frozen models, rate lists, scopes."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

from gateway.config.units import parse_rate

# Matched whole (fullmatch): with `$`, a value ending in a newline would pass and reach a header upstream.
SCOPE = re.compile(r"\*|[a-z0-9][a-z0-9_.-]*(:([a-z0-9][a-z0-9_.-]*|\*))*")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def check_rates(rates: list[str]) -> None:
    periods: set[int] = set()
    for r in rates:
        _, period = parse_rate(r)
        if period in periods:
            raise ValueError(f"two limits per {r.split('/')[-1].strip()}: give one per period")
        periods.add(period)
