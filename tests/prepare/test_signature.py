"""Signature placement (issue 3, rule 3): once, on the main text, MIME-correct, everything else intact."""

from __future__ import annotations

import base64
import quopri
from email import message_from_bytes
from email.message import EmailMessage, Message
from email.policy import default
from typing import Any

import pytest
import yaml

from relay.config.load import parse_config
from relay.envelope import Outgoing, Submission
from relay.prepare.rewrite import rewrite
from relay.prepare.settings import resolve
from relay.prepare.signature import html_with_signature, plain_with_signature

SIG = "Ystävällisin terveisin\nMatti Meikäläinen\nFirma Oy\nPuh. 040 123 4567"
ASCII_SIG = "Best regards\nMatti <Firma & Co>"


def sign(content: bytes, signature: str = SIG, **company: Any) -> Outgoing:
    data = {
        "upstreams": {"main": {"host": "smtp.example.com"}},
        "company": {"upstream": "main", "from_address": "erp@firma.fi", **company},
        "users": {"matti": {"addresses": ["matti@firma.fi"], "signature": signature}},
    }
    config = parse_config(yaml.safe_dump(data, allow_unicode=True))
    settings = resolve(config, "matti", "test")
    [out] = rewrite(Submission("matti@firma.fi", ("a@x.fi",), content, "127.0.0.1"), settings, config)
    return out


def parse(data: bytes) -> EmailMessage:
    msg = message_from_bytes(data, policy=default)
    assert isinstance(msg, EmailMessage)
    return msg


def leaves(msg: Message) -> list[Message]:
    return [p for p in msg.walk() if not p.is_multipart()]


def text_of(part: Message) -> str:
    raw = part.get_payload(decode=True)
    assert isinstance(raw, bytes)
    return raw.decode(part.get_content_charset() or "us-ascii")


def plain(body: str, charset: str = "utf-8", cte: str = "8bit") -> str:
    encoded = body.encode(charset)
    if cte == "base64":
        payload = base64.encodebytes(encoded).decode().replace("\n", "\r\n")
    elif cte == "quoted-printable":
        payload = quopri.encodestring(encoded).decode().replace("\r\n", "\n").replace("\n", "\r\n")
    else:
        payload = encoded.decode(charset)
    return f'Content-Type: text/plain; charset="{charset}"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n{payload}'


def message(*part_lines: str, ctype: str = "multipart/mixed") -> bytes:
    body = "".join(f"--XYZ\r\n{p}\r\n" for p in part_lines) + "--XYZ--\r\n"
    head = f'From: matti@firma.fi\r\nMIME-Version: 1.0\r\nContent-Type: {ctype}; boundary="XYZ"\r\n\r\n'
    return (head + body).encode("utf-8", "surrogateescape")


PDF = "Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK/////w=="
HTML = 'Content-Type: text/html; charset="utf-8"\r\n\r\n<html><body><p>Hei</p></body></html>'


class TestPlacement:
    @pytest.mark.parametrize(
        ("charset", "cte", "body"),
        [
            ("us-ascii", "7bit", "Hello\r\n"),
            ("utf-8", "8bit", "Hyvää päivää\r\n"),
            ("iso-8859-1", "quoted-printable", "Hyvää päivää\r\n"),
            ("windows-1252", "base64", "Hyvää päivää €\r\n"),
            ("utf-8", "base64", "Ääkköset\r\nkaksi riviä"),
        ],
    )
    def test_text_plain_any_encoding(self, charset: str, cte: str, body: str) -> None:
        """The decoded text is the original plus the signature, in every transfer encoding."""
        content = f"From: matti@firma.fi\r\nMIME-Version: 1.0\r\n{plain(body, charset, cte)}".encode()
        out = sign(content)
        msg = parse(out.content)

        assert plain_with_signature(body, SIG) == text_of(msg)
        assert "signature appended to text/plain" in out.notes[-1] or any(n.startswith("signature appended") for n in out.notes)

    def test_charset_kept_when_it_has_the_characters(self) -> None:
        out = sign(f"MIME-Version: 1.0\r\n{plain('Hei', 'iso-8859-1', 'quoted-printable')}".encode())

        assert parse(out.content).get_content_charset() == "iso-8859-1"

    def test_charset_upgraded_to_utf8_when_needed(self) -> None:
        """us-ascii cannot carry ä: the part becomes UTF-8 and the log says so."""
        out = sign(f"MIME-Version: 1.0\r\n{plain('Hello', 'us-ascii', '7bit')}".encode())

        assert parse(out.content).get_content_charset() == "utf-8"
        assert any("us-ascii -> utf-8" in n for n in out.notes)

    def test_html_escaped_before_body_end(self) -> None:
        out = sign(message(HTML, ctype="multipart/mixed"), signature=ASCII_SIG)
        html = text_of(leaves(parse(out.content))[0])

        assert "Matti &lt;Firma &amp; Co&gt;</div>\r\n</body></html>" in html
        assert "Best regards<br>\r\n" in html

    def test_html_without_body_tag_gets_it_appended(self) -> None:
        result = html_with_signature("<p>Hei</p>", "Matti", "utf-8")

        assert result.startswith("<p>Hei</p>\r\n<div") and result.endswith("Matti</div>\r\n")

    def test_html_non_ascii_becomes_character_references_in_legacy_charset(self) -> None:
        """The HTML keeps its charset (its <meta> must keep matching); ä becomes &#228;."""
        html = 'Content-Type: text/html; charset="us-ascii"\r\n\r\n<html><body>Hi</body></html>'
        part = leaves(parse(sign(message(html)).content))[0]

        assert part.get_content_charset() == "us-ascii"
        assert "Yst&#228;v&#228;llisin" in text_of(part)

    def test_alternative_gets_both(self) -> None:
        out = sign(message(plain("Hei\r\n"), HTML, ctype="multipart/alternative"))
        texts = [text_of(p) for p in leaves(parse(out.content))]

        assert texts[0].endswith("Puh. 040 123 4567\r\n")
        assert "Puh. 040 123 4567</div>" in texts[1]

    def test_mixed_first_text_only_and_attachments_identical(self) -> None:
        second_text = plain("second text\r\n")
        out = sign(message(plain("Hei\r\n"), PDF, second_text))
        parts = leaves(parse(out.content))

        assert "Matti Meikäläinen" in text_of(parts[0])
        assert base64.b64decode("JVBERi0xLjQK/////w==") == parts[1].get_payload(decode=True)
        assert text_of(parts[2]).strip() == "second text"

    def test_mixed_with_nested_alternative_and_related(self) -> None:
        related = (
            'Content-Type: multipart/related; boundary="REL"\r\n\r\n--REL\r\n' + HTML + "\r\n--REL\r\n"
            "Content-Type: image/png\r\nContent-ID: <logo>\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--REL--"
        )
        alternative = (
            'Content-Type: multipart/alternative; boundary="ALT"\r\n\r\n--ALT\r\n'
            + plain("Hei\r\n") + "\r\n--ALT\r\n" + related + "\r\n--ALT--"
        )
        out = sign(message(alternative, PDF))
        parts = leaves(parse(out.content))

        assert ["Matti" in text_of(p) for p in parts[:2]] + [False, False] == [True, True, False, False]
        assert base64.b64decode("iVBORw0KGgo=") == parts[2].get_payload(decode=True)
        assert len(parts) == 4

    def test_text_attachment_is_not_the_main_text(self) -> None:
        csv = 'Content-Type: text/plain; name="rivit.csv"\r\nContent-Disposition: attachment; filename="rivit.csv"\r\n\r\na;b;c'
        out = sign(message(csv, plain("Hei\r\n")))
        parts = leaves(parse(out.content))

        assert text_of(parts[0]) == "a;b;c"
        assert "Matti" in text_of(parts[1])

    def test_inline_image_first_then_text(self) -> None:
        image = "Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo="
        parts = leaves(parse(sign(message(image, plain("Hei\r\n"))).content))

        assert "Matti" in text_of(parts[1])

    def test_legacy_message_without_mime(self) -> None:
        """The seeds' plain 8-bit message: repaired and signed in one go."""
        out = sign("Subject: Lasku\r\n\r\nHyvää päivää\r\n".encode("cp1252"))
        msg = parse(out.content)

        assert plain_with_signature("Hyvää päivää\r\n", SIG) == text_of(msg)
        assert msg.get_content_charset() == "windows-1252"


class TestUntouched:
    @pytest.mark.parametrize(
        ("ctype", "note"),
        [
            ('multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256', "signed"),
            ('multipart/encrypted; protocol="application/pgp-encrypted"', "encrypted"),
        ],
    )
    def test_signed_and_encrypted_multipart(self, ctype: str, note: str) -> None:
        content = message(plain("Signed text\r\n"), "Content-Type: application/pkcs7-signature\r\n\r\nMIAGCSqG", ctype=ctype)
        out = sign(content)
        body = content.split(b"\r\n\r\n", 1)[1]

        assert out.content.endswith(b"\r\n\r\n" + body)
        assert any(n.startswith("left untouched") and note in n for n in out.notes)

    def test_pkcs7_mime(self) -> None:
        content = (
            b"MIME-Version: 1.0\r\nContent-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\nMIAGCSqGSIb3DQEHA6CAMIACAQAx\r\n"
        )
        out = sign(content)

        assert out.content.endswith(b"\r\n\r\nMIAGCSqGSIb3DQEHA6CAMIACAQAx\r\n")
        assert any("S/MIME" in n for n in out.notes)

    def test_signed_part_inside_mixed_is_kept_byte_identical(self) -> None:
        signed = (
            'Content-Type: multipart/signed; protocol="application/pgp-signature"; boundary="SIG"\r\n\r\n--SIG\r\n'
            + plain("Signed\r\n") + "\r\n--SIG\r\nContent-Type: application/pgp-signature\r\n\r\nsig\r\n--SIG--"
        )
        out = sign(message(signed, plain("after\r\n")))

        assert signed.encode() in out.content
        assert "Matti" not in out.content.decode("ascii", "replace").split("--XYZ")[2]


class TestOnceOnly:
    def test_second_pass_adds_nothing(self) -> None:
        """The text itself shows the signature is there; no marker header is added to the message."""
        first = sign(message(plain("Hei\r\n"), HTML, ctype="multipart/alternative"))
        second = sign(first.content)

        assert [text_of(p) for p in leaves(parse(first.content))] == [text_of(p) for p in leaves(parse(second.content))]
        assert not any(name.lower().startswith("x-relay") for name in parse(second.content))
        assert "signature already present in text/plain, not added again" in second.notes

    @pytest.mark.parametrize(
        "content",
        [
            b"Subject: x\r\n\r\nHyv\xe4\xe4 p\xe4iv\xe4\xe4\r\n",  # legacy Latin-1, no MIME: re-encoded
            b"Subject: x\n\nHello\n",  # bare LF
            b"Subject: x\r\n\r\n" + b"a" * 2000 + b"\r\n",  # a long line: quoted-printable the first time
            b"MIME-Version: 1.0\r\nContent-Type: text/html\r\n\r\n<p>Hei</p>",  # HTML without <body>
            message(plain("Hyv\u00e4\u00e4\r\n", "iso-8859-1", "quoted-printable"), PDF),
            message(plain("Hyv\u00e4\u00e4\r\n", "utf-8", "base64")),
        ],
    )  # fmt: skip
    def test_second_pass_finds_the_signature_in_the_text(self, content: bytes) -> None:
        """Whatever the first pass re-encoded, the second finds the signature at the end of the text."""
        first = sign(content)
        second = sign(first.content)

        texts = [[text_of(p) for p in leaves(parse(out.content)) if p.get_content_maintype() == "text"]
                 for out in (first, second)]  # fmt: skip
        assert texts[0] == texts[1]

    def test_another_signature_is_still_added(self) -> None:
        first = sign(message(plain("Hei\r\n")))
        second = sign(first.content, signature="Toinen allekirjoitus")

        assert text_of(leaves(parse(second.content))[0]).rstrip().endswith("Toinen allekirjoitus")

    def test_quoted_signature_in_a_reply_does_not_block(self) -> None:
        """Only a signature at the *end* of the text counts as already present."""
        body = "Vastaus\r\n\r\n> " + SIG.replace("\n", "\r\n> ") + "\r\n\r\nLisää tekstiä\r\n"
        out = sign(f"MIME-Version: 1.0\r\n{plain(body)}".encode())

        assert plain_with_signature(body, SIG) == text_of(parse(out.content))


def test_empty_signature_changes_nothing() -> None:
    content = b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nHello\r\n"

    assert sign(content, signature="   ").content.endswith(b"\r\n\r\nHello\r\n")
