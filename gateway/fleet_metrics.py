"""Metrics of several worker processes, summed into one /metrics on the supervisor's admin listener.

Each worker writes a snapshot of its registry to a shared folder about once a second (and when it
stops); the supervisor's collector reads them all and adds them up per series, so totals are right
with `--workers N`. Counters and histograms are summed; gauges too, except health gauges, where
the worst worker speaks for the fleet.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

_WORST_IS_MAX = frozenset(["gateway_ratelimit_degraded"])
_WORST_IS_MIN = frozenset(["gateway_key_store_up", "gateway_usage_store_up"])


def snapshot(registry: CollectorRegistry) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for fam in registry.collect():
        out.append(
            {
                "name": fam.name,
                "type": fam.type,
                "doc": fam.documentation,
                "samples": [[s.name, s.labels, s.value] for s in fam.samples],
            }
        )
    return out


def write_snapshot(folder: Path, name: str, registry: CollectorRegistry) -> None:
    tmp = folder / f".{name}.tmp"
    tmp.write_text(json.dumps(snapshot(registry)))
    os.replace(tmp, folder / f"{name}.json")


class FleetCollector(Collector):
    def __init__(self, folder: Path, live: CollectorRegistry | None = None) -> None:
        self.folder = folder
        self.live = live

    def _snapshots(self) -> Iterator[list[dict[str, object]]]:
        for path in sorted(self.folder.glob("*.json")):
            try:
                yield json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being replaced this instant: next scrape reads it
        if self.live is not None:
            yield snapshot(self.live)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
        for snap in self._snapshots():
            for fam in snap:
                name, typ, doc = str(fam["name"]), str(fam["type"]), str(fam["doc"])
                _, _, series = families.setdefault(name, (typ, doc, {}))
                samples = fam["samples"]
                assert isinstance(samples, list)
                for sample_name, labels, value in samples:
                    key = (sample_name, tuple(sorted(labels.items())))
                    if key not in series:
                        series[key] = value
                    elif name in _WORST_IS_MAX:
                        series[key] = max(series[key], value)
                    elif name in _WORST_IS_MIN:
                        series[key] = min(series[key], value)
                    else:
                        series[key] += value
        for name, (typ, doc, series) in families.items():
            metric = Metric(name, doc, typ)
            for (sample_name, labels), value in series.items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric
