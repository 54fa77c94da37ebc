"""Stage 3: a submission as received -> the messages to spool, rewritten so today's providers take them.

Input: the ``Submission`` (raw bytes exactly as the legacy client sent them), the user's ``Settings`` and
the ``Config``. Output: one ``Outgoing`` for mail (kind ``"mail"``) and, when phone-number recipients are
present, the SMS gateway messages (kind ``"sms"``, see ``sms.py``). Each carries notes, one per rewrite
done, for the delivery log. Pure: no I/O (the SMS password is read through ``relay.credentials``).

What is rewritten:

1. Sender lock: envelope sender and From are the user's ``from_address`` with ``from_name`` (RFC 2047 when
   not ASCII). A message without Reply-To gets the admin's ``reply_to``, else the original From (when it
   differs, ``reply_to_original``, and someone outside can answer it: ``answerable``). ``Sender:`` is removed (From is now the mailbox itself); DKIM-Signature is
   removed (``rewrite.remove_dkim``); Bcc is removed. Date and Message-ID are added when missing.
2. Recipients: RCPT TO values carrying ``a@x.fi;b@y.fi`` are split, duplicates dropped (case-insensitive),
   ``recipient_rules`` applied (envelope and To/Cc), ``copy_to`` added (hidden, or as Cc),
   ``redirect_all`` applied (envelope only: the headers still show whom the mail was meant for). To/Cc
   written legacy-style (``a@x.fi; b@y.fi``) become valid address lists.
3. Body, only when something requires it (``_body_reasons``): legacy 8-bit repair, lines over 998 octets
   re-encoded, the signature (``signature.py``). Otherwise only the header block is rewritten and the body
   bytes are kept as they are: a 25 MB attachment is never parsed just to change the From. A rewritten
   body has CRLF lines of at most 998 octets whatever its MIME damage (``_repair_structure``): a
   "multipart" the parser cannot split (no boundary, or one that never appears) is sent as the
   text/plain part it is, long preamble/epilogue lines are wrapped, long inner header fields folded,
   8-bit ones encoded (a file name as RFC 2231 plus the ``name=`` old Outlook reads, see
   ``charset.encode_parameters``; the top level's too), and a multipart never carries a transfer
   encoding. Signed and encrypted parts are the exception: their
   bytes are kept, long lines included.

Refuses (``RefusedError``): CR/LF/NUL or bad syntax in an envelope address (501), more recipients than
``limits.max_recipients`` (452), an invalid phone number (550), a body that must be rewritten but that
the email package cannot parse or that has more MIME parts or nesting than ``rewrite.max_mime_parts`` /
``max_mime_depth`` (554), no upstream account (451).

All MIME work goes through the stdlib ``email`` package with ``POLICY`` (SMTP: CRLF, 78-column folding
of headers relay writes; ``refold_source="none"``: headers relay did not touch are written as received).
Byte-level work is limited to what the package cannot do for us, see ``charset.py``.
"""

from __future__ import annotations

import base64
import functools
import io
import ipaddress
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.errors import MessageError, NonASCIILocalPartDefect
from email.generator import BytesGenerator
from email.header import Header, decode_header, make_header
from email.headerregistry import Address, Group
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser
from email.policy import compat32
from email.utils import format_datetime, getaddresses
from typing import NoReturn

from relay import replies
from relay.config.models import Config, RecipientRule
from relay.config.types import normalize_number
from relay.envelope import Content, Joined, Outgoing, Settings, Submission
from relay.errors import RefusedError
from relay.idn import ascii_domain, with_a_label
from relay.memo import ByIdentity
from relay.prepare.charset import (
    decode_legacy,
    decode_text_part,
    decodes_as,
    encode_parameters,
    has_long_lines,
    header_block,
    normalize_line_endings,
    set_text_payload,
    utf8_under_latin_label,
)
from relay.prepare.mailpolicy import CACHED_VALUE_MAX, POLICY, message_id
from relay.prepare.signature import PROTECTED_TYPES, add_signature
from relay.prepare.skeleton import restore, skeleton
from relay.prepare.sms import SecretReader, is_sms_address, sms_messages
from relay.prepare.trace import check_hops, received_field

__all__ = ("POLICY", "HeaderList", "rewrite", "split_recipients")

MAX_HEADER_LINE = 998
_HEADER_PARSER = BytesHeaderParser(policy=compat32)
JOIN_LIMIT = 128 * 1024  # a body bigger than this is spooled without joining it to the new headers (Joined)
_ENVELOPE_ADDRESS = re.compile(r"[^@\s<>()\[\],;:\"\\]+@[^@\s<>()\[\],;:\"\\]+")
# RFC 5321 4.1.2's Quoted-string local part ("c d"@x.fi, "a;b"@x.fi): valid, and Postfix takes it
_QUOTED_ADDRESS = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"@[^@\s<>()\[\],;:"\\]+')
_HEADER_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x85\u2028\u2029]")
_DECODED_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # ASCII ones: the folder writes them out raw
_RAW_CONTROLS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # in a folded line: CR, LF or any other but TAB
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")
# ``-transfer-encoding`` first: a pattern that starts with a letter is matched at every octet under
# IGNORECASE (4.9 ms per MiB), one that starts with "-" jumps from "-" to "-" (0.3 ms); see _names_encoded_cte
_ENCODED_CTE = re.compile(rb"(?i)-transfer-encoding:[ \t]*(?:base64|quoted-printable)")
_FOLD = re.compile(r"\r\n(?=[ \t])")
_STRUCTURE = frozenset('<>"()')  # a list member with none of these has no display name or comment
# what the email package raises on input it cannot handle (it has no single root exception)
_PARSE_ERRORS = (MessageError, ValueError, LookupError, UnicodeError, RecursionError, IndexError)


# region #### the header block ####


class HeaderList:
    """The top-level header fields in order: source strings as received, or policy header objects.

    A small ordered list instead of ``Message`` so that a header-only rewrite never touches the body.
    Values are ``str``: either the (decoded, possibly folded) source text, written back verbatim when it
    is ASCII and fits, or a header object made by ``POLICY.header_store_parse`` (a ``str`` subclass).
    """

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self.fields = fields

    @property
    def fields(self) -> list[tuple[str, str]]:
        return self._fields

    @fields.setter
    def fields(self, fields: list[tuple[str, str]]) -> None:
        """The fields and their names as looked up (lower case, trimmed), kept side by side: a rewrite
        looks fields up by name some twenty times, and each look lowered every name again (py-spy: a
        sixth of the rewrite)."""
        self._fields = fields
        self._keys = [name.strip().lower() for name, _value in fields]

    @classmethod
    def from_raw(cls, raw: list[list[bytes]], charset: str, notes: list[str]) -> HeaderList:
        """Physical header lines -> fields; 8-bit text decoded (see ``charset.py``), controls removed."""
        fields = []
        for lines in raw:
            text, used = decode_legacy(b"".join(lines), charset)
            text = text if text.endswith("\r\n") else text + "\r\n"
            if used != "us-ascii":
                notes.append(f"8-bit header {text.split(':', 1)[0].strip()} decoded as {used}")
            text = _HEADER_CONTROLS.sub(" ", text)
            fields.append(POLICY.header_source_parse([line + "\r\n" for line in text.split("\r\n")[:-1]]))
        return cls(fields)

    def _matches(self, name: str) -> Iterator[int]:
        wanted = name.lower()
        return (i for i, key in enumerate(self._keys) if key == wanted)

    def has(self, name: str) -> bool:
        return name.lower() in self._keys

    def raw(self, name: str) -> list[str]:
        """Unfolded values of every ``name`` field."""
        return [_FOLD.sub("", self.fields[i][1]) for i in self._matches(name)]

    def parsed(self, name: str) -> object | None:
        """The first ``name`` field as a policy header object (None if absent or unparseable)."""
        values = self.raw(name)
        if not values:
            return None
        try:
            header: object = POLICY.header_fetch_parse(name, values[0])
        except (*_PARSE_ERRORS, TypeError, AttributeError):
            return None
        return header

    def remove(self, name: str) -> int:
        drop = set(self._matches(name))
        if drop:
            self._fields = [f for i, f in enumerate(self._fields) if i not in drop]
            self._keys = [k for i, k in enumerate(self._keys) if i not in drop]
        return len(drop)

    def set(self, name: str, value: object) -> None:
        """Replace the first ``name`` field in place (dropping others), or append; raises on CR/LF."""
        self.put(*POLICY.header_store_parse(name, value))

    def put(self, name: str, value: str) -> None:
        """``set`` for a value as it is: a header object, or source text (folded already) written
        verbatim."""
        at = next(self._matches(name), None)
        self.remove(name)
        at = len(self._fields) if at is None else at
        self._fields.insert(at, (name, value))
        self._keys.insert(at, name.strip().lower())

    def keep_first(self, names: frozenset[str]) -> list[str]:
        """Drop every field after the first of each of ``names`` (lower case); return the dropped names."""
        seen: set[str] = set()
        kept, dropped = [], []
        for name, value in self.fields:
            key = name.strip().lower()
            if key in seen and key in names:
                dropped.append(name.strip())
                continue
            seen.add(key)
            kept.append((name, value))
        if dropped:
            self.fields = kept
        return dropped

    def to_bytes(self) -> bytes:
        return b"".join(_fold(name, value) for name, value in self.fields)


def _fold(name: str, value: str) -> bytes:
    """One field -> CRLF bytes; non-ASCII or over-long source text is re-folded (RFC 2047 words)."""
    if hasattr(value, "name") and len(value) <= CACHED_VALUE_MAX:  # a header object relay made: folded once
        return _fold_header(name, ByIdentity(value))  # (a long one, e.g. a huge original From, is not kept)
    fits = all(len(line) <= MAX_HEADER_LINE for line in f"{name}: {value}".split("\r\n"))  # the name counts
    if fits and value.isascii():
        return POLICY.fold_binary(name, value)
    return _refold(name, value)[1]


def _refold(name: str, value: str, *, bare: bool = False) -> tuple[str, bytes]:
    """(value, the folded field) with no line over 998 octets.

    The value is a policy header object (a header object relay made is used as it is), or, when the
    parser chokes on the text or its folder cannot break it (one 5,000-character token in a structured
    field such as a Message-ID or Content-ID), the text as RFC 2047 encoded words, which any client reads.
    """
    unfolded = _FOLD.sub("", value)
    try:
        header: str = value if hasattr(value, "name") else POLICY.header_store_parse(name, unfolded)[1]
        header = _with_a_labels(name, header)
        # an encoded word of the source can decode to CR, LF or another control ("=?us-ascii?b?DQo=?="),
        # which the folder writes out raw: a bare CR or LF in the field, where a lenient reader starts a
        # header of the sender's choosing. Such a field goes as the text it was, encoded below.
        if not _DECODED_CONTROLS.search(header):
            lines = POLICY.fold_binary(name, header).split(b"\r\n")[:-1]
            # the stdlib's folder can start a continuation line without white space, at a token the source
            # wrote with none before it (an 8-bit list with a group: "...,Matti <a>,\r\nMatti =?utf-8?...?="):
            # that ends the field there, and a reader loses the fields after it (Subject). One space there
            # is white space between two tokens of the list, as the folder meant.
            lines[1:] = [line if line[:1] in (b" ", b"\t") else b" " + line for line in lines[1:]]
            # and whatever else decoded to a control on the way (a display name in a header relay made):
            # the field is only written from header objects whose folded lines hold none
            if max(map(len, lines)) <= MAX_HEADER_LINE and not any(map(_RAW_CONTROLS.search, lines)):
                if len(lines) > 1 and _addresses(header) and not _same_addresses(name, header, lines):
                    if bare:  # bare addresses split too (a long non-ASCII local part): the text, encoded below
                        raise ValueError("the folder splits an address")  # (it recursed to the limit: 10-20 s)
                    return _refold(name, POLICY.header_store_parse(name, _bare(_addresses(header)))[1], bare=True)
                return header, b"\r\n".join(lines) + b"\r\n"
    except (*_PARSE_ERRORS, TypeError, AttributeError):  # a header the parser chokes on: keep it as text
        pass
    encoded = Header(str(unfolded), "utf-8", header_name=name).encode(linesep="\r\n")
    return encoded, f"{name}: {encoded}\r\n".encode("ascii")


def _with_a_labels(name: str, header: str) -> str:
    """An address header with each internationalised domain of an ASCII local part as its A-label.

    The folder writes ``info@yhtiö.fi`` as ``info@=?utf-8?q?yhti=C3=B6?=.fi``: no address (RFC 2047 5
    forbids an encoded word in an addr-spec), which readers show as it is and cannot reply to.
    ``info@xn--yhti-8qa.fi`` is valid everywhere and mail programs show it as ``yhtiö.fi``. A non-ASCII
    local part, or a domain IDNA refuses, has no ASCII form and is left as it was; so is a header the
    parser could not read whole (its defects): made again from the addresses read, it could lose some.
    A non-ASCII local part is reported as a defect too, but it is read whole: its neighbours still get
    their A-labels.
    """
    groups: tuple[Group, ...] = getattr(header, "groups", ())
    idn = any(a.username.isascii() and not a.domain.isascii() for g in groups for a in g.addresses)
    defects = getattr(header, "defects", ())
    if not idn or any(not isinstance(defect, NonASCIILocalPartDefect) for defect in defects):
        return header
    items: list[Address | Group] = []
    for group in groups:
        addresses = [_a_label(a) for a in group.addresses]
        items += addresses if group.display_name is None else [Group(group.display_name, addresses)]
    made: str = POLICY.header_store_parse(name, items)[1]
    return made


def _a_label(address: Address) -> Address:
    """``address`` with its domain as an A-label (``ascii_domain``), where it can be."""
    domain = ascii_domain(address.domain) if address.username.isascii() else None
    return Address(address.display_name, address.username, domain) if domain else address


def _same_addresses(name: str, header: str, lines: list[bytes]) -> bool:
    """Does the folded field name the addresses the header holds? The stdlib's folder drops the quotes of
    a display name it breaks over lines: ``"Sales Reply-To: x@evil.example ... URGENT" <a@x.fi>`` came
    out as a list whose addresses were x@evil.example and not a@x.fi (a name written as an RFC 2047 word
    is quoted once decoded, so a sender could choose the recipients a reader's reply-all goes to)."""
    text = b"".join(lines).decode("utf-8", "surrogateescape").split(":", 1)[1]
    written = _addresses(POLICY.header_factory(name, text))
    return [a.addr_spec for a in written] == [a.addr_spec for a in _addresses(header)]


def _bare(addresses: list[Address]) -> list[Address]:
    """The addresses without their display names: what goes when the names would not fold safely."""
    return [Address(username=a.username, domain=a.domain) for a in addresses]


@functools.lru_cache(maxsize=1024)
def _fold_header(name: str, header: ByIdentity[str]) -> bytes:
    """A header object folded once: the policy's header factory hands out the same object for the
    same value (``mailpolicy``), and it is immutable, so the same From is not refolded per message."""
    return _refold(name, header.obj)[1]


def _addresses(header: object | None) -> list[Address]:
    return list(getattr(header, "addresses", ()) or ())


# endregion

# region #### recipients ####


@dataclass
class Recipients:
    """Envelope recipients after splitting, rules, copies and redirection."""

    mail: list[str] = field(default_factory=list)
    sms: list[str] = field(default_factory=list)


def _printable(value: str) -> str:
    return value.encode("ascii", "backslashreplace").decode("ascii").replace("\r", "\\r").replace("\n", "\\n")[:200]


def split_recipients(values: Iterable[str]) -> list[str]:
    """RCPT TO values (``<a@x.fi>``, ``a@x.fi;b@y.fi``) -> addresses, deduplicated, syntax-checked."""
    out: list[str] = []
    for value in values:
        for item in _split_outside_quotes(value)[0] if '"' in value else re.split(r"[;,]", value):
            address = item.strip().strip("<>").strip()
            if not address:
                continue
            plain = _ENVELOPE_ADDRESS.fullmatch(address) or _QUOTED_ADDRESS.fullmatch(address)
            if not plain or not address.isprintable():
                raise RefusedError(replies.R501_BAD_ADDRESS.format(_printable(address)))
            out.append(address)
    return _dedupe(out)


def _same(address: str) -> str:
    """What makes two addresses one recipient: case aside, and an internationalised domain as its A-label
    (``info@yhtiö.fi`` and ``info@xn--yhti-8qa.fi`` are one mailbox, and went as two identical RCPTs)."""
    return with_a_label(address).lower()


def _dedupe(addresses: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for address in addresses:
        if (key := _same(address)) not in seen:
            seen.add(key)
            out.append(address)
    return out


def _apply_rules(address: str, rules: tuple[RecipientRule, ...]) -> str:
    lower = address.lower()
    for rule in rules:
        match = rule.match.lower()
        if lower == match or (match.startswith("@") and lower.endswith(match)):
            if rule.replace.startswith("@"):
                return address.rpartition("@")[0] + rule.replace
            return rule.replace
    return address


def _recipients(sub: Submission, settings: Settings, config: Config, notes: list[str]) -> Recipients:
    given = split_recipients(sub.rcpt_tos)
    if not given:
        raise RefusedError(replies.R501_BAD_ADDRESS.format("no recipient"))
    redirect = config.rewrite.redirect_all
    result = Recipients()
    for address in given:
        if is_sms_address(address, config.sms) and not redirect:
            result.sms.append(address)
            continue
        new = _apply_rules(address, config.rewrite.recipient_rules)
        if new != address:
            notes.append(f"recipient {address} -> {new}")
        if is_sms_address(new, config.sms) and not redirect:  # a rule may name a phone: sent as SMS, as given
            result.sms.append(new)
            continue
        result.mail.append(new)
    if settings.copy_to:  # a default recipient may be a phone number too (Vakio vastaanottaja)
        result.sms += [a for a in settings.copy_to if is_sms_address(a, config.sms) and not redirect]
        result.mail += [a for a in settings.copy_to if not is_sms_address(a, config.sms) or redirect]
        notes.append(f"copy to {', '.join(settings.copy_to)} ({settings.copy_to_mode})")
    if redirect:
        notes.append(f"redirect_all: {', '.join(_dedupe(result.mail))} -> {redirect}")
        result.mail = [redirect]
    result.mail = _dedupe(result.mail)
    result.sms = _dedupe(result.sms)
    if len(given) > config.limits.max_recipients:  # the client's, as counted at RCPT: copy_to is the admin's
        raise RefusedError(replies.R452_TOO_MANY_RECIPIENTS.format(config.limits.max_recipients))
    return result


def _note_sms_only_in_headers(headers: HeaderList, recipients: Recipients, config: Config, notes: list[str]) -> None:
    """A phone number in To/Cc that the client did not give as a recipient is not sent (the envelope
    decides, as in any MTA), but say so: some clients cut a ``;`` list to its first address before RCPT
    (Python's smtplib does), and the log is where an admin will look for the missing SMS."""
    if config.sms is None or not config.sms.enabled:
        return
    given = {_sms_number(a, config) for a in recipients.sms}
    for name in ("To", "Cc"):
        for _display, address in _split_legacy_list(", ".join(headers.raw(name)))[0]:
            if is_sms_address(address, config.sms) and _sms_number(address, config) not in given:
                notes.append(f"{name} names {address[:100]} but the client did not send it as a recipient: no SMS")


def _sms_number(address: str, config: Config) -> str:
    assert config.sms is not None
    try:
        return normalize_number(address.rpartition("@")[0], config.sms.country_code)
    except ValueError:
        return address.lower()


def _split_legacy_list(value: str) -> tuple[list[tuple[str, str]], bool]:
    """``a@x.fi; Virtanen, Matti <m@y.fi>`` -> [(name, address)], and whether it was not RFC-valid.

    Separators are ``;`` and ``,`` outside quotes, comments and angle brackets; a piece without ``@`` is
    a display name cut by an unquoted comma and is joined to the next piece when that one has an angle
    address, else it is a name with no address (its address then ``""``); a piece of bare addresses
    separated by whitespace (``a@x.fi b@y.fi``, what ``relay-sendmail -t`` reads as two) is that many
    addresses (``getaddresses`` made ``@y.fi`` of it, and the header came out empty). Group syntax
    (``undisclosed-recipients:;``) is left to the email package. The answers for recent short values
    are kept: a legacy program writes the same To in message after message.
    """
    if len(value) > CACHED_VALUE_MAX:
        return _split_list(value)
    pairs, legacy = _split_list_cached(value)
    return list(pairs), legacy


@functools.lru_cache(maxsize=1024)
def _split_list_cached(value: str) -> tuple[tuple[tuple[str, str], ...], bool]:
    pairs, legacy = _split_list(value)
    return tuple(pairs), legacy


def _split_list(value: str) -> tuple[list[tuple[str, str]], bool]:
    pieces, unquoted = _split_outside_quotes(value)
    if ":" in unquoted or "@" not in value:
        return getaddresses([value]), False
    pairs: list[tuple[str, str]] = []
    carry: list[str] = []
    bare = False
    for piece in pieces:
        if "@" not in piece:
            carry.append(piece.strip())
            continue
        if any(carry) and "<" not in piece:  # not "Virtanen, Matti <m@y.fi>": a name with no address of its own
            pairs.append((", ".join(filter(None, carry)), ""))  # (the caller then keeps the header as written)
            carry = []
        words = piece.split()
        if len(words) > 1 and not any(carry) and all("@" in w for w in words) and not _STRUCTURE.intersection(piece):
            pairs += [("", word) for word in words]  # "a@x.fi b@y.fi": bare addresses, as sendmail takes them
            bare = True
            continue
        name, address = getaddresses([piece])[0] if piece.strip() else ("", "")
        if any(carry):
            name = ", ".join([*filter(None, carry), name]) if name else ", ".join(filter(None, carry))
        pairs.append((name, address))
        carry = []
    if any(carry):  # "a@x.fi, Matti Virtanen": the name was dropped, and the field said rewritten
        pairs.append((", ".join(filter(None, carry)), ""))
    return pairs, bare or ";" in unquoted or len(pairs) != len(getaddresses([value]))


def _split_outside_quotes(value: str) -> tuple[list[str], str]:
    """Split on ``;``/``,`` outside quotes, comments and <>; also return the text outside those."""
    pieces, current, outside = [], "", ""
    depth, quoted = 0, False
    for ch in value:
        if ch == '"' and depth == 0:
            quoted = not quoted
        elif not quoted and ch in "<(":
            depth += 1
        elif not quoted and ch in ">)":
            depth = max(0, depth - 1)
        elif not quoted and depth == 0:
            outside += ch
            if ch in ";,":
                pieces.append(current)
                current = ""
                continue
        current += ch
    pieces.append(current)
    return pieces, outside


def _fix_address_header(headers: HeaderList, name: str, config: Config, notes: list[str], extra: list[str]) -> None:
    """Rewrite To/Cc when legacy-written, duplicated, hit by a recipient rule, or given ``extra`` copies."""
    values = headers.raw(name)
    if not values and not extra:
        return
    joined, phones = _without_phone_numbers(", ".join(values), config)
    if phones:
        notes.append(f"{name}: {', '.join(phones)} left out of the e-mail's header (sent as SMS)")
        if not joined.strip() and not extra:
            headers.remove(name)
            return
    pairs, legacy = _split_legacy_list(joined)
    legacy = legacy or bool(phones)
    if any(not address for _name, address in pairs):  # a member getaddresses cannot read: keep, not empty
        notes.append(f"{name} header left as it was: a member of it cannot be read as an address")
        return
    pairs += [("", a) for a in extra]
    new_pairs = [(n, _apply_rules(a, config.rewrite.recipient_rules)) for n, a in pairs if a]
    unique = _dedupe_pairs(new_pairs)
    if not (legacy or extra or len(values) > 1 or unique != pairs):
        return
    try:
        headers.set(name, [_address(n, a) for n, a in unique])
    except (*_PARSE_ERRORS, TypeError):
        notes.append(f"{name} header left as it was: an address in it cannot be parsed")
        return
    notes.append(f"{name} header rewritten as a valid address list")


def _without_phone_numbers(value: str, config: Config) -> tuple[str, list[str]]:
    """``value`` without its members at the SMS domain, and those members.

    A phone number in To or Cc goes as an SMS; in the e-mail's header it is an address nobody can
    write to (reply-all bounces), and one typed with spaces (``040 123 4567@sms``) made the whole list
    unreadable, so it was left in its legacy form, which readers cut at the first ``;``.
    """
    if config.sms is None or not config.sms.enabled or f"@{config.sms.domain}".lower() not in value.lower():
        return value, []
    pieces, _outside = _split_outside_quotes(value)
    kept: list[str] = []
    phones: list[str] = []
    for piece in pieces:
        address = piece.strip()
        address = address[address.rfind("<") + 1 : address.rfind(">")] if address.endswith(">") else address
        (phones if is_sms_address(address.strip(), config.sms) else kept).append(piece)
    return ",".join(kept), [" ".join(p.split()) for p in phones]


def _dedupe_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[str] = set()
    out = []
    for name, address in pairs:
        if (key := _same(address)) not in seen:
            seen.add(key)
            out.append((name, address))
    return out


@functools.lru_cache(maxsize=1024)  # an Address is immutable; the same From is set message after message
def _address(display_name: str, addr_spec: str) -> Address:
    if any(c in addr_spec for c in "\r\n\0"):
        raise ValueError("line break in an address")
    return Address(display_name=_plain_name(display_name), addr_spec=addr_spec)


def _plain_name(display_name: str) -> str:
    """A display name as the text it shows, its RFC 2047 words decoded and every control a space.

    The policy makes a header of an ``Address`` by parsing its string form, which decodes the encoded
    words in the name, and its folder writes what they decode to as it is: a name
    ``=?utf-8?b?U2FsZXMKQmNjOiB4QHk=?=`` ("Sales", LF, "Bcc: x@y") in a To relay rewrites put a Bcc
    field of the sender's choosing into the message (VT, FF and FS to RS too: line breaks to
    ``splitlines``). A name is only ever shown, so its controls go; decoded until no word is left
    (bounded), so a word inside a word cannot bring one back.
    """
    name = display_name
    for _ in range(3):
        if "=?" not in name:
            break
        try:
            name = str(make_header(decode_header(name)))
        except _PARSE_ERRORS:
            break
    return " ".join(_HEADER_CONTROLS.sub(" ", name).split()) if not name.isprintable() else name


# endregion

# region #### sender and other headers ####


# Fields a message has at most once (RFC 5322 3.6, RFC 2045 for the top level's MIME ones): Gmail refuses
# mail with two Subjects or two Dates, after relay has said 250. To and Cc are merged instead (above).
ONCE_ONLY = frozenset({"date", "from", "sender", "reply-to", "message-id", "in-reply-to", "references", "subject",
                       "mime-version", "content-type", "content-transfer-encoding"})  # fmt: skip
MAX_HEADER_FIELD = 64 * 1024
MAX_BOUNDARY = 70  # characters of a multipart boundary (RFC 2046 5.1.1)
MAX_MIME_PARAMETERS = 100  # in one Content-Type or Content-Disposition field (see _too_many_parameters)
MAX_HEADER_BLOCK = 256 * 1024


def _check_header_size(fields: list[list[bytes]], block: int) -> None:
    """Refuse absurd headers up front: the stdlib folds a long header in time that grows faster than
    its length (a 1 MB Subject took 20 s), so one hostile message could pin a core. Real mail has
    headers of a few KB; a To with 500 recipients is about 15 KB. (Postfix truncates at 100 KB.)"""
    if block > MAX_HEADER_BLOCK:
        raise RefusedError(replies.R554_BAD_MESSAGE.format(f"header block over {MAX_HEADER_BLOCK // 1024} KB"))
    for lines in fields:
        if sum(map(len, lines)) > MAX_HEADER_FIELD:
            name = lines[0].split(b":", 1)[0][:40].decode("ascii", "replace")
            raise RefusedError(
                replies.R554_BAD_MESSAGE.format(f"header field {name} over {MAX_HEADER_FIELD // 1024} KB")
            )
        key = lines[0].split(b":", 1)[0].strip().lower()
        if key in (b"content-type", b"content-disposition") and sum(line.count(b";") for line in lines) > MAX_MIME_PARAMETERS:
            _too_many_parameters(key.decode("ascii"))


def _too_many_parameters(name: str) -> NoReturn:
    """A MIME field with thousands of parameters (an RFC 2231 file name cut in 5,000 pieces) costs the
    stdlib's parser about 0.4 s a reading, and the email package reads Content-Type again at every look:
    one 64 KB message held the intake's event loop, every other session with it, for 7 s. Real mail
    has a handful (a long file name in a few dozen pieces at most)."""
    raise RefusedError(replies.R554_BAD_MESSAGE.format(f"a {name} field with over {MAX_MIME_PARAMETERS} parameters"))


def _encode_parameters(headers: HeaderList, notes: list[str]) -> None:
    """A message that is itself the attachment: 8-bit parameters in its Content-Type or
    Content-Disposition written as ``charset.encode_parameters`` does for inner parts."""
    content_type, disposition = headers.raw("Content-Type"), headers.raw("Content-Disposition")
    new = encode_parameters(content_type[0] if content_type else None, disposition[0] if disposition else None)
    for name, value in new.items():
        headers.put(name, value)
    if new:
        notes.append("8-bit file name: RFC 2231 filename*= and RFC 2047 name=")


def _check_sender(mail_from: str, *, used: bool) -> None:
    """Line breaks are refused always (injection); other oddities only if the sender is kept as is."""
    if any(c in mail_from for c in "\r\n\0") or (used and not mail_from.isprintable()):
        raise RefusedError(replies.R501_BAD_SENDER.format(_printable(mail_from)))


def _lock_sender(headers: HeaderList, settings: Settings, sub: Submission, notes: list[str]) -> str:
    """Set From (and Reply-To from the original From); return the envelope sender."""
    if not settings.from_address:
        if not headers.has("From") and sub.mail_from:
            headers.set("From", _address("", sub.mail_from))
            notes.append(f"From added: {sub.mail_from}")
        _set_reply_to(headers, settings, [], notes)
        return sub.mail_from
    original = _addresses(headers.parsed("From"))
    new_from = _address(settings.from_name or "", settings.from_address)
    headers.set("From", new_from)
    notes.append(f"From set to {new_from}")
    _set_reply_to(headers, settings, original, notes)
    if sub.mail_from.lower() != settings.from_address.lower():
        notes.append(f"envelope sender {sub.mail_from or '<>'} -> {settings.from_address}")
    return settings.from_address


# Names that resolve inside one network only: mail to them from outside goes nowhere. RFC 6762 (.local),
# RFC 8375 (home.arpa), RFC 6761 (localhost, invalid), ICANN's reserved .internal, and the names
# routers and Windows domains are commonly given (ICANN's name-collision list: .corp, .home, .lan...).
INTERNAL_SUFFIXES = (
    "local", "localdomain", "localhost", "invalid", "internal", "intranet", "lan", "home", "home.arpa", "corp",
    "private",
)  # fmt: skip


def answerable(addr_spec: str) -> bool:
    """Could a person outside this network answer mail sent to ``addr_spec``?

    Not a bare name (cron's ``root``), a one-label domain (``root@erpserver``), an internal name
    (``matti@erp.local``) or a private address literal: a customer's reply to those goes nowhere, or
    bounces back to them. Nor a non-ASCII local part (``jörgen@``): a 7-bit header can only write it as
    an encoded word, which is no address. Anything else is given the benefit of the doubt (relay does no
    DNS lookups).
    """
    local, at, domain = addr_spec.rpartition("@")
    domain = domain.rstrip(".").lower()
    if not at or not local or not domain or not local.isascii():
        return False
    if domain.startswith("[") and domain.endswith("]"):
        try:
            return ipaddress.ip_address(domain[1:-1].removeprefix("ipv6:")).is_global
        except ValueError:
            return False
    return "." in domain and not any(domain == s or domain.endswith("." + s) for s in INTERNAL_SUFFIXES)


def _set_reply_to(headers: HeaderList, settings: Settings, original: list[Address], notes: list[str]) -> None:
    """Tell replies where to go when the message does not say it itself.

    The admin's ``reply_to`` first. Else, when the sender was replaced, the original From, so replies
    reach the person the program wrote for, but only the addresses someone outside can answer
    (``answerable``) and not the new From itself: a Reply-To of ``root`` or ``matti@erp.local`` would
    send a customer's reply nowhere.
    """
    if headers.has("Reply-To"):
        return
    if settings.reply_to:
        headers.set("Reply-To", _address("", settings.reply_to))
        notes.append(f"Reply-To set to {settings.reply_to} (reply_to)")
        return
    if not settings.from_address or not settings.reply_to_original:
        return
    others = [a for a in original if a.addr_spec.lower() != settings.from_address.lower()]
    kept = [a for a in others if answerable(a.addr_spec)]
    if kept:
        headers.set("Reply-To", [Address(_plain_name(a.display_name), a.username, a.domain) for a in kept])
        notes.append(f"original From {', '.join(a.addr_spec for a in kept)} kept as Reply-To")
    if len(kept) < len(others):
        dropped = ", ".join(a.addr_spec or "(empty)" for a in others if a not in kept)
        notes.append(f"original From {dropped} not kept as Reply-To: nobody outside can answer it")


def _clean_headers(headers: HeaderList, settings: Settings, config: Config, notes: list[str]) -> None:
    if settings.from_address and headers.remove("Sender"):
        notes.append("Sender header removed (From is the sending mailbox)")
    if config.rewrite.remove_dkim and headers.remove("DKIM-Signature"):
        notes.append("DKIM-Signature removed (the rewrite would break it)")
    for hidden in ("Bcc", "Resent-Bcc"):  # (RFC 5322 3.6.6: a resent message's blind copies)
        if headers.remove(hidden):
            notes.append(f"{hidden} header removed")
    if headers.remove("Content-Length"):  # as Postfix's cleanup does: not portable, and wrong once the body changes
        notes.append("Content-Length header removed")
    if headers.remove("Return-Path"):  # set by the final delivery from the envelope sender, never by a client
        notes.append("Return-Path header removed")
    for name in headers.keep_first(ONCE_ONLY):
        notes.append(f"a second {name} header removed (the first is kept)")
    if not headers.has("Date"):
        headers.set("Date", format_datetime(datetime.now(UTC)))
        notes.append("Date added")
    if any(len(f"Message-ID: {v.strip()}") > MAX_HEADER_LINE for v in headers.raw("Message-ID")):
        headers.remove("Message-ID")  # one token: it cannot be folded, and encoded words are no msg-id
        notes.append("Message-ID over 998 octets replaced")
    if not headers.has("Message-ID"):
        sender = settings.from_address or "relay@relay.invalid"
        headers.set("Message-ID", message_id(sender))
        notes.append("Message-ID added")


# endregion

# region #### the body ####


def _root_type(headers: HeaderList) -> str:
    header = headers.parsed("Content-Type")
    return str(getattr(header, "content_type", "text/plain"))


def _body_reasons(headers: HeaderList, body: memoryview, settings: Settings, notes: list[str]) -> list[str]:
    """Why the body must be parsed and rewritten; empty means: keep the body bytes as they are."""
    root = _root_type(headers)
    long_lines = has_long_lines(body)
    if root in PROTECTED_TYPES:
        notes.append(f"left untouched: {PROTECTED_TYPES[root]}")
        if long_lines:
            notes.append("lines over 998 octets left in place: re-encoding would break the signature")
        return []
    reasons = []
    if settings.signature and settings.signature.strip():
        reasons.append("signature")  # (one already at the end of the text is found there, not added again)
    if not bytes(body.obj).isascii() and _EIGHT_BIT.search(body):  # isascii (C, whole message) first: cheap
        reasons.append("8-bit")
    if long_lines:
        reasons.append("long lines")
    if bytes(body.obj).find(b"\x00") >= 0:  # no NUL may be sent in 7bit or 8bit text (RFC 5322 2.3, RFC 2045 2.7)
        reasons.append("NUL bytes")
    return reasons


def _lying_encoded_text(head: bytes, body: memoryview) -> list[str]:
    """``["mislabelled text"]`` when a 7-bit body that nothing else makes relay rewrite holds a text part in
    base64 or quoted-printable whose bytes its charset label does not describe (``charset=utf-8`` on
    Latin-1); else ``[]``, and the body goes as it came.

    The bytes of such a part are 7-bit on the wire, so ``_body_reasons`` sees nothing; without a signature
    to add, the lie went out and every reader showed "Hyv�� p�iv��". Only a message that names one of
    those encodings is parsed for this, with its big attachments standing aside (``skeleton.py``); one
    the parser cannot take, or a body over ``JOIN_LIMIT`` with nothing to stand aside, goes as it came.
    """
    if not _names_encoded_cte(head) and not _names_encoded_cte(body):
        return []
    if len(body) <= JOIN_LIMIT:
        data = b"".join((head, body))
    elif (stand_ins := skeleton(_HEADER_PARSER.parsebytes(head), body)) is not None:
        data = head + stand_ins.body
    else:
        return []  # a big body with no attachment to stand aside: not parsed whole for this (memory)
    try:
        msg = BytesParser(policy=POLICY).parsebytes(data)
        lying = any(_lies(part) for part in _leaves(msg))
    except _PARSE_ERRORS:
        return []
    return ["mislabelled text"] if lying else []


def _names_encoded_cte(data: bytes | memoryview) -> bool:
    """Whether a line of ``data`` starts ``Content-Transfer-Encoding: base64`` (or quoted-printable), in
    any case: a part that may carry text in an encoding whose bytes are 7-bit."""
    for found in _ENCODED_CTE.finditer(data):
        start = found.start() - len(b"content")
        if start >= 0 and bytes(data[start : found.start()]).lower() == b"content" and (
            start == 0 or data[start - 1 : start] == b"\n"
        ):
            return True
    return False


def _lies(part: Message) -> bool:
    if part.get_content_maintype() != "text":
        return False
    cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    return cte in ("base64", "quoted-printable") and _mislabelled(part, cte, False, part.get_content_charset())


def _parse(data: bytes, config: Config) -> EmailMessage:
    """Parse a whole message; refuse what would cost too much or what the parser cannot take."""
    try:
        msg = BytesParser(policy=POLICY).parsebytes(data)
    except _PARSE_ERRORS as exc:
        raise RefusedError(replies.R554_BAD_MESSAGE.format(f"it cannot be parsed ({type(exc).__name__})")) from None
    parts, depth = _shape(msg, config.rewrite.max_mime_parts)
    if parts > config.rewrite.max_mime_parts:
        raise RefusedError(replies.R554_BAD_MESSAGE.format(f"more than {config.rewrite.max_mime_parts} MIME parts"))
    if depth > config.rewrite.max_mime_depth:
        raise RefusedError(replies.R554_BAD_MESSAGE.format(f"MIME nesting deeper than {config.rewrite.max_mime_depth}"))
    return msg


def _shape(msg: Message, stop_after: int) -> tuple[int, int]:
    """(number of parts, nesting depth), iteratively (``walk`` recurses) and stopping past the limit; a
    part with too many MIME parameters is refused here (``_too_many_parameters``)."""
    stack: list[tuple[Message, int]] = [(msg, 1)]
    parts = depth = 0
    while stack and parts <= stop_after:
        part, level = stack.pop()
        parts += 1
        depth = max(depth, level)
        for name, value in part.raw_items():  # raw: the parsed form of such a field is what costs
            if name.lower() in ("content-type", "content-disposition") and value.count(";") > MAX_MIME_PARAMETERS:
                _too_many_parameters(name.lower())
        payload = part.get_payload()
        if isinstance(payload, list):
            stack += [(p, level + 1) for p in payload if isinstance(p, Message)]
    return parts, depth


def _leaves(part: Message) -> Iterator[Message]:
    """Leaf parts, not descending into signed/encrypted subtrees (their bytes must not change)."""
    if part.get_content_type() in PROTECTED_TYPES:
        return
    payload = part.get_payload()
    if isinstance(payload, list):
        for child in payload:
            if isinstance(child, Message):
                yield from _leaves(child)
    else:
        yield part


def _raw_payload(part: Message, cte: str) -> bytes:
    """The part's body as it travels (still transfer-encoded).

    ``get_payload()`` would decode 8-bit bytes with replacement characters, and with ``decode=True`` it
    undoes base64/QP; for identity encodings ``decode=True`` is exactly the raw bytes.
    """
    if cte in ("7bit", "8bit", "binary"):
        data = part.get_payload(decode=True)
        return data if isinstance(data, bytes) else b""
    payload = part.get_payload()
    return payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else b""


def _repair_part(part: Message, default_charset: str) -> str | None:
    """Re-encode one leaf part whose text its charset label does not describe (8-bit bytes without a
    label, or that the label cannot decode: ``utf-8`` on Latin-1) or with lines over 998 octets; return
    a note."""
    if part.get_content_maintype() == "multipart":  # never a leaf after _repair_structure; never encoded
        return None
    cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    eight_bit, too_long, nul = _wire_faults(part, cte)
    ctype = part.get_content_type()
    declared = part.get_content_charset()
    unlabelled = eight_bit and (cte not in ("8bit", "binary") or declared in (None, "us-ascii", "ascii"))
    if ctype.startswith("text/") and (unlabelled or too_long or _mislabelled(part, cte, eight_bit, declared)):
        decoded = decode_text_part(part, default_charset)
        if decoded is not None:
            used = set_text_payload(part, decoded.text, decoded.charset, "quoted-printable")
            if decoded.relabelled:
                why = decoded.relabelled
            elif unlabelled:
                why = f"8-bit {declared} text sent as {cte}"
            else:
                why = "NUL bytes" if nul else "lines over 998 octets"
            return f"{ctype}: {why}, written as {decoded.charset} {used}"
    if too_long:
        data = part.get_payload(decode=True)
        if isinstance(data, bytes):
            part.set_payload(_base64(data))
            del part["Content-Transfer-Encoding"]
            part["Content-Transfer-Encoding"] = "base64"
            return f"{ctype}: {'NUL bytes' if nul else 'lines over 998 octets'}, re-encoded as base64"
    return None


def _wire_faults(part: Message, cte: str) -> tuple[bool, bool, bool]:
    """(8-bit bytes, a line over 998 octets or NUL bytes, NUL bytes) in the part's body as it travels;
    the copy read for it is gone when this returns, before the text is decoded."""
    raw = _raw_payload(part, cte)
    nul = b"\x00" in raw and cte in _IDENTITY_CTES  # sent as they are, they would be NULs on the wire
    return not raw.isascii(), has_long_lines(raw) or nul, nul


def _mislabelled(part: Message, cte: str, eight_bit: bool, declared: str | None) -> bool:
    """8-bit text its label cannot decode (``charset=utf-8`` on Latin-1 bytes, an unknown label, no
    label), also inside base64 or quoted-printable. A body whose transfer encoding does not decode is
    not judged here (``decode_text_part`` leaves it as it is)."""
    if cte in _IDENTITY_CTES and not eight_bit:
        return False  # ASCII as it travels: what every ASCII-based label reads alike
    defects_before = len(part.defects)
    data = part.get_payload(decode=True)
    del part.defects[defects_before:]  # reading must not leave marks on the message
    if not isinstance(data, bytes) or data.isascii():
        return False
    if declared in (None, "us-ascii", "ascii") or utf8_under_latin_label(data, declared):
        return True
    return not decodes_as(data, declared)


_IDENTITY_CTES = ("7bit", "8bit", "binary")  # the only ones a multipart may carry (RFC 2045 6.4)
_NLCRE = re.compile(r"\r\n|\r|\n")  # what the generator splits a preamble or epilogue on


def _repair_structure(msg: Message, default_charset: str) -> list[str]:
    """Make the tree one the generator writes as CRLF lines of at most 998 octets; return notes.

    The line-length repair of leaves (``_repair_part``) cannot reach three things the generator writes
    as they are: a "multipart" whose body the parser could only keep as a string (no boundary, or a
    declared one that never appears: the generator writes that string verbatim, so nothing in it may
    be re-encoded), a preamble or epilogue, and the header fields of inner parts (``refold_source`` is
    "none"). Protected (signed, encrypted) subtrees are not entered: their bytes must not change.
    """
    notes: list[str] = []
    stack: list[tuple[Message, tuple[str, ...]]] = [(msg, ())]
    while stack:
        part, boundaries = stack.pop()
        if part.get_content_type() in PROTECTED_TYPES:
            if part is not msg and has_long_lines(part.as_bytes(policy=POLICY)):
                notes.append(
                    f"{part.get_content_type()}: lines over 998 octets left in place: re-encoding would break"
                    " the signature"
                )
            continue
        if part is not msg:  # the top-level fields were folded by HeaderList
            notes += _refold_part_headers(part, default_charset)
        payload = part.get_payload()
        if part.get_content_maintype() == "multipart" and not isinstance(payload, list):
            notes.append(_as_text_leaf(part, nested=bool(boundaries)))
            continue
        if not isinstance(payload, list):
            continue
        if part.get_content_maintype() == "multipart":
            notes += _repair_container(part, boundaries)
            boundaries = (*boundaries, part.get_boundary() or "")
        stack += [(child, boundaries) for child in reversed(payload) if isinstance(child, Message)]
    return notes


def _as_text_leaf(part: Message, *, nested: bool) -> str:
    """A multipart the parser could not split -> the single text part it effectively is.

    Its body is the text the sender wrote (mail clients show it as plain text), so it becomes
    ``text/plain`` (the charset parameter kept if it had one, else guessed like any unlabelled text);
    a transfer encoding is kept only if it is an identity or base64/QP that decodes cleanly, otherwise
    the body is taken as the text it literally is. The caller's leaf repair then handles 8-bit and long
    lines. ``nested``: the part is followed by an enclosing multipart's delimiter, whose leading CRLF the
    parser leaves on a multipart's string body (it takes it off a leaf's): taken off here likewise.
    """
    ctype = part.get_content_type()
    why = "no boundary" if part.get_boundary() is None else "a boundary that never appears in its body"
    charset = part.get_param("charset")
    part.replace_header("Content-Type", "text/plain")
    if isinstance(charset, str) and charset:
        part.set_param("charset", charset)
    cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if cte not in _IDENTITY_CTES and not _decodes_cleanly(part, cte):
        del part["Content-Transfer-Encoding"]
        cte = "7bit"
    if cte in _IDENTITY_CTES:  # the bytes as sent (get_payload() would replace 8-bit ones with U+FFFD)
        raw = part.get_payload(decode=True)
        text = raw.decode("ascii", "surrogateescape") if isinstance(raw, bytes) else ""
        part.set_payload(text[:-2] if nested and text.endswith("\r\n") else text)
    return f"{ctype} with {why}: sent as the single text/plain part it is"


def _decodes_cleanly(part: Message, cte: str) -> bool:
    if cte not in ("base64", "quoted-printable"):
        return False
    before = len(part.defects)
    part.get_payload(decode=True)
    clean = len(part.defects) == before
    del part.defects[before:]
    return clean


def _repair_container(part: Message, boundaries: tuple[str, ...]) -> list[str]:
    """A parsed multipart: no transfer encoding but an identity one; preamble and epilogue lines fit."""
    notes = []
    ctype = part.get_content_type()
    cte = part.get("Content-Transfer-Encoding")
    if cte is not None and str(cte).strip().lower() not in _IDENTITY_CTES:
        del part["Content-Transfer-Encoding"]
        notes.append(f"{ctype}: Content-Transfer-Encoding {str(cte).strip()[:40]} removed (a multipart may not have one)")
    if len(part.get_boundary() or "") > MAX_BOUNDARY:  # its delimiter lines could be over 998 octets
        part.set_boundary(f"=_relay_{secrets.token_hex(16)}")
        notes.append(f"{ctype}: boundary over {MAX_BOUNDARY} characters replaced (RFC 2046 5.1.1)")
    delimiters = tuple(f"--{b}" for b in (*boundaries, part.get_boundary() or "") if b)
    for name in ("preamble", "epilogue"):
        text = getattr(part, name)
        if not text:
            continue
        lines = _NLCRE.split(text)
        if all(len(line) <= MAX_HEADER_LINE for line in lines):
            continue
        step = MAX_HEADER_LINE
        pieces = [line[i : i + step] for line in lines for i in range(0, len(line) or 1, step)]
        new_starts = (line[i : i + step] for line in lines for i in range(step, len(line), step))
        if any(start.startswith(delimiters) for start in new_starts):  # would read as a boundary
            setattr(part, name, None)
            notes.append(f"{ctype}: {name} with lines over 998 octets removed (MIME readers ignore it)")
        else:
            setattr(part, name, "\r\n".join(pieces))
            notes.append(f"{ctype}: {name} lines over 998 octets wrapped (MIME readers ignore it)")
    return notes


def _refold_part_headers(part: Message, default_charset: str, *, where: str = "an inner") -> list[str]:
    """Header fields of an inner part (or of a message/rfc822's message) with a line over 998 octets or
    8-bit bytes are written again like the top-level ones: 8-bit bytes decoded as for the top level,
    then RFC 2047 words, and 8-bit MIME parameters (a file name) as ``charset.encode_parameters``."""
    fields = list(part.raw_items())
    if all(_field_fits(n, v) and not _raw_8bit(v) for n, v in fields):
        return []
    ctype = part.get_content_type()
    parameters = _part_parameters(fields, default_charset)
    notes = []
    if parameters:
        notes.append(f"8-bit file name of {where} {ctype} part: RFC 2231 filename*= and RFC 2047 name=")
    new = []
    for name, value in fields:
        key = name.strip().lower()
        if key in parameters:
            new.append((name, parameters.pop(key)))
            continue
        if _field_fits(name, value) and not _raw_8bit(value):
            new.append((name, value))
            continue
        text = _FOLD.sub("", value)
        if not text.isascii():  # the parser keeps 8-bit bytes as surrogate escapes
            text = decode_legacy(text.encode("utf-8", "surrogateescape"), default_charset)[0]
        new.append((name, _refold(name, text)[0]))
        why = "over 998 octets: folded" if not _field_fits(name, value) else "8-bit: RFC 2047 encoded"
        notes.append(f"header {name.strip()[:40]} of {where} {ctype} part {why}")
    new += [(_PARAMETER_NAMES[key], value) for key, value in parameters.items()]  # a name= Outlook reads
    for name in {n.lower() for n, _v in fields}:
        del part[name]
    for name, value in new:
        part.set_raw(name, value)
    return notes


_PARAMETER_NAMES = {"content-type": "Content-Type", "content-disposition": "Content-Disposition"}


def _raw_8bit(value: str) -> bool:
    """Source text with 8-bit bytes (the parser keeps them as surrogate escapes); a header object
    relay made is written by the policy, in RFC 2047 / 2231 where it is not ASCII."""
    return not hasattr(value, "name") and not value.isascii()


def _part_parameters(fields: list[tuple[str, str]], default_charset: str) -> dict[str, str]:
    """{lower-case field name: new value} for a part's Content-Type / Content-Disposition whose
    parameters have 8-bit bytes (``encode_parameters``); empty when there are none."""
    values: dict[str, str] = {}
    for name, value in fields:
        key = name.strip().lower()
        if key in _PARAMETER_NAMES and key not in values and not hasattr(value, "name"):
            raw = value.encode("utf-8", "surrogateescape")
            values[key] = raw.decode("ascii") if raw.isascii() else decode_legacy(raw, default_charset)[0]
    if all(v.isascii() for v in values.values()):
        return {}
    new = encode_parameters(values.get("content-type"), values.get("content-disposition"))
    return {name.lower(): value for name, value in new.items()}


def _field_fits(name: str, value: str) -> bool:
    """Written as it is (source text) or by its own folding (a header object relay made): fits?
    The policy's folder cannot break one long token (``Content-Type: invoicexxx...``), so a header
    object is folded to find out."""
    if hasattr(value, "name"):
        return max(map(len, POLICY.fold_binary(name, value).split(b"\r\n"))) <= MAX_HEADER_LINE
    return max(map(len, _NLCRE.split(f"{name}: {value}"))) <= MAX_HEADER_LINE


def _base64(data: bytes) -> str:
    return base64.encodebytes(data).decode("ascii")


def _rewrite_body(data: bytes, reasons: list[str], settings: Settings, config: Config, notes: list[str]) -> bytes:
    """Parse, repair, sign and serialise; only called when ``_body_reasons`` found a reason."""
    msg = _parse(data, config)
    charset = config.rewrite.default_charset
    try:
        notes += _repair_structure(msg, charset)
        if reasons != ["signature"]:  # only 8-bit or long lines need a look at every part
            notes += [note for part in list(_leaves(msg)) if (note := _repair_part(part, charset))]
        if settings.signature:
            notes += add_signature(msg, settings.signature, default_charset=charset)
        # the repairs above may have written top-level fields again (Content-Type with a new charset)
        notes += _refold_part_headers(msg, charset, where="the top-level")
        if msg.get("Content-Type") is not None and msg.get("MIME-Version") is None:
            msg["MIME-Version"] = "1.0"
        out = io.BytesIO()
        BytesGenerator(out, policy=POLICY).flatten(msg)
    except _PARSE_ERRORS as exc:
        raise RefusedError(replies.R554_BAD_MESSAGE.format(f"it cannot be rewritten ({type(exc).__name__})")) from None
    return out.getvalue()


# endregion


def _account(settings: Settings) -> str:
    if settings.account is None:
        raise RefusedError(replies.R451_NO_UPSTREAM)
    return settings.account.name


def rewrite(
    sub: Submission, settings: Settings, config: Config, *, read_secret: SecretReader | None = None
) -> list[Outgoing]:
    """Submission as received -> one or more messages ready for the spool (see module docstring).

    ``read_secret`` reads the SMS gateway's password when a message goes to the gateway with one.

    Raises:
        RefusedError: with the SMTP reply for anything refused.
    """
    _check_sender(sub.mail_from, used=not settings.from_address)
    notes: list[str] = []
    recipients = _recipients(sub, settings, config, notes)
    content = normalize_line_endings(sub.content)
    if content is not sub.content:
        notes.append("bare LF/CR line endings normalised to CRLF")
    raw_fields, offset = header_block(content)
    _check_header_size(raw_fields, offset)
    body = memoryview(content)[offset:]  # the body stays where it is: a 25 MB attachment is not copied
    headers = HeaderList.from_raw(raw_fields, config.rewrite.default_charset, notes)
    check_hops(len(headers.raw("Received")))
    _note_sms_only_in_headers(headers, recipients, config, notes)
    # for the SMS text: the message as submitted, headers made safe (before _mail changes them)
    original = b"".join((headers.to_bytes(), b"\r\n", body)) if recipients.sms else b""
    out: list[Outgoing] = []
    if recipients.mail:
        out.append(_mail(headers, body, recipients.mail, sub, settings, config, notes))
    if recipients.sms:
        assert config.sms is not None  # is_sms_address is False without an SMS config
        sender = settings.from_address or sub.mail_from
        msg = _parse(original, config)
        out += sms_messages(
            msg, tuple(recipients.sms), settings, config.sms, sender=sender, default_charset=config.rewrite.default_charset,
            read_secret=read_secret,
        )
    return out


def _mail(
    headers: HeaderList, body: memoryview, rcpts: list[str], sub: Submission, settings: Settings, config: Config,
    notes: list[str],
) -> Outgoing:
    account = _account(settings)
    sender = _lock_sender(headers, settings, sub, notes)
    copies = [a for a in settings.copy_to if not is_sms_address(a, config.sms)] if settings.copy_to_mode == "cc" else []
    for name in ("To", "Cc"):
        _fix_address_header(headers, name, config, notes, copies if name == "Cc" else [])
    _clean_headers(headers, settings, config, notes)
    _encode_parameters(headers, notes)
    head = b"".join((received_field(sub, config), headers.to_bytes(), b"\r\n"))  # (trace.py)
    reasons = _body_reasons(headers, body, settings, notes) or _lying_encoded_text(head, body)
    data: Content | None
    if reasons:
        data = _rewrite_big_body(head, body, reasons, settings, config, notes) if len(body) > JOIN_LIMIT else None
        if data is None:
            data = _rewrite_body(b"".join((head, body)), reasons, settings, config, notes)
    elif len(body) > JOIN_LIMIT:
        data = Joined((head, body))  # the body is kept as received: not copied (see Joined)
    else:
        data = b"".join((head, body))
    return Outgoing(account, sender, tuple(rcpts), data, settings.user, "mail", tuple(notes))


def _rewrite_big_body(
    head: bytes, body: memoryview, reasons: list[str], settings: Settings, config: Config, notes: list[str]
) -> Joined | None:
    """The body rewrite with big attachments standing aside (``skeleton.py``); ``None``: do it whole."""
    stand_ins = skeleton(_HEADER_PARSER.parsebytes(head), body)
    if stand_ins is None:
        return None
    own_notes: list[str] = []
    rendered = _rewrite_body(head + stand_ins.body, reasons, settings, config, own_notes)
    pieces = restore(rendered, stand_ins.originals)
    if pieces is None:
        return None
    notes += own_notes
    return Joined(tuple(pieces))
