"""Failure and delay notices (RFC 3464 delivery status notifications) to the submitting user.

The legacy program got ``250`` long ago and will never hear of a 5xx that came later, so the person
who sent the mail must: when relay gives up on recipients (a 5xx, or ``max_queue_lifetime`` reached),
and optionally when mail is still not delivered after ``delivery.delay_warning`` seconds, it queues a
``multipart/report; report-type=delivery-status`` message (RFC 3462/3464) with three parts: plain words
naming the recipients, the provider's reply (or, for mail that expired without one, the last attempt's
error) and what to do, by the reply's RFC 3463 code; the ``message/delivery-status`` fields; and the
original message's headers (``text/rfc822-headers``). A reply holds whatever the provider sent: it is
escaped (``printable``), cut and folded before it goes in, so odd bytes never cost the notice.

Where it goes and how: to the user's own address, *from* that address, through that user's own account,
as a normal queue entry of kind ``notice``. Office 365 (and any provider that lets a login send only as
its own mailbox) refuses a null envelope sender or another From, so the envelope sender is the user's
address rather than RFC 3464's ``<>``; loops are broken instead by relay never sending a notice about a
notice entry, and by ``Auto-Submitted: auto-replied`` (RFC 3834) for the mailbox's own rules.

``delivery.notify`` addresses get an admin copy, an entry of its own from the company's ``from_address``
through the company's account (``admin_copy``): the user's account is often the one that failed (a
revoked app password, a closed port), and a copy queued on it would fail with it, a lifetime later,
exactly when the admin needs it. When the user's account *is* the company's (or the company has no
address to send from) the copy rides along as more recipients of the user's notice, one message.

Pure: building only. The scheduler commits the returned ``Outgoing`` and records it on the entry.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.utils import format_datetime
from typing import Literal

from relay import replies
from relay.config.accounts import account_for
from relay.config.models import Config
from relay.envelope import Account, Outgoing
from relay.errors import ConfigError
from relay.idn import with_a_label
from relay.prepare.charset import header_block
from relay.prepare.mailpolicy import POLICY, message_id
from relay.prepare.settings import resolve
from relay.queue.spool import QueueEntry

Action = Literal["failed", "delayed"]
Audience = Literal["user", "admin"]  # the user's own notice, or the admin copy (delivery.notify)
KIND: Literal["notice"] = "notice"
ADMIN = "admin"  # the last word of an entry's note about an admin copy: "failed <notice id> admin"
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
    """Never a notice about a notice (that is how notice loops are broken): an admin copy is a notice too."""
    return config.delivery.notices and entry.kind != KIND


def note(action: Action, queue_id: str, audience: Audience) -> str:
    """What an entry records about a notice sent about it: ``failed <id>``, ``failed <id> admin``."""
    return f"{action} {queue_id}" + (f" {ADMIN}" if audience == "admin" else "")


def read_note(text: str) -> tuple[str, str, Audience]:
    """An entry's note about a notice as (action, notice id, audience); the inverse of ``note``."""
    action, _, rest = text.partition(" ")
    queue_id, _, tail = rest.partition(" ")
    return action, queue_id, "admin" if tail == ADMIN else "user"


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
    reply = reply_words(reply)
    return f"smtp; {reply}" if reply[:3].isdigit() else f"X-Relay; {reply or 'no reply'}"


# the transports' words for a message sent whole whose reply never came (smtp.py's describe_failure,
# graph.py's _unanswered): the provider may have taken it (RFC 1047)
_LOST_REPLY = re.compile(r"after the whole (?:message|request) was sent")


@dataclass(frozen=True)
class _Told:
    """What a notice says about one recipient."""

    recipient: str
    reply: str  # the provider's reply; for an expired recipient without one, the last attempt's error
    status: str  # RFC 3463
    expired: bool  # max_queue_lifetime reached, rather than refused
    uncertain: bool  # the last attempt lost the reply to the whole message: it may have arrived


def _told(entry: QueueEntry, recipient: str, reply: str, action: Action) -> _Told:
    """A recipient that expired without a reply of its own (a connection refused, a certificate, a
    timeout, a lost reply) is told the error of the last attempt: the scheduler writes it after
    ``EXPIRED`` (from ``last_reply``, still read here for a bounce text written without it), which was
    "no reply" to the sender before."""
    expired = reply.startswith(EXPIRED)
    said = reply.removeprefix(EXPIRED)
    if expired and not said:
        said = entry.last_reply
    uncertain = expired and _LOST_REPLY.search(said) is not None
    return _Told(recipient, said, _status(reply, action), expired, uncertain)


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
    entry: QueueEntry, told: Sequence[_Told], action: Action, *, mta: str, remote: str | None, now: datetime,
    retry_until: datetime | None,
) -> EmailMessage:  # fmt: skip
    per_message = [("Reporting-MTA", f"dns; {mta}"), ("X-Relay-Queue-ID", entry.id),
                   ("Arrival-Date", format_datetime(datetime.fromtimestamp(entry.received_at, UTC)))]  # fmt: skip
    blocks: list[Message | str] = [_block(per_message)]
    for one in told:
        fields = [("Final-Recipient", _address_type(one.recipient)), ("Action", action), ("Status", one.status)]
        if remote and one.reply not in replies.DELIVERY_REFUSALS:  # (relay's own refusal: no remote MTA said it)
            fields.append(("Remote-MTA", f"dns; {remote}"))
        fields += [("Diagnostic-Code", _diagnostic(one.reply)), ("Last-Attempt-Date", format_datetime(now))]
        if retry_until is not None:
            fields.append(("Will-Retry-Until", format_datetime(retry_until)))
        blocks.append(_block(fields))
    part = EmailMessage(policy=POLICY)
    part["Content-Type"] = "message/delivery-status"
    part.set_payload(blocks)
    return part


_SENDER = ("The provider does not let your account send as this sender, so sending the message again will fail "
           "the same way: tell the administrator (relay must send as the account's own mailbox).")  # fmt: skip
_POLICY = ("The provider refused the message by its rules (a spam or content filter, or a permission), so "
           "sending it again unchanged will fail the same way: tell the administrator, with the provider's "
           "words above.")  # fmt: skip
_ADDRESS = "Check the recipient's address, then send the message again from the program if it is still needed."
_FULL = "The recipient's mailbox is full: tell the recipient another way, or send the message again later."
_MAILBOX = "The recipient's mailbox does not take mail (disabled, or over a limit): tell the recipient another way."
_SIZE = "The message is too large for the recipient's mail system: send it again with smaller or fewer attachments."
_SYSTEM = "The recipient's mail system does not take the message: tell the recipient another way."
_FORMAT = "The provider cannot take the message in this form (an address or the content): tell the administrator."
_EXPIRED_ADVICE = ("relay kept trying until its time limit: if the message is still needed, send it again later; "
                   "if this happens again, tell the administrator (relay queue shows the reason).")  # fmt: skip
_UNCERTAIN = "Ask the recipient whether the message arrived before sending it again: it may have been delivered."
_GENERIC = "Check the addresses, then send the message again from the program if it is still needed."
# RFC 3463's subject.detail (the class digit left out) -> what the sender can do; first match wins, so
# the sender's own codes (1.7, 1.8: the sender's address; 7.60: Office 365's SendAsDenied) come first
_ADVICE_BY_CODE: tuple[tuple[str, str], ...] = (
    ("1.7", _SENDER), ("1.8", _SENDER), ("7.60", _SENDER), ("1.", _ADDRESS), ("2.2", _FULL), ("2.3", _SIZE),
    ("3.4", _SIZE), ("2.", _MAILBOX), ("3.", _SYSTEM), ("4.7", _EXPIRED_ADVICE), ("6.", _FORMAT), ("7.", _POLICY),
)  # fmt: skip


def _advice(one: _Told) -> str:
    """What the sender can do about one recipient, by the provider's enhanced status code (RFC 3463):
    "check the addresses" sent a user refused as a sender, or by a spam filter, to retype good ones."""
    if one.uncertain:
        return _UNCERTAIN
    if "SendAsDenied" in one.reply:  # Office 365's refusal after the data comes as 5.2.0
        return _SENDER
    detail = one.status.partition(".")[2]
    for code, words in _ADVICE_BY_CODE:
        if detail == code or (code.endswith(".") and detail.startswith(code)):
            return words
    return _GENERIC


def _duration(seconds: float) -> str:
    """``max_queue_lifetime`` as a person says it: "5 days", "36 hours", "25 minutes" (the largest whole unit)."""
    unit, size = next(((u, n) for u, n in (("day", 86400), ("hour", 3600), ("minute", 60)) if seconds % n == 0),
                      ("second", 1))  # fmt: skip
    count = seconds / size
    return f"{count:g} {unit}" + ("" if count == 1 else "s")


def _recipient_lines(one: _Told, lifetime: float) -> list[str]:
    """A lost reply is told in the sender's words only: the transport's ("the next attempt sends it
    twice", for the admin) would be wrong once relay has stopped; Diagnostic-Code keeps them."""
    reply = reply_words(one.reply)
    if one.uncertain:
        why = ("may have been delivered: the provider stopped answering after the whole message was sent, so "
               f"relay cannot tell whether it took it, and stopped trying after {_duration(lifetime)}")  # fmt: skip
        return [f"    {one.recipient}", f"        {why}"]
    if one.expired:
        return [f"    {one.recipient}", f"        not delivered within {_duration(lifetime)}, relay's time limit",
                f"        the last attempt: {reply or '(no reply)'}"]  # fmt: skip
    if one.reply in replies.DELIVERY_REFUSALS:  # relay's own: the provider was never asked
        return [f"    {one.recipient}", f"        relay could not send to this address: {reply}"]
    return [f"    {one.recipient}", f"        the provider said: {reply or '(no reply)'}"]


def _heading(told: Sequence[_Told], action: Action, retry_until: datetime | None) -> str:
    if action == "delayed":
        until = f" until {format_datetime(retry_until)}" if retry_until else ""
        return f"has not yet been delivered to these recipients. relay keeps trying{until}; nothing to do yet:"
    if all(one.uncertain for one in told):
        return "may not have been delivered to these recipients (relay cannot tell). relay has stopped trying:"
    if any(one.uncertain for one in told):
        return "could NOT be delivered, or may not have been, to these recipients. relay has stopped trying:"
    return "could NOT be delivered to these recipients. relay has stopped trying:"


def _explanation(facts: _Facts, copy: str | None) -> str:
    """The plain words; ``copy``: for an admin copy, what became of the user's own notice (the admin
    reads whose message it was, and the advice the user was given)."""
    entry, told, action = facts.entry, facts.told, facts.action
    sent = format_datetime(datetime.fromtimestamp(entry.received_at, UTC).astimezone())
    whose = "Your message" if copy is None else f"The message of {entry.user or 'the company'} <{entry.mail_from}>"
    lines = [f"{whose} \"{facts.subject}\", sent {sent},", _heading(told, action, facts.retry_until), ""]
    for one in told:
        lines += _recipient_lines(one, facts.lifetime)
    lines += ["", f"(relay queue id {entry.id}; the message's headers are attached.)"]
    if action == "failed":
        lines += list(dict.fromkeys(_advice(one) for one in told))  # each piece of advice once, in order
    opening = "This is the mail relay of your business software.\n\n"
    if copy is not None:
        opening = f"This is the mail relay of your business software: a copy for the administrator (delivery.notify).\n{copy}\n\n"
    return opening + "\n".join(lines) + "\n"


def _subject(headers: bytes) -> str:
    try:
        parsed = BytesHeaderParser(policy=POLICY).parsebytes(headers)
        return printable(one_line(str(parsed.get("Subject", "") or ""))) or "(no subject)"
    except (ValueError, TypeError, LookupError):  # a header the parser cannot read must not cost the notice
        return "(no subject)"


@dataclass(frozen=True)
class _Route:
    """Where a notice leaves from: the mailbox it is sent as (envelope and From) and the account."""

    address: str
    account: Account


@dataclass(frozen=True)
class _Facts:
    """What every copy of one notice says, whoever it goes to."""

    entry: QueueEntry
    action: Action
    subject: str
    told: tuple[_Told, ...]
    when: datetime
    mta: str
    remote: str | None
    retry_until: datetime | None
    lifetime: float
    headers: bytes


def _user_route(config: Config, entry: QueueEntry) -> _Route | None:
    """The user's own mailbox and account, or ``None`` when the user has no address to tell. Raises
    ``ConfigError`` when the user's account is no longer configured."""
    settings = resolve(config, entry.user, KIND)
    if not settings.from_address or settings.account is None:
        return None
    return _Route(settings.from_address, settings.account)


def _company_route(config: Config) -> _Route | None:
    """The company's ``from_address`` and account, as the company's own mail goes; ``None`` without either."""
    try:
        settings = resolve(config, None, KIND)
    except ConfigError:
        return None
    if not settings.from_address or settings.account is None:
        return None
    return _Route(settings.from_address, settings.account)


def _admin_rides_along(config: Config, user: _Route) -> bool:
    """The admin copy goes in the user's notice (more envelope recipients, one message): the user's
    account is the company's, so a copy of its own would go the same way; or the company has no
    mailbox to send one from."""
    company = _company_route(config)
    return company is None or company.account.name == user.account.name


def _admins(config: Config, user_address: str | None) -> list[str]:
    """``delivery.notify``, once per mailbox however the admin spelled it twice, without the user's own."""
    seen = {user_address.lower()} if user_address else set()
    admins = []
    for address in config.delivery.notify:
        if address.lower() not in seen:
            seen.add(address.lower())
            admins.append(address)
    return admins


def _facts(
    config: Config, entry: QueueEntry, recipients: Sequence[tuple[str, str]], headers: bytes, action: Action,
    now: float,
) -> _Facts:  # fmt: skip
    try:
        remote: str | None = account_for(config, entry.account).host
    except ConfigError:
        remote = None
    retry_until = None
    if action == "delayed":
        retry_until = datetime.fromtimestamp(entry.received_at + config.delivery.max_queue_lifetime, UTC)
    told = tuple(_told(entry, recipient, reply, action) for recipient, reply in recipients)
    return _Facts(entry, action, _subject(headers), told, datetime.fromtimestamp(now, UTC),
                  config.hostname or socket.getfqdn(), remote, retry_until, config.delivery.max_queue_lifetime,
                  headers)  # fmt: skip


def _content(facts: _Facts, sender: str, to: Sequence[str], *, copy: str | None = None) -> bytes:
    """The report from ``sender`` to ``to``; ``copy``: an admin copy's words on the user's own notice."""
    uncertain = all(one.uncertain for one in facts.told)
    report = _report(sender, to, facts.subject, facts.action, facts.when, uncertain=uncertain)
    report.set_content(_explanation(facts, copy), cte="quoted-printable")
    report.make_mixed()
    report.attach(_delivery_status(facts.entry, facts.told, facts.action, mta=facts.mta, remote=facts.remote,
                                   now=facts.when, retry_until=facts.retry_until))  # fmt: skip
    report.attach(_headers_part(facts.headers))
    report.set_type("multipart/report")
    report.set_param("report-type", "delivery-status")
    return report.as_bytes()


def build(
    config: Config, entry: QueueEntry, recipients: Sequence[tuple[str, str]], headers: bytes, action: Action,
    *, now: float,
) -> Outgoing | None:  # fmt: skip
    """The notice for ``recipients`` (``(address, reply)`` pairs) of ``entry`` to its user, or ``None``
    when the user has no address to tell. ``delivery.notify`` is among its recipients only when the
    admin copy rides along (``_admin_rides_along``); else ``admin_copy`` makes one of its own. Raises
    ``ConfigError`` when the user's account is no longer configured."""
    user = _user_route(config, entry)
    if user is None:
        return None
    envelope = [user.address]
    if _admin_rides_along(config, user):
        envelope += _admins(config, user.address)
    content = _content(_facts(config, entry, recipients, headers, action, now), user.address, [user.address])
    return Outgoing(user.account.name, user.address, tuple(envelope), content, entry.user, KIND,
                    (f"{action} notice about {entry.id}",))  # fmt: skip


def admin_copy(
    config: Config, entry: QueueEntry, recipients: Sequence[tuple[str, str]], headers: bytes, action: Action,
    *, now: float,
) -> Outgoing | None:  # fmt: skip
    """The same notice to ``delivery.notify``, from the company's ``from_address`` through the company's
    account, when it does not ride along in the user's notice: the user's account may be the one that
    is down. It is made also when the user gets no notice at all (no address, an account no longer
    configured): the admin is then the only one told. ``None``: no copy of its own is due."""
    company = _company_route(config)
    try:
        user = _user_route(config, entry)
    except ConfigError:
        user = None
    if company is None or (user is not None and _admin_rides_along(config, user)):
        return None
    admins = _admins(config, user.address if user is not None else None)
    if not admins:
        return None
    if user is None:
        copy = "The user was sent no notice (no address to send it to, or no account): only this copy was."
    else:
        copy = (f"The user's own notice goes to {user.address} through the user's account ({user.account.name}), "
                "this copy through the company's.")  # fmt: skip
    content = _content(_facts(config, entry, recipients, headers, action, now), company.address, admins, copy=copy)
    # the company's mail (no user): it is archived, logged and listed as the company's, not in the user's
    # archive folder next to the user's own notice; its note names the entry it is about
    return Outgoing(company.account.name, company.address, tuple(admins), content, None, KIND,
                    (f"admin copy of the {action} notice about {entry.id}",))  # fmt: skip


def _report(
    sender: str, to: Sequence[str], subject: str, action: Action, when: datetime, *, uncertain: bool
) -> EmailMessage:
    """The notice's own header: from the mailbox the account sending it may send as (the user's, or the
    company's for an admin copy), to its readers. "Undelivered" is not said of mail the provider may have taken."""
    msg = EmailMessage(policy=POLICY)
    msg["From"] = Address("Mail Delivery System", addr_spec=with_a_label(sender))
    msg["To"] = ", ".join(with_a_label(address) for address in to)
    if action == "delayed":
        msg["Subject"] = "Delayed mail (still trying): " + subject
    else:
        msg["Subject"] = ("Delivery uncertain: " if uncertain else "Undelivered mail: ") + subject
    msg["Date"] = format_datetime(when)
    msg["Message-ID"] = message_id(sender)
    msg["Auto-Submitted"] = "auto-replied"  # RFC 3834: the mailbox's own rules must not answer it
    return msg


def _headers_part(headers: bytes) -> EmailMessage:
    """``text/rfc822-headers``: the original header block as it was queued (8-bit bytes kept, QP-encoded)."""
    part = EmailMessage(policy=POLICY)
    cte = "7bit" if headers.isascii() else "quoted-printable"
    part.set_content(headers or b"\r\n", maintype="text", subtype="rfc822-headers", cte=cte)
    del part["MIME-Version"]
    return part
