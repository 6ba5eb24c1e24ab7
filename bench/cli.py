"""`python -m bench`: start everything, measure each proxy in turn, report, stop everything."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import gateway, nginx, report, wrk
from bench.measure import LATENCY, THROUGHPUT, Target, measure
from bench.procs import BenchError, Procs, free_port, http_get, wait_port
from bench.scenarios import BY_NAME, SCENARIOS, Scenario, Setup, key_table

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP_SECONDS = 1.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--duration", type=float, default=10.0, metavar="SECONDS", help="each wrk run (default 10)")
    p.add_argument("--rounds", type=int, default=3, metavar="N", help="interleaved rounds (default 3)")
    p.add_argument("--quick", action="store_true", help="duration 3, rounds 1")
    p.add_argument(
        "--scenario", action="append", choices=list(BY_NAME), metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(BY_NAME)}",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="where latest.json and latest.md go (default bench/results)")
    p.add_argument(
        "--rev", metavar="REV",
        help="measure the gateway as committed at REV (e.g. HEAD) instead of the working tree",
    )
    p.add_argument("--keep-temp", action="store_true", help="keep the temp directory (configs, logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 3.0, 1
    if args.duration <= 0 or args.rounds < 1:
        p.error("--duration must be positive and --rounds at least 1")
    return args


def cpu_layout() -> tuple[list[int] | None, list[int] | None, list[int] | None]:
    """(proxy CPUs, load CPUs, both): the proxy alone on the first CPU, wrk and the upstream on the second."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        print("bench: fewer than 2 CPUs available: nothing is pinned, figures are not comparable", file=sys.stderr)
        return None, None, None
    return [allowed[0]], [allowed[1]], allowed[:2]


def _cmd(argv: list[str], cwd: Path | None = None) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (res.stdout or res.stderr).strip()


def metadata(args: argparse.Namespace, proxy_cpus: Any, load_cpus: Any, commit: str | None) -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if commit is None:  # the working tree: HEAD, marked when the gateway package differs from it
        commit = _cmd(["git", "rev-parse", "--short", "HEAD"], gateway.REPO)
        dirty = _cmd(["git", "status", "--porcelain", "--", "gateway"], gateway.REPO)
        if dirty and dirty != "?":
            commit += "+modified"
    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = None
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "source": f"commit {commit}" if args.rev else "working tree",
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "nginx": _cmd([nginx.nginx_binary(), "-v"]).replace("nginx version: ", ""),
        "wrk": _cmd([wrk.wrk_binary(), "--version"]).splitlines()[0].split(" [")[0],
        "python": platform.python_version(),
        "uvloop": uv,
        "duration": args.duration,
        "rounds": args.rounds,
        "proxy_cpus": ",".join(map(str, proxy_cpus)) if proxy_cpus else "any",
        "load_cpus": ",".join(map(str, load_cpus)) if load_cpus else "any",
    }


def _sanity(target: Target, path: str, headers: dict[str, str], expect_len: int) -> None:
    """One GET through the proxy must answer 200 with the whole body (retried while workers come up)."""
    deadline = time.monotonic() + 10
    while True:
        target.proc.check_alive()
        try:
            status, body = http_get(target.port, path, headers)
        except OSError as e:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            raise BenchError(f"{target.name}: GET {path} failed: {e}\n{target.proc.log_tail()}") from None
        if status != 200 or len(body) != expect_len:
            raise BenchError(
                f"{target.name}: GET {path} answered {status} with {len(body)} bytes (want 200, {expect_len})"
                f"\n{body[:300]!r}\n{target.proc.log_tail()}"
            )
        return


def run_scenario(
    procs: Procs, tmp: Path, scen: Scenario, args: argparse.Namespace, upstream: Target, keys: list[str],
    layout: tuple[Any, Any, Any],
) -> dict[str, Any]:
    proxy_cpus, load_cpus, both = layout
    upstream_port = upstream.port
    cpus = both if scen.spread else proxy_cpus
    if scen.key_count != len(keys):
        keys = key_table(scen.key_count)
    key = keys[len(keys) // 2]
    headers = {"X-API-Key": key}
    base = tmp / scen.name
    logs = base / "wrk"
    for d in (base / "nginx", base / "gateway", logs):
        d.mkdir(parents=True)

    anchor_port = free_port()
    anchor = nginx.start_anchor(
        procs, base / "nginx", anchor_port, upstream_port, keys, scen.workers, cpus, scen.anchor
    )

    gw_port, admin_port = free_port(), free_port()
    config = gateway.base_config(gw_port, admin_port, upstream_port)
    config["routes"][0].update(scen.route)
    setup = Setup(base / "gateway", config, keys, procs, cpus, load_cpus, source=args.source)
    if scen.configure:
        scen.configure(setup)
    gw_headers = setup.gateway_headers or headers
    scripts: dict[str, Path] = {}  # wrk scripts by target: only when the keys rotate
    if scen.rotate:
        if not setup.gateway_keys:
            raise BenchError(f"{scen.name}: rotating keys, but its configure hook made none for the gateway")
        scripts = {
            report.ANCHOR: wrk.rotation_script(logs, report.ANCHOR, keys),
            report.OURS: wrk.rotation_script(logs, report.OURS, setup.gateway_keys),
        }
    gw = gateway.start_gateway(procs, base / "gateway", config, scen.workers, cpus, source=args.source)
    targets = [Target(report.ANCHOR, anchor, anchor_port), Target(report.OURS, gw, gw_port)]
    if scen.floor:
        floor_port = free_port()
        floor = procs.start(
            report.FLOOR, [sys.executable, "-m", "bench.floor_proxy", str(floor_port), str(upstream_port)],
            cpus=cpus, log=base / "floor.log", cwd=gateway.REPO, env=gateway.gateway_env(),
        )
        wait_port(floor, floor_port)
        targets.append(Target(report.FLOOR, floor, floor_port))

    try:
        expect = nginx.BIG_SIZE if scen.path == nginx.BIG_PATH else 2
        status, _ = http_get(anchor_port, scen.path, {"X-API-Key": "not-a-key"})
        if status != 403:
            raise BenchError(f"nginx anchor: an unknown key got {status}, want 403")
        for t in targets:
            hdrs = gw_headers if t.name == report.OURS else headers
            _sanity(t, scen.path, hdrs, expect)
            warm = measure(
                procs, t, THROUGHPUT, path=scen.path, duration=WARMUP_SECONDS, headers=hdrs,
                load_cpus=load_cpus, log=logs / f"warmup-{t.name}.txt", helpers=[upstream.proc, *setup.helpers],
                script=scripts.get(t.name),
            )
            if warm["errors"]:
                print(f"  warm-up {t.name}: {warm['errors']} failed requests", flush=True)

        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            t.name: {LATENCY: [], THROUGHPUT: []} for t in targets
        }
        for rnd in range(args.rounds):
            for mode in (LATENCY, THROUGHPUT):
                for t in targets:  # A B, A B: each proxy next to its anchor run
                    r = measure(
                        procs, t, mode, path=scen.path, duration=args.duration,
                        headers=gw_headers if t.name == report.OURS else headers,
                        load_cpus=load_cpus, log=logs / f"{rnd}-{mode}-{t.name}.txt", helpers=[upstream.proc, *setup.helpers],
                        backends=setup.helpers if t.name == report.OURS else (),
                        script=scripts.get(t.name),
                    )
                    r["round"] = rnd
                    runs[t.name][mode].append(r)
                    cpu = f"{r['cpu_us_per_req']:.1f}" if r["cpu_us_per_req"] else "?"
                    if r["backend_cpu_us_per_req"] is not None:
                        cpu += f" (+{r['backend_cpu_us_per_req']:.1f} backends)"
                    err = f"  ERRORS {r['errors']} (non-2xx {r['non_2xx']}, socket {r['socket_errors']})" if r["errors"] else ""
                    warn = f"  ({'; '.join(r['warnings'])})" if r["warnings"] else ""
                    print(
                        f"  {scen.name} round {rnd + 1}/{args.rounds} {mode:10} {t.name:8} "
                        f"{r['rps']:>10,.0f} req/s  p50 {r['p50_us'] or 0:>8,.0f} µs  "
                        f"p99 {r['p99_us'] or 0:>8,.0f} µs  {cpu:>6} CPU-µs/req  "
                        f"background {r['background_cpu'] or 0:.2f} CPU{err}{warn}",
                        flush=True,
                    )
        gc_pauses = _gc_pauses(admin_port)
    finally:
        for t in targets:  # the anchor first
            procs.stop(t.proc)
    gw_log = (base / "gateway" / "gateway.log").read_text(errors="replace")
    problems = [ln for ln in gw_log.splitlines() if " ERROR " in ln or " WARNING " in ln or "Traceback" in ln]
    return {
        "description": scen.description,
        "path": scen.path,
        "workers": scen.workers,
        "proxy_cpus": cpus,
        "note": scen.note,
        "gateway_config": config,
        "gateway_log_problems": problems[:50],
        "gateway_gc": gc_pauses,
        "runs": runs,
    }


def _gc_pauses(admin_port: int) -> dict[str, Any] | None:
    """The gateway's full collections over the whole scenario (warm-ups included), from its /metrics:
    how many, their total, and the bucket bound the longest fell under."""
    from prometheus_client.parser import text_string_to_metric_families

    try:  # a side figure: whatever goes wrong here, the scenario's measurements are kept
        status, body = http_get(admin_port, "/metrics", {})
        if status != 200:
            return None
        buckets: list[tuple[float, float]] = []
        out: dict[str, Any] = {}
        for fam in text_string_to_metric_families(body.decode()):
            if fam.name != "gateway_gc_pause_seconds":
                continue
            for sample in fam.samples:
                if sample.labels.get("generation") != "2":
                    continue
                if sample.name.endswith("_bucket"):
                    buckets.append((float(sample.labels["le"]), sample.value))
                elif sample.name.endswith("_count"):
                    out["full_collections"] = int(sample.value)
                elif sample.name.endswith("_sum"):
                    out["full_seconds"] = sample.value
    except Exception as e:
        print(f"  (the gateway's full collections could not be read from /metrics: {e!r})", flush=True)
        return None
    if not buckets:
        return None
    buckets.sort()
    total = buckets[-1][1]
    longest = next(le for le, n in buckets if n >= total) if total else 0.0
    # None: over the last finite bound, kept beside it for the report
    out["longest_at_most_s"] = None if longest == float("inf") else longest
    out["last_bound_s"] = buckets[-2][0] if len(buckets) > 1 else None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [BY_NAME[n] for n in dict.fromkeys(args.scenario)] if args.scenario else SCENARIOS

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminate)

    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    try:
        layout = cpu_layout()
        proxy_cpus, load_cpus, _ = layout
        if load_cpus:
            os.sched_setaffinity(0, load_cpus)  # this driver mostly sleeps, but not on the proxy's CPU
        commit = None
        args.source = gateway.REPO
        if args.rev:
            args.source = tmp / "src"
            commit = gateway.snapshot(args.rev, args.source)
        doc: dict[str, Any] = {"meta": metadata(args, proxy_cpus, load_cpus, commit), "scenarios": {}}
        keys = key_table()
        upstream_port = free_port()
        upstream = Target(
            "upstream", nginx.start_upstream(procs, tmp / "upstream", upstream_port, load_cpus), upstream_port
        )
        print(
            f"bench: {len(chosen)} scenario(s), {args.rounds} round(s) of {args.duration:g} s; "
            f"proxies on CPU {doc['meta']['proxy_cpus']}, wrk and upstream on CPU {doc['meta']['load_cpus']}",
            flush=True,
        )
        for scen in chosen:
            result = run_scenario(procs, tmp, scen, args, upstream, keys, layout)
            result["summary"] = report.summarise(result)
            doc["scenarios"][scen.name] = result
        jpath, mpath = report.write(doc, args.out)
        print()
        print(report.markdown(doc), end="")
        seen: dict[str, list[str]] = {}
        for name, scen in doc["scenarios"].items():
            for line in scen["gateway_log_problems"]:
                # Without its timestamp, so a message every scenario logs is shown once.
                msg = line.split(" ", 2)[2] if line[:4].isdigit() and line.count(" ") >= 2 else line
                seen.setdefault(msg, []).append(name)
        if seen:
            print("\ngateway log (warnings and errors):")
            for msg, names in list(seen.items())[:20]:
                print(f"  [{', '.join(dict.fromkeys(names))}] {msg}")
        print(f"\nwrote {os.path.relpath(jpath)} and {os.path.relpath(mpath)}")
        return 0
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        if not args.keep_temp:
            print("bench: rerun with --keep-temp to keep configs and logs", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if args.keep_temp:
            print(f"bench: temp directory kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
