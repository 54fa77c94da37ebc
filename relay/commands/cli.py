"""The ``relay`` command: serve | check | demo | queue | send-test | passwd | oauth login | schema. Thin:
parsing and exit codes only.

Exit codes: 0 success, 1 the check found errors or a queue command failed, 2 usage error (argparse),
3 the daemon could not start (``daemon.STARTUP_FAILURE``), 78 serve as root on a spool that belongs to another
user (``spoolaccess.root_refusal``); send-test, passwd and oauth login use sysexits(3) codes
(67 unknown user or recipient, 69 unavailable, 75 try again later, 78 the settings must change: see
sendtest.py, passwd.py and oauthlogin.py).
"""

from __future__ import annotations

import argparse
import asyncio
import email.policy
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from email.parser import BytesHeaderParser
from pathlib import Path

import structlog

from relay import __version__, logs, maildrop
from relay.config.load import lenient_spool_dir, load_config
from relay.config.models import Config
from relay.config.spoolaccess import permission_advice, root_refusal
from relay.envelope import OAuth2
from relay.errors import ConfigError
from relay.queue.notices import printable, read_note
from relay.queue.spool import STATES, QueueEntry, Spool, State

DEFAULT_CONFIG = "/etc/relay/relay.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="Local SMTP relay for legacy business software.")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    # `relay serve CONFIG` and `relay check -c CONFIG` work too: admins type one form for both
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("-c", "--config", help=f"YAML config (default {DEFAULT_CONFIG})")
    serve.add_argument("config_file", nargs="?", metavar="CONFIG", help="the same, given without -c")

    check = sub.add_parser("check", help="validate a config file: every error with its line, then warnings")
    check.add_argument("config_file", nargs="?", metavar="CONFIG", help=f"YAML config (default {DEFAULT_CONFIG})")
    check.add_argument("-c", "--config", help="the same, given with -c")
    check.add_argument("--connect", action="store_true", help="also connect and log in to every upstream account")
    check.add_argument("--startup", action="store_true", help="fail only on what stops the daemon (config errors, "
                       "listener keys), as the unit's ExecStartPre= runs it: a missing secret file or an expired "
                       "credential is a warning here (mail waits in the queue until it is fixed)")  # fmt: skip

    demo = sub.add_parser("demo", help="run relay with a built-in TLS+AUTH upstream that stores mail in a Maildir")
    demo.add_argument("--data", default="demo-data", help="where the demo keeps its spool and Maildir")
    demo.add_argument("--port", type=_port, default=2525, help="where relay listens (default 2525)")
    demo.add_argument("--upstream-port", type=_port, default=4650, help="the built-in provider's port (default 4650)")

    # listed for --help only: main() hands `relay sendmail ...` to sendmail.py before argparse sees its options
    sub.add_parser("sendmail", help="submit a message from stdin like /usr/sbin/sendmail (also: relay-sendmail)",
                   add_help=False)  # fmt: skip
    sub.add_parser("schema", help="print the config JSON Schema (for editors: completion, checks)")

    queue = sub.add_parser("queue", help="list, show and manage queued mail (like mailq, postqueue, postsuper)")
    queue.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    queue.add_argument("--json", action="store_true", help="one JSON object per entry or per action")
    actions = queue.add_mutually_exclusive_group()
    actions.add_argument("--show", nargs="+", metavar="ID", help="an entry in full: envelope, each recipient's "
                         "state and reply, the message headers")  # fmt: skip
    actions.add_argument("--retry", nargs="+", metavar="ID", help="deliver deferred or held entries now")
    actions.add_argument("--flush", action="store_true", help="deliver every deferred entry now (postqueue -f)")
    actions.add_argument("--hold", nargs="+", metavar="ID", help="stop delivering these entries until released")
    actions.add_argument("--release", nargs="+", metavar="ID", help="deliver held entries again (hold -> incoming)")
    actions.add_argument("--delete", nargs="+", metavar="ID", help="remove waiting, held or failed entries")

    send_test = sub.add_parser("send-test", help="send a test message as a user now, and explain any failure")
    send_test.add_argument("user", metavar="USER", help="a key of users:, or 'company' for the company defaults")
    send_test.add_argument("--to", metavar="ADDRESS", help="recipient (default: the user's own address)")
    send_test.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")

    passwd = sub.add_parser("passwd", help="set a user's own mail password (kept out of the config)")
    passwd.add_argument("user", metavar="USER", help="a key of users:")
    passwd.add_argument("--login", action="store_true", help="the local SMTP AUTH password, not the provider's")
    passwd.add_argument("--delete", action="store_true", help="remove the stored password")
    passwd.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")

    oauth = sub.add_parser("oauth", help="sign a person in for an OAuth2 account (Outlook.com, Gmail, SMTP.Send)")
    oauth_sub = oauth.add_subparsers(dest="oauth_command", required=True)
    login = oauth_sub.add_parser("login", help="sign in once and save the refresh token to refresh_token_file")
    login.add_argument("account", metavar="ACCOUNT", help="a name under upstreams:, or a user with an own oauth2 account")
    login.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    login.add_argument("--flow", choices=("device", "browser", "paste"),
                       help="device (code on another device; default for microsoft), browser (a redirect to this "
                            "machine; default for google) or paste (paste the address the browser ended on)")  # fmt: skip
    login.add_argument("--port", type=int, help="the loopback port of the browser and paste flows (default: a free one)")
    login.add_argument("--force", action="store_true", help="save the token even if another person than the "
                       "account's username signed in (by default the old token is kept)")  # fmt: skip
    return parser


def _port(text: str) -> int:
    """argparse's type for a port: out of range is a usage error (exit 2), not a traceback from the config."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (a number 1-65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (1-65535)")
    return port


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["sendmail"]:  # sendmail.py: its options (-oi, -fsender, -t) and sysexits codes
        from relay.commands import sendmail

        return sendmail.main(arguments[1:], prog="sendmail")
    if arguments[:1] == ["intake-process"]:  # started by relay serve itself (daemon.IntakeProcess), not by hand
        return _intake_process(arguments[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.port == args.upstream_port:
        parser.error(f"--port and --upstream-port are both {args.port}: relay and its built-in provider need one each")
    if args.command in ("serve", "check"):
        if args.config and args.config_file and args.config != args.config_file:
            parser.error(f"two configs given: {args.config} and {args.config_file}")
        args.config = args.config or args.config_file or DEFAULT_CONFIG
    command = {"serve": _serve, "check": _check, "demo": _demo, "queue": _queue, "send-test": _send_test,
               "passwd": _passwd, "schema": _schema, "oauth": _oauth}[args.command]  # fmt: skip
    try:
        return command(args)
    except BrokenPipeError:  # `relay queue | head`: the reader has all it wanted, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _load(path: str, *, as_json: bool = False) -> Config | None:
    """The config, or ``None`` once its errors are printed: for people on stderr, or with ``as_json`` as one
    object on stdout, where a script reading ``--json`` output looks (as the queue actions' errors are)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        _print_config_errors(path, exc, as_json=as_json)
        return None


def _print_config_errors(path: str, exc: ConfigError, *, as_json: bool) -> None:
    """For people on stderr; with ``as_json`` one object on stdout, where a script reading ``--json`` looks."""
    if as_json:
        print(json.dumps({"error": f"{path}: {len(exc.problems)} error(s) in the config",
                          "problems": [str(problem) for problem in exc.problems]}))  # fmt: skip
        return
    print(f"relay: {path}: {len(exc.problems)} error(s):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  error: {problem}", file=sys.stderr)


def _check(args: argparse.Namespace) -> int:
    from relay.config.warnings import check_errors, check_warnings, startup_errors

    config = _load(args.config)
    if config is None:
        if args.connect:
            print("relay: --connect: no account was tried: the file must load first (fix the errors above)", file=sys.stderr)
        return 1
    text = Path(args.config).read_text(encoding="utf-8")
    errors: list[object] = [*check_errors(config, text)]  # loads, but cannot work here (a secret file missing)
    errors += _client_key_errors(config)
    warnings: list[object] = [*check_warnings(config, text)]
    warnings += _queued_too_big_for_graph(config)
    expired = _credential_problems(config, warnings)
    if args.startup:  # ExecStartPre=: only what stops the daemon anyway; the rest waits in the queue
        fatal = startup_errors(config, text)
        warnings += [*(error for error in errors if error not in fatal), *expired]
        errors, expired = [*fatal], []
    for error in [*errors, *expired]:
        print(f"  error: {error}", file=sys.stderr)
    for warning in warnings:
        print(f"  warning: {warning}", file=sys.stderr)
    if errors or expired:
        found = [f"{len(errors)} error(s)"] if errors else []
        found += [f"{len(expired)} expired credential(s)"] if expired else []
        print(f"{args.config}: NOT OK ({', '.join(found)}, {len(warnings)} warning(s))")
    else:
        print(f"{args.config}: OK ({len(config.upstreams)} upstream(s), {len(config.users)} user(s), "
              f"{len(warnings)} warning(s))")  # fmt: skip
    _print_secret_sources(config)
    if args.connect:  # errors or not: each account is tried, one with a missing secret fails saying so
        from relay.commands.diagnose import probe_all

        logs.configure(level="warning")  # one line per account says it all; no debug events in between
        probes = asyncio.run(probe_all(config))
        for result in probes:
            print(result)
        return 0 if all(p.ok for p in probes) and not (errors or expired) else 1
    return 1 if errors or expired else 0


def _credential_problems(config: Config, warnings: list[object]) -> list[str]:
    """Certificates and client secrets that expire within 30 days (added to ``warnings``) or have expired
    (returned: errors), and certificates that cannot be read (warnings)."""
    from relay.config.accounts import every_account
    from relay.transports.assertions import expiries

    found, unreadable = expiries(every_account(config))
    errors: list[str] = []
    for expiry in found:
        problem = expiry.problem()
        if problem is not None:
            (errors if problem[0] == "error" else warnings).append(problem[1])
    warnings += [f"{name}: {why}" for name, why in unreadable]
    return errors


def _client_key_errors(config: Config) -> list[str]:
    """A ``client_key_file`` that is another certificate's key: no token can ever be had (only ``--connect``
    said so; plain ``relay check`` said OK). Checked offline, once per certificate and key."""
    from relay.config.accounts import every_account
    from relay.transports.assertions import key_mismatch

    found: list[str] = []
    seen: set[tuple[Path | None, Path | None]] = set()
    for account in every_account(config):
        oauth = account.oauth2
        if oauth is None or oauth.client_certificate_file is None:
            continue
        pair = (oauth.client_certificate_file, oauth.client_key_file)
        words = None if pair in seen else key_mismatch(oauth)
        seen.add(pair)
        if words is not None:
            where = f"users.{account.own_user}.upstream" if account.own_user else f"upstreams.{account.name}"
            found.append(f"{where}.oauth2.client_key_file: {words}")
    return found


def _print_secret_sources(config: Config) -> None:
    """Where each account that logs in gets its secret: a file, the environment, a credential, a user's
    ``relay passwd`` file (secret store) or an OAuth2 app; never the secret itself."""
    from relay.config.accounts import every_account
    from relay.config.credentials import password_source

    for account in every_account(config):
        if account.username is not None or account.oauth2 is not None:
            print(f"  secret: {account.name} as {account.username}: {password_source(account)}")
        if account.oauth2 is not None and account.oauth2.client_certificate_file is not None:
            print(f"  certificate: {account.name}: {_certificate_words(account.oauth2)}")


def _certificate_words(oauth: OAuth2) -> str:
    """The thumbprint and expiry an admin compares with the app registration's Certificates & secrets."""
    from relay.errors import SecretError
    from relay.transports.assertions import certificate_info

    try:
        info = certificate_info(oauth)
    except SecretError as exc:
        return f"cannot be read: {exc}"
    return (f"thumbprint {info.thumbprint} (SHA-256 {info.thumbprint_sha256[:16]}...), expires "
            f"{info.not_after:%Y-%m-%d %H:%M} UTC, subject {info.subject}")  # fmt: skip


def _send_test(args: argparse.Namespace) -> int:
    from relay.commands.sendtest import EX_CONFIG, send_test

    config = _load(args.config)
    if config is None:
        return EX_CONFIG
    logs.configure(level="warning")  # the report says what happened; the daemon's info/debug events would not
    report = asyncio.run(send_test(config, args.user, args.to))
    print("\n".join(report.lines))
    return report.code


def _passwd(args: argparse.Namespace) -> int:
    from relay.commands import passwd
    from relay.commands.sendtest import EX_CONFIG

    config = _load(args.config)
    return EX_CONFIG if config is None else passwd.run(config, args.user, login=args.login, delete=args.delete)


def _oauth(args: argparse.Namespace) -> int:
    from os import EX_CONFIG, EX_USAGE

    from relay.commands import oauthlogin

    if args.port is not None and not 1 <= args.port <= 65535:
        print(f"relay oauth login: --port {args.port} is not a port (1-65535)", file=sys.stderr)
        return EX_USAGE
    config = _load(args.config)
    if config is None:
        return EX_CONFIG
    return oauthlogin.run(config, args.account, flow=args.flow, port=args.port, force=args.force)


def _schema(args: argparse.Namespace) -> int:
    from relay.config.schema import config_schema

    print(json.dumps(config_schema(), indent=2, ensure_ascii=False))
    return 0


def _queued_too_big_for_graph(config: Config) -> list[str]:
    """Mail queued before its account became a Graph account, too big for one 4 MB sendMail request: it
    goes by the draft route, which needs ``Mail.ReadWrite``; without that permission it waits and is
    bounced at the end of its lifetime. Plain ``check`` cannot see the token's permissions, so it says
    what the mail needs and where to look (the warning said "will be bounced", and told the admin to
    send it again by SMTP: a second copy, since the daemon delivers it by the draft route)."""
    from relay.config.accounts import account_for
    from relay.transports.graph import GRAPH_MAX_REQUEST

    too_big: dict[str, int] = {}
    spool = Spool(config.spool_dir)
    try:
        for state in ("incoming", "deferred", "hold"):
            for entry in spool.entries(state):
                try:
                    graph = account_for(config, entry.account).transport == "graph"
                except ConfigError:
                    continue
                if graph and entry.size * 4 // 3 > GRAPH_MAX_REQUEST:
                    too_big[entry.account] = too_big.get(entry.account, 0) + 1
    except OSError:  # the spool's own problems are warned about by check_warnings
        return []
    return [f"{count} queued message(s) of upstream {name} are over Microsoft Graph's 4 MB request size: they "
            f"go by the draft route, which needs the app permission Mail.ReadWrite (relay check --connect says "
            f"whether the token has it; without it they wait and are bounced when they expire)"
            for name, count in sorted(too_big.items())]  # fmt: skip


def _serve(args: argparse.Namespace) -> int:
    from relay.daemon import STARTUP_FAILURE, DaemonFailure, event_loop_factory, log_config_problems, run

    config = _load(args.config)
    if config is None:
        return STARTUP_FAILURE
    refusal = root_refusal(config.spool_dir, args.config)
    if refusal is not None:  # before anything is written there as root
        print(f"relay: {refusal}", file=sys.stderr)
        return os.EX_CONFIG
    logs.configure(fmt=config.logging.format, level=config.logging.level)
    log = structlog.get_logger("relay.config")
    log.info("config_loaded", path=args.config, upstreams=sorted(config.upstreams), users=len(config.users))
    log_config_problems(config, args.config)  # the daemon still starts: mail waits queued until it is fixed
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(run(config, config_path=args.config))
    except OSError as exc:
        print(f"relay: cannot start: {exc}{permission_advice(exc, config.spool_dir, args.config)}", file=sys.stderr)
        return STARTUP_FAILURE
    except DaemonFailure as exc:
        print(f"relay: stopped: {exc}", file=sys.stderr)
        return 1
    return 0


def _intake_process(arguments: list[str]) -> int:
    """The listeners' process of ``relay serve`` (see ``daemon.IntakeProcess``)."""
    from relay.daemon import STARTUP_FAILURE, die_with_parent, event_loop_factory, serve_intake

    parser = argparse.ArgumentParser(prog="relay intake-process")
    parser.add_argument("--config", required=True)
    parser.add_argument("--hints", type=int, required=True)
    parser.add_argument("--life", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--listen", action="append", default=[], help="INDEX:FD")
    args = parser.parse_args(arguments)
    die_with_parent(args.parent)
    config = _load(args.config)
    if config is None:
        return STARTUP_FAILURE
    logs.configure(fmt=config.logging.format, level=config.logging.level)
    listen = [(int(index), int(fd)) for index, fd in (item.split(":") for item in args.listen)]
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(serve_intake(args.config, listen, args.hints, args.life))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from relay.commands.demo import DemoBusy, run_demo
    from relay.daemon import STARTUP_FAILURE

    logs.configure()
    try:
        asyncio.run(run_demo(Path(args.data).resolve(), args.port, args.upstream_port))
    except DemoBusy as exc:
        print(f"relay demo: cannot start: {exc}", file=sys.stderr)
        return STARTUP_FAILURE
    except ConfigError as exc:  # the demo's own config refused (e.g. a --data path it cannot hold)
        print(f"relay demo: cannot start: {'; '.join(str(p) for p in exc.problems)}", file=sys.stderr)
        return STARTUP_FAILURE
    except OSError as exc:
        print(f"relay demo: cannot start: {exc} (is another demo running?)", file=sys.stderr)
        return STARTUP_FAILURE
    except KeyboardInterrupt:
        pass
    return 0


QUEUE_HEADER = f"{'QUEUE ID':19}  {'STATE':8} {'SIZE':>9}  {'AGE':>7}  {'USER':12} SENDER"


def _queue(args: argparse.Namespace) -> int:
    """List the spool like mailq; a spool that is missing or unreadable is one line on stderr, exit 1."""
    found = _queue_spool_dir(args.config, as_json=args.json)
    if found is None:
        return 1
    spool_dir, drop_dir = found
    problem = _spool_problem(spool_dir)
    if problem is not None:
        print(f"relay: {problem}", file=sys.stderr)
        return 1
    if args.show:
        return _queue_show(Spool(spool_dir), args.show, as_json=args.json)
    if args.retry or args.hold or args.delete or args.release or args.flush:
        return _queue_action(Spool(spool_dir), args)
    spool = Spool(spool_dir)
    try:
        rows = [(state, entry) for state in STATES for entry in spool.entries(state)]
        damaged = [(state, queue_id) for state in STATES for queue_id in spool.damaged(state)]
    except OSError as exc:
        print(f"relay: cannot read the spool directory {exc.filename or spool_dir}: {exc.strerror}"
              " (run as root or as relay's user)", file=sys.stderr)  # fmt: skip
        return 1
    except (ValueError, TypeError) as exc:  # a queue file that is not a relay envelope
        print(f"relay: a queue file under {spool_dir} cannot be read as an entry: {exc}", file=sys.stderr)
        return 1
    now = time.time()
    if not args.json:
        print(QUEUE_HEADER)
    states = {entry.id: state for state, entry in rows}
    for state, entry in rows:
        if args.json:
            print(json.dumps(_queue_json(state, entry, now)))
        else:
            print(_terminal(_queue_text(state, entry, now, states.get)))
    for state, queue_id in damaged:  # listed, not hidden: the daemon moves them to hold/ for a person
        if args.json:
            print(json.dumps({"state": state, "id": queue_id, "damaged": True}))
        else:
            print(f"{queue_id}  {state:8} damaged envelope: cannot be read (look at it, or relay queue --delete)")
    if not args.json:
        print(f"-- {len(rows) + len(damaged)} message(s) in queue")
        note = _maildrop_note(drop_dir)
        if note:
            print(note)
    return 0


def _maildrop_note(directory: Path) -> str | None:
    """How many messages relay-sendmail left in the drop directory while relay was down (``None``: none,
    or the directory cannot be listed: mode 3733, only relay's user and root may)."""
    try:
        with os.scandir(directory) as found:  # regular files: a directory or a link planted there is no mail
            names = [item.name for item in found if item.is_file(follow_symlinks=False)]
        bad = len(os.listdir(directory / maildrop.BAD)) if (directory / maildrop.BAD).is_dir() else 0
    except OSError:
        return None
    waiting = sum(map(maildrop.is_drop_name, names))
    if not waiting and not bad:
        return None
    note = f"-- {waiting} message(s) in the drop directory {directory}, left by relay-sendmail while relay was down"
    note += " (relay takes them when it runs)" if waiting else ""
    return note + (f"; {bad} it could not take in {directory / maildrop.BAD} (see the maildrop_bad events)" if bad else "")


def _queue_spool_dir(path: str, *, as_json: bool) -> tuple[Path, Path] | None:
    """The spool ``relay queue`` works on and the drop directory, or ``None`` once the config's errors
    are printed (with errors, the drop directory is the one ``spool_dir`` implies).

    ``spool_dir`` is all it needs. A config with errors anywhere else is refused at a reload while the
    daemon runs on its previous one: that is when the admin must see the queue, so the errors become
    a warning on stderr (``--json`` keeps stdout to JSON) and ``spool_dir`` is read alone
    (``lenient_spool_dir``). Only when even that cannot be told does the command fail, as before."""
    try:
        config = load_config(path)
        return config.spool_dir, config.maildrop
    except ConfigError as exc:
        errors = exc
    spool_dir = lenient_spool_dir(path)
    if spool_dir is None:
        _print_config_errors(path, errors, as_json=as_json)
        return None
    print(f"relay: warning: {path}: {len(errors.problems)} error(s), so relay will not load it (relay check "
          f"{path}); relay queue goes on with spool_dir {spool_dir}", file=sys.stderr)  # fmt: skip
    for problem in errors.problems:
        print(f"  error: {problem}", file=sys.stderr)
    return spool_dir, maildrop.directory_for(spool_dir, None)


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
    "flush": {"deferred": "incoming"},
    "hold": {"incoming": "hold", "deferred": "hold"},
    "release": {"hold": "incoming"},
}
_WHY_NOT: dict[State | None, str] = {
    None: "no such entry",
    "active": "being delivered right now; try again in a moment",
    "failed": "it failed permanently; send the message again",
}


def _queue_action(spool: Spool, args: argparse.Namespace) -> int:
    """postsuper-like actions, by rename only, safe beside the running daemon (which is nudged to look
    at incoming/ at once, see ``Spool.nudge``; otherwise it finds the entries within 10 seconds)."""
    failures = flushed = 0
    for name, given in _requested(spool, args):
        queue_id, unknown = resolve_id(spool, given) if name != "flush" else (given, "")
        if queue_id is None:
            failures += 1
            _report_action(name, given, None, unknown, as_json=args.json)
            continue
        done: object = spool.delete(queue_id) if name == "delete" else spool.admin_move(queue_id, _ACTIONS[name])
        moved = done if isinstance(done, tuple) else None
        reason = None
        if not done and name == "flush":  # the daemon took it meanwhile (its retry was due): not a failure
            continue
        if not done:
            failures += 1
            where = spool.find(queue_id)
            reason = _WHY_NOT.get(where[0] if where else None, f"it is in {where[0] if where else '?'}/")
        flushed += name == "flush"
        _report_action(name, queue_id, moved, reason, as_json=args.json)
    if args.flush and not args.json:
        print(f"-- {flushed} deferred message(s) queued for delivery now")
    if any(getattr(args, name) for name in ("retry", "flush", "release")):
        try:
            spool.nudge()
        except OSError:  # not the spool's owner nor root: the daemon's own rescan finds them in 10 s
            pass
    return 1 if failures else 0


def _requested(spool: Spool, args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.flush:  # what is deferred right now; an entry the daemon takes meanwhile is simply not moved
        return [("flush", queue_id) for queue_id in spool.ids("deferred")]
    named = ("retry", "hold", "release", "delete")
    return [(name, queue_id) for name in named for queue_id in getattr(args, name) or ()]


MAX_CANDIDATES = 10  # ids listed for an ambiguous prefix


def resolve_id(spool: Spool, given: str) -> tuple[str | None, str]:
    """The one queue id ``given`` names (the whole id or a unique prefix, any case), or ``None`` and why not."""
    found = spool.matching(given)
    if len(found) == 1:
        return found[0], ""
    if not found:
        return None, "no such entry"
    shown = ", ".join(found[:MAX_CANDIDATES]) + (f" and {len(found) - MAX_CANDIDATES} more" if len(found) >
                                                   MAX_CANDIDATES else "")  # fmt: skip
    return None, f"ambiguous: {len(found)} entries start with {given.upper()} ({shown}); give more of the id"


def _report_action(name: str, queue_id: str, moved: tuple[State, State] | None, reason: str | None, *,
                   as_json: bool) -> None:  # fmt: skip
    if as_json:
        row: dict[str, object] = {"id": queue_id, "action": name, "done": reason is None}
        if moved:
            row.update({"from": moved[0], "to": moved[1]})
        if reason:
            row["error"] = reason
        print(json.dumps(row))
    elif reason is None:
        print(f"{queue_id}: {name} done" + (f" ({moved[0]} -> {moved[1]})" if moved else ""))
    else:
        print(f"relay: {queue_id}: cannot {name}: {reason}", file=sys.stderr)


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
        "waiting_for": (entry.waiting_for or "retry") if state == "deferred" else None,  # "limit" or "retry"
        "kind": entry.kind,
        "notices": list(entry.notices),
    }


def _terminal(lines: list[str]) -> str:
    """Lines for the admin's terminal: a provider's reply, a header or a queue file holds whatever was
    put there, and an escape sequence in it would recolour, retitle or rewrite the terminal (``--json``
    needs nothing: JSON escapes every control character)."""
    return "\n".join(printable(line) for line in lines)


NoticeState = Callable[[str], State | None]  # where a notice's own entry is; None: delivered (or deleted)


def _queue_text(state: State, entry: QueueEntry, now: float, notice_state: NoticeState) -> list[str]:
    """An entry's lines under ``QUEUE_HEADER``, then what happened to which recipient so far."""
    age = f"{int(now - entry.received_at)}s"
    lines = [
        f"{entry.id}  {state:8} {entry.size:>9}  {age:>7}  {entry.user or '-':12} {entry.mail_from}"
        + ("  [notice]" if entry.kind == "notice" else ""),
        f"    -> {', '.join(entry.recipients)}  attempts={entry.attempts}  {entry.last_reply}",
    ]
    if entry.delivered:
        lines.append(f"    delivered: {', '.join(entry.delivered)}")
    lines += [f"    bounced: {recipient} ({reply})" for recipient, reply in entry.bounced]
    lines += ["    {} {}".format(*_notice_line(note, notice_state)) for note in entry.notices]
    if state == "deferred":
        wait = int(entry.next_attempt_at - now)
        why = {"limit": " (waiting for: limit, the account's sending limits)", "retry": " (waiting for: retry)"}
        when = f"next attempt in {wait}s" if wait > 0 else "next attempt: due now"
        lines.append(f"    {when}{why.get(entry.waiting_for, '')}")
    return lines


def _notice_line(note: str, notice_state: NoticeState) -> tuple[str, str]:
    """``failed 18F...`` (``failed 18F... admin`` for the admin copy) -> its label and words. ``notice
    sent:`` only for a notice that left: one that failed too (the user's account refuses its own mailbox
    as well; the company's account is down for the admin copy) told nobody, one still queued nobody yet."""
    action, queue_id, audience = read_note(note)
    what = {"failed": "failure notice", "delayed": "delay warning"}.get(action, action)
    who = "the user"
    if audience == "admin":
        what, who = f"{what}, admin copy", "the administrator (delivery.notify)"
    state = notice_state(queue_id)
    if state is None:
        return "notice sent:", f"{what} (queue id {queue_id})"
    if state == "failed":
        return "notice FAILED:", f"{what} (queue id {queue_id}; not delivered either, so {who} was not told)"
    return "notice queued:", f"{what} (queue id {queue_id}, {_PENDING[state]})"


def _spool_state(spool: Spool) -> NoticeState:
    """For ``--show``: each notice looked up where it is now (an envelope read or two, for the entries shown)."""

    def state_of(queue_id: str) -> State | None:
        try:
            found = spool.find(queue_id)
        except (ValueError, TypeError):  # a damaged envelope: it did not leave
            return "hold"
        return found[0] if found is not None else None

    return state_of


# region #### relay queue --show ####

Headers = list[tuple[str, str]] | str  # the decoded headers, or why they cannot be shown


_PENDING: dict[State, str] = {
    "incoming": "waiting", "active": "being delivered", "deferred": "deferred", "hold": "on hold",
    "failed": "not delivered",
}  # fmt: skip


def _queue_show(spool: Spool, queue_ids: list[str], *, as_json: bool) -> int:
    """Each entry in full (postcat -q without the body): what relay knows and what the message says."""
    failures = 0
    now = time.time()
    for given in queue_ids:
        queue_id, why = resolve_id(spool, given)
        try:
            where = spool.find(queue_id) if queue_id is not None else None
        except (ValueError, TypeError):
            where, why = None, "its envelope is damaged and cannot be read"
        if where is None:
            failures += 1
            _show_error(given, why or "no such entry", as_json=as_json)
            continue
        state, entry = where
        headers = _headers(spool, entry)
        if as_json:
            print(json.dumps(_show_json(state, entry, headers, now)))
        else:
            print(_terminal(_show_text(state, entry, headers, now, _spool_state(spool))))
    return 1 if failures else 0


def _show_error(given: str, reason: str, *, as_json: bool) -> None:
    """An id that cannot be shown: an error object on stdout for scripts (as the actions print), else stderr."""
    if as_json:
        print(json.dumps({"id": given, "action": "show", "done": False, "error": reason}))
    else:
        print(f"relay: {given}: {reason}", file=sys.stderr)


def _recipient_states(state: State, entry: QueueEntry) -> list[dict[str, str]]:
    """Each recipient with its state: delivered, bounced (with the reply), or the entry's pending state."""
    bounced = dict(entry.bounced)
    rows = []
    for recipient in entry.recipients:
        if recipient in entry.delivered:
            rows.append({"recipient": recipient, "state": "delivered", "reply": ""})
        elif recipient in bounced:
            rows.append({"recipient": recipient, "state": "bounced", "reply": bounced[recipient]})
        else:
            rows.append({"recipient": recipient, "state": _PENDING[state], "reply": entry.last_reply})
    return rows


def _headers(spool: Spool, entry: QueueEntry) -> Headers:
    """The message's headers, decoded (RFC 2047); or why they cannot be shown.

    An SMS entry's Subject may carry the gateway's password (``sms.password_in: subject``): hidden.
    """
    try:
        block = spool.read_headers(entry.id)
    except OSError as exc:
        return f"cannot read the message: {exc.strerror or exc}"
    parsed = BytesHeaderParser(policy=email.policy.default).parsebytes(block + b"\r\n\r\n")
    shown = []
    for name, raw in parsed.raw_items():
        if entry.kind == "sms" and name.lower() == "subject":
            shown.append((name, "(hidden: an SMS subject may carry the gateway password)"))
            continue
        try:  # the stdlib's header classes choke on some malformed values relay queued as received
            value = str(email.policy.default.header_fetch_parse(name, raw))
        except Exception:  # noqa: BLE001  (any of the stdlib's parse errors: show the raw value instead)
            value = " ".join(str(raw).split())
        shown.append((name, value))
    return shown


def _show_json(state: State, entry: QueueEntry, headers: Headers, now: float) -> dict[str, object]:
    row = _queue_json(state, entry, now)
    row.update({
        "mail_from": entry.mail_from, "account": entry.account, "kind": entry.kind, "client": entry.client,
        "identified_by": entry.identified_by, "received_at": round(entry.received_at, 3), "crashes": entry.crashes,
        "notes": list(entry.notes), "recipient_states": _recipient_states(state, entry),
    })  # fmt: skip
    if isinstance(headers, str):
        row["headers"], row["headers_error"] = [], headers
    else:
        row["headers"] = [[name, value] for name, value in headers]
    return row


def _show_text(state: State, entry: QueueEntry, headers: Headers, now: float, notice_state: NoticeState) -> list[str]:
    received = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(entry.received_at))
    identified = f" (identified by {entry.identified_by})" if entry.identified_by else ""
    lines = [
        f"queue id:     {entry.id}",
        f"state:        {state}" + (_next_attempt(entry, now) if state == "deferred" else ""),
        f"received:     {received} ({int(now - entry.received_at)}s ago) from {entry.client or '-'}",
        f"user:         {entry.user or '-'}" + identified,
        f"sender:       {entry.mail_from}",
        f"account:      {entry.account}",
        f"kind:         {entry.kind}, {entry.size} bytes, {entry.attempts} attempt(s), {entry.crashes} crash(es)",
        f"last reply:   {entry.last_reply or '-'}",
    ]
    lines += [f"note:         {note}" for note in entry.notes]
    if state == "deferred" and entry.waiting_for:
        lines.append(f"waiting for:  {entry.waiting_for}")
    lines += ["{:13} {}".format(*_notice_line(note, notice_state)) for note in entry.notices]
    lines.append("recipients:")
    for row in _recipient_states(state, entry):
        lines.append(f"  {row['recipient']}  {row['state']}" + (f": {row['reply']}" if row["reply"] else ""))
    lines.append("headers:")
    if isinstance(headers, str):
        lines.append(f"  ({headers})")
    else:
        lines += [f"  {name}: {value}" for name, value in headers]
    return lines


def _next_attempt(entry: QueueEntry, now: float) -> str:
    wait = int(entry.next_attempt_at - now)
    return f", next attempt in {wait}s" if wait > 0 else ", next attempt: due now"


# endregion
