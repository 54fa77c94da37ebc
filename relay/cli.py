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
from relay.spool import STATES, QueueEntry, Spool, State

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
    actions = queue.add_mutually_exclusive_group()
    actions.add_argument("--retry", nargs="+", metavar="ID", help="deliver deferred or held entries now")
    actions.add_argument("--hold", nargs="+", metavar="ID", help="stop delivering these entries until released")
    actions.add_argument("--delete", nargs="+", metavar="ID", help="remove waiting, held or failed entries")
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


QUEUE_HEADER = f"{'QUEUE ID':19}  {'STATE':8} {'SIZE':>9}  {'AGE':>7}  {'USER':12} SENDER"


def _queue(args: argparse.Namespace) -> int:
    """List the spool like mailq; a spool that is missing or unreadable is one line on stderr, exit 1."""
    config = _load(args.config)
    if config is None:
        return 1
    problem = _spool_problem(config.spool_dir)
    if problem is not None:
        print(f"relay: {problem}", file=sys.stderr)
        return 1
    if args.retry or args.hold or args.delete:
        return _queue_action(Spool(config.spool_dir), args)
    try:
        rows = [(state, entry) for state in STATES for entry in Spool(config.spool_dir).entries(state)]
    except OSError as exc:
        print(f"relay: cannot read the spool directory {exc.filename or config.spool_dir}: {exc.strerror}"
              " (run as root or as relay's user)", file=sys.stderr)  # fmt: skip
        return 1
    except (ValueError, TypeError) as exc:  # a queue file that is not a relay envelope
        print(f"relay: a queue file under {config.spool_dir} cannot be read as an entry: {exc}", file=sys.stderr)
        return 1
    now = time.time()
    if not args.json:
        print(QUEUE_HEADER)
    for state, entry in rows:
        if args.json:
            print(json.dumps(_queue_json(state, entry, now)))
        else:
            print("\n".join(_queue_text(state, entry, now)))
    if not args.json:
        print(f"-- {len(rows)} message(s) in queue")
    return 0


def _spool_problem(spool_dir: Path) -> str | None:
    """Why ``spool_dir`` cannot be listed, or ``None``.

    A missing spool is an error rather than an empty queue: most often the admin passed another config
    than the daemon's, and "0 messages" would wrongly reassure them.
    """
    try:
        is_dir = spool_dir.is_dir()
        exists = is_dir or spool_dir.exists()
    except OSError as exc:
        return f"cannot read the spool directory {spool_dir}: {exc.strerror}"
    if not exists:
        return f"spool directory {spool_dir} does not exist (has relay run with this config?)"
    if not is_dir:
        return f"spool_dir {spool_dir} is not a directory"
    return None


_ACTIONS: dict[str, dict[State, State]] = {
    "retry": {"deferred": "incoming", "hold": "incoming"},
    "hold": {"incoming": "hold", "deferred": "hold"},
}


def _queue_action(spool: Spool, args: argparse.Namespace) -> int:
    """postsuper-like actions, by rename only, safe beside the running daemon."""
    failures = 0
    for name in ("retry", "hold", "delete"):
        for queue_id in getattr(args, name) or ():
            done: object = spool.delete(queue_id) if name == "delete" else spool.admin_move(queue_id, _ACTIONS[name])
            if done:
                print(f"{queue_id}: {name} done" + (f" ({done[0]} -> {done[1]})" if isinstance(done, tuple) else ""))
                continue
            failures += 1
            where = spool.find(queue_id)
            state = where[0] if where else None
            reason = {
                None: "no such entry", "active": "being delivered right now; try again in a moment",
                "failed": "it failed permanently; send the message again",
            }.get(state, f"it is in {state}/")  # fmt: skip
            print(f"relay: {queue_id}: cannot {name}: {reason}", file=sys.stderr)
    return 1 if failures else 0


def _queue_json(state: State, entry: QueueEntry, now: float) -> dict[str, object]:
    """One entry for scripts and monitoring; the keys are stable (``next_attempt_at`` is null unless deferred)."""
    return {
        "state": state,
        "id": entry.id,
        "user": entry.user,
        "age": round(now - entry.received_at),
        "size": entry.size,
        "recipients": list(entry.recipients),
        "delivered": list(entry.delivered),
        "bounced": [{"recipient": recipient, "reply": reply} for recipient, reply in entry.bounced],
        "attempts": entry.attempts,
        "last_reply": entry.last_reply,
        "next_attempt_at": round(entry.next_attempt_at) if state == "deferred" else None,
    }


def _queue_text(state: State, entry: QueueEntry, now: float) -> list[str]:
    """An entry's lines under ``QUEUE_HEADER``, then what happened to which recipient so far."""
    age = f"{int(now - entry.received_at)}s"
    lines = [
        f"{entry.id}  {state:8} {entry.size:>9}  {age:>7}  {entry.user or '-':12} {entry.mail_from}",
        f"    -> {', '.join(entry.recipients)}  attempts={entry.attempts}  {entry.last_reply}",
    ]
    if entry.delivered:
        lines.append(f"    delivered: {', '.join(entry.delivered)}")
    lines += [f"    bounced: {recipient} ({reply})" for recipient, reply in entry.bounced]
    if state == "deferred":
        wait = int(entry.next_attempt_at - now)
        lines.append(f"    next attempt in {wait}s" if wait > 0 else "    next attempt: due now")
    return lines
