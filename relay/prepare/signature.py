"""Stage 3b: append the user's signature, once, to the main text of a parsed message. Pure.

Input: an ``EmailMessage`` parsed with relay's policy, the signature text (several lines, as the seeds'
eight ``Allekirjoitus`` lines) and the installation's legacy charset. Output: the same message object,
changed in place, plus notes saying what was done. Refuses nothing: a part it cannot read safely is left
as it was and the note says why.

Where the signature goes (the "main text"):

* text/plain or text/html at the top;
* every text part of a multipart/alternative (and the HTML root of a multipart/related inside it);
* the first text part of multipart/mixed (or /related, or any other multipart), descending into a
  nested multipart/alternative or /related.

Attachments (a Content-Disposition of attachment, or any part with a file name) and forwarded messages
(message/rfc822) are never touched. multipart/signed, multipart/encrypted and application/pkcs7-mime are
left untouched: changing one byte would break the signature or is impossible without the key.

Plain text gets the signature after a blank line. HTML gets it escaped, lines joined with ``<br>``, in a
``<div class="relay-signature">`` inserted before ``</body>`` (appended if there is none); characters the
part's charset lacks become character references there, so the HTML's own ``<meta charset>`` can never
disagree with its Content-Type. Plain text is upgraded to UTF-8 when the charset lacks a character.

Once only (a message passing relay twice, e.g. through a second installation or re-sent by the ERP):
the message gets ``X-Relay-Signature: <hash of the signature>``; a message carrying the same hash is
skipped. As a second guard, which survives clients that drop unknown headers, a plain part that already
ends with the signature, or an HTML part whose body already ends with the signature block, is skipped.
A *different* signature (another user, a changed text) is still appended.
"""

from __future__ import annotations

import hashlib
import html
from collections.abc import Iterator
from email.message import Message

from relay.prepare.charset import decode_text_part, encodable, set_text_payload

__all__ = (
    "MARKER_HEADER",
    "PROTECTED_TYPES",
    "add_signature",
    "html_with_signature",
    "marker_value",
    "plain_with_signature",
    "signature_targets",
)

MARKER_HEADER = "X-Relay-Signature"
PROTECTED_TYPES = {
    "multipart/signed": "signed (S/MIME or PGP)",
    "multipart/encrypted": "PGP encrypted",
    "application/pkcs7-mime": "S/MIME signed or encrypted",
    "application/x-pkcs7-mime": "S/MIME signed or encrypted",
}
_TEXT_TYPES = ("text/plain", "text/html")
_BLOCK_OPEN = '<div class="relay-signature">'


def marker_value(signature: str) -> str:
    """Short, stable fingerprint of the signature text for the once-only header."""
    return hashlib.sha256(_unify(signature).strip().encode("utf-8")).hexdigest()[:16]


def _unify(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _newline(text: str) -> str:
    """The text's own line-ending style; CRLF (the wire form) when it has none."""
    return "\n" if "\n" in text and "\r\n" not in text else "\r\n"


def plain_with_signature(text: str, signature: str) -> str:
    """``text`` + blank line + signature, in the text's own line-ending style."""
    newline = _newline(text)
    lines = _unify(signature).strip("\n").split("\n")
    lead = "" if not text or text.endswith(("\n", "\r")) else newline
    return text + lead + newline + newline.join(lines) + newline


def _plain_has_signature(text: str, signature: str) -> bool:
    return _unify(text).rstrip().endswith(_unify(signature).strip())


def signature_html(signature: str, charset: str, newline: str = "\n") -> str:
    """The escaped signature block; characters ``charset`` lacks become character references."""
    lines = _unify(signature).strip("\n").split("\n")
    body = f"<br>{newline}".join(html.escape(line) for line in lines)
    block = f"{_BLOCK_OPEN}{body}</div>{newline}"
    return block.encode(charset, "xmlcharrefreplace").decode(charset)


def html_with_signature(text: str, signature: str, charset: str) -> str:
    """Insert the signature block before the last ``</body>``, or append it (text's line endings)."""
    newline = _newline(text)
    block = signature_html(signature, charset, newline)
    at = text.lower().rfind("</body>")
    if at < 0:
        lead = "" if not text or text.endswith(("\n", "\r")) else newline
        return text + lead + block
    return text[:at] + block + text[at:]


def _html_has_signature(text: str, signature: str, charset: str) -> bool:
    at = text.lower().rfind("</body>")
    head = _unify(text if at < 0 else text[:at])
    return head.rstrip().endswith(signature_html(signature, charset).rstrip())


def _is_attachment(part: Message) -> bool:
    return part.get_content_disposition() == "attachment" or part.get_filename() is not None


def signature_targets(msg: Message, notes: list[str]) -> list[Message]:
    """The parts that make up the main text (see module docstring); notes why when there are none."""
    found = list(_targets(msg, notes, depth=0))
    if not found and not notes:
        notes.append(f"signature not added: no main text part in {msg.get_content_type()}")
    return found


def _targets(part: Message, notes: list[str], depth: int) -> Iterator[Message]:
    ctype = part.get_content_type()
    if ctype in PROTECTED_TYPES:
        notes.append(f"left untouched: {PROTECTED_TYPES[ctype]}")
    elif _is_attachment(part) or depth > 64:
        return
    elif ctype in _TEXT_TYPES:
        yield part
    elif ctype == "multipart/alternative":
        for child in _children(part):
            yield from _targets(child, notes, depth + 1)
    elif ctype == "multipart/related":
        children = _children(part)
        yield from _targets(_related_root(part, children), notes, depth + 1) if children else ()
    elif part.is_multipart() and ctype != "message/rfc822":
        yield from _first_text(_children(part), notes, depth)


def _first_text(children: list[Message], notes: list[str], depth: int) -> Iterator[Message]:
    for child in children:
        ctype = child.get_content_type()
        if ctype in PROTECTED_TYPES:
            notes.append(f"left untouched: {PROTECTED_TYPES[ctype]}")
            return
        if _is_attachment(child) or not (ctype in _TEXT_TYPES or ctype.startswith("multipart/")):
            continue
        found = list(_targets(child, notes, depth + 1))
        if found:
            yield from found
            return


def _children(part: Message) -> list[Message]:
    payload = part.get_payload()
    return [p for p in payload if isinstance(p, Message)] if isinstance(payload, list) else []


def _related_root(part: Message, children: list[Message]) -> Message:
    start = part.get_param("start")
    if isinstance(start, str):
        for child in children:
            if child.get("Content-ID", "").strip() == start.strip():
                return child
    return children[0]


def add_signature(msg: Message, signature: str, *, default_charset: str) -> list[str]:
    """Append ``signature`` to the main text of ``msg`` in place; return notes for the log."""
    notes: list[str] = []
    if not signature.strip():
        return notes
    marker = marker_value(signature)
    if any(str(v).strip() == marker for v in msg.get_all(MARKER_HEADER, [])):
        return ["signature already present (X-Relay-Signature), not added again"]
    signed = [note for part in signature_targets(msg, notes) if (note := _sign_part(part, signature, default_charset))]
    notes += signed
    if any(n.startswith("signature appended") for n in signed):
        msg[MARKER_HEADER] = marker
    return notes


def _sign_part(part: Message, signature: str, default_charset: str) -> str:
    ctype = part.get_content_type()
    decoded = decode_text_part(part, default_charset)
    if decoded is None:
        return f"signature not added to {ctype}: its charset or transfer encoding is broken"
    text, charset = decoded
    is_html = ctype == "text/html"
    if (_html_has_signature(text, signature, charset) if is_html else _plain_has_signature(text, signature)):
        return f"signature already present in {ctype}, not added again"
    new_charset = charset if is_html or encodable(signature, charset) else "utf-8"
    new_text = html_with_signature(text, signature, charset) if is_html else plain_with_signature(text, signature)
    set_text_payload(part, new_text, new_charset, part.get("Content-Transfer-Encoding"))
    upgraded = f" (charset {charset} -> {new_charset})" if new_charset != charset else ""
    return f"signature appended to {ctype}{upgraded}"
