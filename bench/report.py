"""Medians with min-max over rounds, the ratio to nginx, and the JSON and Markdown outputs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from bench.measure import LATENCY, THROUGHPUT

ANCHOR = "nginx"
OURS = "gateway"
FLOOR = "floor"  # bench/floor_proxy.py: sockets, event loop and the least Python, no features
DASH = "\u2013"  # en dash, for ranges
TIMES = "\u00d7"
BACKGROUND_NOTE = 0.1  # CPUs of load from outside the benchmark worth a note under the table


def spread(values: list[float | None]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def summarise(scenario: dict[str, Any]) -> dict[str, Any]:
    """Per proxy: req/s at 64 connections, p50/p99 at one, CPU-µs/request (both), errors."""
    out: dict[str, Any] = {}
    for name, runs in scenario["runs"].items():
        thr, lat = runs[THROUGHPUT], runs[LATENCY]
        out[name] = {
            "rps": spread([r["rps"] for r in thr]),
            "read_mib_s": spread([r["read_mib_s"] for r in thr]),
            "p50_us": spread([r["p50_us"] for r in lat]),
            "p99_us": spread([r["p99_us"] for r in lat]),
            "p99_us_c64": spread([r["p99_us"] for r in thr]),
            "cpu_us_per_req": spread([r["cpu_us_per_req"] for r in thr]),
            "cpu_us_per_req_c1": spread([r["cpu_us_per_req"] for r in lat]),
            # A Redis the gateway's limiter uses: its CPU, and the gateway's plus it, per request.
            "backend_cpu_us_per_req": spread([r.get("backend_cpu_us_per_req") for r in thr]),
            "cpu_with_backends_us_per_req": spread(
                [r["cpu_us_per_req"] + r["backend_cpu_us_per_req"] for r in thr
                 if r["cpu_us_per_req"] and r.get("backend_cpu_us_per_req") is not None]
            ),
            "cpu_util_c64": spread([r["cpu_util"] for r in thr]),
            "background_cpu": spread([r.get("background_cpu") for r in thr + lat]),
            "errors": sum(r["errors"] for r in thr + lat),
        }
    anchor = scenario["runs"].get(ANCHOR)
    if anchor:
        base = out[ANCHOR]["cpu_us_per_req"]
        for name, runs in scenario["runs"].items():
            # Paired by round: each proxy against the nginx run just before or after it.
            pairs = [
                ours["cpu_us_per_req"] / ref["cpu_us_per_req"]
                for ours, ref in zip(runs[THROUGHPUT], anchor[THROUGHPUT], strict=False)
                if ours["cpu_us_per_req"] and ref["cpu_us_per_req"]
            ]
            ratio = spread(pairs)  # type: ignore[arg-type]
            if ratio and base and out[name]["cpu_us_per_req"]:
                ratio["median"] = out[name]["cpu_us_per_req"]["median"] / base["median"]
            out[name]["cpu_vs_nginx"] = ratio
    return out


def _num(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _cell(s: dict[str, float] | None, suffix: str = "", bold: bool = False) -> str:
    if not s:
        return DASH
    med = f"**{_num(s['median'])}**" if bold else _num(s["median"])
    if s["n"] > 1:
        return f"{med}{suffix} ({_num(s['min'])}{DASH}{_num(s['max'])})"
    return f"{med}{suffix}"


def markdown(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = [
        f"Benchmark of {meta['date']}, gateway at `{meta['commit']}`, {meta['cpu']} ({meta['cpus']} CPUs), "
        f"kernel {meta['kernel']}, {meta['nginx']}, Python {meta['python']}.",
        f"{meta['rounds']} interleaved round(s) of {meta['duration']:g} s per run; medians with (min{DASH}max). "
        "req/s and CPU-µs/req with `wrk -t1 -c64`, p50/p99 with `wrk -t1 -c1`. "
        f"Proxies on CPU {meta['proxy_cpus']}, wrk and the nginx upstream on CPU {meta['load_cpus']}.",
        "",
        "| scenario | proxy | req/s | p50 µs | p99 µs | CPU-µs/req | vs nginx CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for sname, scen in doc["scenarios"].items():
        for proxy, s in scen["summary"].items():
            ratio = s.get("cpu_vs_nginx")
            ratio_cell = _cell(ratio, TIMES) if ratio and proxy != ANCHOR else DASH
            if proxy == ANCHOR:
                ratio_cell = f"1.00{TIMES}"
            flag = " ⚠" if s["errors"] else ""
            lines.append(
                f"| {sname} | {proxy}{flag} | {_cell(s['rps'])} | {_cell(s['p50_us'])} | "
                f"{_cell(s['p99_us'])} | {_cell(s['cpu_us_per_req'], bold=True)} | {ratio_cell} |"
            )
            if s["errors"]:
                notes.append(f"⚠ {sname}/{proxy}: {s['errors']} failed requests (non-2xx or socket errors)")
            if s.get("backend_cpu_us_per_req"):
                notes.append(
                    f"{sname}: besides the {proxy}'s own CPU, the backends it uses (Redis) spent "
                    f"{_cell(s['backend_cpu_us_per_req'])} CPU-µs/req; the {proxy} and its backends together: "
                    f"{_cell(s['cpu_with_backends_us_per_req'])}"
                )
        bg = max((s["background_cpu"]["max"] for s in scen["summary"].values() if s["background_cpu"]), default=0.0)
        if bg >= BACKGROUND_NOTE:
            notes.append(
                f"{sname}: other processes used up to {bg:.2f} of a CPU during a measurement: "
                "figures are noisier than usual"
            )
        if scen.get("note"):
            notes.append(f"{sname}: {scen['note']}")
        gc_run = scen.get("gateway_gc")
        if gc_run and gc_run.get("full_collections"):
            longest = gc_run["longest_at_most_s"]
            bound = f"over {gc_run['last_bound_s'] * 1000:g} ms" if longest is None else f"at most {longest * 1000:g} ms"
            notes.append(
                f"{sname}: the gateway made {gc_run['full_collections']} full garbage "
                f"collection{'' if gc_run['full_collections'] == 1 else 's'} over the scenario "
                f"({gc_run['full_seconds'] * 1000:.0f} ms in all; the longest {bound})"
            )
        if FLOOR in scen["summary"]:
            notes.append(
                f"{sname}: `{FLOOR}` is bench/floor_proxy.py, a bare llhttp proxy on uvloop with a pooled upstream "
                "and no features at all (no routing, key, limit, header hygiene, metrics or usage record): "
                "what any Python proxy pays here for the sockets and the event loop"
            )
        if scen.get("path") != "/":
            mib = ", ".join(
                f"{p} {_num(s['read_mib_s']['median'])} MiB/s" for p, s in scen["summary"].items() if s["read_mib_s"]
            )
            notes.append(f"{sname}: {scen['description']}; read at 64 connections: {mib}")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def write(doc: dict[str, Any], outdir: Path) -> tuple[Path, Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = outdir / "latest.json", outdir / "latest.md"
    jpath.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    mpath.write_text(markdown(doc))
    return jpath, mpath
