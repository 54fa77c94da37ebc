"""``relay send-test USER``: send one test message as a user, now, and say in plain words what happened.

The seeds' "Send Test Emails" button. The message goes through the same stages as real mail: the
user's settings are resolved and the message rewritten by ``pipeline.prepare_as`` (sender lock,
signature, recipient rules, ``redirect_all``; only ``copy_to`` is left out, so a test never reaches a
customer), then it is delivered *synchronously* to the user's account through the same transports as
the daemon's (``transport.Transports``: SMTP with a password or XOAUTH2, or Graph). Nothing is spooled.

Before sending, ``diagnose.probe`` connects, does TLS and logs in, naming the step that fails; then the
transaction shows whether the provider takes the sender, the recipient and the message. Each failure
is one ``FAILED:`` line with the provider's reply and, on a ``->`` line, what to do. Exit codes follow
sysexits(3), so scripts can tell a wait-and-retry from a fix-the-settings:

==  ==================  =============================================================================
0   EX_OK               the provider accepted the message
64  EX_USAGE            ``--to`` is not an address relay can send to
67  EX_NOUSER           no such user in the config, or the provider refused the recipient
69  EX_UNAVAILABLE      cannot connect, TLS failure, the provider refused the session or the message
75  EX_TEMPFAIL         a temporary refusal (4xx), or no answer in time: try again later
77  EX_NOPERM           this user cannot write the refresh token's folder: the token was not used (run
                        as the daemon's user)
78  EX_CONFIG           the settings must change: password or ca_file, login or token refused,
                        sender refused, the user may not send
==  ==================  =============================================================================
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from os import EX_CONFIG, EX_NOPERM, EX_NOUSER, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE  # sysexits(3)

from relay import __version__
from relay.commands.diagnose import CERT_HINT, config_argument, probe, service_secret_hint, unsaved_refresh
from relay.config.accounts import account_for
from relay.config.credentials import password_source, read_password, read_secret
from relay.config.models import Config
from relay.config.types import checked_recipient
from relay.envelope import Account, Outgoing, Submission
from relay.errors import ConfigError, RefusedError, SecretError
from relay.idn import with_a_label
from relay.prepare.identify import COMPANY, identify
from relay.prepare.mailpolicy import message_id
from relay.prepare.pipeline import prepare_as
from relay.prepare.settings import resolve
from relay.transports import Transports
from relay.transports.smtp import ConnectionPool, Outcome, advice

COMPANY_USER = "company"  # ``relay send-test company``: the company defaults

# what failed, in words, and its exit code, per diagnose step
_PROBE_STEPS: dict[str, tuple[str, int]] = {
    "password": ("the password cannot be read", EX_CONFIG),
    "ca_file": ("the ca_file cannot be used", EX_CONFIG),
    "token": ("no OAuth2 token", EX_CONFIG),
    "unsaved": ("the refresh token was not used", EX_NOPERM),
    "permission": ("the OAuth2 app may not send mail", EX_CONFIG),
    "connect": ("cannot connect to the provider", EX_UNAVAILABLE),
    "tls": ("TLS failure", EX_UNAVAILABLE),
    "timeout": ("no answer from the provider", EX_TEMPFAIL),
    "login": ("login refused by the provider (AUTH)", EX_CONFIG),
    "session": ("the provider refused the session", EX_UNAVAILABLE),
}
RECIPIENT_HINT = ("the account and its login work; the provider will not take mail for this address: check its "
                  "spelling, or try --to with an address you know works")  # fmt: skip
SENDER_HINT = ("the provider lets this account send only as its own mailbox (or an alias it may send as): set "
               "from_address to it, or give the user an own login (relay passwd)")  # fmt: skip


@dataclass
class Report:
    """What ``relay send-test`` prints (one line each) and its exit code."""

    lines: list[str] = field(default_factory=list)
    code: int = EX_OK

    def fail(self, what: str, detail: str, code: int, hint: str | None = None) -> Report:
        self.lines.append(f"FAILED: {what}: {detail}")
        if hint:
            self.lines.append(f"  -> {hint}")
        self.code = code
        return self


def test_message(from_address: str, to: str, user: str) -> bytes:
    """A short plain-text message that says what it is; the rewrite stage adds the rest (From name,
    signature) as it does for real mail."""
    message = EmailMessage()
    message["From"] = with_a_label(from_address)
    message["To"] = with_a_label(to)
    message["Subject"] = f"relay test message ({user})"
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = message_id(from_address)
    message.set_content(
        f"This is a test message sent with `relay send-test {user}` on {socket.gethostname()} (relay {__version__}).\n"
        "If you can read it, this user's mail settings work: mail from the program will arrive the same way.\n"
    )
    return bytes(message.as_bytes(policy=message.policy.clone(linesep="\r\n")))


def _user_id(config: Config, user: str) -> str | None:
    if user in config.users:
        return user
    if user == COMPANY_USER:
        return None
    known = ", ".join(sorted(config.users)) or "none"
    raise LookupError(f"no user {user!r} in the config (users: {known}; or {COMPANY_USER} for the company defaults)")


def _identified_note(config: Config, sub: Submission, user_id: str | None) -> str | None:
    """Would real mail with this sender be identified as this user? If not, say what would happen."""
    try:
        found, rule = identify(config, sub)
    except RefusedError:
        return f"note: mail from the program with sender {sub.mail_from} would be refused (no user matches it)"
    if found == user_id:
        return None
    who = f"user {found} (rule {rule})" if found is not None else "the company defaults"
    if rule == COMPANY and user_id is None:
        return None
    return f"note: mail from the program with sender {sub.mail_from} would be sent as {who}, not as this one"


async def send_test(config: Config, user: str, to: str | None = None) -> Report:
    """Build, prepare and deliver one test message as ``user``; never raises for a delivery problem."""
    report = Report()
    try:
        user_id = _user_id(config, user)
    except LookupError as exc:
        return report.fail("unknown user", str(exc), EX_NOUSER)
    settings = resolve(config, user_id, "send_test")
    from_address = settings.from_address
    if not from_address:
        return report.fail("no sender address", f"{user} has no from_address (and the company none)", EX_CONFIG,
                           "set from_address for the user or the company")  # fmt: skip
    to_given = bool(to)
    try:  # before it reaches a header: 'a@' made the email package raise, a line break too
        to = checked_recipient(to) if to else from_address
    except ValueError as exc:
        return report.fail("--to is not an address relay can send to", str(exc), EX_USAGE)
    sub = Submission(mail_from=from_address, rcpt_tos=(to,), content=test_message(from_address, to, user),
                     client="127.0.0.1", listener=-1, helo="relay-send-test")  # fmt: skip
    try:
        prepared = prepare_as(config, sub, user_id, copy_to=False, read_secret=read_secret)
    except RefusedError as exc:
        if to_given and exc.reply[4:8] == "5.1.":  # the address typed after --to, not the user's settings
            return report.fail("--to is not an address relay can send to", exc.reply, EX_USAGE)
        return report.fail("relay would refuse this user's mail", exc.reply, EX_CONFIG)
    except ConfigError as exc:
        return report.fail("the settings do not resolve", "; ".join(map(str, exc.problems)), EX_CONFIG)
    report.lines.append(f"relay send-test: {user}: from {from_address} to {to}")
    note = _identified_note(config, sub, user_id)
    report.lines += [note] if note else []
    if settings.copy_to:
        report.lines.append(f"note: copy_to ({', '.join(settings.copy_to)}) is left out: a test goes to {to} only")
    transports = Transports(ConnectionPool())
    try:
        for message in prepared.messages:
            await _deliver(config, message, to, report, transports, user)
            if report.code != EX_OK:
                break
    finally:
        await transports.aclose()
        await asyncio.sleep(0.1)  # TLS transports close asynchronously (close_notify): let them finish
    return report


async def _deliver(config: Config, message: Outgoing, to: str, report: Report, transports: Transports,
                   user: str) -> None:
    account = account_for(config, message.account)
    login = f" as {account.username}" if account.username else ""
    report.lines.append(f"  account   {account.label}{login}")
    if account.username or account.oauth2 is not None:
        report.lines.append(f"  secret    {password_source(account)}")
    if message.recipients != (to,):  # recipient_rules, redirect_all, an SMS gateway
        report.lines.append(f"  sent to   {', '.join(message.recipients)} (after the config's recipient rules)")
    checked = await probe(account, tokens=transports.tokens)
    if not checked.ok:
        what, code = _PROBE_STEPS.get(checked.step, ("the provider refused", EX_UNAVAILABLE))
        if checked.message.startswith("refused: 4"):  # a temporary refusal of the session (421, 454)
            code = EX_TEMPFAIL
        hint = checked.hint or (CERT_HINT if "certificate" in checked.message else None)
        command = f"relay send-test {user} -c {config_argument(config)}"
        if checked.step == "password":  # the service's own secret: the hint names this very command
            hint = service_secret_hint(account, command) or hint
        unsaved = unsaved_refresh(account, command) if checked.step == "unsaved" else None
        hint = unsaved.hint if unsaved is not None else hint  # this very command, as the daemon's user
        report.fail(what, checked.message, code, hint)
        return
    report.lines.append(f"  login     ok: {checked.message}")
    try:
        secret = await asyncio.to_thread(read_password, account) if account.oauth2 is None else None
    except SecretError as exc:  # it was readable a moment ago (probe): changed meanwhile
        report.fail(_PROBE_STEPS["password"][0], str(exc), EX_CONFIG)
        return
    outcome = await transports.deliver(account, secret, message.mail_from, list(message.recipients),
                                       bytes(message.content), deadline=config.delivery.deadline)  # fmt: skip
    _judge(outcome, message, account, report)


def _judge(outcome: Outcome, message: Outgoing, account: Account, report: Report) -> None:
    """Turn one delivery outcome into the last lines of the report and its exit code."""
    code, text = outcome.reply
    said = f"{code} {text}".strip() if code is not None else text
    if outcome.result == "delivered":
        report.lines.append(f"  sending   ok: accepted by the provider: {said}")
        report.lines.append(f"OK: the test message was accepted; look for it in {', '.join(message.recipients)}'s mailbox")
        return
    temporary = bool(outcome.deferred) and not outcome.bounced
    exit_code = EX_TEMPFAIL if temporary else EX_UNAVAILABLE
    hint = outcome.advice or advice(code, text, signin=account.own_user or account.name)
    error = outcome.error or ""
    if error.startswith("sender "):
        report.fail("sender refused by the provider", f"{message.mail_from}: {said}",
                    exit_code if temporary else EX_CONFIG, hint or SENDER_HINT)  # fmt: skip
    elif not error and (outcome.bounced or outcome.deferred):  # refused at RCPT, per recipient
        refused = {**outcome.deferred, **outcome.bounced}
        detail = "; ".join(f"{rcpt}: {c or ''} {t}".replace("  ", " ") for rcpt, (c, t) in refused.items())
        report.fail("recipient refused by the provider", detail, exit_code if temporary else EX_NOUSER,
                    hint or (None if temporary else RECIPIENT_HINT))  # fmt: skip
    elif error == "message refused after DATA":
        report.fail("message refused by the provider", said, exit_code, hint)
    else:  # the session failed after the probe's login worked, or Graph refused
        report.fail(f"not sent ({account.transport})", f"{error}{': ' + said if said else ''}", exit_code, hint)


__all__ = ["COMPANY_USER", "EX_CONFIG", "EX_NOUSER", "EX_TEMPFAIL", "EX_UNAVAILABLE", "Report", "send_test"]
