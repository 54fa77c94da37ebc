"""Stage 3c: phone-number recipients -> plain-text mail to the email-to-SMS gateway (seed 004). Pure,
except for reading the SMS service password through ``relay.credentials`` when one is configured.

Input: the parsed submitted message, the SMS recipients (``+358401234567@sms``, ``040 123 4567@sms``;
the pseudo-domain is ``sms.domain``), the user's settings and the SMS config. Output: ``Outgoing``
messages of kind ``"sms"``: sent through ``sms.upstream`` (or the user's account) from ``sms.from_address``
(or the user's address), plain text only (the text/plain body, else the HTML body stripped of tags, else
the Subject). Where the number goes is the seeds' ``Puhelinnumeron paikka`` (``number_in``):

* ``address``: one message, the gateway address with ``{number}`` filled in per recipient;
* ``subject`` / ``body``: one message per number, sent to the gateway address, the number as the Subject
  or as the first body line.

The service password (``password_in``) goes first in the Subject, or as the first body line.

Refuses: a number that is not a phone number (550 5.1.1); a password that cannot be read (451, the admin
must fix the secret; the mail is not lost, the client retries).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.utils import format_datetime
from html.parser import HTMLParser
from typing import TYPE_CHECKING

from relay import replies
from relay.config.models import SmsConfig
from relay.config.types import normalize_number
from relay.envelope import Outgoing, Settings
from relay.errors import RefusedError, SecretError
from relay.idn import with_a_label
from relay.prepare.charset import decode_text_part
from relay.prepare.mailpolicy import POLICY, message_id

if TYPE_CHECKING:
    from relay.config.credentials import HasSecretSource, Secret

__all__ = ("html_to_text", "is_sms_address", "normalize_number", "plain_text", "sms_messages")

_BLOCK_TAGS = frozenset({"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol"})


def is_sms_address(address: str, sms: SmsConfig | None) -> bool:
    """Is ``address`` a phone number at the SMS pseudo-domain (and is the SMS route on)?"""
    if sms is None or not sms.enabled or "@" not in address:
        return False
    return address.rpartition("@")[2].lower() == sms.domain.lower()




def format_number(e164: str, style: str, country_code: str) -> str:
    """The number as the gateway wants it: ``+358401234567``, ``358401234567`` or ``0401234567``."""
    if style == "digits":
        return e164[1:]
    cc = "+" + country_code.lstrip("+")
    if style == "national" and e164.startswith(cc):
        return "0" + e164[len(cc):]
    return e164


class _TextExtractor(HTMLParser):
    """Collects visible text; block tags become line breaks; script and style are dropped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in _BLOCK_TAGS:
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK_TAGS:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.chunks.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML body, whitespace tidied (an SMS has no room for markup)."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.chunks).splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def plain_text(msg: Message, default_charset: str) -> str:
    """The message's text for an SMS: first inline text/plain, else first inline text/html stripped."""
    for wanted in ("text/plain", "text/html"):
        for part in msg.walk():
            if part.get_content_type() != wanted or part.get_content_disposition() == "attachment":
                continue
            decoded = decode_text_part(part, default_charset)
            if decoded is not None:
                text = decoded[0] if wanted == "text/plain" else html_to_text(decoded[0])
                return "\n".join(line.rstrip() for line in text.splitlines()).strip()
    return ""


def _numbers(addresses: tuple[str, ...], sms: SmsConfig) -> list[str]:
    out: list[str] = []
    for address in addresses:
        try:
            number = normalize_number(address.rpartition("@")[0], sms.country_code)
        except ValueError:
            raise RefusedError(replies.R550_BAD_PHONE_NUMBER.format(address[:100])) from None
        if number not in out:
            out.append(number)
    return out


SecretReader = Callable[["HasSecretSource"], "Secret | None"]
"""``config.credentials.read_secret``, handed in by the caller: this stage does no I/O of its own, yet
the SMS password is read at the moment of use, so a changed secret is picked up."""


def _password(sms: SmsConfig, read_secret: SecretReader | None) -> str | None:
    if sms.password_in == "none":
        return None
    if read_secret is None:
        raise RefusedError(replies.R451_SMS_SECRET)
    try:
        secret = read_secret(sms)
    except SecretError:
        raise RefusedError(replies.R451_SMS_SECRET) from None
    value = secret.reveal() if secret is not None else None
    if not value or any(c in value for c in "\r\n\0"):
        raise RefusedError(replies.R451_SMS_SECRET)
    return value


def _build(sender: str, to: list[str], subject: str, text: str) -> bytes:
    msg = EmailMessage(policy=POLICY)
    msg["From"] = Address(addr_spec=with_a_label(sender))
    msg["To"] = [Address(addr_spec=with_a_label(a)) for a in to]
    if subject:
        msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = message_id(sender)
    msg.set_content(text + "\n", charset="utf-8", cte="quoted-printable")
    return msg.as_bytes(policy=POLICY)


def sms_messages(
    msg: Message, addresses: tuple[str, ...], settings: Settings, sms: SmsConfig, *, sender: str, default_charset: str,
    read_secret: SecretReader | None = None,
) -> list[Outgoing]:
    """The gateway messages for ``addresses`` (all at ``sms.domain``); see the module docstring."""
    numbers = _numbers(addresses, sms)
    account = sms.upstream or (settings.account.name if settings.account is not None else None)
    if account is None:
        raise RefusedError(replies.R451_NO_UPSTREAM)
    from_address = sms.from_address or sender
    if not from_address:
        raise RefusedError(replies.R554_BAD_MESSAGE.format("no sender address for the SMS gateway (set sms.from_address)"))
    text = plain_text(msg, default_charset) or str(msg.get("Subject", "") or "")
    password = _password(sms, read_secret)
    shown = [format_number(n, sms.number_format, sms.country_code) for n in numbers]
    batches = [shown] if sms.number_in == "address" else [[n] for n in shown]
    out = []
    for batch in batches:
        to = [sms.gateway.replace("{number}", n) for n in batch]
        subject, body = _placement(sms, batch[0], password, text)
        notes = (f"sms to {', '.join(batch)} via {', '.join(to)} (number in {sms.number_in})",)
        content = _build(from_address, to, subject, body)
        out.append(Outgoing(account, from_address, tuple(to), content, settings.user, "sms", notes))
    return out


def _placement(sms: SmsConfig, number: str, password: str | None, text: str) -> tuple[str, str]:
    """(Subject, body) with the number and password where the gateway expects them."""
    subject_parts = [password] if sms.password_in == "subject" and password else []
    body_parts = [password] if sms.password_in == "body" and password else []
    if sms.number_in == "subject":
        subject_parts.append(number)
    elif sms.number_in == "body":
        body_parts.append(number)
    return " ".join(subject_parts), "\n".join([*body_parts, text])
