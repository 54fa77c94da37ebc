"""A message too big for Graph's ``sendMail`` (4 MB a request), split for the draft route: the parts.

Graph documents one route for a big message: create a draft from the MIME without its big
attachments (``POST /users/{mailbox}/messages``), attach each of them (``POST .../attachments`` under
3 MB, else an upload session whose ``PUT``s carry byte ranges), then send the draft. ``graph.py`` does
the requests; this module decides what goes where, without holding the message more than once:

- ``plan``: the draft's MIME is the message with its big attachments taken out, found the way
  ``skeleton.py`` finds them for the rewrite stage (well-formed multiparts, non-text ``base64`` parts of
  plain lines); only the small skeleton is parsed. Taken out are the biggest parts, until the rest fits
  one request; each keeps its name (RFC 2231 and RFC 2047 names decoded), content type, and for an
  inline image ``isInline`` and its ``contentId``, so ``cid:`` references in the HTML still resolve.
- ``fragments``: an attachment's bytes decoded from the spooled base64 a fragment at a time (a multiple
  of 320 KiB, under 4 MB, as Graph requires), from any offset, for a resume after a ``429``.
- ``DraftRecord``: what an attempt did with a draft, kept in the spool (``Spool.write_draft``), so a
  crash between the draft's creation and its sending neither loses the message nor sends it twice.
- ``graph_address_problem``: the address rules Graph applies to a recipient, checked at ``RCPT`` for a
  Graph account so that one malformed address is refused at once instead of stopping the message.
"""

from __future__ import annotations

import binascii
import io
import json
import mimetypes
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from email.generator import BytesGenerator
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser
from email.policy import compat32

from relay.skeleton import _TOKEN, skeleton

FRAGMENT = 4 * 320 * 1024  # bytes a PUT carries: a multiple of 320 KiB (Graph's rule) under 4 MB; small, for memory
SMALL_ATTACHMENT = 3 * 1024 * 1024 - 16 * 1024  # under this (decoded) one POST .../attachments: Graph says 3 MB;
# its base64 in JSON must stay under the 4 MB a request
_DECODE_STEP = 256 * 1024  # base64 read a quarter MiB at a time
_HEADERS = BytesHeaderParser(policy=compat32)
_TOKEN_FOUND = re.compile(rb"RelayStandIn(\d{6})ForAnAttachmentBodyKeptAsReceived")


class CannotSplitError(ValueError):
    """The message cannot be cut down to one Graph request (the reason says why, for the bounce)."""


@dataclass
class Part:
    """An attachment taken out of the draft's MIME, its body still the spooled base64 text."""

    name: str
    content_type: str
    inline: bool
    content_id: str | None
    encoded: memoryview
    size: int = 0  # decoded octets

    def item(self) -> dict[str, object]:
        """The ``AttachmentItem`` of ``createUploadSession`` (and the fields of a ``fileAttachment``)."""
        item: dict[str, object] = {"attachmentType": "file", "name": self.name, "size": self.size,
                                   "contentType": self.content_type, "isInline": self.inline}  # fmt: skip
        if self.content_id:
            item["contentId"] = self.content_id
        return item


@dataclass
class Plan:
    """The draft's MIME (for one request) and the parts to attach to the draft afterwards."""

    mime: bytes
    parts: list[Part]


def plan(content: memoryview, fits: Callable[[int], bool]) -> Plan:
    """Split ``content`` (the spooled message); ``fits(size)``: whether a MIME of ``size`` octets goes in one
    request. Raises ``CannotSplitError`` when no set of big parts taken out makes the rest fit."""
    split = bytes(content[:262144]).find(b"\r\n\r\n")
    if split < 0:
        raise CannotSplitError("the message has no header block Graph can read")
    head, body = content[: split + 4], content[split + 4 :]
    headers = _HEADERS.parsebytes(bytes(head))
    found = skeleton(headers, body, taken_out=True)
    if found is None:
        raise CannotSplitError("it has no attachment that can be sent apart (base64, in a well-formed multipart)")
    message = BytesParser(policy=compat32).parsebytes(bytes(head) + found.body)
    stood_in = _stood_in(message)
    sizes = {n: len(original) for n, original in enumerate(found.originals)}
    size = len(head) + len(found.body) + sum(sizes.values())
    taken: list[int] = []
    for n in sorted(sizes, key=sizes.__getitem__, reverse=True):  # the biggest out first: fewest requests
        if fits(size):
            break
        taken.append(n)
        size -= sizes[n]
    if not fits(size):
        raise CannotSplitError("what is left without its attachments is still over Graph's 4 MB a request")
    parts = [_take_out(stood_in[n], found.originals[n]) for n in sorted(taken)]
    rendered = _render(message)
    return Plan(_restore(rendered, {n: o for n, o in enumerate(found.originals) if n not in taken}), parts)


def _stood_in(message: Message) -> dict[int, tuple[Message, Message]]:
    """Each stood-in part by its token's number, with the multipart it is in."""
    found: dict[int, tuple[Message, Message]] = {}
    for parent in message.walk():
        if not parent.is_multipart():
            continue
        for part in parent.get_payload():
            if not isinstance(part, Message):
                continue
            payload = part.get_payload()
            if isinstance(payload, str):
                match = _TOKEN_FOUND.search(payload.encode("ascii", "replace"))
                if match is not None:
                    found[int(match[1])] = (parent, part)
    return found


def _take_out(where: tuple[Message, Message], encoded: memoryview) -> Part:
    """Remove the part from its multipart (an emptied one keeps an empty text part: RFC 2046 wants one)."""
    parent, part = where
    payload = parent.get_payload()
    assert isinstance(payload, list)  # a multipart's payload (``_stood_in`` found it in one)
    payload.remove(part)
    if not payload:
        empty = Message()
        empty["Content-Type"] = "text/plain"
        payload.append(empty)
    content_type = part.get_content_type()
    content_id = str(part.get("Content-ID", "")).strip().strip("<>").strip() or None
    disposition = part.get_content_disposition()
    inline = disposition == "inline" or (disposition is None and content_id is not None)
    name = _name(part) or "attachment" + (mimetypes.guess_extension(content_type) or ".bin")
    result = Part(name, content_type, inline, content_id, encoded)
    result.size = _decoded_size(result)
    return result


def _decoded_size(part: Part) -> int:
    """How many octets ``fragments`` yields, counted without decoding when the only ``=`` are the padding."""
    encoded, chars, padding = part.encoded, 0, b""
    for at in range(0, len(encoded), _DECODE_STEP):
        window = bytes(encoded[at : at + _DECODE_STEP])
        chars += len(window) - window.count(b"\r") - window.count(b"\n")
        padding = (padding + window.translate(None, b"\r\n"))[-3:]
    pad = len(padding) - len(padding.rstrip(b"="))
    if _equals(encoded) != pad:
        return sum(len(chunk) for chunk in fragments(part, 0))  # padding inside: decode to be sure
    whole, extra = divmod(chars, 4)
    return whole * 3 - pad + {0: 0, 1: 0, 2: 1, 3: 2}[extra]


def _equals(encoded: memoryview) -> int:
    return sum(bytes(encoded[at : at + _DECODE_STEP]).count(b"=") for at in range(0, len(encoded), _DECODE_STEP))


def _name(part: Message) -> str | None:
    """The file name as the user sees it: RFC 2231 (``filename*=``) by the email package, RFC 2047
    encoded words (what many mailers write) decoded here; a name with 8-bit bytes read as UTF-8."""
    raw = part.get_filename() or part.get_param("name")
    if not raw:
        return None
    text = raw if isinstance(raw, str) else str(raw[2])
    if "=?" in text:
        try:
            text = str(make_header(decode_header(text)))
        except (ValueError, LookupError):
            pass
    try:  # compat32 hands 8-bit header bytes over as surrogates
        text = text.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeDecodeError:
        text = text.encode("utf-8", "surrogateescape").decode("latin-1")
    return " ".join(text.split()) or None


def _render(message: Message) -> bytes:
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, maxheaderlen=0).flatten(message, linesep="\r\n")
    return out.getvalue()


def _restore(rendered: bytes, kept: dict[int, memoryview]) -> bytes:
    """Put the bodies of the parts left in the MIME back in place of their tokens."""
    pieces: list[bytes] = []
    at = 0
    for n, original in sorted(kept.items()):
        token = _TOKEN % n
        found = rendered.find(token, at)
        if found < 0:
            raise CannotSplitError("the message's structure changed while it was split")
        pieces += [rendered[at:found], bytes(original)]
        at = found + len(token)
    pieces.append(rendered[at:])
    return b"".join(pieces)


def fragments(part: Part, start: int, size: int = FRAGMENT) -> Iterator[bytes]:
    """The part's decoded bytes from offset ``start``, ``size`` at a time (the last one shorter).

    The spooled base64 is decoded a MiB at a time; a resume decodes again from the start and skips
    what Graph already has (decoding is far cheaper than sending, and nothing is kept in between).
    """
    buffer = bytearray()
    done = 0  # decoded octets so far, the skipped ones included
    carry = b""
    encoded = part.encoded
    for at in range(0, len(encoded) + 1, _DECODE_STEP):
        text = carry + bytes(encoded[at : at + _DECODE_STEP]).translate(None, b"\r\n")
        last = at + _DECODE_STEP >= len(encoded)
        extra = len(text) % 4
        if not last:
            text, carry = text[: len(text) - extra], text[len(text) - extra :]
        elif extra == 1:  # a lone sextet is no octet
            text = text[:-1]
        elif extra:  # unpadded end
            text += b"=" * (4 - extra)
        data = binascii.a2b_base64(text)
        if done + len(data) > start:
            buffer += data[max(start - done, 0) :]
        done += len(data)
        while len(buffer) >= size:
            with memoryview(buffer) as view:
                piece = bytes(view[:size])
            del buffer[:size]
            yield piece
        if last:
            break
    if buffer:
        yield bytes(buffer)


# region #### the draft's record in the spool ####


@dataclass
class DraftRecord:
    """Where an attempt is on the draft route, written before the step it names.

    ``creating``: the draft is being created (its id is not known yet: after a crash, drafts carrying
    ``message_id`` are looked for and deleted). ``created``: the draft ``draft`` exists and is being
    filled (after a crash: deleted, since it was never sent). ``sending``: its send was asked for (after
    a crash: sent again, which Graph refuses with 404 if it went, and then Sent Items is looked at).
    """

    step: str
    message_id: str
    since: float
    draft: str = ""
    lookups: int = field(default=0)  # attempts that found the draft gone and the message not in Sent Items

    def dumps(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def loads(cls, raw: bytes) -> DraftRecord:
        data = json.loads(raw)
        return cls(str(data["step"]), str(data["message_id"]), float(data["since"]), str(data.get("draft", "")),
                   int(data.get("lookups", 0)))  # fmt: skip


# endregion

# region #### recipients as Graph sees them ####

_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9\-\u0080-\U0010ffff]{1,63}(?<!-)")


def graph_address_problem(address: str) -> str | None:
    """Why Exchange Online would refuse ``address`` as a recipient (``ErrorInvalidRecipients``), or ``None``.

    Exchange takes an SMTP address whose local part is a dot-atom (no leading, trailing or doubled dot)
    or a quoted string, and whose domain is dot-separated host-name labels: RFC 5321's own rules.
    """
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "not an address (local@domain)"
    if not (local.startswith('"') and local.endswith('"') and len(local) > 1):
        if local.startswith(".") or local.endswith(".") or ".." in local:
            return "a dot at the start or end of the name, or two dots in a row"
        if not all(_ATOM.fullmatch(atom) for atom in local.split(".")):
            return "a character that is not allowed in an address"
    if domain.startswith("[") and domain.endswith("]"):
        return None  # an address literal
    labels = domain.rstrip(".").split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return "the domain is not a host name"
    return None


_NAMED = re.compile(r"Recipient '([^']+)' is not (?:resolved|valid)", re.IGNORECASE)


def named_recipients(message: str) -> list[str]:
    """The recipients an ``ErrorInvalidRecipients`` message names (Exchange: ``Recipient 'x' is not
    resolved``); empty when it names none."""
    return _NAMED.findall(message)


# endregion

__all__ = [
    "FRAGMENT", "SMALL_ATTACHMENT", "CannotSplitError", "DraftRecord", "Part", "Plan", "fragments",
    "graph_address_problem", "named_recipients", "plan",
]  # fmt: skip
