"""The ``relay`` command: serve | check | demo | queue. Thin: parsing and exit codes only.

Exit codes: 0 success, 1 the check found errors or a queue command failed, 2 usage error (argparse),
3 the daemon could not start (``daemon.STARTUP_FAILURE``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from relay import __version__, logs
from relay.config import Config, check_warnings, load_config
from relay.daemon import STARTUP_FAILURE, run
from relay.errors import ConfigError
from relay.spool import STATES, Spool

DEFAULT_CONFIG = "/etc/relay/relay.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="Local SMTP relay for legacy business software.")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")

    check = sub.add_parser("check", help="validate a config file: every error with its line, then warnings")
    check.add_argument("config", nargs="?", default=DEFAULT_CONFIG)
    check.add_argument("--connect", action="store_true", help="also connect and log in to every upstream account")

    demo = sub.add_parser("demo", help="run relay with a built-in TLS+AUTH upstream that stores mail in a Maildir")
    demo.add_argument("--data", default="demo-data", help="where the demo keeps its spool and Maildir")

    queue = sub.add_parser("queue", help="list queued mail (like mailq)")
    queue.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    queue.add_argument("--json", action="store_true", help="one JSON object per entry")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"serve": _serve, "check": _check, "demo": _demo, "queue": _queue}[args.command]
    return command(args)


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"relay: {path}: {len(exc.problems)} error(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  error: {problem}", file=sys.stderr)
        return None


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    warnings = check_warnings(config, Path(args.config).read_text(encoding="utf-8"))
    for warning in warnings:
        print(f"  warning: {warning}", file=sys.stderr)
    print(f"{args.config}: OK ({len(config.upstreams)} upstream(s), {len(config.users)} user(s), "
          f"{len(warnings)} warning(s))")  # fmt: skip
    if args.connect:
        from relay.diagnose import probe_all

        probes = asyncio.run(probe_all(config))
        for result in probes:
            print(result)
        return 0 if all(p.ok for p in probes) else 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return STARTUP_FAILURE
    logs.configure(fmt=config.logging.format, level=config.logging.level)
    log = structlog.get_logger("relay.config")
    log.info("config_loaded", path=args.config, upstreams=sorted(config.upstreams), users=len(config.users))
    for warning in check_warnings(config, Path(args.config).read_text(encoding="utf-8")):
        log.warning("config_warning", problem=str(warning))
    try:
        asyncio.run(run(config, config_path=args.config))
    except OSError as exc:
        print(f"relay: cannot start: {exc}", file=sys.stderr)
        return STARTUP_FAILURE
    return 0


def _demo(args: argparse.Namespace) -> int:
    from relay.demo import run_demo  # trustme is only needed here

    logs.configure()
    try:
        asyncio.run(run_demo(Path(args.data).resolve()))
    except OSError as exc:
        print(f"relay demo: cannot start: {exc} (is another demo running?)", file=sys.stderr)
        return STARTUP_FAILURE
    except KeyboardInterrupt:
        pass
    return 0


def _queue(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    spool = Spool(config.spool_dir)
    now = time.time()
    rows = [(state, entry) for state in STATES for entry in spool.entries(state)]
    for state, entry in rows:
        if args.json:
            print(json.dumps({"state": state, "id": entry.id, "user": entry.user, "age": round(now - entry.received_at),
                              "size": entry.size, "recipients": list(entry.recipients), "attempts": entry.attempts,
                              "last_reply": entry.last_reply}))  # fmt: skip
        else:
            age = f"{int(now - entry.received_at)}s"
            print(f"{entry.id}  {state:8} {entry.size:>9}  {age:>7}  {entry.user or '-':12} {entry.mail_from}")
            print(f"    -> {', '.join(entry.recipients)}  attempts={entry.attempts}  {entry.last_reply}")
    if not args.json:
        print(f"-- {len(rows)} message(s) in queue")
    return 0
