"""SMS route (issue 3, rule 5; seed 004): phone-number recipients -> the email-to-SMS gateway's format."""

from __future__ import annotations

from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from typing import Any

import pytest
import yaml

from relay.config.credentials import read_secret
from relay.config.load import parse_config
from relay.config.types import normalize_number
from relay.envelope import Outgoing, Submission
from relay.errors import RefusedError
from relay.prepare.rewrite import rewrite
from relay.prepare.settings import resolve
from relay.prepare.sms import format_number, html_to_text

MAIL = "From: matti@firma.fi\r\nTo: 0401234567@sms\r\nSubject: Muistutus\r\n\r\nHuomenna klo 9 työmaalla.\r\n".encode()


def send(content: bytes, rcpts: tuple[str, ...], **sms: Any) -> list[Outgoing]:
    data = {
        "upstreams": {"main": {"host": "smtp.example.com"}, "labyrintti": {"host": "smtp.labyrintti.example"}},
        "company": {"upstream": "main", "from_address": "erp@firma.fi"},
        "users": {"matti": {"addresses": ["matti@firma.fi"], "signature": "Matti"}},
        "sms": {"gateway": "{number}@smsmail.labyrintti.com", **sms},
    }
    config = parse_config(yaml.safe_dump(data, allow_unicode=True))
    settings = resolve(config, "matti", "test")
    return rewrite(Submission("matti@firma.fi", rcpts, content, "127.0.0.1"), settings, config, read_secret=read_secret)


def parse(out: Outgoing) -> EmailMessage:
    msg = message_from_bytes(out.content, policy=default)
    assert isinstance(msg, EmailMessage)
    return msg


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0401234567", "+358401234567"),
        ("040 123 4567", "+358401234567"),
        ("040-123-4567", "+358401234567"),
        ("+358401234567", "+358401234567"),
        ("00358401234567", "+358401234567"),
        ("(09) 123 4567", "+35891234567"),
        ("+46701234567", "+46701234567"),
    ],
)
def test_normalize_number(raw: str, expected: str) -> None:
    assert expected == normalize_number(raw, "+358")


@pytest.mark.parametrize("raw", ["", "abc", "401234567", "+0401234567", "+35840123456789012", "040１２３", "+358 40x"])
def test_invalid_numbers(raw: str) -> None:
    with pytest.raises(ValueError):
        normalize_number(raw, "+358")


@pytest.mark.parametrize(
    ("style", "expected"), [("e164", "+358401234567"), ("digits", "358401234567"), ("national", "0401234567")]
)
def test_format_number(style: str, expected: str) -> None:
    assert expected == format_number("+358401234567", style, "+358")


def test_number_in_address() -> None:
    """One gateway message, the numbers in the addresses, plain text, the SMS route's own account."""
    [sms] = send(MAIL, ("0401234567@sms", "+358507654321@SMS"), upstream="labyrintti", from_address="sms@firma.fi")
    msg = parse(sms)

    assert (sms.kind, sms.account, sms.mail_from) == ("sms", "labyrintti", "sms@firma.fi")
    assert sms.recipients == ("+358401234567@smsmail.labyrintti.com", "+358507654321@smsmail.labyrintti.com")
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().strip() == "Huomenna klo 9 työmaalla."


def test_defaults_to_the_users_account_and_address() -> None:
    [sms] = send(MAIL, ("0401234567@sms",), number_format="digits")

    assert (sms.account, sms.mail_from, sms.recipients) == ("main", "erp@firma.fi", ("358401234567@smsmail.labyrintti.com",))


def test_an_sms_from_an_idn_address_is_written() -> None:
    """The gateway message's Message-ID is at the sender's A-label (a msg-id is ASCII): at ``yhtiö.fi`` the
    message could not be written, and the submission failed; From is at the A-label too."""
    [sms] = send(MAIL, ("0401234567@sms",), from_address="sms@yhtiö.fi")
    msg = parse(sms)

    assert "sms@yhtiö.fi" == sms.mail_from
    assert msg["Message-ID"].endswith("@xn--yhti-8qa.fi>")
    assert ["sms@xn--yhti-8qa.fi"] == [a.addr_spec for a in msg["From"].addresses]


def test_number_in_subject_with_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """Puhelinnumeron paikka = subject: one message per number; the password goes first."""
    monkeypatch.setenv("RELAY_TEST_SMS_PW", "s3cret")
    out = send(
        MAIL, ("0401234567@sms", "0507654321@sms"), gateway="sms@gw.example", number_in="subject",
        password_in="subject", password_env="RELAY_TEST_SMS_PW",
    )

    assert [parse(o)["Subject"] for o in out] == ["s3cret +358401234567", "s3cret +358507654321"]
    assert [o.recipients for o in out] == [("sms@gw.example",)] * 2


def test_number_and_password_in_body(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_TEST_SMS_PW", "s3cret")
    [sms] = send(MAIL, ("0401234567@sms",), gateway="sms@gw.example", number_in="body", password_in="body",
                 password_env="RELAY_TEST_SMS_PW")

    assert parse(sms).get_content().strip().splitlines() == ["s3cret", "+358401234567", "Huomenna klo 9 työmaalla."]


def test_unreadable_password_is_a_temporary_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_TEST_SMS_PW", raising=False)
    with pytest.raises(RefusedError) as info:
        send(MAIL, ("0401234567@sms",), password_in="subject", password_env="RELAY_TEST_SMS_PW")

    assert info.value.code == 451


def test_password_with_line_break_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_TEST_SMS_PW", "a\r\nBcc: x@y.fi")
    with pytest.raises(RefusedError):
        send(MAIL, ("0401234567@sms",), password_in="subject", password_env="RELAY_TEST_SMS_PW")


def test_invalid_number_refused_with_550() -> None:
    with pytest.raises(RefusedError) as info:
        send(MAIL, ("a@x.fi", "12ab@sms"))

    assert info.value.reply == "550 5.1.1 Not a valid phone number for SMS: 12ab@sms"


def test_mail_and_sms_recipients_split() -> None:
    """Mail recipients get the signed mail; the phone gets plain text without the signature."""
    mail, sms = send(MAIL, ("a@x.fi;0401234567@sms",))

    assert (mail.recipients, mail.kind) == (("a@x.fi",), "mail")
    assert "Matti" in parse(mail).get_content()
    assert "Matti" not in parse(sms).get_content()


def test_html_only_body_is_stripped() -> None:
    content = (
        b"MIME-Version: 1.0\r\nSubject: x\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        b"<html><head><style>p{}</style></head><body><p>Rivi 1</p><p>Rivi&nbsp;2 &amp; 3</p></body></html>\r\n"
    )
    [sms] = send(content, ("0401234567@sms",))

    assert parse(sms).get_content().strip().replace("\xa0", " ").replace("\r\n", "\n") == "Rivi 1\n\nRivi 2 & 3"


def test_legacy_8bit_body_and_empty_body() -> None:
    [sms] = send("Subject: Hälytys\r\n\r\nPäivä\r\n".encode("cp1252"), ("0401234567@sms",))
    [empty] = send("Subject: Hälytys\r\n\r\n".encode("cp1252"), ("0401234567@sms",))

    assert parse(sms).get_content().strip() == "Päivä"
    assert parse(empty).get_content().strip() == "Hälytys"


def test_sms_route_off_means_ordinary_address() -> None:
    [mail] = send(MAIL, ("0401234567@sms",), enabled=False)

    assert (mail.kind, mail.recipients) == ("mail", ("0401234567@sms",))


def test_html_to_text() -> None:
    assert html_to_text("<div>a</div><script>x()</script><div>b</div>") == "a\n\nb"


@pytest.mark.parametrize("to", [
    "a@example.com; b@example.com; 040 123 4567@sms",
    "+358401234567@sms, a@example.com; b@example.com",
    "a@example.com; Työmaa <040 123 4567@sms>; b@example.com",
])  # fmt: skip
def test_a_phone_number_in_to_goes_as_sms_and_not_into_the_e_mails_header(to: str) -> None:
    """Found from outside: with ``040 123 4567@sms`` in it the list could not be read and went in its
    legacy form (readers cut it at the first ``;``: reply-all lost b@example.com); with ``+358...@sms``
    the customer saw a pseudo-address that bounces. The e-mail's To holds the e-mail recipients."""
    content = f"From: matti@firma.fi\r\nTo: {to}\r\nSubject: Muistutus\r\n\r\nHuomenna.\r\n".encode()
    mail, sms = send(content, ("a@example.com", "b@example.com", "0401234567@sms"))  # compacted at RCPT

    assert ["a@example.com", "b@example.com"] == sorted(a.addr_spec for a in parse(mail)["To"].addresses)
    assert b"@sms" not in mail.content.split(b"\r\n\r\n")[0]
    assert sms.kind == "sms" and sms.recipients == ("+358401234567@smsmail.labyrintti.com",)
    assert any("left out of the e-mail's header (sent as SMS)" in note for note in mail.notes), mail.notes


def test_a_to_of_phone_numbers_only_is_left_out_of_the_e_mail() -> None:
    content = b"From: matti@firma.fi\r\nTo: 040 123 4567@sms\r\nSubject: x\r\n\r\nHuomenna.\r\n"
    mail, _sms = send(content, ("a@example.com", "0401234567@sms"))

    assert parse(mail)["To"] is None
