"""A message too big for Graph's ``sendMail`` (4 MB a request), split for the draft route: the parts.

Graph documents one route for a big message: create a draft from the MIME without its big
attachments (``POST /users/{mailbox}/messages``), attach each of them (``POST .../attachments`` under
3 MB, else an upload session whose ``PUT``s carry byte ranges), then send the draft. ``graph.py`` does
the requests; this module decides what goes where, without holding the message more than once:

- ``Plan``: the draft's MIME (the message with its big attachments taken out) and those attachments
  (``Part``), made by ``relay.prepare.graph_split.plan`` (it parses MIME, the prepare stage's trade) and
  handed to the transport by the scheduler (``Planner``).
- ``fragments``: an attachment's bytes decoded from the spooled base64 a fragment at a time (a multiple
  of 320 KiB, under 4 MB, as Graph requires), from any offset, for a resume after a ``429``.
- ``DraftRecord``: what an attempt did with a draft, kept in the spool (``Spool.write_draft``), so a
  crash between the draft's creation and its sending neither loses the message nor sends it twice.
- ``graph_address_problem``: the address rules Graph applies to a recipient, checked at ``RCPT`` for a
  Graph account so that one malformed address is refused at once instead of stopping the message.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

FRAGMENT = 4 * 320 * 1024  # bytes a PUT carries: a multiple of 320 KiB (Graph's rule) under 4 MB; small, for memory
SMALL_ATTACHMENT = 3 * 1024 * 1024 - 16 * 1024  # under this (decoded) one POST .../attachments: Graph says 3 MB;
# its base64 in JSON must stay under the 4 MB a request
_DECODE_STEP = 256 * 1024  # base64 read a quarter MiB at a time


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


# ``prepare.graph_split.plan``: the message -> its Plan, given whether a MIME of a size fits one request
Planner = Callable[[memoryview, Callable[[int], bool]], Plan]


def decoded_size(part: Part) -> int:
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
    "FRAGMENT", "SMALL_ATTACHMENT", "CannotSplitError", "DraftRecord", "Part", "Plan", "Planner", "decoded_size",
    "fragments", "graph_address_problem", "named_recipients",
]  # fmt: skip
