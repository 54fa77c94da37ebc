"""``relay-sendmail`` (also ``relay sendmail``): the sendmail command, for programs that pipe mail to it.

cron, PHP's ``mail()`` and old Unix ERP modules run ``/usr/sbin/sendmail -t -i`` (or ``sendmail -f
sender rcpt...``) and write the message to its standard input. This command submits it to the local
relay daemon over SMTP, the way Postfix's sendmail hands mail to its queue, and exits with sendmail's
codes (sysexits.h), saying why in one line on stderr. Then the daemon does what it does to all mail:
identify the user, rewrite (sender lock, missing Date / Message-ID / From added), queue, deliver.

Who sends: this command sends nothing about the calling user for the daemon to believe (no login, no
XCLIENT-like hint: any program could send the same and pose as another user). The daemon's ``os_user``
rule asks the kernel which OS user owns this process's socket (``osuser.py``); add it to
``identify.order`` and map OS users with ``users.X.os_users``.

Input: bare LF line ends (Unix pipes) become CRLF, 8-bit bytes pass as they are (``BODY=8BITMIME``).
Without ``-i`` / ``-oi`` a line holding a single ``.`` ends the message, as with sendmail.
``-t`` takes recipients from To, Cc and Bcc and removes Bcc (command-line recipients are added, as
Postfix does). A bare name (cron's ``root``) gets ``@`` and this host's name, like Postfix's
``append_at_myorigin``: map it with ``rewrite.recipient_rules``.

Recipients: every argument, and every To/Cc/Bcc field with ``-t``, is an address list (``address_list``):
members separated by ``,`` (or the ``;`` legacy programs write), and bare addresses separated by
whitespace, as Postfix's sendmail takes them (``'foo bar'`` is two local recipients), except a phone
number typed with spaces or brackets (``040 123 4567@sms``, ``(09) 123-4567@sms``): one recipient, sent
as typed for the daemon to compact. No recipient is ever dropped: a member that is not an address (or
has digits beside such a number) refuses the whole command (64 for an argument, 65 for a header field),
naming it, and nothing is sent. Argument bytes that are not UTF-8 (a Latin-1 ``-F`` name) are read as
Windows-1252, as the daemon reads 8-bit headers.

relay down: when relay cannot be reached (nothing listens: stopped, restarting, being upgraded, in a
crash loop), the message and its envelope are left in relay's drop directory (``relay/maildrop.py``),
which the daemon picks up when it runs, as Postfix's sendmail leaves mail in maildrop/ for pickup: exit
0, with a note on stderr. cron and PHP's mail() never try again, so 75 would lose the mail. A running
relay's refusal (4xx, 5xx) is never dropped: its exit code stays.

Exit codes: 0 sent (or left in the drop directory while relay is down); 64 usage (unknown option, no recipients, an argument that is not an address); 65
the message was refused as data (too big, malformed, a To/Cc/Bcc member that is not an address with
-t); 67 a recipient was refused (the others were still sent); 69 relay refused the sender or the message
otherwise (5xx); 70 internal error; 75 try again later (relay answered 4xx, or is down and the drop
directory cannot be written); 78 the config named with -c or $RELAY_CONFIG cannot be read, or its
``listeners:`` are not address/port entries.

A config that is not valid YAML (a quote missing in another section) is no reason to refuse mail: the
daemon keeps running on its previous config. The ``listeners:`` section is then read alone (else relay's
default listener is tried), and one warning line on stderr names the error and ``relay check``.
"""

from __future__ import annotations

import email.utils
import getopt
import ipaddress
import os
import pwd
import re
import smtplib
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.errors import MessageDefect, MessageError, NonASCIILocalPartDefect
from email.headerregistry import Address, AddressHeader, HeaderRegistry
from email.utils import formataddr, parseaddr
from os import (  # sysexits(3)
    EX_CONFIG,
    EX_DATAERR,
    EX_NOUSER,
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
)
from pathlib import Path
from typing import BinaryIO

import yaml

from relay import maildrop
from relay.config.yamlread import Refused, SectionUnreadable, read_section, read_yaml, top_level
from relay.prepare.charset import decode_legacy, header_block

DEFAULT_CONFIG = "/etc/relay/relay.yaml"
FALLBACK = ("127.0.0.1", 2525)
CONFIG_MAX_BYTES = 1 << 20  # the daemon reads no more of its config either (relay.config.load)
CHUNK = 1 << 20  # standard input is read this much at a time
FIRST_CAP = 1 << 20  # input up to this size is read without asking the daemon for its size limit
TIMEOUT = 120.0  # per read or write; the daemon answers the final dot once the message is on disk
# The reply to the final dot is waited for 10 minutes (RFC 5321 4.5.3.2.6): given up sooner, a relay that
# was only slow (a stalled disk) queued the message while relay-sendmail left a second copy for pickup.
FINAL_REPLY_TIMEOUT = 600.0
PROG = "relay-sendmail"
# sendmail's options (getopt style: -f sender or -fsender, -ti); those not listed in Options are ignored
OPTSTRING = "B:b:C:c:F:f:Gh:IiL:mN:nO:o:p:R:r:tUV:vX:"
_HEADERS = HeaderRegistry()  # the stdlib's RFC 5322 address-list parser, for members with structure
_STRUCTURE = frozenset('<>"():;\\')  # a member with none of these is bare addresses, split on whitespace
_PARSER_ERRORS = (MessageError, ValueError, IndexError, TypeError, AttributeError)  # the stdlib parser on junk
_FOLD = re.compile(r"\r?\n(?=[ \t])")
# A phone number as typed at a domain (``040 123 4567@sms``, ``(09) 123-4567@sms``, ``+358 (0)40 1234567@sms``):
# digit groups, an optional leading +, dashes, spaces and bracketed groups, the last one ending in a digit
_GROUP = r"(?:\([0-9]+\)[0-9]*|[0-9]+)"  # a separator is required between plain groups: no \d+(\d+)* backtracking
# (``@domain`` is optional in the pattern so that a run of digit groups is matched, and passed over, once)
_PHONE_RUN = re.compile(rf"(?<![^\s<])\+?{_GROUP}(?:[ \t-]+{_GROUP}|\([0-9]+\)[0-9]*)*"
                        r"(?:(?<=[0-9])@(?P<domain>[^\s@<>()\[\],;:\"\\]+)(?![^\s>(]))?")  # fmt: skip
_DIGIT_WORD = re.compile(r"\+?[0-9()\-]+")  # beside a phone run, a part of a number more likely than a local user
_TYPED = re.compile(r"[\s()]")  # what makes a phone run more than one ordinary addr-spec
_STAND_IN = "phone.relay-sendmail.invalid"  # stands in for a phone run while the member is parsed
LEGACY_CHARSET = "windows-1252"  # the daemon's default_charset: how undecodable argument bytes are read
USAGE = f"usage: {PROG} [-t] [-i] [-f sender] [-F full name] [-c config] [--] [recipient ...] < message"
HELP = f"""{USAGE}

Submits the message on standard input to the local relay daemon, as /usr/sbin/sendmail does.
  -t              recipients from To, Cc and Bcc (Bcc is removed); arguments are added
  -i, -oi         a line with a lone "." does not end the message
  -f sender       envelope sender (also -r)
  -F "Full Name"  the From display name, for a message without a From
  -c config       relay's config file, for its listener (default $RELAY_CONFIG or {DEFAULT_CONFIG})
  -v              show the SMTP dialogue on stderr
  -bp             list relay's queue (mailq)
While relay is not running the message waits in relay's drop directory (exit 0) and goes when it runs.
Exit codes: 0 sent (or left for relay), 64 usage, 65 message refused as data, 67 a recipient refused,
69 refused, 70 internal error, 75 try again later, 78 config unreadable (a YAML error in it: a warning).
"""


class UsageError(Exception):
    """The command line cannot be run: exit 64 with this message."""


class HelpRequested(Exception):
    """``--help``: a person at a terminal, not a program; the usage goes to stdout and the exit is 0."""


@dataclass
class Options:
    """What the command line asks for."""

    mode: str = "m"  # -bm deliver (default), -bp list the queue, -bi rebuild aliases (nothing to do)
    extract: bool = False  # -t
    dot_ends: bool = True  # a lone "." line ends the input unless -i / -oi
    sender: str | None = None  # -f / -r
    full_name: str | None = None  # -F
    config: str | None = None  # -c / -C
    verbose: bool = False  # -v: show the SMTP dialogue on stderr
    recipients: list[str] = field(default_factory=list)


class Failure(Exception):
    """Why the mail was not sent, and sendmail's exit code for it."""

    def __init__(self, code: int, message: str, /) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Unreachable(Failure):
    """relay could not be reached at all, or was lost before it answered the message: the mail may go
    to the drop directory (``leave_in_drop``)."""

    def __init__(self, where: str, reason: str, /) -> None:
        super().__init__(EX_TEMPFAIL, f"cannot reach relay at {where}: {reason} (is relay running?)")
        self.where = where
        self.reason = reason


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """The console script: run the command line, return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    name = Path(prog or sys.argv[0]).name
    try:
        options = parse_args(args)
        if name == "mailq":
            options.mode = "p"
        elif name == "newaliases":
            options.mode = "i"
        return run(options)
    except HelpRequested:
        print(HELP, end="")
        return EX_OK
    except UsageError as exc:
        print(f"{PROG}: {exc}\n{USAGE}", file=sys.stderr)
        return EX_USAGE
    except Failure as failure:
        print(f"{PROG}: {failure.message}", file=sys.stderr)
        return failure.code
    except Exception as exc:  # noqa: BLE001  (a cron job gets one line and EX_SOFTWARE, not a traceback)
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EX_SOFTWARE


def parse_args(args: list[str]) -> Options:
    """sendmail's command line -> ``Options``; harmless options are accepted and ignored."""
    try:
        pairs, rest = getopt.getopt(args, OPTSTRING)
    except getopt.GetoptError as exc:
        if exc.opt == "help":
            raise HelpRequested from None
        if exc.opt == "q":
            raise UsageError("-q (run the queue) is not supported: relay delivers by itself; "
                             "relay queue --flush sends deferred mail now") from None  # fmt: skip
        raise UsageError(str(exc)) from None
    options = Options()
    for flag, value in pairs:
        _apply(options, flag[1], value)
    options.recipients = [argument_text(value) for value in rest]
    return options


def _apply(options: Options, letter: str, value: str) -> None:
    if letter == "b":
        if value not in ("m", "p", "i"):
            raise UsageError(f"-b{value} is not supported (only -bm send, -bp list the queue, -bi which does nothing)")
        options.mode = value
    elif letter == "I":
        options.mode = "i"
    elif letter == "t":
        options.extract = True
    elif letter == "i" or (letter == "o" and value == "i") or (letter == "O" and value.lower() == "ignoredots"):
        options.dot_ends = False
    elif letter in "fr":
        value = argument_text(value)
        options.sender = parseaddr(value)[1] if "<" in value else value.strip()
    elif letter == "F":
        options.full_name = argument_text(value)
    elif letter in "cC":
        options.config = value
    elif letter == "v":
        options.verbose = True
    # -B -G -h -L -m -N -n -o* -O -p -R -U -V -X: accepted and ignored, as Postfix's sendmail does


def argument_text(value: str) -> str:
    """An argument as the text its writer meant. Python reads argv as UTF-8 and keeps bytes that are not
    as surrogate escapes, which no encoder takes: a legacy program in a Latin-1 locale passes ``-F
    'P\\xe4ivi'``. Its bytes are read the way the daemon reads 8-bit header bytes: UTF-8 when valid, else
    Windows-1252 (Latin-1 for the five bytes it leaves undefined). The config path is not passed here:
    it names a file by its bytes."""
    try:
        raw = os.fsencode(value)
    except UnicodeEncodeError:  # only a caller in this process can pass such a str
        raise UsageError(f"argument {_quoted(value)} is not text") from None
    return decode_legacy(raw, LEGACY_CHARSET)[0]


def run(options: Options) -> int:
    if options.mode == "i":
        return EX_OK  # relay has no aliases database; newaliases in package scripts must not fail
    listener = listener_address(options.config)
    if options.mode == "p":  # mailq: the queue listing is `relay queue`'s, as Postfix's sendmail runs postqueue
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "relay", "queue", "-c", listener.config])

    def size_limit() -> int | None:
        try:
            return announced_size(listener.address, listener.note)
        except Unreachable:  # relay is down: the drop directory takes what relay would take
            return drop_place(listener.config)[1]

    data = read_input(sys.stdin.buffer, size_limit, dot_ends=options.dot_ends)
    sender, recipients, message = compose(options, data)
    try:
        code = submit(listener.address, sender, recipients, message, note=listener.note, verbose=options.verbose)
    except Unreachable as down:
        return leave_in_drop(down, listener.config, sender, recipients, message)
    if listener.warning is not None:
        print(_config_warning(listener, code), file=sys.stderr)
    return code


def leave_in_drop(down: Unreachable, config_path: str, sender: str, recipients: list[str], message: bytes) -> int:
    """relay cannot be reached (stopped, restarting, upgraded, crashing): leave the mail in its drop
    directory (``relay/maildrop.py``), where relay picks it up when it runs, as Postfix's sendmail
    leaves mail in maildrop/ for pickup; exit 0 with a note on stderr. cron and PHP's mail() never try
    again: exit 75 would lose it. If it cannot be left there either: 75, naming both reasons.

    Only when relay did not answer: a refusal (4xx or 5xx) from a running relay is its verdict (a
    sending rate, a full spool, a refused sender) and keeps its exit code, or the drop would be a way
    around it. relay lost after the message was sent but before its answer (killed, its drain's 30 s
    over) may have queued it: dropped too, as Postfix would rather deliver twice than lose mail."""
    directory, limit = drop_place(config_path)
    if len(message) > limit:
        raise Failure(EX_DATAERR, f"message too big: relay takes at most {limit} bytes "
                      "(limits.max_message_size); nothing was sent")  # fmt: skip
    user, now = _login_name(), time.time()
    if not _has_field(message, b"date"):  # as Postfix's cleanup dates it by postdrop's time, not pickup's
        message = f"Date: {email.utils.formatdate(now)}\r\n".encode() + message
    drop = maildrop.Drop(sender, tuple(recipients), message, uid=os.getuid(),
                         user=None if user == str(os.getuid()) else user, time=now)  # fmt: skip
    try:
        maildrop.write(directory, drop)
    except OSError as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise Failure(EX_TEMPFAIL, f"{down.message}, and the mail cannot be left in its drop directory "
                      f"{directory}: {reason}; nothing was sent") from None  # fmt: skip
    print(f"{PROG}: relay did not answer ({down.reason} at {down.where}): the mail waits in {directory} "
          "and is sent when relay takes it", file=sys.stderr)  # fmt: skip
    return EX_OK


def drop_place(config_path: str) -> tuple[Path, int]:
    """(the drop directory, the size it takes) as the daemon reads them from its config (``spool_dir``,
    ``maildrop_dir``, ``limits.max_message_size``: ``Config.maildrop``); relay's defaults when the file
    cannot be read (users outside the relay group: the package's /var/spool/relay/maildrop). Read only
    when relay is down, and leniently: a key that cannot be used counts as not given."""
    from pydantic import ValidationError  # only on this path: a sent message does not wait for pydantic

    from relay.config.models import LimitsConfig
    from relay.config.types import from_config_folder

    keys: dict[str, object] = {}
    try:
        with open(config_path, "rb") as stream:
            text = stream.read(CONFIG_MAX_BYTES).decode("utf-8")
        for key in ("spool_dir", "maildrop_dir", "limits"):  # a YAML error elsewhere: each section read alone
            try:
                keys.update(top_level(text, key))
            except (SectionUnreadable, Refused, yaml.YAMLError):
                continue
    except (OSError, UnicodeDecodeError):
        pass
    spool, drop = keys.get("spool_dir"), keys.get("maildrop_dir")
    directory = maildrop.directory_for(
        from_config_folder(spool, config_path) if isinstance(spool, str) and spool.strip() else maildrop.DEFAULT_SPOOL,
        from_config_folder(drop, config_path) if isinstance(drop, str) and drop.strip() else None,
    )
    limits = keys.get("limits")
    size = limits.get("max_message_size") if isinstance(limits, dict) else None
    try:
        limit = LimitsConfig.model_validate({} if size is None else {"max_message_size": size}).max_message_size
    except ValidationError:
        limit = LimitsConfig().max_message_size
    return directory, limit


def _config_warning(listener: Listener, code: int) -> str:
    """The one line that says the config has an error, once the daemon has answered: that the mail went
    through does not mean the file is fine (a refusal has its own line above)."""
    where = f"relay at {listener.address[0]}:{listener.address[1]}{listener.note}"
    outcome = f"the mail was handed to {where}" if code == EX_OK else f"{where} answered as above"
    return f"{PROG}: warning: {listener.warning}; {outcome}"


def read_input(stream: BinaryIO, size_limit: Callable[[], int | None], *, dot_ends: bool) -> bytes:
    """Standard input, kept only up to the daemon's size limit: a runaway program's 10 GB of output is
    read to the end (so the writer never gets SIGPIPE) but not held in memory.

    Input up to ``FIRST_CAP`` is read without asking anything (the usual mail: no extra connection).
    Past it, ``size_limit`` asks the daemon for the SIZE it announces; beyond that, ``Failure`` 65.
    Without ``-i`` the message ends at a lone ``.`` line: input after it does not count.
    """
    data = _read_upto(stream, FIRST_CAP)
    if len(data) > FIRST_CAP and not (dot_ends and _ends_at_a_dot(data)):
        limit = size_limit()
        if limit is None:
            return data + stream.read()
        data += _read_upto(stream, limit - len(data))
        if len(data) > limit and not (dot_ends and _ends_at_a_dot(data)):
            _discard_rest(stream)
            raise Failure(EX_DATAERR, f"message too big: relay takes at most {limit} bytes "
                          "(limits.max_message_size); nothing was sent")  # fmt: skip
    _discard_rest(stream)  # after a lone "." line (without -i), or nothing left at all
    return data


def _read_upto(stream: BinaryIO, limit: int) -> bytes:
    """At most ``limit + 1`` bytes (one more says "there is more"), or less at the end of the input."""
    chunks, size = [], 0
    while size <= limit:
        chunk = stream.read(min(CHUNK, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _discard_rest(stream: BinaryIO) -> None:
    while stream.read(CHUNK):
        pass


def _ends_at_a_dot(data: bytes) -> bool:
    return b"\n.\n" in data or b"\n.\r\n" in data or data.startswith((b".\n", b".\r\n"))


def announced_size(address: tuple[str, int], note: str) -> int | None:
    """The message size the daemon takes (its EHLO SIZE), asked in a session of its own, so a slow
    writer never holds a connection open; ``None`` when it announces no limit."""
    try:
        with smtplib.SMTP(address[0], address[1], local_hostname=socket.gethostname(), timeout=TIMEOUT) as smtp:
            smtp.ehlo_or_helo_if_needed()
            size = smtp.esmtp_features.get("size", "")
    except smtplib.SMTPConnectError as exc:  # relay answered, with a refusal (421: too many connections)
        raise Failure(EX_TEMPFAIL, f"cannot reach relay at {address[0]}:{address[1]}{note}: {exc} "
                      "(is relay running?)") from None  # fmt: skip
    except (smtplib.SMTPException, OSError) as exc:
        raise Unreachable(f"{address[0]}:{address[1]}{note}", _reason(exc)) from None
    return int(size) if size.strip().isdigit() and int(size) > 0 else None


def compose(options: Options, data: bytes) -> tuple[str, list[str], bytes]:
    """Standard input and the options -> (envelope sender, recipients, message with CRLF line ends)."""
    message = read_message(data, dot_ends=options.dot_ends)
    recipients = [qualify(a) for a in split_addresses([("argument", v) for v in options.recipients], EX_USAGE)]
    if options.extract:
        message, found = extract_recipients(message)
        recipients += [a for a in map(qualify, found) if a not in recipients]
    if not recipients:
        raise UsageError("no recipients given" + ("" if options.extract else " (-t reads them from the message)"))
    sender = options.sender if options.sender is not None else qualify(_login_name())
    if options.full_name and not _has_field(message, b"from"):  # -F: only for a message without From
        message = f"From: {formataddr((options.full_name, sender))}\r\n".encode() + message
    return sender, recipients, message


@dataclass(frozen=True)
class Listener:
    """Where the daemon listens, as this command found it in the config."""

    config: str  # the config's path (``-bp`` hands it to ``relay queue``)
    address: tuple[str, int]
    note: str  # where the address came from, for error messages
    warning: str | None = None  # the config has an error: said on stderr once the daemon has answered


def listener_address(option: str | None) -> Listener:
    """Where the daemon listens, and how that was found.

    The config comes from ``-c``, ``RELAY_CONFIG`` or the default path. A default config that this
    user may not read (mode 0640 for the relay group) or that does not exist means 127.0.0.1:2525;
    one named explicitly must be readable. Only ``listeners`` is read (the first one not bound to a
    user that takes plain SMTP, else the first not bound to a user): the daemon checks the rest, and a
    PHP page should not wait for pydantic to build the models. A file that is not valid YAML does not
    stop the mail (``_from_broken_config``).
    """
    explicit = option or os.environ.get("RELAY_CONFIG")
    path = explicit or DEFAULT_CONFIG
    try:
        with open(path, "rb") as stream:
            text = stream.read(CONFIG_MAX_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        if explicit:
            raise Failure(EX_CONFIG, f"cannot read the config {path}: {getattr(exc, 'strerror', None) or exc}") from None
        return Listener(path, FALLBACK, f" (the default; {path} could not be read: give -c CONFIG or set RELAY_CONFIG)")
    try:
        data = read_yaml(text)[1]  # the daemon's reading (YAML 1.2: port 02525 is 2525 to both)
    except (yaml.YAMLError, Refused) as exc:
        return _from_broken_config(path, text, exc)
    listeners = data.get("listeners") if isinstance(data, dict) else None
    if listeners is None:
        return Listener(path, FALLBACK, f" (relay's default listener; {path} has no listeners:)")
    address = _chosen(listeners)
    if address is None:
        raise Failure(EX_CONFIG, f"{path}: listeners: is not a list of address/port entries (see relay check)")
    return Listener(path, address, f" (listener of {path})")


def _from_broken_config(path: str, text: str, exc: yaml.YAMLError | Refused) -> Listener:
    """The listener of a config that is not valid YAML: its ``listeners:`` section read alone, else relay's
    default listener, and a warning to say after the submission.

    Why not exit 78: the daemon refuses such a file at a reload and keeps running on its previous config,
    listening where it did; cron and PHP do not retry, so refusing here loses the mail of every program
    on the machine for a quote missing in an unrelated section."""
    problem = _yaml_problem(exc, text)
    warning = f"{path} is not valid YAML ({problem}): relay will not load it (relay check {path} says what to fix)"
    try:
        section = read_section(text, "listeners")
    except SectionUnreadable as unreadable:
        why = f"{path} is not valid YAML and {unreadable}"
        return Listener(path, FALLBACK, f" (relay's default listener: {why})", warning)
    if "listeners" not in section:
        return Listener(path, FALLBACK, f" (relay's default listener; {path} has no listeners:)", warning)
    address = _chosen(section["listeners"])
    if address is None:
        why = f"{path} is not valid YAML and its listeners: are not address/port entries"
        return Listener(path, FALLBACK, f" (relay's default listener: {why})", warning)
    return Listener(path, address, f" (listener of {path}, read from its listeners: section alone)", warning)


def _yaml_problem(exc: yaml.YAMLError | Refused, text: str) -> str:
    """Where the file is broken and what to change, in ``relay check``'s words: ``yamlerrors.explain``
    never shows a line that may hold a secret (this goes to a cron mail or a web server's log)."""
    line: int | None
    if isinstance(exc, Refused):
        line, message = exc.line, exc.message
    else:
        from relay.config.yamlerrors import explain  # only for a broken file: the usual run stays lean

        try:
            advice = explain(exc, text)
            line, message = advice.line, advice.message
        except Exception:  # noqa: BLE001  (advice is a courtesy: a bug in it must not cost the mail)
            line, message = None, "see relay check"
    return (f"line {line}: " if line else "") + " ".join(message.split())


def _chosen(listeners: object) -> tuple[str, int] | None:
    """The address of the listener this command speaks to (see ``listener_address``); ``None`` when
    ``listeners`` is not a list of address/port entries."""
    entries = [lst for lst in listeners if isinstance(lst, dict)] if isinstance(listeners, list) else []
    chosen = next(
        (lst for lst in entries if not lst.get("user") and _plain(lst)),  # this command speaks plain SMTP
        next((lst for lst in entries if not lst.get("user")), entries[0] if entries else None),
    )
    if chosen is None:
        return None
    try:
        host = str(ipaddress.ip_address(str(chosen.get("address", FALLBACK[0]))))
        port = int(chosen.get("port", FALLBACK[1]))
    except (ValueError, TypeError):
        return None
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port


def _plain(listener: dict[str, object]) -> bool:
    """Takes mail without TLS: no ``tls: implicit``, no ``require_tls``."""
    return listener.get("tls") != "implicit" and not listener.get("require_tls")


def read_message(data: bytes, *, dot_ends: bool) -> bytes:
    """Standard input -> the message with CRLF line ends; without -i it ends at a lone ``.`` line."""
    text = data.replace(b"\r\n", b"\n")
    if dot_ends:
        if text.startswith(b".\n") or text == b".":
            text = b""
        else:
            cut = text.find(b"\n.\n")
            if cut >= 0:
                text = text[: cut + 1]
            elif text.endswith(b"\n."):
                text = text[:-1]
    text = text.replace(b"\n", b"\r\n")
    return text + b"\r\n" if text and not text.endswith(b"\r\n") else text


def extract_recipients(message: bytes) -> tuple[bytes, list[str]]:
    """-t: the addresses in To, Cc and Bcc, and the message without its Bcc fields (every other byte
    stays as it was). A member that is not an address: ``Failure`` 65, naming it."""
    fields, _ = header_block(message)
    skipped = message.find(b"\r\n") + 2 if message.startswith(b"From ") else 0  # an mbox "From " line
    end = skipped + sum(len(line) for lines in fields for line in lines)
    wanted = (b"to", b"cc", b"bcc")
    values = [(f"{_label(lines)} field", _value(lines)) for lines in fields if _name(lines) in wanted]
    kept = b"".join(line for lines in fields if _name(lines) != b"bcc" for line in lines)
    return message[:skipped] + kept + message[end:], split_addresses(values, EX_DATAERR)


class BadAddress(ValueError):
    """A member of an address list that is not an address (or not one relay could send to)."""

    def __init__(self, member: str, /) -> None:
        super().__init__(member)
        self.member = member


def split_addresses(values: Sequence[tuple[str, str]], code: int) -> list[str]:
    """``[("argument", "a@x.fi, B <b@y.fi>"), ("argument", "root")]`` -> the addresses, in order, once
    each; a member that is not an address: ``Failure`` with ``code``, naming it and where it was."""
    out: list[str] = []
    for where, value in values:
        try:
            found = address_list(value)
        except BadAddress as bad:
            raise Failure(code, f"recipient {_quoted(bad.member)} is not an address (in the {where} "
                          f"{_quoted(' '.join(value.split()))}); nothing was sent") from None  # fmt: skip
        out += [a for a in found if a not in out]
    return out


def address_list(value: str) -> list[str]:
    """One argument or one To/Cc/Bcc field -> its addresses, in order; ``BadAddress`` for a member
    that is not one.

    sendmail's convention, as Postfix's sendmail takes it: members are separated by ``,`` (and by the
    ``;`` legacy programs write), and a member of bare addresses separated by whitespace is that many
    recipients: ``'foo bar'`` is foo and bar, ``'a@x.fi b@y.fi'`` both. A member with structure (a
    display name with an angle address, a quoted local part, a comment, a group) is read by the
    stdlib's RFC 5322 parser, which is right about those. ``email.utils.getaddresses`` is not used for
    the list: it makes ``sa1@example.com sa2@example.com`` into ``@example.com``, an address nobody
    typed, and ``foo bar`` into ``foo``, dropping a recipient without a word.
    """
    addresses: list[str] = []
    members = [member.strip() for member in _members(_FOLD.sub("", value))]
    for index, member in enumerate(members):
        if not member:
            continue  # "a@x.fi, , b@y.fi" or a trailing comma: an empty member names nobody
        if _first_half_of_a_name(member, members[index + 1] if index + 1 < len(members) else ""):
            continue
        addresses += _member_addresses(member)
    return addresses


def _first_half_of_a_name(member: str, following: str) -> bool:
    """``Virtanen, Matti <m@x.fi>``: a surname cut from its display name by an unquoted comma, not the
    local user ``Virtanen``. The daemon reads the field so when it repairs it; read as a bare name here it
    became a recipient nobody named (``Virtanen@host``), which the provider bounced. A lowercase ASCII
    word stays a local name, as Postfix's sendmail reads ``root, Cron <cron@x.fi>``: login names are
    lowercase (Debian's useradd refuses capitals), names of people are not."""
    name, bracket, _ = following.partition("<")
    person = any(c.isupper() for c in member) or not member.isascii()
    return person and bool(bracket) and bool(name.strip()) and "@" not in member and not _STRUCTURE.intersection(member)


def _member_addresses(member: str) -> list[str]:
    """One member's addresses. A phone number typed with spaces or brackets (``040 123 4567@sms``,
    ``(09) 123-4567@sms``) is one recipient, as the daemon takes it in one RCPT: split at its spaces it
    would be mail to ``040@host`` and ``123@host``, and the RFC 5322 parser reads ``(09)`` as a comment
    and drops the area code. So each such run stands in as a plain address while the member is parsed
    by the usual rules, and is given back as typed (the daemon compacts it)."""
    phones: dict[str, str] = {}

    def stand_in(run: re.Match[str]) -> str:
        if run.group("domain") is None or not _TYPED.search(run.group()):
            return run.group()  # digits with no domain, or 0401234567@sms: an ordinary addr-spec already
        key = f"phone{len(phones)}@{_STAND_IN}"
        phones[key] = _phone(run.group())
        return key

    if _STAND_IN in member.lower():
        raise BadAddress(member)
    parsed = _PHONE_RUN.sub(stand_in, member)
    try:
        found = _structured(parsed) if _STRUCTURE.intersection(parsed) else _bare(parsed)
    except BadAddress as bad:
        raise BadAddress(_restore(bad.member, phones)) from None
    if phones and any(_DIGIT_WORD.fullmatch(address) for address in found):
        raise BadAddress(member)  # "040 +358 40@sms": a number cut in two, or two numbers? Not ours to guess
    return [phones.get(address, address) for address in found]


def _phone(run: str) -> str:
    """A phone run as typed, its whitespace one space each; ``BadAddress`` if it compacts to no address
    (``040 123@sms..``)."""
    typed = " ".join(run.split())
    local, _, domain = typed.rpartition("@")
    if not _is_address(re.sub(r"[\s()\-]", "", local) + "@" + domain):
        raise BadAddress(typed)
    return typed


def _restore(text: str, phones: dict[str, str]) -> str:
    """The member text of an error message with its phone runs as typed, not their stand-ins."""
    for key, phone in phones.items():
        text = text.replace(key, phone)
    return text


def _members(value: str) -> list[str]:
    """Split at ``,`` and ``;`` outside quotes, comments and angle brackets; a group (``team: a@x.fi,
    b@y.fi;``) stays one member. An unclosed quote or bracket keeps the rest in one member, which
    then fails to parse: named, not guessed at."""
    members, start = [], 0
    quoted, escaped, comment, angle, group = False, False, 0, False, False
    for at, ch in enumerate(value):
        if escaped:
            escaped = False
        elif ch == "\\" and (quoted or comment):
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif comment:
            comment += {"(": 1, ")": -1}.get(ch, 0)
        elif ch in '"(':
            quoted, comment = ch == '"', int(ch == "(")
        elif ch in "<>":
            angle = ch == "<"
        elif angle:
            continue
        elif ch == ":":
            group = True
        elif ch in ",;" and not (group and ch == ","):
            members.append(value[start : at + (ch == ";" and group)])
            start, group = at + 1, False
    members.append(value[start:])
    return members


def _structured(member: str) -> list[str]:
    """A member with structure, read by the stdlib; any defect but a local part without a domain
    (``Cron <root>``, qualified later) or a non-ASCII one (SMTPUTF8) means it was not read whole."""
    try:
        header = _HEADERS("To", member)
    except _PARSER_ERRORS:
        raise BadAddress(member) from None
    if not isinstance(header, AddressHeader) or any(not _tolerated(d) for d in header.defects):
        raise BadAddress(member)
    addresses = [a.addr_spec for group in header.groups for a in group.addresses]
    if not all(map(_is_address, addresses)):
        raise BadAddress(member)
    return addresses


def _tolerated(defect: MessageDefect) -> bool:
    return isinstance(defect, NonASCIILocalPartDefect) or "local part with no domain" in str(defect)


def _bare(member: str) -> list[str]:
    words = member.split()
    bad = next((word for word in words if not _is_address(word)), None)
    if bad is not None:
        raise BadAddress(bad)
    return words


def _is_address(addr_spec: str) -> bool:
    """An addr-spec, or a bare local part (``root``, to be qualified), by the stdlib's parser; non-ASCII
    letters (SMTPUTF8 addresses, IDN domains) stand in as ``x`` for the check."""
    if not addr_spec.isprintable() or addr_spec.startswith("<") or addr_spec.count("@") > 1:
        return False
    local, at, domain = addr_spec.rpartition("@") if "@" in addr_spec else (addr_spec, "@", "host.invalid")
    if not local or not domain:
        return False
    try:
        Address(addr_spec=re.sub(r"[^\x00-\x7f]", "x", f"{local}{at}{domain}"))
    except _PARSER_ERRORS:
        return False
    return True


def _quoted(text: str) -> str:
    """Text for a one-line error message: quoted, control characters escaped, cut at 200."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return '"' + (shown if len(shown) <= 200 else shown[:200] + "...") + '"'


def qualify(address: str) -> str:
    """A bare name gets this host's name, as Postfix appends ``@$myorigin``: ``root`` -> ``root@host``."""
    return address if "@" in address else f"{address}@{socket.gethostname()}"


def submit(
    address: tuple[str, int], sender: str, recipients: list[str], message: bytes, *, note: str, verbose: bool
) -> int:
    """One SMTP transaction with the daemon; the exit code, or ``Failure``."""
    where = f"{address[0]}:{address[1]}{note}"
    try:
        with smtplib.SMTP(address[0], address[1], local_hostname=socket.gethostname(), timeout=TIMEOUT) as smtp:
            smtp.set_debuglevel(1 if verbose else 0)
            return _transaction(smtp, sender, recipients, message)
    except smtplib.SMTPConnectError as exc:  # relay answered, with a refusal (421: too many connections)
        raise Failure(EX_TEMPFAIL, f"cannot reach relay at {where}: {_reason(exc)} (is relay running?)") from None
    except (smtplib.SMTPServerDisconnected, OSError) as exc:  # nothing listening, or lost before its answer
        raise Unreachable(where, _reason(exc)) from None


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _transaction(smtp: smtplib.SMTP, sender: str, recipients: list[str], message: bytes) -> int:
    smtp.ehlo_or_helo_if_needed()
    options = ["BODY=8BITMIME"] if not message.isascii() and smtp.has_extn("8bitmime") else []
    wide = next((a for a in (sender, *recipients) if not a.isascii()), None)
    if wide is not None and not smtp.has_extn("smtputf8"):
        raise Failure(EX_UNAVAILABLE, f"{_quoted(wide)} is not ASCII and relay does not offer SMTPUTF8; "
                      "nothing was sent")  # fmt: skip
    if wide is not None:
        options.append("SMTPUTF8")
    refused: list[tuple[str, int, bytes]] = []
    pending, sent = list(recipients), False
    while pending:  # one transaction, or more where relay takes fewer recipients at a time
        accepted, pending = _recipients_of_one_transaction(smtp, sender, options, pending, refused)
        if not accepted:
            break
        _send_data(smtp, message)
        sent = True
    for rcpt, code, reply in refused:
        print(f"{PROG}: recipient {rcpt} refused: {code} {_text(reply)}", file=sys.stderr)
    if not sent:
        return max(_exit_code(code, reply, "RCPT") for _, code, reply in refused)
    return max((_exit_code(rcpt_code, rcpt_reply, "RCPT") for _, rcpt_code, rcpt_reply in refused), default=EX_OK)


def _recipients_of_one_transaction(
    smtp: smtplib.SMTP, sender: str, options: list[str], pending: list[str], refused: list[tuple[str, int, bytes]]
) -> tuple[list[str], list[str]]:
    """MAIL and the RCPTs of one transaction: (the accepted, those left for the next one).

    A ``452`` after some were accepted is "too many recipients" (RFC 5321 4.5.3.1.10): the message goes
    to those, and the rest in a new transaction, as the RFC asks of a client. Exit 75 there lost the
    rest of a cron job's list over ``limits.max_recipients`` (cron never tries again)."""
    code, reply = smtp.mail(sender, options)  # (after a 250 to the dot the session takes a new MAIL)
    if code != 250:
        raise Failure(_exit_code(code, reply, "MAIL"), f"sender {sender} refused: {code} {_text(reply)}")
    accepted: list[str] = []
    for index, rcpt in enumerate(pending):
        code, reply = _rcpt(smtp, rcpt)
        if code in (250, 251):
            accepted.append(rcpt)
        elif code == 452 and accepted:
            return accepted, pending[index:]
        else:
            refused.append((rcpt, code, reply))
    return accepted, []


def _send_data(smtp: smtplib.SMTP, message: bytes) -> None:
    if smtp.sock is not None:
        smtp.sock.settimeout(FINAL_REPLY_TIMEOUT)  # (smtplib has one timeout: the dot's reply is the long one)
    try:
        code, reply = smtp.data(message)
    except smtplib.SMTPDataError as exc:
        code, error = exc.smtp_code, exc.smtp_error
        reply = error if isinstance(error, bytes) else error.encode()
    finally:
        if smtp.sock is not None:
            smtp.sock.settimeout(TIMEOUT)
    if code != 250:
        raise Failure(_exit_code(code, reply, "DATA"), f"message refused: {code} {_text(reply)}")


def _rcpt(smtp: smtplib.SMTP, address: str) -> tuple[int, bytes]:
    """RCPT TO with the address exactly as found: ``smtp.rcpt`` runs it through ``parseaddr`` first,
    which reads ``(09) 123-4567@sms`` as a comment and an address and sends the number without its
    area code."""
    return smtp.docmd("RCPT", f"TO:<{address}>")


def _exit_code(code: int, reply: bytes, stage: str) -> int:
    """sendmail's exit code for the daemon's reply: 4xx try later; 5xx by what was refused."""
    if 400 <= code < 500:
        return EX_TEMPFAIL
    if stage == "RCPT":
        return EX_NOUSER
    if stage == "DATA" and (code == 552 or reply.startswith(b"5.6.")):
        return EX_DATAERR
    return EX_UNAVAILABLE if 500 <= code < 600 else EX_SOFTWARE


def _text(reply: bytes) -> str:
    return " ".join(reply.decode("utf-8", "replace").split())


def _login_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _name(lines: list[bytes]) -> bytes:
    return lines[0].split(b":", 1)[0].strip().lower()


def _label(lines: list[bytes]) -> str:
    """The field's name as written (``To``, ``CC``), for an error message."""
    return lines[0].split(b":", 1)[0].strip().decode("ascii", "replace")


def _value(lines: list[bytes]) -> str:
    raw = b"".join(lines).split(b":", 1)[1]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _has_field(message: bytes, name: bytes) -> bool:
    return any(_name(lines) == name for lines in header_block(message)[0])


if __name__ == "__main__":
    sys.exit(main())
