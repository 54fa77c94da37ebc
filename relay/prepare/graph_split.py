"""Graph's draft route, the split: which big attachments leave the draft's MIME, and what each one is.

The draft's MIME is the message with its big attachments taken out, found the way ``skeleton.py`` finds
them for the rewrite (well-formed multiparts, non-text ``base64`` parts of plain lines); only the small
skeleton is parsed. Taken out are the biggest parts, until the rest fits one request; each keeps its
name (RFC 2231 and RFC 2047 names decoded), content type, and for an inline image ``isInline`` and its
``contentId``, so ``cid:`` references in the HTML still resolve. The attachments stay slices of the
spooled message (``Part.encoded``): ``transports.graph`` decodes them a range at a time as it uploads.
Pure: the caller maps the spool file and hands the view in (the scheduler passes ``plan`` to the transport).
"""

from __future__ import annotations

import io
import mimetypes
import re
from collections.abc import Callable
from email.generator import BytesGenerator
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser
from email.policy import compat32

from relay.prepare.skeleton import _TOKEN, skeleton
from relay.transports.graph_large import CannotSplitError, Part, Plan, decoded_size

_HEADERS = BytesHeaderParser(policy=compat32)
_TOKEN_FOUND = re.compile(rb"RelayStandIn(\d{6})ForAnAttachmentBodyKeptAsReceived")


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
    result.size = decoded_size(result)
    return result


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


__all__ = ["plan"]
