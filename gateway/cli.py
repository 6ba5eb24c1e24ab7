"""The command line: `gateway run|check|demo` (key, usage and audit commands join as they land)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from gateway.app import StartupError
from gateway.config import ConfigError, load_config
from gateway.config.schema import GatewayConfig


def config_path(given: str | None) -> str:
    """-c wins; then ./gateway.yaml if present; then $GATEWAY_CONFIG."""
    if given:
        return given
    if os.path.exists("gateway.yaml"):
        return "gateway.yaml"
    return os.environ.get("GATEWAY_CONFIG") or "gateway.yaml"


def _load(args: argparse.Namespace) -> GatewayConfig:
    return load_config(config_path(args.config))


def cmd_check(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        if args.json:
            print(json.dumps({"ok": False, "errors": e.errors}))
        else:
            for line in e.errors:
                print(line, file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"ok": True, "routes": [r.name for r in cfg.routes]}))
    else:
        print(f"{path}: OK ({len(cfg.routes)} route{'s' if len(cfg.routes) != 1 else ''})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import run, setup_logging

    setup_logging(args.log_level)
    cfg = _load(args)
    return run(cfg, workers=args.workers, path=os.path.abspath(config_path(args.config)))


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.app import setup_logging
    from gateway.demo import run_demo

    setup_logging(args.log_level)
    return run_demo(_load(args), upstream_port=args.upstream_port)


def cmd_store(args: argparse.Namespace) -> int:
    from gateway.cli_keys import run_action

    return run_action(_load(args), args.action, args)


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: an option given before the subcommand is not reset by the subcommand's own default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c", "--config", default=argparse.SUPPRESS, help="config file (default ./gateway.yaml, then $GATEWAY_CONFIG)"
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    common.add_argument("--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO (default), WARNING, ERROR")
    parser = argparse.ArgumentParser(prog="gateway", description="API-key gateway", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", parents=[common], help="serve the proxy and admin listeners")
    p.add_argument("--workers", type=int, default=1, help="proxy worker processes (SO_REUSEPORT)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check", parents=[common], help="validate the config offline")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("demo", parents=[common], help="run a demo upstream and the gateway in front of it")
    p.add_argument("--upstream-port", type=int, default=9901)
    p.set_defaults(func=cmd_demo)
    from gateway.cli_keys import add_parsers

    add_parsers(sub, common, cmd_store)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.config = getattr(args, "config", None)
    args.json = getattr(args, "json", False)
    args.log_level = getattr(args, "log_level", None) or os.environ.get("GATEWAY_LOG_LEVEL", "INFO")
    if args.command == "run" and args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        return int(args.func(args))
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        print("gateway: refusing to start with an invalid config", file=sys.stderr)
        return 2
    except StartupError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
