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

Exit codes: 0 sent; 64 usage (unknown option, no recipients); 65 the message was refused as data (too
big, malformed); 67 a recipient was refused (the others were still sent); 69 relay refused the sender
or the message otherwise (5xx); 70 internal error; 75 try again later (relay is down or answered 4xx);
78 the config cannot be read or is invalid.
"""

from __future__ import annotations

import getopt
import ipaddress
import os
import pwd
import smtplib
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import formataddr, getaddresses, parseaddr
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

from relay.prepare.charset import header_block

DEFAULT_CONFIG = "/etc/relay/relay.yaml"
FALLBACK = ("127.0.0.1", 2525)
CHUNK = 1 << 20  # standard input is read this much at a time
FIRST_CAP = 1 << 20  # input up to this size is read without asking the daemon for its size limit
TIMEOUT = 120.0  # per read or write; the daemon answers the final dot once the message is on disk
PROG = "relay-sendmail"
# sendmail's options (getopt style: -f sender or -fsender, -ti); those not listed in Options are ignored
OPTSTRING = "B:b:C:c:F:f:Gh:IiL:mN:nO:o:p:R:r:tUV:vX:"
USAGE = f"usage: {PROG} [-t] [-i] [-f sender] [-F full name] [-c config] [--] [recipient ...] < message"


class UsageError(Exception):
    """The command line cannot be run: exit 64 with this message."""


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
        if exc.opt == "q":
            raise UsageError("-q (run the queue) is not supported: relay delivers by itself; "
                             "relay queue --flush sends deferred mail now") from None  # fmt: skip
        raise UsageError(str(exc)) from None
    options = Options()
    for flag, value in pairs:
        _apply(options, flag[1], value)
    options.recipients = rest
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
        options.sender = parseaddr(value)[1] if "<" in value else value.strip()
    elif letter == "F":
        options.full_name = value
    elif letter in "cC":
        options.config = value
    elif letter == "v":
        options.verbose = True
    # -B -G -h -L -m -N -n -o* -O -p -R -U -V -X: accepted and ignored, as Postfix's sendmail does


def run(options: Options) -> int:
    if options.mode == "i":
        return EX_OK  # relay has no aliases database; newaliases in package scripts must not fail
    config_path, address, note = listener_address(options.config)
    if options.mode == "p":  # mailq: the queue listing is `relay queue`'s, as Postfix's sendmail runs postqueue
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "relay", "queue", "-c", config_path])
    data = read_input(sys.stdin.buffer, lambda: announced_size(address, note), dot_ends=options.dot_ends)
    sender, recipients, message = compose(options, data)
    return submit(address, sender, recipients, message, note=note, verbose=options.verbose)


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
    except (smtplib.SMTPException, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise Failure(EX_TEMPFAIL, f"cannot reach relay at {address[0]}:{address[1]}{note}: {reason} "
                      "(is relay running?)") from None  # fmt: skip
    return int(size) if size.strip().isdigit() and int(size) > 0 else None


def compose(options: Options, data: bytes) -> tuple[str, list[str], bytes]:
    """Standard input and the options -> (envelope sender, recipients, message with CRLF line ends)."""
    message = read_message(data, dot_ends=options.dot_ends)
    recipients = [qualify(a) for a in split_addresses(options.recipients)]
    if options.extract:
        message, found = extract_recipients(message)
        recipients += [a for a in map(qualify, found) if a not in recipients]
    if not recipients:
        raise UsageError("no recipients given" + ("" if options.extract else " (-t reads them from the message)"))
    sender = options.sender if options.sender is not None else qualify(_login_name())
    if options.full_name and not _has_field(message, b"from"):  # -F: only for a message without From
        message = f"From: {formataddr((options.full_name, sender))}\r\n".encode() + message
    return sender, recipients, message


def listener_address(option: str | None) -> tuple[str, tuple[str, int], str]:
    """(config path, where the daemon listens, a note for error messages).

    The config comes from ``-c``, ``RELAY_CONFIG`` or the default path. A default config that this
    user may not read (mode 0640 for the relay group) or that does not exist means 127.0.0.1:2525;
    one named explicitly must be readable. Only ``listeners`` is read (the first one not bound to a
    user that takes plain SMTP, else the first not bound to a user): the daemon checks the rest, and a PHP page should not wait for pydantic to build the models.
    """
    explicit = option or os.environ.get("RELAY_CONFIG")
    path = explicit or DEFAULT_CONFIG
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        if explicit:
            raise Failure(EX_CONFIG, f"cannot read the config {path}: {getattr(exc, 'strerror', None) or exc}") from None
        return path, FALLBACK, f" (the default; {path} could not be read: give -c CONFIG or set RELAY_CONFIG)"
    except yaml.YAMLError as exc:
        raise Failure(EX_CONFIG, f"{path} is not valid YAML: {' '.join(str(exc).split())} (see relay check)") from None
    listeners = data.get("listeners") if isinstance(data, dict) else None
    if listeners is None:
        return path, FALLBACK, f" (relay's default listener; {path} has no listeners:)"
    entries = [lst for lst in listeners if isinstance(lst, dict)] if isinstance(listeners, list) else []
    chosen = next(
        (lst for lst in entries if not lst.get("user") and _plain(lst)),  # this command speaks plain SMTP
        next((lst for lst in entries if not lst.get("user")), entries[0] if entries else None),
    )
    try:
        if chosen is None:
            raise ValueError("no listener")
        host = str(ipaddress.ip_address(str(chosen.get("address", FALLBACK[0]))))
        port = int(chosen.get("port", FALLBACK[1]))
    except (ValueError, TypeError):
        raise Failure(EX_CONFIG, f"{path}: listeners: is not a list of address/port entries (see relay check)") from None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return path, (host, port), f" (listener of {path})"


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
    stays as it was)."""
    fields, _ = header_block(message)
    skipped = message.find(b"\r\n") + 2 if message.startswith(b"From ") else 0  # an mbox "From " line
    end = skipped + sum(len(line) for lines in fields for line in lines)
    values = [_value(lines) for lines in fields if _name(lines) in (b"to", b"cc", b"bcc")]
    kept = b"".join(line for lines in fields if _name(lines) != b"bcc" for line in lines)
    return message[:skipped] + kept + message[end:], split_addresses(values)


def split_addresses(values: Sequence[str]) -> list[str]:
    """``["a@x.fi, B <b@y.fi>", "root"]`` -> the addresses, in order, once each (groups' names dropped)."""
    out: list[str] = []
    for _name_, address in getaddresses(list(values)):
        if address and address not in out:
            out.append(address)
    return out


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
    except (smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise Failure(EX_TEMPFAIL, f"cannot reach relay at {where}: {reason} (is relay running?)") from None


def _transaction(smtp: smtplib.SMTP, sender: str, recipients: list[str], message: bytes) -> int:
    smtp.ehlo_or_helo_if_needed()
    options = ["BODY=8BITMIME"] if not message.isascii() and smtp.has_extn("8bitmime") else []
    if not all(a.isascii() for a in (sender, *recipients)) and smtp.has_extn("smtputf8"):
        options.append("SMTPUTF8")
    code, reply = smtp.mail(sender, options)
    if code != 250:
        raise Failure(_exit_code(code, reply, "MAIL"), f"sender {sender} refused: {code} {_text(reply)}")
    refused = []
    for rcpt in recipients:
        code, reply = smtp.rcpt(rcpt)
        if code not in (250, 251):
            refused.append((rcpt, code, reply))
    for rcpt, code, reply in refused:
        print(f"{PROG}: recipient {rcpt} refused: {code} {_text(reply)}", file=sys.stderr)
    if len(refused) == len(recipients):
        return max(_exit_code(code, reply, "RCPT") for _, code, reply in refused)
    try:
        code, reply = smtp.data(message)
    except smtplib.SMTPDataError as exc:
        code, error = exc.smtp_code, exc.smtp_error
        reply = error if isinstance(error, bytes) else error.encode()
    if code != 250:
        raise Failure(_exit_code(code, reply, "DATA"), f"message refused: {code} {_text(reply)}")
    return max((_exit_code(rcpt_code, rcpt_reply, "RCPT") for _, rcpt_code, rcpt_reply in refused), default=EX_OK)


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
