"""Failure and delay notices (RFC 3464 delivery status notifications) to the submitting user.

The legacy program got ``250`` long ago and will never hear of a 5xx that came later, so the person
who sent the mail must: when relay gives up on recipients (a 5xx, or ``max_queue_lifetime`` reached),
and optionally when mail is still not delivered after ``delivery.delay_warning`` seconds, it queues a
``multipart/report; report-type=delivery-status`` message (RFC 3462/3464) with three parts: plain words
naming the recipients and the provider's reply, the ``message/delivery-status`` fields, and the
original message's headers (``text/rfc822-headers``).

Where it goes and how: to the user's own address, *from* that address, through that user's own account,
as a normal queue entry of kind ``notice``. Office 365 (and any provider that lets a login send only as
its own mailbox) refuses a null envelope sender or another From, so the envelope sender is the user's
address rather than RFC 3464's ``<>``; loops are broken instead by relay never sending a notice about a
notice entry, and by ``Auto-Submitted: auto-replied`` (RFC 3834) for the mailbox's own rules.
``delivery.notify`` addresses get the same notice as additional envelope recipients (an admin copy).

Pure: building only. The scheduler commits the returned ``Outgoing`` and records it on the entry.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.utils import format_datetime, make_msgid
from typing import Literal

from relay.config.accounts import account_for
from relay.config.models import Config
from relay.envelope import Outgoing
from relay.errors import ConfigError
from relay.prepare.charset import header_block
from relay.prepare.mailpolicy import POLICY
from relay.prepare.settings import resolve
from relay.queue.spool import QueueEntry

Action = Literal["failed", "delayed"]
KIND: Literal["notice"] = "notice"
EXPIRED = "expired in queue: "
HEADERS_MAX = 256 * 1024  # the listener refuses larger header blocks, so the whole block fits
_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
# A provider's reply is repeated up to this many characters: RFC 5321 replies are lines of at most 512
# octets and real multi-line ones stay under it, and the longest unbroken word of a Diagnostic-Code then
# still fits RFC 5322's 998-octet line.
REPLY_MAX = 900
FOLD_WIDTH = 78
# C0, DEL and C1 controls (ESC and CSI drive terminals), surrogates (aiosmtplib keeps a byte that is not
# UTF-8 as one, and no encoder takes it back), and the two Unicode line separators
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")


def wanted(config: Config, entry: QueueEntry) -> bool:
    """Never a notice about a notice (that is how notice loops are broken)."""
    return config.delivery.notices and entry.kind != KIND


def original_headers(content: bytes, *, kind: str = "mail") -> bytes:
    """The header block of a queued message (the spool's bodies have CRLF line ends).

    An SMS entry's Subject may carry the gateway's password (``sms.password_in: subject``): left out.
    """
    fields, _ = header_block(content[:HEADERS_MAX])
    if kind == "sms":
        fields = [field for field in fields if not field[0].lower().startswith(b"subject:")]
    return b"".join(line for field in fields for line in field)


def one_line(text: str) -> str:
    """A provider's reply for a header field: multi-line replies joined, no CR/LF (no injection)."""
    return " ".join(text.split())


def printable(text: str) -> str:
    """``text`` with what a terminal or a mail reader would act on shown as escapes: ``\\x1b`` for ESC,
    ``\\xe4`` for a byte that was not UTF-8. Provider replies end up on the admin's terminal and in the
    sender's notice, and a provider (or whatever sits between) decides what they hold."""
    return _UNSAFE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the byte ``code - 0xDC00``
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def reply_words(reply: str) -> str:
    """A provider's reply as a notice repeats it: one line, printable, at most ``REPLY_MAX`` characters."""
    text = printable(one_line(reply))
    if len(text) <= REPLY_MAX:
        return text
    return f"{text[:REPLY_MAX]} [... {len(text) - REPLY_MAX} more characters]"


def _fold(name: str, value: str) -> str:
    """RFC 5322 folding at spaces: the generator keeps a value it is given folded (``refold_source``
    is ``none``), and one longer than 998 octets would be a broken message."""
    lines = [f"{name}:"]
    for word in value.split(" "):
        if len(lines[-1]) + 1 + len(word) > FOLD_WIDTH and lines[-1] != f"{name}:":
            lines.append("")
        lines[-1] += f" {word}"
    return "\n".join(lines).removeprefix(f"{name}: ")


def _status(reply: str, action: Action) -> str:
    """RFC 3463 status: the provider's own enhanced code when it gave one, else one from its class."""
    if reply.startswith(EXPIRED):
        return "4.4.7"  # delivery time expired
    found = _ENHANCED.search(reply)
    if found:
        return found.group(1)
    return "4.0.0" if action == "delayed" or reply[:1] == "4" else "5.0.0"


def _diagnostic(reply: str) -> str:
    reply = reply_words(reply.removeprefix(EXPIRED))
    return f"smtp; {reply}" if reply[:3].isdigit() else f"X-Relay; {reply or 'no reply'}"


def _block(fields: Sequence[tuple[str, str]]) -> Message:
    """One group of DSN fields; they are ASCII (RFC 3464), so anything else is escaped, never dropped."""
    block = Message()
    for name, value in fields:
        block[name] = _fold(name, printable(one_line(value)).encode("ascii", "backslashreplace").decode("ascii"))
    return block


def _address_type(recipient: str) -> str:
    """``rfc822; a@b``, or RFC 6533's ``utf-8; `` with ``\\x{HEX}`` escapes for a non-ASCII address."""
    if recipient.isascii():
        return f"rfc822; {recipient}"
    return "utf-8; " + "".join(c if c.isascii() and c != "\\" else f"\\x{{{ord(c):X}}}" for c in recipient)


def _delivery_status(
    entry: QueueEntry, recipients: Sequence[tuple[str, str]], action: Action, *, mta: str, remote: str | None,
    now: datetime, retry_until: datetime | None,
) -> EmailMessage:  # fmt: skip
    per_message = [("Reporting-MTA", f"dns; {mta}"), ("X-Relay-Queue-ID", entry.id),
                   ("Arrival-Date", format_datetime(datetime.fromtimestamp(entry.received_at, UTC)))]  # fmt: skip
    blocks: list[Message | str] = [_block(per_message)]
    for recipient, reply in recipients:
        fields = [("Final-Recipient", _address_type(recipient)), ("Action", action), ("Status", _status(reply, action))]
        if remote:
            fields.append(("Remote-MTA", f"dns; {remote}"))
        fields += [("Diagnostic-Code", _diagnostic(reply)), ("Last-Attempt-Date", format_datetime(now))]
        if retry_until is not None:
            fields.append(("Will-Retry-Until", format_datetime(retry_until)))
        blocks.append(_block(fields))
    part = EmailMessage(policy=POLICY)
    part["Content-Type"] = "message/delivery-status"
    part.set_payload(blocks)
    return part


def _explanation(entry: QueueEntry, subject: str, recipients: Sequence[tuple[str, str]], action: Action,
                 retry_until: datetime | None) -> str:  # fmt: skip
    sent = format_datetime(datetime.fromtimestamp(entry.received_at, UTC).astimezone())
    lines = [f"Your message \"{subject}\", sent {sent},"]
    if action == "failed":
        lines += ["could NOT be delivered to these recipients. relay has stopped trying:", ""]
    else:
        lines += ["has not yet been delivered to these recipients. relay keeps trying"
                  + (f" until {format_datetime(retry_until)}" if retry_until else "") + "; nothing to do yet:", ""]  # fmt: skip
    for recipient, reply in recipients:
        lines.append(f"    {recipient}")
        lines.append(f"        the provider said: {reply_words(reply) or '(no reply)'}")
    lines += ["", f"(relay queue id {entry.id}; the message's headers are attached.)"]
    if action == "failed":
        lines += ["Check the addresses, then send the message again from the program if it is still needed."]
    return "This is the mail relay of your business software.\n\n" + "\n".join(lines) + "\n"


def _subject(headers: bytes) -> str:
    try:
        parsed = BytesHeaderParser(policy=POLICY).parsebytes(headers)
        return printable(one_line(str(parsed.get("Subject", "") or ""))) or "(no subject)"
    except (ValueError, TypeError, LookupError):  # a header the parser cannot read must not cost the notice
        return "(no subject)"


def build(
    config: Config, entry: QueueEntry, recipients: Sequence[tuple[str, str]], headers: bytes, action: Action,
    *, now: float,
) -> Outgoing | None:  # fmt: skip
    """The notice for ``recipients`` (``(address, reply)`` pairs) of ``entry``, or ``None`` when the user
    has no address to tell. Raises ``ConfigError`` when the user's account is no longer configured."""
    settings = resolve(config, entry.user, KIND)
    to = settings.from_address
    if not to or settings.account is None:
        return None
    try:
        remote: str | None = account_for(config, entry.account).host
    except ConfigError:
        remote = None
    retry_until = None
    if action == "delayed":
        retry_until = datetime.fromtimestamp(entry.received_at + config.delivery.max_queue_lifetime, UTC)
    subject, when, mta = _subject(headers), datetime.fromtimestamp(now, UTC), config.hostname or socket.getfqdn()
    report = _report(to, subject, action, when)
    report.set_content(_explanation(entry, subject, recipients, action, retry_until), cte="quoted-printable")
    report.make_mixed()
    report.attach(_delivery_status(entry, recipients, action, mta=mta, remote=remote, now=when, retry_until=retry_until))
    report.attach(_headers_part(headers))
    report.set_type("multipart/report")
    report.set_param("report-type", "delivery-status")
    envelope = [to]
    for address in config.delivery.notify:  # once per mailbox, however the admin spelled it twice
        if address.lower() not in {a.lower() for a in envelope}:
            envelope.append(address)
    return Outgoing(settings.account.name, to, tuple(envelope), report.as_bytes(), entry.user, KIND,
                    (f"{action} notice about {entry.id}",))  # fmt: skip


def _report(to: str, subject: str, action: Action, when: datetime) -> EmailMessage:
    """The notice's own header: from and to the user's mailbox (what the user's account may send as)."""
    msg = EmailMessage(policy=POLICY)
    msg["From"] = Address("Mail Delivery System", addr_spec=to)
    msg["To"] = to
    msg["Subject"] = ("Undelivered mail: " if action == "failed" else "Delayed mail (still trying): ") + subject
    msg["Date"] = format_datetime(when)
    msg["Message-ID"] = make_msgid(domain=to.rpartition("@")[2])
    msg["Auto-Submitted"] = "auto-replied"  # RFC 3834: the mailbox's own rules must not answer it
    return msg


def _headers_part(headers: bytes) -> EmailMessage:
    """``text/rfc822-headers``: the original header block as it was queued (8-bit bytes kept, QP-encoded)."""
    part = EmailMessage(policy=POLICY)
    cte = "7bit" if headers.isascii() else "quoted-printable"
    part.set_content(headers or b"\r\n", maintype="text", subtype="rfc822-headers", cte=cte)
    del part["MIME-Version"]
    return part
