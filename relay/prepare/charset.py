"""Legacy 8-bit repair: raw bytes -> CRLF lines, decoded header fields, and text parts re-encoded.

Input: the bytes a legacy ERP program sent (bare LF or CR possible, raw Latin-1/Windows-1252 or UTF-8 in
headers and bodies, no MIME headers at all). Output: CRLF-normalised bytes, the header block as decoded
source fields (name, value) ready for ``email.policy`` objects, and helpers that read and write the text
of one MIME part without changing anything the recipient would see. Nothing here refuses mail: every
input decodes to *something* (Latin-1 as the last resort can decode any byte).

Why some byte-level work is done here rather than by the ``email`` package:

* Line endings: the parser accepts any mix, but the generator only re-normalises parts it re-serialises.
  Headers-only rewrites keep the body bytes as they are, so normalising them is ours to do.
* 8-bit header bytes: RFC 5322 forbids them, so the parser can only keep them as surrogate escapes and
  the generator writes them back raw (or as ``unknown-8bit``). Only we know the installation's legacy
  charset, so we decode each header field ourselves and let the policy write RFC 2047 words.

Charset choice for unlabelled 8-bit text: if the bytes are valid UTF-8 we take UTF-8. Text in a legacy
8-bit charset practically never forms valid UTF-8 multi-byte sequences by accident (it would need e.g.
``Ã`` followed by a C1-range byte), while genuine UTF-8 decoded as Windows-1252 is mojibake for sure.
Otherwise the configured default (``windows-1252``), and Latin-1 for the five bytes Windows-1252 leaves
undefined.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from email.message import Message

__all__ = (
    "decode_legacy",
    "decode_text_part",
    "encodable",
    "has_long_lines",
    "header_block",
    "normalize_line_endings",
    "set_text_payload",
)

_WINDOW = 64 * 1024  # a split list costs ~2.5x its window (an object per line): keep it small
MAX_LINE = 998  # RFC 5322 2.1.1, octets without CRLF
_HEADER_NAME = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")
_ANY_EOL = re.compile(rb"\r\n|\r|\n")
_ASCII_NAMES = frozenset({"us-ascii", "ascii", "ansi_x3.4-1968", "646"})


_EOL_WINDOW = 1 << 20


def normalize_line_endings(data: bytes) -> bytes:
    """Bare LF and bare CR become CRLF (SMTP forbids both); untouched when already clean (fast path).

    A window at a time: ``re.sub`` over a whole 30 MB message of bare-LF lines held a piece per line
    besides its result (3.5 times the message); a window that would end between a CR and its LF takes the LF
    along, so a CRLF is never cut in two. The result is written into a buffer that becomes the bytes uncopied.
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\n") == crlf and data.count(b"\r") == crlf:
        return data
    if len(data) <= _EOL_WINDOW:
        return _ANY_EOL.sub(b"\r\n", data)
    out = io.BytesIO()
    at = 0
    while at < len(data):
        end = at + _EOL_WINDOW
        if data[end - 1 : end + 1] == b"\r\n":
            end += 1
        out.write(_ANY_EOL.sub(b"\r\n", data[at:end]))
        at = end
    return out.getvalue()


def has_long_lines(data: bytes | memoryview, limit: int = MAX_LINE) -> bool:
    """Any line longer than ``limit`` octets?

    ``split`` is C-fast (a regex scan is 100x slower), but splitting a whole 25 MB body builds a list
    as big as the body; it is split a window of ``_WINDOW`` octets at a time instead.
    """
    size = len(data)
    if size <= limit:
        return False
    start = 0
    while start < size:
        window = bytes(data[start : start + _WINDOW])
        cut = len(window) if start + len(window) >= size else window.rfind(b"\r\n")
        if cut < 0:
            return True  # a whole window without a line end: longer than any limit we use
        if max(map(len, window[:cut].split(b"\r\n"))) > limit:
            return True
        start += cut + 2
    return False


def header_block(data: bytes) -> tuple[list[list[bytes]], int]:
    """CRLF bytes -> (header fields as lists of physical lines incl. CRLF, offset where the body starts).

    The header block ends at the first empty line, or at the first line that is neither a header nor a
    continuation (the email parser does the same and records a MissingHeaderBodySeparatorDefect); that
    line then starts the body. A leading mbox ``From `` line is dropped. Returning an offset lets the
    caller keep the body where it is instead of copying it.
    """
    fields: list[list[bytes]] = []
    pos = 0
    if data.startswith(b"From "):
        pos = _next_line(data, 0)
    while pos < len(data):
        end = _next_line(data, pos)
        line = data[pos:end]
        if line in (b"\r\n", b""):
            return fields, end
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        elif _HEADER_NAME.match(line):
            fields.append([line])
        else:
            return fields, pos
        pos = end
    return fields, len(data)


def _next_line(data: bytes, pos: int) -> int:
    end = data.find(b"\r\n", pos)
    return len(data) if end < 0 else end + 2


def decode_legacy(data: bytes, fallback: str) -> tuple[str, str]:
    """Bytes of unknown charset -> (text, charset used): ASCII, else UTF-8 if valid, else ``fallback``."""
    if data.isascii():
        return data.decode("ascii"), "us-ascii"
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode(fallback), fallback
    except (UnicodeDecodeError, LookupError):
        return data.decode("latin-1"), "iso-8859-1"


def encodable(text: str, charset: str) -> bool:
    """Can ``charset`` represent every character of ``text``?"""
    try:
        text.encode(charset)
    except (UnicodeError, LookupError):
        return False
    return True


def decode_text_part(part: Message, default_charset: str) -> tuple[str, str] | None:
    """A leaf text part -> (decoded text, charset to write it back in), or None if it cannot be read.

    A missing or ``us-ascii`` label on 8-bit bytes is what legacy programs send: the charset is guessed
    (``decode_legacy``). A wrong label (bytes that do not decode) or a broken base64 body gives None: the
    caller leaves such a part exactly as it is rather than guess and damage it.
    """
    defects_before = len(part.defects)
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes) or len(part.defects) != defects_before:
        del part.defects[defects_before:]  # reading must not leave marks on the message
        return None
    declared = (part.get_content_charset() or "").lower()
    if declared and declared not in _ASCII_NAMES:
        try:
            return raw.decode(declared), declared
        except (UnicodeError, LookupError):
            return None
    text, guessed = decode_legacy(raw, default_charset)
    return text, (declared or guessed) if guessed == "us-ascii" else guessed


def set_text_payload(part: Message, text: str, charset: str, cte: str | None) -> str:
    """Write ``text`` into ``part`` in ``charset``, keeping the transfer encoding when it still fits.

    Returns the transfer encoding used. 7bit/8bit stay when the bytes allow it (ASCII, lines <= 998);
    otherwise quoted-printable, which keeps text readable in the source and is 7-bit safe everywhere.
    base64 and quoted-printable are kept as they were.
    """
    data = text.encode(charset)
    chosen = _choose_cte(data, (cte or "7bit").lower())
    if chosen == "base64":
        payload = base64.encodebytes(data).decode("ascii")
    elif chosen == "quoted-printable":
        payload = binascii.b2a_qp(data, istext=True).decode("ascii")
    else:
        payload = data.decode("ascii", "surrogateescape")  # BytesGenerator writes surrogates back as bytes
    part.set_payload(payload)
    _set_header(part, "Content-Transfer-Encoding", chosen)
    if part.get("Content-Type") is None:
        _set_header(part, "Content-Type", "text/plain")
    part.set_param("charset", charset, replace=True)
    return chosen


def _choose_cte(data: bytes, cte: str) -> str:
    if cte in ("base64", "quoted-printable"):
        return cte
    if has_long_lines(normalize_line_endings(data)):
        return "quoted-printable"
    if data.isascii():
        return "7bit"
    return "8bit" if cte in ("8bit", "binary") else "quoted-printable"


def _set_header(part: Message, name: str, value: str) -> None:
    if part.get(name) is None:
        part[name] = value
    else:
        part.replace_header(name, value)
