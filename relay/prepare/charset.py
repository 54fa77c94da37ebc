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
* 8-bit MIME parameters (a file name): the policy writes them as RFC 2231, which Outlook up to 2007
  does not read, so ``encode_parameters`` adds the Content-Type ``name`` in the form it does read.

Charset choice for unlabelled 8-bit text: if the bytes are valid UTF-8 we take UTF-8. Text in a legacy
8-bit charset practically never forms valid UTF-8 multi-byte sequences by accident (it would need e.g.
``Ã`` followed by a C1-range byte), while genuine UTF-8 decoded as Windows-1252 is mojibake for sure.
Otherwise the configured default (``windows-1252``), and Latin-1 for the five bytes Windows-1252 leaves
undefined; text that is mostly UTF-8 with a few stray legacy bytes is read as both (``_mixed``). For the
same reason a ``iso-8859-1`` or ``windows-1252`` label on bytes that are valid UTF-8 with two or more
multi-byte sequences is taken as a label the program wrote without honouring (a database moved to UTF-8 under a
fixed header): read as UTF-8.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import io
import itertools
import re
from email.header import Header
from email.headerregistry import BaseHeader, ParameterizedMIMEHeader
from email.message import Message
from email.utils import encode_rfc2231, quote
from typing import NamedTuple

from relay.prepare.mailpolicy import POLICY

__all__ = (
    "PartText",
    "decode_legacy",
    "decode_text_part",
    "decodes_as",
    "encodable",
    "encode_parameters",
    "has_long_lines",
    "header_block",
    "is_charset",
    "normalize_line_endings",
    "set_text_payload",
    "utf8_under_latin_label",
)

_WINDOW = 64 * 1024  # a split list costs ~2.5x its window (an object per line): keep it small
MAX_LINE = 998  # RFC 5322 2.1.1, octets without CRLF
_HEADER_NAME = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")
_ANY_EOL = re.compile(rb"\r\n|\r|\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
_UNFOLD = re.compile(r"\r?\n(?=[ \t])")
_ASCII_NAMES = frozenset({"us-ascii", "ascii", "ansi_x3.4-1968", "646"})


_EOL_WINDOW = 1 << 20


def normalize_line_endings(data: bytes) -> bytes:
    """Bare LF and bare CR become CRLF (SMTP forbids both); untouched when already clean (fast path).

    A window at a time: ``re.sub`` over a whole 30 MB message of bare-LF lines held a piece per line
    besides its result (3.5 times the message); a window that would end between a CR and its LF takes the LF
    along, so a CRLF is never cut in two. The result is written into a buffer that becomes the bytes uncopied.
    """
    # as many CR as LF and no CR without its LF: every line end is a CRLF (counting the two-octet CRLF
    # itself is three times slower than counting one octet: 0.86 against 0.3 ms per MiB)
    if data.count(b"\n") == data.count(b"\r") and _BARE_CR.search(data) is None:
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
        if _long_line_in(window, cut, limit):
            return True
        start += cut + 2
    return False


def _long_line_in(window: bytes, end: int, limit: int) -> bool:
    """Whether ``window[:end]`` holds a line over ``limit`` octets (lines end with CRLF).

    From each line start it jumps to the last CRLF within reach (``limit`` + 2 octets): every line before
    that one is short, and none at all means the line at hand is long. About one step per kilobyte, where
    splitting made an object per line (1.5 -> 0.3 ms per MiB of 80-octet lines).
    """
    at = 0
    while end - at > limit:
        crlf = window.rfind(b"\r\n", at, at + limit + 2)
        if crlf < 0:
            return True
        at = crlf + 2
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
    """Bytes of unknown charset -> (text, charset used): ASCII, else UTF-8 if valid, else ``fallback``;
    UTF-8 with a few stray legacy bytes is read as both (see ``_mixed``)."""
    if data.isascii():
        return data.decode("ascii"), "us-ascii"
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    mixed = _mixed(data, fallback)
    if mixed is not None:
        return mixed, "utf-8"
    try:
        return data.decode(fallback), fallback
    except (UnicodeDecodeError, LookupError):
        return data.decode("latin-1"), "iso-8859-1"


_STRAY = re.compile("[\udc80-\udcff]+")  # bytes that were no UTF-8 (surrogate escapes)
_UTF8_CHAR = re.compile("[^\x00-\x7f\udc80-\udcff]")  # a character that came as a UTF-8 sequence


def _mixed(data: bytes, fallback: str) -> str | None:
    """UTF-8 text with stray bytes of the legacy charset, as both: ``None`` if it is not that.

    An ERP that fills a UTF-8 template with fields from an old Latin-1 database writes "Hyvää päivää,
    Mäkelä" with the last two ä as single bytes. Read wholly as the legacy charset, every UTF-8 ä of the
    rest becomes "Ã¤": the repair would damage what a reader showed right. When the characters that came
    as valid UTF-8 sequences are at least as many as the stray bytes, those are UTF-8 and only the strays
    are the legacy charset; fewer, and the valid sequences are the accident (Latin-1 "Ö–" is one).
    """
    text = data.decode("utf-8", "surrogateescape")
    if _UTF8_CHAR.search(text) is None:
        return None
    strays = sum(len(run) for run in _STRAY.findall(text))
    if len(_UTF8_CHAR.findall(text)) < strays:
        return None
    return _STRAY.sub(lambda run: _legacy(run.group().encode("utf-8", "surrogateescape"), fallback), text)


def _legacy(data: bytes, fallback: str) -> str:
    try:
        return data.decode(fallback)
    except (UnicodeDecodeError, LookupError):
        return data.decode("latin-1")


def encodable(text: str, charset: str) -> bool:
    """Can ``charset`` represent every character of ``text``?"""
    try:
        text.encode(charset)
    except (UnicodeError, LookupError):
        return False
    return True


@functools.lru_cache(maxsize=64)
def is_charset(name: str) -> bool:
    """Does a text codec know ``name``? (Empty bytes decode under any name, known or not; and base64 or
    zlib are codecs but no charset.)"""
    try:
        return isinstance(codecs.lookup(name).decode(b"")[0], str)
    except Exception:  # noqa: BLE001  (LookupError; zlib.error, TypeError... from codecs that are no charset)
        return False


def decodes_as(data: bytes, charset: str) -> bool:
    """Do ``data`` decode as ``charset``? False for a label no text codec knows. Decoded a window at a
    time, so a big text part is never held as a ``str`` as well."""
    if not is_charset(charset):
        return False
    decoder = codecs.getincrementaldecoder(charset)()
    try:
        for start in range(0, len(data), _WINDOW):
            decoder.decode(data[start : start + _WINDOW])
        decoder.decode(b"", final=True)
    except UnicodeError:
        return False
    return True


_LATIN_NAMES = frozenset({"iso-8859-1", "iso8859-1", "latin1", "latin-1", "l1", "iso-8859-15", "latin-9",
                          "windows-1252", "cp1252"})  # fmt: skip


def utf8_under_latin_label(data: bytes, declared: str) -> bool:
    """Valid UTF-8 with two or more multi-byte sequences under a Latin-1 or Windows-1252 label (see the
    module's docstring): those labels decode any byte, so only this tells the label is wrong. One is not
    enough: Windows-1252 "Ä€" is the valid UTF-8 "Ā", and a short text may be nothing but that."""
    if declared not in _LATIN_NAMES or data.isascii():
        return False
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return next(itertools.islice(_UTF8_CHAR.finditer(text), 1, None), None) is not None


class PartText(NamedTuple):
    """A text part read: its text, the charset to write it back in, and why that is not its label."""

    text: str
    charset: str
    relabelled: str | None = None  # "labelled utf-8 but not valid utf-8", "8-bit text without a charset"


def decode_text_part(part: Message, default_charset: str) -> PartText | None:
    """A leaf text part -> its text and the charset to write it back in, or None if it cannot be read.

    Legacy programs write a charset label they do not honour: no label or ``us-ascii`` on 8-bit bytes,
    ``utf-8`` on Latin-1 bytes, a label no codec knows. Bytes the label cannot decode are read the way
    unlabelled ones are (``decode_legacy``: UTF-8 if valid, else the installation's legacy charset), and
    ``relabelled`` says why. Only a transfer encoding that does not decode (broken base64) gives None:
    the caller leaves such a part exactly as it is rather than guess and damage it.
    """
    defects_before = len(part.defects)
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes) or len(part.defects) != defects_before:
        del part.defects[defects_before:]  # reading must not leave marks on the message
        return None
    declared = (part.get_content_charset() or "").lower()
    if utf8_under_latin_label(raw, declared):
        return PartText(raw.decode("utf-8"), "utf-8", f"labelled {declared} but UTF-8")
    if declared and declared not in _ASCII_NAMES:
        if not is_charset(declared):
            return PartText(*decode_legacy(raw, default_charset), f"unknown charset {declared}")
        try:
            return PartText(raw.decode(declared), declared)
        except UnicodeError:
            why = f"labelled {declared} but not valid {declared}"
            return PartText(*decode_legacy(raw, default_charset), why)
    text, guessed = decode_legacy(raw, default_charset)
    if guessed == "us-ascii":
        return PartText(text, declared or guessed)
    return PartText(text, guessed, "8-bit text without a charset")


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


def encode_parameters(content_type: str | None, disposition: str | None) -> dict[str, str]:
    """A part's Content-Type and Content-Disposition (decoded text, ``None`` if absent) -> the values
    to write instead, by field name, when a parameter in them is not ASCII (an ERP's
    ``filename="lasku_9001_\xe4.pdf"``); empty when both are ASCII.

    The policy writes Content-Disposition's parameters as RFC 2231 (``filename*=utf-8''lasku_9001_%C3%A4.pdf``,
    in continuations when long), which current readers take. Outlook up to 2007 reads the file name
    only from Content-Type's ``name``, and only as RFC 2047 encoded words inside the quotes: RFC 2047
    section 5 forbids that, but Outlook and Thunderbird write it and every reader takes it. So ``name``
    is written that way, added when only the disposition had the 8-bit file name; Content-Type's other
    parameters stay as they were (RFC 2231 for another non-ASCII one).
    """
    if (content_type or "").isascii() and (disposition or "").isascii():
        return {}
    new: dict[str, str] = {}
    filename: str | None = None
    if disposition is not None:
        header = _parameterized("Content-Disposition", disposition)
        filename = header.params.get("filename") if header is not None else None
        if not disposition.isascii():
            new["Content-Disposition"] = _policy_header("Content-Disposition", disposition)
    if content_type is not None:
        header = _parameterized("Content-Type", content_type)
        if header is None:  # not read whole: the policy writes what it could read
            if not content_type.isascii():
                new["Content-Type"] = _policy_header("Content-Type", content_type)
            return new
        name = header.params.get("name") or (filename if filename and not filename.isascii() else None)
        if not content_type.isascii() or (name is not None and not name.isascii()):
            new["Content-Type"] = _content_type(header, name)
    return new


def _policy_header(name: str, value: str) -> str:
    """The field as a header object: the policy writes its parameters, RFC 2231 where not ASCII."""
    header: str = POLICY.header_store_parse(name, _UNFOLD.sub("", value))[1]
    return header


def _parameterized(name: str, value: str) -> ParameterizedMIMEHeader | None:
    """The field as the stdlib reads it; ``None`` when it could not read all of it (defects)."""
    header = POLICY.header_factory(name, _UNFOLD.sub("", value))
    if isinstance(header, BaseHeader) and header.defects:
        return None
    return header if isinstance(header, ParameterizedMIMEHeader) else None


def _content_type(header: ParameterizedMIMEHeader, name: str | None) -> str:
    """The Content-Type source text, one parameter per line; ``name`` as Outlook reads it."""
    params = [str(getattr(header, "content_type", "application/octet-stream"))]
    params += [_parameter(key, value) for key, value in header.params.items() if key != "name"]
    if name is not None:
        value = quote(name) if name.isascii() else Header(name, "utf-8").encode(linesep="\r\n")
        params.append(f'name="{value}"')
    return ";\r\n ".join(params)


def _parameter(key: str, value: str) -> str:
    if value.isascii():
        return f'{key}="{quote(value)}"'
    return f"{key}*={encode_rfc2231(value, 'utf-8')}"
