"""Stage 0: the SMTP listener legacy programs talk to (aiosmtpd). Protocol only.

It answers MAIL, RCPT and DATA, hands the received bytes to the pipeline (``pipeline.prepare``:
identify, resolve, rewrite), commits the result to the spool and only then answers
``250 2.0.0 Ok: queued as <id>``. Anything that goes wrong answers a 4xx (the client will try again)
or the 5xx a stage chose; aiosmtpd's default of a permanent ``500`` for an unexpected exception is
replaced by ``451`` in ``handle_exception``.

``RelaySMTP`` replaces aiosmtpd's DATA reader, which reads one line at a time and refuses any line
longer than 1000 octets with a permanent 500. Legacy programs send long lines and bare LF line ends;
relay accepts both (the rewrite stage repairs them). DATA ends at ``CRLF.CRLF``; a bare ``LF.LF``
ends it only for a client that never sent a CRLF, so inside a normal message it stays content (and is
dot-stuffed on the way out): a crafted message cannot smuggle a second one past an upstream.

TLS (a listener with a certificate, see ``relay/config/listener_tls.py``) is aiosmtpd's: STARTTLS puts
its TLS layer under this same protocol object, so the readers above, the reply sanitiser and the
admission count work unchanged on the decrypted stream; with implicit TLS the server socket is TLS from
the first byte.
aiosmtpd's own TLS replies get enhanced status codes (``_TLS_REPLIES``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import functools
import io
import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from email._header_value_parser import get_addr_spec, get_angle_addr
from typing import Any

import structlog
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
    _Missing,
    syntax,
)

from relay import logs, osuser, replies
from relay.config.credentials import read_secret
from relay.config.models import Config
from relay.config.secretstore import FailureThrottle, verify_login
from relay.config.types import normalize_number
from relay.envelope import OsUser, Submission
from relay.errors import ConfigError, RefusedError
from relay.idn import with_a_label
from relay.intake import aiosmtpd_private as private
from relay.intake.admission import Admission
from relay.prepare.identify import client_ip, identify, user_by_address
from relay.prepare.pipeline import prepare, settings_for
from relay.prepare.rewrite import split_recipients
from relay.prepare.settings import resolve
from relay.prepare.sms import is_sms_address
from relay.queue.committer import Committer
from relay.queue.spool import QueueEntry, Spool
from relay.transports.graph import GraphTransport, fits
from relay.transports.graph_large import graph_address_problem

log = structlog.get_logger("relay.listener")
private.skip_disabled_command_logging()
READ_CHUNK = 64 * 1024
END_OF_DATA = b"\r\n.\r\n"
_SIMPLE_PATH = re.compile(r"\s*<([A-Za-z0-9._%+\-=]+@[A-Za-z0-9.\-]+)>((?:\s+[A-Za-z][A-Za-z0-9\-]*=\S*)*)\s*")
# a phone number as typed, bare or quoted: "040 123 4567"@sms, (09) 123-4567@sms, +358 (0)40 123 4567@sms
_PHONE = re.compile(r'("?\+?[0-9() \-]*[0-9][0-9() \-]*"?)@([A-Za-z0-9.\-]+)')
_PARAM = re.compile(r"[A-Za-z][A-Za-z0-9\-]*=\S*")  # an ESMTP parameter: SIZE=1, NOTIFY=NEVER, ORCPT=...
# MAIL's AUTH=<mailbox> parameter (RFC 4954 section 5): ``<>`` or an xtext (RFC 3461 section 4)
_AUTH_PARAM = re.compile(r"(?i)\s+AUTH=(\S*)(?=\s|$)")
_HUGE_SIZE = re.compile(r"(?i)\sSIZE=0*[1-9][0-9]{18,}(?=\s|$)")  # a SIZE= no message has: 10**18 octets and up
_XTEXT = re.compile(r"<>|(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")
# The longest command line taken (RFC 5321's minimum is 512 octets). Legacy programs put the whole
# recipient field in one RCPT, ``<a@x.fi; b@y.fi; ...>``: a dozen customers' addresses is already past
# 512, and refusing the command refuses every one of them. ``limits.max_recipients`` still counts them.
COMMAND_LINE_MAX = 64 * 1024
_COMMAND_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # TAB may separate parameters
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as aiosmtpd keeps it (surrogateescape)
REPLY_TEXT_MAX = 510  # octets of a reply line before its CRLF (RFC 5321 4.5.3.1.5: 512 with it)
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
# aiosmtpd's fixed TLS replies -> relay's, with the enhanced status codes clients log and act on
_TLS_REPLIES = {
    "530 Must issue a STARTTLS command first": replies.R530_STARTTLS_FIRST,
    "220 Ready to start TLS": replies.R220_READY_FOR_TLS,
    "454 TLS not available": replies.R454_TLS_UNAVAILABLE,
    "501 Syntax: STARTTLS": replies.R501_STARTTLS_SYNTAX,
}
# what a failed STARTTLS handshake most often means, for the admin reading the log
_HANDSHAKE_ADVICE = {
    "UNKNOWN_CA": "the client does not trust relay's certificate: install the CA that signed it on the client "
    "(README: Listening with TLS)",
    "BAD_CERTIFICATE": "the client refused relay's certificate (its name or dates): see relay check",
    "CERTIFICATE_UNKNOWN": "the client refused relay's certificate (its name, dates or CA): see relay check",
    "UNSUPPORTED_PROTOCOL": "the client offers only TLS versions older than 1.2, which relay does not speak: "
    "update the client's TLS settings (on Windows: TLS 1.2 for .NET, SchUseStrongCrypto)",
    "NO_SHARED_CIPHER": "the client offers no cipher relay accepts (an old TLS library)",
}
# Rewriting a small message takes about a millisecond: done on the event loop, where a worker thread
# would only add a GIL hand-over per message. Bigger ones are parsed in a thread so they cannot stall
# every other session.
INLINE_PREPARE_LIMIT = 128 * 1024
GRAPH_CHECK_TIMEOUT = 10.0  # seconds a big message's DATA waits for a Graph token's permissions, once


def unstuff(data: bytes, *, lf_only: bool = False, stuffed: bool = True) -> bytes:
    """Undo SMTP dot-stuffing (RFC 5321 4.5.2) on the received body (after LF for bare-LF clients).
    ``stuffed=False``: the end-of-data scan saw no stuffed line, so the body is not searched again."""
    if not stuffed and not lf_only:
        return data
    line_end = b"\n" if lf_only else b"\r\n"
    if data.startswith(b".."):
        data = data[1:]
    if line_end + b".." not in data:
        return data  # the common case: no copy at all
    return data.replace(line_end + b"..", line_end + b".")


class _EndScan:
    """Finds the end of DATA in a stream of chunks without keeping them (the caller stores them).

    Positions are offsets in the data after the ``DATA`` command's reply. The scan runs over the last
    few octets of the previous chunks plus the new chunk, so a marker split across chunks is found,
    and it starts with a virtual ``CRLF`` so that an empty message's lone ``.`` line ends it too.
    """

    def __init__(self) -> None:
        self.received = 0  # octets of data so far
        self.tail = b"\r\n"  # the last octets seen (the virtual CRLF at first)
        self.crlf_seen = False
        self.lf_only = False
        self.marker_length = len(END_OF_DATA) - 2  # octets of the marker after the content's last line end
        self.last_chunk = b""
        self.stuffed = False  # a CRLF.. seen: the body needs ``unstuff`` (else it is not searched again)

    def feed(self, chunk: bytes) -> int | None:
        """The content's end (an offset in the data), or ``None`` while the marker has not come."""
        tail, base = self.tail, self.received - len(self.tail)  # base: the data offset of probe[0]
        probe = tail + chunk
        self.received += len(chunk)
        self.last_chunk = chunk
        self.tail = probe[-4:]
        virtual = max(-base, 0)  # leading octets of the probe that are the virtual CRLF
        if not self.crlf_seen:
            crlf = probe.find(b"\r\n", virtual)
            at = probe.find(b"\n.\n", max(virtual - 1, 0))
            if at >= 0 and (crlf < 0 or crlf > at):  # no CRLF in the data before this LF.LF
                self.lf_only = True
                self.marker_length = 2
                return base + at + 1  # the content keeps its last LF
            self.crlf_seen = crlf >= 0
        # every line that starts with a dot, in one pass: the end marker, or a stuffed line (noted, so that
        # ``unstuff`` need not search the whole body again), or a dot line a client forgot to stuff
        at = probe.find(b"\r\n.") if b"." in probe else -1  # a dot is looked for 40x faster than CRLF-dot
        while at >= 0:
            follows = probe[at + 3 : at + 5]
            if follows[:1] == b".":
                self.stuffed = True
            elif follows == b"\r\n":
                return base + at + 2  # the content keeps the CRLF before the dot
            elif len(follows) < 2:
                break  # the rest comes with the next chunk (``tail`` keeps these octets)
            at = probe.find(b"\r\n.", at + 3)
        return None


def _a_labels(recipients: tuple[str, ...]) -> dict[str, list[str]]:
    """``to_ascii`` for a ``received`` event with an internationalised domain among its recipients: the
    form relay sends and the provider logs, and where a look-alike shows (``аpple.com`` with a Cyrillic
    ``а`` reads like ``apple.com``; its A-label, ``xn--pple-43d.com``, does not)."""
    if all(address.isascii() for address in recipients):
        return {}
    return {"to_ascii": [with_a_label(address) for address in recipients]}


def printable_reply(status: str) -> str:
    """A reply line as it may go on the wire: printable ASCII, at most 512 octets with its CRLF.

    aiosmtpd echoes an unknown command as it came (``500 Error: command "RSET\\x00" not recognized``)
    and relay's replies name the address they refuse; a NUL, a bare CR, 8-bit or a 5,000-octet
    "command" would go back raw (a bare CR ends a line for some clients; 8-bit that is not UTF-8
    cannot be encoded at all). Anything else is written as its escape (``\\x00``, ``\\xe4``), so a
    client's log still shows what was sent.
    """
    text = _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], status)
    return text if len(text) <= REPLY_TEXT_MAX else text[: REPLY_TEXT_MAX - 3] + "..."


def _bytes(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


def _b64(text: str | bytes) -> bytes:
    return base64.b64encode(_bytes(text))


def _legacy_bytes(arg: str) -> str:
    """A command's bytes that are not UTF-8 read as windows-1252, as the rewrite reads such header bytes.

    A Windows ERP writes its customer's ``info@yhtiö.fi`` in its ANSI code page (``ö`` is one byte,
    0xF6): aiosmtpd keeps that byte as a surrogate and the address parser refused the whole RCPT (501),
    where the same address in UTF-8 goes. Valid UTF-8 around it stays as it is; a byte windows-1252
    leaves undefined stays a surrogate, and the command is still refused."""
    if arg.isascii():
        return arg
    return _NOT_UTF8.sub(_windows_1252, arg)


def _windows_1252(byte: re.Match[str]) -> str:
    raw = bytes([ord(byte.group()) - 0xDC00])
    try:
        return raw.decode("windows-1252")
    except UnicodeDecodeError:  # 0x81, 0x8D, 0x8F, 0x90, 0x9D
        return byte.group()


def parse_rcpt(arg: str) -> tuple[str | None, str | None]:
    """An RCPT TO (or MAIL FROM) argument -> (address or ``;``-joined addresses, parameters).

    Legacy programs put the whole recipient field in one command: ``<a@x.fi; 040 123 4567@sms>``,
    ``<a@x.fi>; <b@y.fi>``, ``a@x.fi, b@y.fi SIZE=1``. Every member of such a list is parsed on its
    own and returned, so none can be cut off as a "parameter" or a "comment": either all members are
    addresses and all are passed on, or the command is refused (``None``) and the client sees it.
    A phone number typed with spaces, dashes or brackets is compacted (``(040) 123-4567@sms``).
    """
    simple = _SIMPLE_PATH.fullmatch(arg)
    if simple:  # <local@domain> with nothing unusual: what the RFC 5322 parser would return, 20x faster
        return simple.group(1), simple.group(2).strip()
    path, params = _path_and_params(arg)
    pieces = _split_members(path)
    members = [m for m in (_unbracket(m) for m in pieces) if m]
    if path.lstrip().startswith("<@") or (len(pieces) == 1 and not _PHONE.fullmatch(members[0] if members else "")):
        return _rfc_address(arg)  # one ordinary address, a source route, or <>: the RFC parser's answer
    if not members:
        return None, None
    addresses = [_member(m) for m in members]
    if any(a is None for a in addresses):
        return None, None
    return ";".join(a for a in addresses if a), params


def _path_and_params(arg: str) -> tuple[str, str]:
    """Split ``<path...> KEY=VALUE ...`` (or an unbracketed list followed by parameters)."""
    text = arg.strip()
    if ">" in text:
        cut = text.rindex(">") + 1
        after = text[cut:]
        if not after.strip() or (after[0].isspace() and all(_PARAM.fullmatch(t) for t in after.split())):
            return text[:cut], after.strip()
        return text, ""
    tokens = text.split()
    cut = next((i for i, t in enumerate(tokens) if _PARAM.fullmatch(t) and "@" not in t), len(tokens))
    return " ".join(tokens[:cut]), " ".join(tokens[cut:])


def _split_members(path: str) -> list[str]:
    """Split on ``;`` and ``,`` outside double quotes (a quoted local part may hold either)."""
    members, current, quoted = [], "", False
    for ch in path:
        if ch == '"':
            quoted = not quoted
        elif ch in ";," and not quoted:
            members.append(current)
            current = ""
            continue
        current += ch
    return [*members, current]


def _unbracket(member: str) -> str:
    return member.strip().lstrip("<").rstrip(">").strip()


def _member(member: str) -> str | None:
    """One list member -> its address (phone numbers compacted), or ``None`` if it is not one."""
    phone = _PHONE.fullmatch(member)
    if phone:
        typed = phone.group(1).strip('"')
        if typed.lstrip().startswith("+"):  # +358 (0)40 ...: the "(0)" is the national prefix, not dialled
            typed = typed.replace("(0)", "")
        return re.sub(r"[\s()\-]", "", typed) + "@" + phone.group(2)
    address, rest = _rfc_address(f"<{member}>")
    return address if address and not rest else None


def _rfc_address(arg: str) -> tuple[str | None, str | None]:
    """aiosmtpd's own parser (RFC 5321/5322 paths, source routes, quoted local parts)."""
    if not arg.strip():
        return "", ""  # as aiosmtpd answers an empty argument (its reply: a syntax error)
    parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
    try:
        address, rest = parse(arg)
        return str(address.addr_spec), rest
    except Exception:  # noqa: BLE001  the email package's parser fails in many ways on malformed paths
        # (HeaderParseError, IndexError, AttributeError, ValueError; `0@[ ` even UnboundLocalError, a bug of
        # CPython's _header_value_parser): whichever, the address is refused (501), never a 451 crash reply
        return None, None


_HOOK_NAMES: dict[tuple[type, tuple[str, ...]], list[str]] = {}


def _hook_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The names on ``cls`` that start with one of ``prefixes``, worked out once per class."""
    key = (cls, prefixes)
    if key not in _HOOK_NAMES:
        _HOOK_NAMES[key] = sorted(name for name in dir(cls) if name.startswith(prefixes))
    return list(_HOOK_NAMES[key])


class RelaySession(Session):
    """aiosmtpd's session plus who owns the client's socket, looked up at most once per connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.sockname: tuple[str, int] | None = None  # relay's end of the connection
        self.os_user: OsUser | None = None
        self.os_user_checked = False


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with a chunked, long-line-tolerant DATA reader and legacy address lists."""

    # aiosmtpd's stream reader limit (its longest line) and command line limits, with and without EHLO
    line_length_limit = COMMAND_LINE_MAX
    command_size_limit = COMMAND_LINE_MAX
    command_size_limits: dict[str, int] = collections.defaultdict(lambda: COMMAND_LINE_MAX)  # noqa: RUF012 (aiosmtpd's own is one too)
    # AUTH LOGIN's prompts as Postfix (Cyrus SASL) and Microsoft send them; aiosmtpd's "User Name\0" is
    # not what an old mail component that waits for "Username:" matches
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

    def __dir__(self) -> list[str]:
        """Only the ``smtp_*`` and ``auth_*`` methods, listed once per class.

        aiosmtpd finds its command and AUTH methods with ``dir()`` and ``inspect.getmembers`` on every
        new connection; over all ~200 attributes of the class that was most of the cost of setting
        up a session (a new connection per message is how legacy clients send). These are the only
        names it looks for, and the class defines them all.
        """
        return _hook_names(type(self), ("smtp_", "auth_"))

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Accept the seeds' ``RCPT TO:<a@x.fi; b@y.fi>``: aiosmtpd would keep ``a@x.fi`` and silently
        treat the rest as parameters. See ``parse_rcpt``; the rewrite stage splits the list again.

        A control character anywhere in the argument refuses it (RFC 5321 has none in a command): the
        email package's parser drops CR, VT and FF from a domain, so ``<a@evil.com\r.example.com>`` was
        taken for ``a@evil.com.example.com``, and a NUL in MAIL FROM was refused only after the DATA."""
        if _COMMAND_CONTROLS.search(arg):
            return None, None
        return parse_rcpt(_legacy_bytes(arg))

    _admitted: str | None = None  # the client counted by Admission.connect, until the connection ends
    _refusal: str | None = None  # the 421 a connection over the limits gets instead of the greeting

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.session is None
        super().connection_made(transport)
        if isinstance(self.session, RelaySession):
            sockname = transport.get_extra_info("sockname")
            self.session.sockname = (str(sockname[0]), int(sockname[1])) if isinstance(sockname, tuple) else None
        admission = getattr(self.event_handler, "admission", None)
        if first and isinstance(admission, Admission):
            client = _client(self.session) if self.session is not None else ""
            self._refusal = admission.connect(client)
            self._admitted = client if self._refusal is None else None
            self._admission = admission

    async def _handle_client(self) -> None:
        """A connection over the limits gets its 421 instead of the greeting, and is closed."""
        if self._refusal is None:
            await super()._handle_client()
            return
        await self.push(self._refusal)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if self._admitted is not None:
            self._admission.disconnect(self._admitted)
            self._admitted = None

    _continued = b""  # the lines of a multi-line reply so far (``250-...``), written with its last line

    def _timeout_cb(self) -> None:
        """An idle session ends with a ``421`` first (RFC 5321 4.5.3.2: the server closes with 421 4.4.2,
        as Postfix's "Error: timeout exceeded"), so the client's log says why; aiosmtpd only closed."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode("ascii", "replace"))
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def push(self, status: str | bytes) -> None:
        """Every reply goes out as ``printable_reply`` makes it (aiosmtpd's TLS ones as ``_TLS_REPLIES``), and
        every 4xx and 5xx with an enhanced status code (aiosmtpd's own ``501 Syntax: RCPT TO: <address>``
        has none). A multi-line reply (EHLO's) goes out in one write, as Postfix sends it: aiosmtpd
        writes each line by itself, a system call and a packet each."""
        text = status if isinstance(status, str) else status.decode("ascii", "backslashreplace")
        line = printable_reply(replies.with_enhanced_code(_TLS_REPLIES.get(text, text))).encode("ascii")
        if line[3:4] == b"-":
            self._continued += line + b"\r\n"
            return
        line, self._continued = self._continued + line, b""
        await super().push(line)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """aiosmtpd's MAIL, taking the ``AUTH=`` parameter RFC 4954 says a server offering AUTH must take.

        Sendmail, Exchange and JavaMail add ``AUTH=<>`` (or the submitter) after a login, and the README
        lets legacy programs keep their old ISP login: aiosmtpd refuses the parameter (555), which
        refused all their mail. relay makes no use of it (the submitter is not passed on); a malformed
        one gets 501, as the RFC asks.
        """
        if arg is not None and _HUGE_SIZE.search(arg):  # aiosmtpd's int() of 5,000 digits raised (a 451)
            await self.push(replies.R552_TOO_BIG.format(self.data_size_limit))
            return
        if arg is not None and (found := _AUTH_PARAM.search(arg)) is not None:
            if not _XTEXT.fullmatch(found.group(1)):
                await self.push(replies.R501_AUTH_PARAM)
                return
            arg = arg[: found.start()] + arg[found.end() :]
        await super().smtp_MAIL(arg)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS, refused on a connection that is already encrypted (a second STARTTLS, or
        one over implicit TLS) instead of starting TLS inside TLS, as Postfix refuses it."""
        if tls_version(self.transport) is not None:
            await self.push(replies.R503_TLS_ACTIVE)
            return
        await super().smtp_STARTTLS(arg)

    async def handle_exception(self, error: Exception) -> str:
        """A failed STARTTLS handshake is the client's choice (it distrusts the certificate, or speaks only
        old TLS), not relay's error: one warning with the client and what it likely means, no traceback.
        aiosmtpd then closes the connection without a reply (the channel is neither plain nor TLS)."""
        if isinstance(error, TLSSetupException):
            reason = str(error.__cause__ or error)
            advice = next((text for code, text in _HANDSHAKE_ADVICE.items() if code in reason), None)
            client = _client(self.session) if self.session is not None else ""
            log.warning("tls_handshake_failed", client=client, error=reason, **({"advice": advice} if advice else {}))
            return replies.R454_TLS_UNAVAILABLE
        return await super().handle_exception(error)

    async def challenge_auth(
        self, challenge: str | bytes, encode_to_b64: bool = True, log_client_response: bool = False
    ) -> _Missing | bytes:
        """aiosmtpd's AUTH challenge, with a response line over the reader's limit answered
        ``500 5.5.6`` (RFC 4954 4) instead of raising ``ValueError`` out of ``readline`` (a 451 and a
        ``session_error``, or, past the read buffer, the rest of the line taken as commands)."""
        line = await self._read_line(b"334 " + (_b64(challenge) if encode_to_b64 else _bytes(challenge)))
        blob = line.strip() if line is not None else None
        if blob is None:
            await self.push(replies.R500_AUTH_LINE_TOO_LONG)
        elif blob == b"*":
            await self.push("501 5.7.0 Auth aborted")
        else:
            try:
                return base64.b64decode(blob, validate=True)
            except binascii.Error:
                await self.push("501 5.5.2 Can't decode base64")
        return MISSING

    async def _read_line(self, prompt: bytes) -> bytes | None:
        """Send ``prompt``, read the client's line; ``None`` (the line read and dropped) if it is too long."""
        await self.push(prompt)
        too_long = False
        while True:
            try:
                line = await private.reader(self).readuntil()
                return None if too_long else line
            except asyncio.LimitOverrunError as exc:
                too_long = True
                await private.reader(self).readexactly(exc.consumed)
            except asyncio.IncompleteReadError as exc:  # the client hung up in the middle of the line
                raise ConnectionResetError("connection closed during AUTH") from exc

    async def check_helo_needed(self, helo: str = "HELO") -> bool:
        """Old programs skip HELO; Postfix (``smtpd_helo_required = no``) takes their mail, so do we."""
        return False

    async def _read_data(self, limit: int | None) -> bytes | None:
        """Read up to ``CRLF.CRLF``; ``None`` when the message was larger than ``limit``.

        The data goes into an ``io.BytesIO`` whose ``getvalue`` hands over its own buffer (resized in
        place) instead of copying it: a 25 MB message costs 25 MB here, not the 50 MB of a buffer plus
        its copy. Past the limit the data is read and thrown away (keeping only what could be the start
        of the end marker), so a huge message costs no memory and still gets its 552 at the end.
        A client that has sent no CRLF at all (a Unix program writing bare LF everywhere) may end
        with ``LF.LF``; once a CRLF was seen only ``CRLF.CRLF`` ends the data, so a bare ``LF.LF``
        inside a normal message is content (SMTP smuggling), and is dot-stuffed on the way out.
        """
        scan = _EndScan()
        store: io.BytesIO | None = io.BytesIO()
        while True:
            chunk = await private.reader(self).read(READ_CHUNK)
            if not chunk:
                raise ConnectionResetError("connection closed during DATA")
            private.still_talking(self)
            found = scan.feed(chunk)
            if store is not None:
                store.write(chunk)
            if found is not None:
                return self._end_of_data(store, scan, found, limit)
            if limit and scan.received > limit + 7:
                store = None  # too big: count the rest, keep nothing (the marker is found in the scan's tail)

    def _end_of_data(self, store: io.BytesIO | None, scan: _EndScan, end: int, limit: int | None) -> bytes | None:
        """``end``: where the content ends in the data (its last line end included)."""
        after = end + scan.marker_length
        if scan.received > after:
            # pipelined commands after the end marker belong to the next transaction
            private.unread(private.reader(self), scan.last_chunk[after - scan.received :])
        if store is None or (limit and end > limit):
            return None
        store.truncate(end)
        return unstuff(store.getvalue(), lf_only=scan.lf_only, stuffed=scan.stuffed)

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content = await self._read_data(self.data_size_limit)
        if content is None:
            private.end_transaction(self)
            await self.push(replies.R552_TOO_BIG.format(self.data_size_limit))
            return
        self.envelope.content = self.envelope.original_content = content
        status = await private.data_hook(self)
        private.end_transaction(self)
        await self.push(status if isinstance(status, str) else replies.R451_INTERNAL)


class RelayHandler:
    """aiosmtpd handler: the hooks that turn an SMTP transaction into queued mail."""

    def __dir__(self) -> list[str]:
        """Only the ``handle_*`` and ``auth_*`` hooks: what aiosmtpd looks for with ``dir()`` and
        ``inspect.getmembers`` on every new connection (see ``RelaySMTP.__dir__``)."""
        return _hook_names(type(self), ("handle_", "auth_"))

    def __init__(
        self, config: Config, spool: Spool, on_queued: Callable[[list[QueueEntry]], None], *, listener: int = 0,
        admission: Admission | None = None, graph: GraphTransport | None = None, committer: Committer | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self.graph = graph  # the daemon's Graph transport: whether a message over sendMail's limit may go
        self.may_upload = graph.may_upload if graph is not None else None
        self.spool = spool
        self.committer = committer or Committer(spool)  # the daemon shares one among its listeners
        self.on_queued = on_queued
        self.listener = listener
        self.login_failures = FailureThrottle()
        # the daemon shares one among its listeners
        self.admission = admission or Admission(config.limits, spool_dir=spool.root)

    def _allowed(self, session: Session) -> bool:
        address = client_address(session.peer[0] if isinstance(session.peer, tuple) else str(session.peer))
        return address is not None and any(address in net for net in self.config.listeners[self.listener].networks)

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        """aiosmtpd's own PLAIN exchange (which calls ``accept_any_login``), then the local-login check."""
        return await self._checked_login(server, await server.auth_PLAIN(server, args))

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._checked_login(server, await server.auth_LOGIN(server, args))

    async def _checked_login(self, server: SMTP, result: AuthResult) -> AuthResult:
        """A login naming a user with a local password (``relay passwd USER --login``) must give it;
        then it identifies that user (rule ``auth``). Any other login is taken as before.

        The hash is checked in a thread (scrypt takes tens of milliseconds); a wrong password waits
        (``FailureThrottle``) and gets 535 5.7.8. Plain text is acceptable here: the listener takes
        mail only from ``allowed_networks`` (loopback by default), and this password opens nothing but
        relay's own sender identity, never the provider's account.
        """
        data = result.auth_data
        if not result.success or not isinstance(data, LoginPassword):
            return result
        login = data.login.decode("utf-8", "replace")
        user_id = local_user(self.config, login)
        if user_id is None:
            return result
        assert server.session is not None
        client = _client(server.session)
        verdict = await asyncio.to_thread(verify_login, self.config.secret_store, user_id, data.password)
        if verdict is None:  # no local password for this user: any login, as for everyone else
            return result
        if verdict:
            log.info("client_login_checked", client=client, user=user_id, result="accepted")
            return AuthResult(success=True, auth_data=CheckedLogin(data.login, user_id))
        wait = self.login_failures.failed(client)
        log.warning("client_login_failed", client=client, user=user_id, login=_printable_login(login), delay=wait)
        await asyncio.sleep(wait)
        return AuthResult(success=False, handled=False, message=replies.R535_BAD_LOGIN)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not self._allowed(session):
            log.warning("client_refused", client=_client(session), reason="not in allowed_networks")
            return replies.R554_NOT_ALLOWED.format(_client(session))
        # the disk first: a MAIL refused for it is not counted against the client's rate
        limited = self.admission.storage(_announced_size(options), _client(session))
        limited = limited or self.admission.message_from_client(_client(session))
        if limited is not None:
            return limited
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        if "os_user" in self.config.identify.order and isinstance(session, RelaySession):
            await _look_up_os_user(session)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not self._allowed(session):
            return replies.R554_NOT_ALLOWED.format(_client(session))
        try:
            # refuse a bad address now, not the whole message after DATA
            members = check_recipient(address, self.config)
            if _through_graph(self.config, session, envelope):
                check_graph_recipients(members)
        except RefusedError as exc:
            return exc.reply
        limit = self.config.limits.max_recipients
        if _members(envelope.rcpt_tos) + len(members) > limit:  # list members count, as they will be sent
            return replies.R452_TOO_MANY_RECIPIENTS.format(limit)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        structlog.contextvars.clear_contextvars()
        sub = Submission(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=envelope.original_content or b"",
            client=_client(session),
            listener=self.listener,
            os_user=session.os_user if isinstance(session, RelaySession) else None,
            helo=session.host_name,
            login=session.auth_data.user if isinstance(session.auth_data, CheckedLogin) else None,
            server=server.hostname,
        )
        tls = tls_version(server.transport)
        return await self.take(sub, self.config, **({"tls": tls} if tls else {}))

    async def take(self, sub: Submission, config: Config, **logged: Any) -> str:
        """One submission through what every message takes: prepare (identify, resolve, rewrite), the
        per-user rate, the durable commit, the scheduler told, a ``received`` event (with ``logged``'s
        fields) per entry. The reply a client gets: 250 once on disk, else the 4xx or 5xx a stage chose.
        The SMTP DATA and the drop directory's pickup (``pickup.py``) both come here."""
        try:
            await self._learn_graph_permission(config, sub)
            if len(sub.content) <= INLINE_PREPARE_LIMIT:
                prepared = prepare(config, sub, read_secret=read_secret, may_upload=self.may_upload)
            else:
                prepared = await asyncio.to_thread(
                    functools.partial(prepare, config, sub, read_secret=read_secret, may_upload=self.may_upload)
                )
            limited = self.admission.message_from_user(prepared.settings.user, sub.client)
            if limited is not None:
                return limited
            entries = await self.committer.commit(
                prepared.messages, client=sub.client, identified_by=prepared.settings.identified_by
            )
        except RefusedError as exc:
            log.warning("refused", client=sub.client, mail_from=sub.mail_from, reply=exc.reply, **logged)
            return exc.reply
        except OSError as exc:
            log.error("spool_write_failed", client=sub.client, error=f"{type(exc).__name__}: {exc}", **logged)
            return replies.R451_SPOOL_WRITE
        if logs.enabled("relay.listener"):
            for entry in entries:  # logged before the scheduler hears of it: its delivery_attempt comes after
                log.info(
                    "received", queue_id=entry.id, user=entry.user, identified_by=prepared.settings.identified_by,
                    client=sub.client, mail_from=sub.mail_from, sender=entry.mail_from, size=len(sub.content),
                    recipients=len(entry.recipients), to=list(entry.recipients), upstream=entry.account,
                    kind=entry.kind, notes=list(entry.notes), **_a_labels(entry.recipients),
                    **({"os_user": str(sub.os_user)} if sub.os_user else {}), **logged,
                )  # fmt: skip
        self.on_queued(entries)
        return replies.R250_QUEUED.format(" ".join(e.id for e in entries))

    async def _learn_graph_permission(self, config: Config, sub: Submission) -> None:
        """A message over Graph's sendMail limit for a Graph account whose permissions are not known yet
        (just started, or reloaded): ask for the token now (cached for the next ones), so that the answer
        is the right one: 552 without Mail.ReadWrite, taken with it."""
        if self.graph is None or fits(len(sub.content)):
            return
        account = settings_for(config, sub).account
        if account is None or account.transport != "graph" or self.graph.may_upload(account) is not None:
            return
        try:
            async with asyncio.timeout(GRAPH_CHECK_TIMEOUT):
                await self.graph.check_permissions(account)
        except TimeoutError:
            pass  # not known: the message is taken, and delivery says what is missing while it waits

    async def handle_exception(self, error: Exception) -> str:
        log.error("session_error", error=f"{type(error).__name__}: {error}", exc_info=error)
        return replies.R451_INTERNAL


def _announced_size(options: list[str]) -> int:
    """MAIL's ``SIZE=`` (RFC 1870), 0 if not given; aiosmtpd has checked it is digits within the limit."""
    for option in options:
        if option.upper().startswith("SIZE=") and option[5:].isdigit():
            return int(option[5:])
    return 0


async def _look_up_os_user(session: RelaySession) -> None:
    """Find the OS user owning the client's socket, once per connection (at its first MAIL, while the
    client is surely connected). Only done when the ``os_user`` rule is configured: it reads the
    kernel's socket table, in a thread."""
    if session.os_user_checked:
        return
    session.os_user_checked = True
    peer: Any = session.peer
    if not isinstance(peer, tuple) or session.sockname is None:
        return
    session.os_user = await asyncio.to_thread(osuser.os_user, (str(peer[0]), int(peer[1])), session.sockname)
    log.debug("os_user", client=_client(session), os_user=str(session.os_user) if session.os_user else None)


def client_address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client's IP address for the network check: ``client_ip``'s, an IPv4-mapped one as IPv4."""
    address = client_ip(peer)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def check_recipient(address: str, config: Config) -> list[str]:
    """Refuse at RCPT what the rewrite stage would refuse after DATA: no address (``<>``), a malformed
    member of the list, a phone number that cannot be one, or one for an SMS route that is off. The
    client then knows which recipient failed, and the message still goes to the others. Returns the
    members (how many recipients this RCPT adds)."""
    members = split_recipients([address])
    if not members:
        raise RefusedError(replies.R501_BAD_ADDRESS.format("<>"))
    sms_domain = config.sms.domain.lower() if config.sms is not None else "sms"
    for rcpt in members:
        if config.sms is not None and is_sms_address(rcpt, config.sms):
            try:
                normalize_number(rcpt.rpartition("@")[0], config.sms.country_code)
            except ValueError:
                raise RefusedError(replies.R550_BAD_PHONE_NUMBER.format(rcpt)) from None
        elif rcpt.rpartition("@")[2].lower() == sms_domain:  # the ERP asks for an SMS relay cannot send
            raise RefusedError(replies.R550_SMS_OFF.format(rcpt)) from None
    return members


def check_graph_recipients(members: list[str]) -> None:
    """Refuse at RCPT an address Microsoft Graph would refuse (``ErrorInvalidRecipients``): Graph refuses
    the whole message for one such recipient, so the client hears 553 for that one now, and the others go."""
    for rcpt in members:
        problem = graph_address_problem(rcpt)
        if problem is not None:
            raise RefusedError(replies.R553_GRAPH_ADDRESS.format(rcpt, problem))


def _through_graph(config: Config, session: Session, envelope: Envelope) -> bool:
    """Whether this transaction's mail goes out through a Graph account, as far as the envelope tells (a
    rule on the From header is only known after DATA: then the company's account decides)."""
    sub = Submission(mail_from=envelope.mail_from or "", rcpt_tos=(), content=b"", client=_client(session),
                     os_user=session.os_user if isinstance(session, RelaySession) else None)  # fmt: skip
    return through_graph(config, sub)


def through_graph(config: Config, sub: Submission) -> bool:
    """``_through_graph`` for a submission (the drop directory's pickup has no session)."""
    try:
        account = resolve(config, *identify(config, sub)).account
    except (RefusedError, ConfigError):
        return False
    return account is not None and account.transport == "graph"


def _members(rcpt_tos: list[str]) -> int:
    """Recipients accepted so far: a ``;`` list in one RCPT counts each of its members."""
    return sum(len(split_recipients([rcpt])) for rcpt in rcpt_tos)


@dataclass(frozen=True)
class CheckedLogin:
    """A session's login whose password matched the user's local-login hash (``session.auth_data``)."""

    login: bytes  # aiosmtpd copies it to ``session.login_data``
    user: str


def local_user(config: Config, login: str) -> str | None:
    """The user a login names: a user id, or (case-insensitively) one of a user's addresses."""
    return login if login in config.users else user_by_address(config, [login])


def accept_any_login(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
    """aiosmtpd authenticator for legacy programs that insist on AUTH PLAIN/LOGIN: any login is taken.

    relay accepts mail from ``allowed_networks`` without a login, so a login grants nothing more; refusing
    it (aiosmtpd's 538 "encryption required") would stop a program that cannot be reconfigured. A login
    naming a user who has a local password is checked afterwards (``RelayHandler._checked_login``).
    """
    login = data.login.decode("utf-8", "replace") if isinstance(data, LoginPassword) else ""
    log.debug("client_login", client=_client(session), mechanism=mechanism, login=_printable_login(login))
    return AuthResult(success=True, auth_data=data)


def tls_version(transport: asyncio.BaseTransport | None) -> str | None:
    """``TLSv1.3`` (or the like) on an encrypted connection, STARTTLS or implicit; ``None`` in plain."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    version = ssl_object.version() if ssl_object is not None else None
    return str(version) if version else None


def _printable_login(login: str) -> str:
    return login.encode("ascii", "backslashreplace").decode("ascii")[:100]


def _client(session: Session) -> str:
    peer: Any = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


@functools.cache
def this_host() -> str:
    """The greeting's default name, looked up once: aiosmtpd would call ``socket.getfqdn`` for every
    connection, on the event loop (a name lookup; seconds when DNS is broken)."""
    return socket.getfqdn()
