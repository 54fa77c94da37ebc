"""Big attachments stand aside while the rewrite stage parses and re-serialises a message.

Adding a signature (or repairing an 8-bit text part) needs the ``email`` package's parse tree, and the
package holds a message several times over while it parses and serialises it: a 25 MB invoice PDF with a
signature cost about ten times its size. The attachment itself is never changed: a base64 part with
short ASCII lines is written out exactly as it came in. So before the parse, each such big part's body is
replaced by a short stand-in token (``skeleton``); the rewrite works on the small skeleton; afterwards the
tokens in its output are replaced by the original bodies again (``restore``), as slices of the message
that was received, not copies. ``Joined`` then spools the pieces one after the other.

Only what the parser would read the same way and the rewrite leaves alone is stood in: non-text parts
of a multipart whose delimiters are well-formed (RFC 2046 5.1.1: ``--boundary`` lines, a closing
``--boundary--``), with a ``base64`` body of short ASCII lines; the token must come back whole, between
the part's blank line and the next delimiter. Anything else, or a token that does not come back exactly once, means the message is
rewritten whole, as before.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from relay.prepare.charset import has_long_lines

STAND_IN_MIN = 64 * 1024  # smaller bodies are parsed along: a stand-in would save little
MAX_DEPTH = 5
_TOKEN = b"RelayStandIn%06dForAnAttachmentBodyKeptAsReceived"  # base64 alphabet only: a valid payload line
_BASE64_LINES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"
_HEADERS = BytesHeaderParser(policy=compat32)
_REWRITTEN = ("text", "message", "multipart")  # the rewrite may change these (signature, 8-bit repair)


@dataclass
class Skeleton:
    """The message body with big attachment bodies replaced by tokens, and those bodies."""

    body: bytes
    originals: list[memoryview]


def skeleton(content_type: Message, body: memoryview, *, taken_out: bool = False) -> Skeleton | None:
    """``None`` when nothing can stand aside (not a well-formed multipart, no big base64 part).

    ``taken_out``: the parts stood in will be sent apart, decoded (Graph's draft route), not written back
    by the serialiser: a body that ends with a line end (what the ``email`` package writes) may stand in too.
    """
    originals: list[memoryview] = []
    pieces: list[bytes | memoryview] = []
    if not _stand_in(content_type, body, 0, originals, pieces, taken_out) or not originals:
        return None
    return Skeleton(b"".join(pieces), originals)


def restore(rendered: bytes, originals: list[memoryview]) -> list[bytes | memoryview] | None:
    """The rewrite's output with every token replaced by its body; ``None`` unless each token is there
    exactly once, in order (then the rewrite touched a stood-in part, and the message is redone whole)."""
    pieces: list[bytes | memoryview] = []
    at = 0
    for n, original in enumerate(originals):
        token = _TOKEN % n
        found = rendered.find(token, at)
        whole = rendered[found - 4 : found] == b"\r\n\r\n" and rendered[found + len(token) :].startswith(b"\r\n--")
        if found < 0 or not whole or rendered.find(token, found + len(token)) >= 0:
            return None  # gone, re-encoded into a longer body, or twice: the part was not left alone
        pieces += [rendered[at:found], original]
        at = found + len(token)
    pieces.append(rendered[at:])
    return pieces


def _stand_in(
    content_type: Message, body: memoryview, depth: int, originals: list[memoryview], pieces: list[bytes | memoryview],
    taken_out: bool = False,
) -> bool:
    """Append ``body`` to ``pieces`` with big parts stood in; ``False`` if its structure is not plain."""
    boundary = content_type.get_boundary() if content_type.get_content_maintype() == "multipart" else None
    if boundary is None or depth >= MAX_DEPTH:
        pieces.append(body)
        return True
    delimiters = list(_delimiters(body, boundary.encode("latin-1", "replace")))
    if len(delimiters) < 2 or not delimiters[-1][2]:
        return False  # no parts, or no closing delimiter: leave it to the parser
    pieces.append(body[: delimiters[0][1]])
    for (_, start, _), (end, following, _) in itertools.pairwise(delimiters):
        part = body[start:end]
        if not _part(part, depth, originals, pieces, taken_out):
            return False
        pieces.append(body[end:following])
    pieces.append(body[delimiters[-1][1] :])
    return True


def _part(
    part: memoryview, depth: int, originals: list[memoryview], pieces: list[bytes | memoryview], taken_out: bool
) -> bool:
    split = bytes(part[:65536]).find(b"\r\n\r\n")
    if split < 0 or bytes(part[:2]) == b"\r\n":  # no header block (or none that ends): text/plain, parsed along
        pieces.append(part)
        return True
    head, body = part[: split + 4], part[split + 4 :]
    headers = _HEADERS.parsebytes(bytes(head))
    if headers.get_content_maintype() == "multipart":
        pieces.append(head)
        return _stand_in(headers, body, depth + 1, originals, pieces, taken_out)
    if (len(body) >= STAND_IN_MIN and headers.get_content_maintype() not in _REWRITTEN
            and _plain_base64(headers, body, taken_out)):  # fmt: skip
        pieces += [head, _TOKEN % len(originals)]
        originals.append(body)
    else:
        pieces.append(part)
    return True


def _plain_base64(headers: Message, body: memoryview, taken_out: bool = False) -> bool:
    """A base64 body the serialiser writes out unchanged: its alphabet, CRLF, no line over 998."""
    if str(headers.get("Content-Transfer-Encoding", "")).strip().lower() != "base64":
        return False
    step = 1 << 20
    if any(bytes(body[at : at + step]).translate(None, _BASE64_LINES) for at in range(0, len(body), step)):
        return False  # a byte outside the alphabet (a bare CR or LF, 8-bit, NUL)
    return (taken_out or bytes(body[-2:]) != b"\r\n") and not has_long_lines(body)


def _delimiters(body: memoryview, boundary: bytes) -> list[tuple[int, int, bool]]:
    """(where the delimiter starts, including the CRLF before it; where its line ends; closing?)."""
    # a literal first: a fast scan; a nested multipart's closing delimiter ends its body (the CRLF after
    # it belongs to the enclosing multipart's next delimiter)
    line = re.compile(rb"--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r\n|\Z)")
    found = []
    for match in line.finditer(body):
        start = match.start()
        if start >= 2 and bytes(body[start - 2 : start]) == b"\r\n":  # at the start of a line
            start -= 2
        elif start != 0:
            continue
        found.append((start, match.end(), match.group(1) is not None))
        if match.group(1) is not None:
            break
    return found


__all__ = ["STAND_IN_MIN", "Skeleton", "restore", "skeleton"]
