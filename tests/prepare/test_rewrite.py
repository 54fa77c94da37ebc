"""Stage 3 rewriting, rule by rule (issue 3): sender lock, recipients, legacy 8-bit repair, line length,
hostile input. Signatures have their own file (test_signature.py), SMS too (test_sms.py)."""

from __future__ import annotations

import base64
import quopri
import re
import time
from dataclasses import replace
from email import message_from_bytes
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.policy import default
from typing import Any, ClassVar

import pytest
import yaml

from relay.config.load import parse_config
from relay.config.models import Config
from relay.envelope import Joined, Outgoing, Settings, Submission
from relay.errors import ConfigError, RefusedError
from relay.prepare import rewrite as rewrite_module
from relay.prepare.rewrite import rewrite, split_recipients
from relay.prepare.settings import resolve

BASE: dict[str, Any] = {
    "upstreams": {"main": {"host": "smtp.example.com", "username": "erp@firma.fi", "password_env": "RELAY_TEST_PW"}},
    "company": {"upstream": "main", "from_address": "erp@firma.fi", "from_name": "Firma Oy"},
    "users": {"matti": {"addresses": ["matti@firma.fi"], "from_address": "matti@firma.fi", "from_name": "Matti Meikäläinen"}},
}


def make(user: str | None = "matti", **sections: Any) -> tuple[Config, Settings]:
    """Config from BASE with ``sections`` merged one level deep, and the user's resolved settings."""
    data = {k: dict(v) for k, v in BASE.items()}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) and key in data else value
    config = parse_config(yaml.safe_dump(data, allow_unicode=True))
    return config, resolve(config, user, "test")


def run(
    content: bytes, rcpts: tuple[str, ...] = ("a@x.fi",), *, mail_from: str = "matti@firma.fi", user: str | None = "matti",
    **sections: Any,
) -> list[Outgoing]:
    config, settings = make(user, **sections)
    out = rewrite(Submission(mail_from, rcpts, content, "127.0.0.1"), settings, config)
    return [replace(o, content=bytes(o.content)) for o in out]  # a big body comes as Joined (see TestBigBody)


def one(content: bytes, rcpts: tuple[str, ...] = ("a@x.fi",), **kw: Any) -> Outgoing:
    out = run(content, rcpts, **kw)
    assert len(out) == 1
    return out[0]


def parse(out: Outgoing) -> EmailMessage:
    msg = message_from_bytes(out.content, policy=default)
    assert isinstance(msg, EmailMessage)
    return msg


def refused(content: bytes, rcpts: tuple[str, ...] = ("a@x.fi",), **kw: Any) -> RefusedError:
    with pytest.raises(RefusedError) as info:
        run(content, rcpts, **kw)
    return info.value


SIMPLE = b"From: someone@else.fi\r\nTo: a@x.fi\r\nSubject: Hello\r\n\r\nBody line\r\n"


def assert_clean_lines(data: bytes) -> None:
    """CRLF only and no line over 998 octets: what every upstream accepts."""
    assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")
    assert max(map(len, data.split(b"\r\n"))) <= 998


class TestSenderLock:
    def test_from_and_envelope_are_the_users_address(self) -> None:
        """A user cannot send in another name: envelope and From are the resolved address."""
        out = one(SIMPLE)
        msg = parse(out)

        assert out.mail_from == "matti@firma.fi"
        assert msg["From"].addresses[0].addr_spec == "matti@firma.fi"
        assert msg["From"].addresses[0].display_name == "Matti Meikäläinen"
        assert out.content.split(b"\r\n\r\n")[0].isascii()  # the non-ASCII name is RFC 2047 encoded

    @pytest.mark.parametrize(
        ("headers", "reply_to_original", "expected"),
        [
            (b"From: someone@else.fi\r\n", True, "someone@else.fi"),
            (b"From: someone@else.fi\r\nReply-To: keep@x.fi\r\n", True, "keep@x.fi"),
            (b"From: matti@firma.fi\r\n", True, None),
            (b"From: MATTI@firma.fi\r\n", True, None),
            (b"From: someone@else.fi\r\n", False, None),
            (b"", True, None),
        ],
    )
    def test_original_from_kept_as_reply_to(self, headers: bytes, reply_to_original: bool, expected: str | None) -> None:
        """Reply-To is the original From only when none is given and it is another address."""
        out = one(headers + b"Subject: x\r\n\r\nbody\r\n", company={"reply_to_original": reply_to_original})
        reply_to = parse(out)["Reply-To"]

        assert expected == (reply_to.addresses[0].addr_spec if reply_to else None)

    @pytest.mark.parametrize(
        "original",
        [
            "root", "Cron Daemon <root>", "root@erpserver", "matti@erp.local", "matti@ERP.LOCAL.", "a@x.lan",
            "a@srv.internal", "a@host.localdomain", "a@nas.home.arpa", "a@dc1.corp", "a@[127.0.0.2]",
            "a@localhost",
        ],
    )  # fmt: skip
    def test_an_original_from_nobody_outside_can_answer_is_not_kept(self, original: str) -> None:
        """Issue 16: a customer's reply to ``root`` or ``matti@erp.local`` goes nowhere; no Reply-To
        is better than that one (the reply goes to the mailbox in From), and the note says why."""
        out = one(f"From: {original}\r\nSubject: x\r\n\r\nbody\r\n".encode())

        assert None is parse(out)["Reply-To"]
        assert any("not kept as Reply-To: nobody outside can answer it" in note for note in out.notes)

    def test_of_several_original_from_addresses_only_the_answerable_ones_are_kept(self) -> None:
        out = one(b"From: matti@erp.local, Matti <matti@gmail.com>, matti@firma.fi\r\nSubject: x\r\n\r\nb\r\n")

        assert ["matti@gmail.com"] == [a.addr_spec for a in parse(out)["Reply-To"].addresses]

    @pytest.mark.parametrize(
        ("company", "user", "headers", "expected"),
        [
            ({"reply_to": "laskutus@firma.fi"}, {}, b"From: root\r\n", "laskutus@firma.fi"),
            ({"reply_to": "laskutus@firma.fi"}, {}, b"From: someone@else.fi\r\n", "laskutus@firma.fi"),
            ({"reply_to": "laskutus@firma.fi"}, {"reply_to": "matti@gmail.com"}, b"", "matti@gmail.com"),
            ({"reply_to": "laskutus@firma.fi"}, {}, b"Reply-To: own@x.fi\r\n", "own@x.fi"),
            ({"reply_to": "laskutus@firma.fi", "reply_to_original": False}, {}, b"", "laskutus@firma.fi"),
        ],
    )
    def test_reply_to_setting(self, company: dict[str, Any], user: dict[str, Any], headers: bytes, expected: str) -> None:
        """``reply_to`` (company, overridden by the user's) wins over the original From; a Reply-To the
        program wrote itself is its own choice and stays."""
        users = {"matti": {**BASE["users"]["matti"], **user}}
        out = one(headers + b"Subject: x\r\n\r\nbody\r\n", company=company, users=users)

        assert [expected] == [a.addr_spec for a in parse(out)["Reply-To"].addresses]

    def test_reply_to_applies_without_a_sender_lock_too(self) -> None:
        """Company mail without from_address keeps the program's From, and still gets reply_to."""
        company = {"upstream": "main", "from_address": None, "reply_to": "laskutus@firma.fi"}
        out = one(b"From: erp@firma.fi\r\nSubject: x\r\n\r\nbody\r\n", mail_from="erp@firma.fi", user=None,
                  company=company)  # fmt: skip

        assert "laskutus@firma.fi" == parse(out)["Reply-To"].addresses[0].addr_spec

    @pytest.mark.parametrize("value", ["laskutus@firma.fi\r\nBcc: victim@x.fi", "laskutus", "a@b.fi, c@d.fi"])
    def test_reply_to_must_be_one_address_on_one_line(self, value: str) -> None:
        with pytest.raises(ConfigError) as info:
            make(company={"reply_to": value})

        assert "company.reply_to" in str(info.value)

    def test_sender_dkim_and_bcc_are_removed(self) -> None:
        """Sender would contradict From, DKIM would fail after the rewrite, Bcc must never travel."""
        content = (
            b"DKIM-Signature: v=1; a=rsa-sha256; d=else.fi;\r\n\tb=abc\r\nSender: x@else.fi\r\n"
            b"Bcc: hidden@x.fi\r\n" + SIMPLE
        )
        out = one(content)
        msg = parse(out)

        assert (msg["Sender"], msg["DKIM-Signature"], msg["Bcc"]) == (None, None, None)
        assert any("DKIM" in n for n in out.notes)

    def test_resent_bcc_and_content_length_are_removed(self) -> None:
        """A resent message's blind copies must not travel either; a Content-Length (not portable, wrong once
        the body is rewritten: a reader that trusts it cuts the message) goes, as Postfix's cleanup drops it."""
        out = one(b"Resent-Bcc: resent@x.fi\r\nContent-Length: 12345\r\n" + SIMPLE)
        msg = parse(out)

        assert (msg["Resent-Bcc"], msg["Content-Length"]) == (None, None)
        assert {"Resent-Bcc header removed", "Content-Length header removed"} <= set(out.notes)
        assert b"resent@x.fi" not in out.content

    def test_dkim_kept_when_configured(self) -> None:
        out = one(b"DKIM-Signature: v=1; b=abc\r\n" + SIMPLE, rewrite={"remove_dkim": False})

        assert parse(out)["DKIM-Signature"] is not None

    def test_without_from_address_the_submitted_sender_stays(self) -> None:
        """No address configured anywhere: the envelope sender and From of the submission are kept."""
        out = one(SIMPLE, mail_from="legacy@else.fi", user=None, company={"from_address": None})

        assert out.mail_from == "legacy@else.fi"
        assert parse(out)["From"].addresses[0].addr_spec == "someone@else.fi"

    def test_date_and_message_id_added_when_missing(self) -> None:
        msg = parse(one(b"Subject: x\r\n\r\nbody\r\n"))

        assert msg["Date"] is not None and msg["Message-ID"].endswith("@firma.fi>")

    def test_headers_relay_does_not_touch_stay_verbatim(self) -> None:
        """Received/Subject lines are written as they came: no gratuitous refolding."""
        received = b"Received: from erp (localhost [127.0.0.1])\r\n\tby old.relay; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        subject = b"Subject: =?iso-8859-1?q?Lasku_=E4?=\r\n"

        out = one(received + subject + SIMPLE)

        assert received in out.content and subject in out.content


class TestRecipients:
    @pytest.mark.parametrize(
        ("rcpts", "expected"),
        [
            (("a@x.fi",), ("a@x.fi",)),
            (("a@x.fi;b@y.fi",), ("a@x.fi", "b@y.fi")),
            (("a@x.fi; b@y.fi, c@z.fi",), ("a@x.fi", "b@y.fi", "c@z.fi")),
            (("<a@x.fi>", "A@X.FI", "b@y.fi;"), ("a@x.fi", "b@y.fi")),
            (("a@x.fi;;",), ("a@x.fi",)),
        ],
    )
    def test_rcpt_to_split_and_deduplicated(self, rcpts: tuple[str, ...], expected: tuple[str, ...]) -> None:
        assert expected == one(SIMPLE, rcpts).recipients

    @pytest.mark.parametrize(
        ("to", "expected"),
        [
            ("a@x.fi; b@y.fi, c@z.fi", ["a@x.fi", "b@y.fi", "c@z.fi"]),
            ("a@x.fi;b@y.fi", ["a@x.fi", "b@y.fi"]),
            ("Virtanen, Matti <m@x.fi>; b@y.fi", ["m@x.fi", "b@y.fi"]),
            ('"Virtanen, Matti" <m@x.fi>, b@y.fi', ["m@x.fi", "b@y.fi"]),
            ("a@x.fi, A@x.fi; a@X.fi", ["a@x.fi"]),
            ("undisclosed-recipients:;", []),
        ],
    )
    def test_legacy_to_header_becomes_valid(self, to: str, expected: list[str]) -> None:
        """The seeds' ``a@x.fi; b@y.fi`` lists become RFC 5322 address lists that parse cleanly."""
        out = one(f"To: {to}\r\nSubject: x\r\n\r\nbody\r\n".encode())
        header = parse(out)["To"]

        assert expected == [a.addr_spec.lower() for a in header.addresses]
        assert [d for d in header.defects if "InvalidHeaderDefect" in type(d).__name__] == []

    @pytest.mark.parametrize("to", ["a@x.fi, Matti Virtanen", "a@x.fi, Matti Virtanen, b@y.fi"])
    def test_a_name_with_no_address_is_neither_dropped_nor_given_to_the_next_address(self, to: str) -> None:
        """The repair dropped a trailing name in silence, and gave a name in the middle to the bare address
        after it (``Matti Virtanen <b@y.fi>``): such a field is now kept as written, and the log says why."""
        out = one(f"To: {to}\r\nSubject: x\r\n\r\nbody\r\n".encode())

        assert f"To: {to}".encode() == _field(out, "To")
        assert "To header left as it was: a member of it cannot be read as an address" in out.notes

    def test_display_name_cut_by_comma_is_rejoined(self) -> None:
        header = parse(one(b"To: Virtanen, Matti <m@x.fi>; b@y.fi\r\n\r\nx\r\n"))["To"]

        assert header.addresses[0].display_name == "Virtanen, Matti"

    def test_copy_to_is_hidden_by_default(self) -> None:
        """Vakio vastaanottaja: an own copy travels in the envelope only (Bcc semantics)."""
        out = one(SIMPLE, users={"matti": {**BASE["users"]["matti"], "copy_to": "arkisto@firma.fi; a@x.fi"}})

        assert out.recipients == ("a@x.fi", "arkisto@firma.fi")
        assert b"arkisto" not in out.content

    def test_copy_to_as_visible_cc(self) -> None:
        out = one(SIMPLE, company={"copy_to": "arkisto@firma.fi", "copy_to_mode": "cc"})

        assert out.recipients == ("a@x.fi", "arkisto@firma.fi")
        assert [a.addr_spec for a in parse(out)["Cc"].addresses] == ["arkisto@firma.fi"]

    @pytest.mark.parametrize(
        ("rule", "rcpt", "expected"),
        [
            ({"match": "old@x.fi", "replace": "new@y.fi"}, "OLD@x.fi", "new@y.fi"),
            ({"match": "@old.fi", "replace": "@new.fi"}, "pekka@old.fi", "pekka@new.fi"),
            ({"match": "@old.fi", "replace": "all@new.fi"}, "pekka@old.fi", "all@new.fi"),
            ({"match": "@old.fi", "replace": "@new.fi"}, "pekka@bold.fi", "pekka@bold.fi"),
        ],
    )
    def test_recipient_rules(self, rule: dict[str, str], rcpt: str, expected: str) -> None:
        """Rules rewrite the envelope and the To header alike, and each rewrite is noted."""
        content = f"To: {rcpt}\r\nSubject: x\r\n\r\nbody\r\n".encode()
        out = one(content, (rcpt,), rewrite={"recipient_rules": [rule]})

        assert (expected,) == out.recipients
        assert expected == parse(out)["To"].addresses[0].addr_spec
        assert (f"recipient {rcpt} -> {expected}" in out.notes) == (rcpt != expected)

    def test_redirect_all_changes_the_envelope_only(self) -> None:
        """A test installation sends everything to one address; the headers still show the intent."""
        out = one(SIMPLE, ("a@x.fi", "b@y.fi"), rewrite={"redirect_all": "test@firma.fi"})

        assert out.recipients == ("test@firma.fi",)
        assert parse(out)["To"].addresses[0].addr_spec == "a@x.fi"
        assert any(n.startswith("redirect_all:") for n in out.notes)

    @pytest.mark.parametrize(("count", "refused_"), [(3, False), (4, True)])
    def test_max_recipients(self, count: int, refused_: bool) -> None:
        """The bound counts the client's recipients after splitting and deduplication, as the listener does
        at RCPT; the admin's copy_to does not count (a client could never make such a message fit)."""
        rcpts = (";".join(f"r{i}@x.fi" for i in range(count)) + ";R0@X.FI",)
        users = {"matti": {**BASE["users"]["matti"], "copy_to": "copy@firma.fi"}}
        if refused_:
            error = refused(SIMPLE, rcpts, users=users, limits={"max_recipients": 3})
            assert error.reply == "452 4.5.3 Too many recipients (at most 3 per message)"
        else:
            assert len(one(SIMPLE, rcpts, users=users, limits={"max_recipients": 3}).recipients) == 4


class TestLegacy8Bit:
    @pytest.mark.parametrize(
        ("body", "charset"),
        [
            ("Hyvää päivää, lasku €100".encode("cp1252"), "windows-1252"),
            ("Hyvää päivää, lasku €100".encode(), "utf-8"),
            ("Grüße".encode("latin-1"), "windows-1252"),
        ],
    )
    def test_body_without_mime_headers_gets_them(self, body: bytes, charset: str) -> None:
        """The recipient reads ä and é, not mojibake; valid UTF-8 is recognised as such."""
        out = one(b"Subject: x\r\n\r\n" + body + b"\r\n")
        msg = parse(out)

        assert msg["MIME-Version"] == "1.0"
        assert charset == msg.get_content_charset()
        assert body.decode(charset) + "\r\n" == msg.get_content()
        assert out.content.isascii()

    def test_configured_default_charset(self) -> None:
        out = one("Subject: x\r\n\r\nДобрый день\r\n".encode("cp1251"), rewrite={"default_charset": "windows-1251"})

        assert parse(out).get_content().strip() == "Добрый день"

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("Lasku ääkköset".encode("latin-1"), "Lasku ääkköset"),
            ("Lasku ääkköset €".encode(), "Lasku ääkköset €"),
            ("Lasku \x81".encode("latin-1"), "Lasku \x81"),  # undefined in cp1252: Latin-1 last resort
        ],
    )
    def test_8bit_subject_becomes_rfc2047(self, raw: bytes, expected: str) -> None:
        out = one(b"Subject: " + raw + b"\r\n\r\nbody\r\n")

        assert expected == parse(out)["Subject"]
        assert out.content.split(b"\r\n\r\n")[0].isascii()

    def test_8bit_display_name_in_to(self) -> None:
        out = one("To: Pekka Pöllö <p@x.fi>\r\n\r\nbody\r\n".encode("latin-1"))

        assert parse(out)["To"].addresses[0].display_name == "Pekka Pöllö"

    def test_bare_lf_normalised(self) -> None:
        out = one(b"Subject: x\nTo: a@x.fi\n\nline 1\nline 2\rline 3\n")

        assert_clean_lines(out.content)
        assert out.content.endswith(b"\r\n\r\nline 1\r\nline 2\r\nline 3\r\n")

    def test_labelled_8bit_part_stays_8bit(self) -> None:
        """A properly declared 8bit UTF-8 body is legal (8BITMIME) and kept as it is."""
        body = "Hyvää päivää\r\n".encode()
        content = b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        out = one(content + body)

        assert out.content.endswith(b"\r\n\r\n" + body)

    def test_mislabelled_us_ascii_8bit_part_repaired(self) -> None:
        content = b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n" + "päivää\r\n".encode("cp1252")
        msg = parse(one(content))

        assert (msg.get_content_charset(), msg.get_content()) == ("windows-1252", "päivää\r\n")


class TestIssue16ToHeaderOfBareAddresses:
    """Issue 16, 1.1 as the provider's reader sees it: ``To: ss1@example.com ss2@example.com`` (what
    ``relay-sendmail -t`` now takes as two recipients) came out as an empty ``To:``."""

    @pytest.mark.parametrize(("to", "expected"), [
        ("ss1@example.com ss2@example.com", ["ss1@example.com", "ss2@example.com"]),
        ("a@x.fi; b@y.fi  c@z.fi", ["a@x.fi", "b@y.fi", "c@z.fi"]),
    ])  # fmt: skip
    def test_bare_addresses_separated_by_spaces_become_a_list(self, to: str, expected: list[str]) -> None:
        out = one(f"To: {to}\r\nSubject: x\r\n\r\nbody\r\n".encode())

        assert expected == [a.addr_spec for a in parse(out)["To"].addresses]

    def test_a_member_that_cannot_be_read_leaves_the_header_as_it_was(self) -> None:
        """Never an emptier To than the program wrote: a group with no members stays as written."""
        out = one(b"To: undisclosed-recipients:;\r\nSubject: x\r\n\r\nbody\r\n")

        assert b"\r\nTo: undisclosed-recipients:;\r\n" in b"\r\n" + out.content


    def test_an_8bit_list_that_cannot_be_read_keeps_the_fields_after_it(self) -> None:
        """Found by the relay-sendmail property test: an 8-bit To with a group and a bare name was folded
        by the stdlib with a continuation line that did not start with white space, which ended the
        header there: the provider's reader lost the Subject. Every continuation line is folded now."""
        to = "0@example.com,tiimi: ;,Matti <a>,Matti Meikäläinen <0@example.com>"
        out = one(f"To: {to}\r\nSubject: property 1\r\n\r\nbody\r\n".encode())

        head = out.content.split(b"\r\n\r\n")[0]
        assert all(line[:1] in (b" ", b"\t") or b":" in line.split(b" ")[0] for line in head.split(b"\r\n"))
        assert "property 1" == parse(out)["Subject"]
        assert "Meikäläinen" in str(parse(out)["To"])
        assert head.isascii()


class TestIssue16LyingCharsetLabel:
    """Issue 16, 1.2: legacy ERPs write a charset label they do not honour. Latin-1 bytes labelled
    ``utf-8`` (or an unknown label) are repaired the way unlabelled 8-bit text is: a note, the
    signature, and valid MIME (a true label, quoted-printable)."""

    LATIN1 = b"Hyv\xe4\xe4 p\xe4iv\xe4\xe4\r\n"
    SIGNED: ClassVar[dict[str, Any]] = {"matti": {**BASE["users"]["matti"], "signature": "Terveisin\nMatti"}}

    @pytest.mark.parametrize(("label", "cte", "body"), [
        ("utf-8", None, LATIN1),
        ("UTF-8", "8bit", LATIN1),
        ("utf-8", "quoted-printable", b"Hyv=E4=E4 p=E4iv=E4=E4\r\n"),
        ("utf-8", "base64", base64.encodebytes(LATIN1).replace(b"\n", b"\r\n")),
        ("x-no-such-charset", "8bit", LATIN1),
    ], ids=["no CTE", "8bit", "quoted-printable", "base64", "unknown label"])  # fmt: skip
    def test_latin1_under_a_lying_label_is_repaired_and_signed(
        self, label: str, cte: str | None, body: bytes
    ) -> None:
        fields = f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset={label}\r\n"
        fields += f"Content-Transfer-Encoding: {cte}\r\n" if cte else ""
        out = one(fields.encode() + b"\r\n" + body, users=self.SIGNED)
        msg = parse(out)

        assert out.content.isascii()
        encoding = "base64" if cte == "base64" else "quoted-printable"  # an encoded body keeps its encoding
        assert ("windows-1252", encoding) == (msg.get_content_charset(), msg["Content-Transfer-Encoding"])
        assert "Hyvää päivää\r\n\r\nTerveisin\r\nMatti\r\n" == msg.get_content()
        assert any(label.lower() in n and "written as windows-1252" in n for n in out.notes), out.notes
        assert any(note.startswith("signature appended to text/plain") for note in out.notes)

    def test_the_issue_s_note(self) -> None:
        """The log says what was wrong and what was done."""
        content = b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + self.LATIN1
        out = one(content, users=self.SIGNED)

        note = "text/plain: labelled utf-8 but not valid utf-8, written as windows-1252 quoted-printable"
        assert note in out.notes
        assert "signature appended to text/plain" in out.notes

    def test_valid_utf8_under_its_label_is_left_alone(self) -> None:
        body = "Hyvää päivää\r\n".encode()
        content = b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        content += b"Content-Transfer-Encoding: 8bit\r\n\r\n"

        assert one(content + body).content.endswith(b"\r\n\r\n" + body)


def test_a_field_a_message_may_have_once_goes_once() -> None:
    """Two Subjects, Dates, Message-IDs or Content-Types (an ERP adding its own to its mail library's):
    Gmail refuses such mail after relay has said 250. The first is kept, as readers and parsers read."""
    content = (
        b"Subject: Lasku 1\r\nDate: Mon, 07 Dec 2026 10:00:00 +0200\r\nMessage-ID: <1@erp>\r\nTo: a@x.fi\r\n"
        b"Subject: Lasku 2\r\nDate: Tue, 08 Dec 2026 10:00:00 +0200\r\nMessage-ID: <2@erp>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Type: text/html\r\nX-Erp: a\r\nX-Erp: b\r\n\r\nhei\r\n"
    )
    out = one(content)
    msg = parse(out)

    assert ["Lasku 1"] == msg.get_all("Subject")
    assert ["<1@erp>"] == msg.get_all("Message-ID")
    assert 1 == len(msg.get_all("Date") or []) and "Mon, 07 Dec 2026" in str(msg["Date"])
    assert "text/plain" == msg.get_content_type()
    assert ["a", "b"] == msg.get_all("X-Erp")  # a field that may come more than once stays
    assert "a second Subject header removed (the first is kept)" in out.notes


@pytest.mark.parametrize("where", ["top-level", "inner part"])
def test_a_mime_field_with_thousands_of_parameters_is_refused(where: str) -> None:
    """5,900 parameters in 64 KB held the intake's event loop for 7 s (the stdlib parses such a field at
    0.4 s a reading, and reads it again at every look): refused, by a count made before any parse; a few
    dozen still go. (No clock here: the refusal's text says it came from the count.)"""
    many = ";\r\n ".join(f"name*{n}*=utf-8''%E4{n}" for n in range(2000))
    few = ";\r\n ".join(f"name*{n}*=utf-8''%E4{n}" for n in range(40))
    for params, refused in ((many, True), (few, False)):
        field = f"Content-Type: application/octet-stream;\r\n {params}\r\nContent-Transfer-Encoding: base64\r\n"
        if where == "top-level":
            content = f"MIME-Version: 1.0\r\n{field}\r\nQUJD\r\n"
        else:
            content = f"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n{field}\r\nQUJD\r\n--x--\r\n"
        try:
            one(content.encode(), users={"matti": {**BASE["users"]["matti"], "signature": "Matti"}})
        except RefusedError as exc:
            assert refused and exc.reply.startswith("554 5.6.0") and "over 100 parameters" in exc.reply, exc.reply
        else:
            assert not refused


def test_an_address_the_folder_must_split_is_folded_twice_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    """A To with a 64-letter non-ASCII local part: the folder splits its encoded word, the bare retry splits
    it again, and each retry retried, to the recursion limit (951 folds, 10-20 s of CPU before the 250 to
    the dot; an ERP's client gives up at 100 s and sends again). One retry, then the text encoded, as the
    last of those folds wrote it. (Counted, not timed.)"""
    calls = []
    original = rewrite_module._refold

    def counted(name: str, value: str, **kwargs: bool) -> tuple[str, bytes]:
        calls.append(name)
        return original(name, value, **kwargs)

    monkeypatch.setattr(rewrite_module, "_refold", counted)
    _, folded = rewrite_module._refold("To", "ö" * 64 + "@example.fi")

    assert len(calls) <= 2, len(calls)
    assert folded.startswith(b"To: =?utf-8?b?w7bDtsO2") and all(len(line) <= 998 for line in folded.split(b"\r\n"))


def test_a_boundary_too_long_for_a_line_is_replaced() -> None:
    """A 3,000-character boundary (RFC 2046: at most 70) got 250, then the provider's "500 Line too long"
    and a failure notice: relay repairs long lines, so it writes the multipart with a boundary of its own."""
    boundary = "B" * 3000
    content = (
        f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n--{boundary}\r\n'
        f"Content-Type: text/plain\r\n\r\nhei\r\n--{boundary}\r\nContent-Type: application/pdf\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--{boundary}--\r\n"
    ).encode()
    out = one(content)
    msg = parse(out)

    assert max(map(len, out.content.split(b"\r\n"))) <= 998
    assert ["hei", b"%PDF-"] == [p.get_content() for p in msg.iter_parts()]
    assert "multipart/mixed: boundary over 70 characters replaced (RFC 2046 5.1.1)" in out.notes


class TestEncodedDisplayNames:
    """Found from outside (2026-12-07): a display name that decodes to a line break put fields of the
    sender's choosing into a To or Reply-To relay rewrote."""

    @pytest.mark.parametrize("brk", ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1e", "\x85", "\u2028", ""],
                             ids=["LF", "CR", "CRLF", "VT", "FF", "FS", "RS", "NEL", "LS", "none"])  # fmt: skip
    @pytest.mark.parametrize("nested", [False, True], ids=["word", "word in a word"])
    def test_a_name_that_decodes_to_a_line_break_adds_no_field_and_no_address(self, brk: str, nested: bool) -> None:
        def word(text: str) -> str:
            return "=?utf-8?b?" + base64.b64encode(text.encode()).decode() + "?="

        name = word("Sales" + brk + "Bcc: inj@evil.example")
        name = word(name) if nested else name
        content = f"From: {name} <orig@asiakas.fi>\r\nTo: {name} <a@x.fi>; b@y.fi\r\nSubject: x\r\n\r\nbody\r\n"
        out = one(content.encode(), ("a@x.fi", "b@y.fi"))
        msg = parse(out)
        head = out.content.split(b"\r\n\r\n")[0]

        assert ["a@x.fi", "b@y.fi"] == [a.addr_spec for a in msg["To"].addresses]
        assert {"received", "from", "to", "subject", "date", "message-id"} >= {k.lower() for k in msg} - {"reply-to"}
        assert msg["Reply-To"] is None or ["orig@asiakas.fi"] == [a.addr_spec for a in msg["Reply-To"].addresses]
        assert all(line[:1] in (b" ", b"\t") or b":" in line for line in head.split(b"\r\n"))
        assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", head.replace(b"\r\n", b""))


def _field(out: Outgoing, name: str) -> bytes:
    """One header field of the rewritten message as written, unfolded."""
    head = out.content.split(b"\r\n\r\n")[0].replace(b"\r\n ", b" ")
    [line] = [line for line in head.split(b"\r\n") if line.lower().startswith(name.lower().encode() + b":")]
    return line


class TestInternationalisedDomains:
    """An address with an ASCII local part at an IDN domain, in a header relay writes (an 8-bit field it
    encodes, a legacy list it rewrites, the From and Reply-To it sets), has its domain as an A-label: an
    RFC 2047 word inside an addr-spec (``info@=?utf-8?q?yhti=C3=B6?=.fi``) is no address (RFC 2047 5)."""

    @pytest.mark.parametrize(
        ("field", "charset", "expected"),
        [
            ("To: info@yhtiö.fi", "utf-8", b"To: info@xn--yhti-8qa.fi"),
            ("To: info@yhtiö.fi", "latin-1", b"To: info@xn--yhti-8qa.fi"),
            ("To: a@example.com; info@yhtiö.fi", "utf-8", b"To: a@example.com, info@xn--yhti-8qa.fi"),
            ("To: a@example.com; info@yhtiö.fi", "latin-1", b"To: a@example.com, info@xn--yhti-8qa.fi"),
            ("To: Yhtiö Oy <info@YHTIÖ.fi>; b@x.fi", "utf-8", b"To: =?utf-8?q?Yhti=C3=B6?= Oy <info@xn--yhti-8qa.fi>, b@x.fi"),
            ("To: tiimi: info@yhtiö.fi, b@x.fi;", "utf-8", b"To: tiimi: info@xn--yhti-8qa.fi, b@x.fi;"),
            ("Cc: myynti@müller.de", "latin-1", b"Cc: myynti@xn--mller-kva.de"),
            ("From: myynti@müller.de", "utf-8", b"Reply-To: myynti@xn--mller-kva.de"),  # the original From kept
            # a non-ASCII local part beside it (a parser "defect", but read whole) left the IDN an encoded word
            ('To: "Yhtiö" <info@yhtiö.fi>, J <jörgen@example.fi>', "utf-8",
             b"To: =?utf-8?q?Yhti=C3=B6?= <info@xn--yhti-8qa.fi>, J <=?utf-8?q?j=C3=B6rgen?=@example.fi>"),
        ],
    )  # fmt: skip
    def test_the_domain_is_written_as_its_a_label(self, field: str, charset: str, expected: bytes) -> None:
        out = one(f"{field}\r\nSubject: x\r\n\r\nbody\r\n".encode(charset), ("a@example.com", "info@yhtiö.fi"))

        assert expected == _field(out, expected.split(b":")[0].decode())
        assert ("a@example.com", "info@yhtiö.fi") == out.recipients  # the envelope keeps the address as given

    def test_one_mailbox_in_both_forms_is_one_recipient(self) -> None:
        """``info@yhtiö.fi`` and ``info@XN--YHTI-8QA.fi`` (an ERP's list holding both) are one mailbox: one
        RCPT (the first form given), and one entry in a To list relay writes."""
        out = one(b"To: info@yhti\xf6.fi; info@XN--YHTI-8QA.fi\r\nSubject: x\r\n\r\nbody\r\n",
                  ("info@yhtiö.fi", "info@XN--YHTI-8QA.fi", "a@example.com"))  # fmt: skip

        assert ("info@yhtiö.fi", "a@example.com") == out.recipients
        assert b"To: info@xn--yhti-8qa.fi" == _field(out, "To")

    def test_an_idn_from_address_is_written_as_its_a_label(self) -> None:
        users = {"matti": {**BASE["users"]["matti"], "from_address": "laskutus@yhtiö.fi"}}
        out = one(SIMPLE, users=users)

        assert b"From: Matti =?utf-8?q?Meik=C3=A4l=C3=A4inen?= <laskutus@xn--yhti-8qa.fi>" == _field(out, "From")
        assert "laskutus@yhtiö.fi" == out.mail_from

    def test_the_message_id_made_for_an_idn_from_address_is_at_its_a_label(self) -> None:
        """A msg-id is ASCII (RFC 5322 3.6.4): ``<...@yhtiö.fi>`` came out as one RFC 2047 word, no Message-ID."""
        users = {"matti": {**BASE["users"]["matti"], "from_address": "laskutus@yhtiö.fi"}}
        out = one(SIMPLE, users=users)

        assert re.fullmatch(rb"Message-ID: <[0-9.]+@xn--yhti-8qa\.fi>", _field(out, "Message-ID"))


class TestLongDisplayNames:
    """Found on the re-test (2026-12-07): the stdlib's folder drops the quotes of a display name it breaks
    over lines, so a long name holding address syntax became the list's addresses."""

    NAME = "Sales Reply-To: attacker@evil.example X-Injected: yes Content-Type: text/html Subject: URGENT"

    @pytest.mark.parametrize("written", ["encoded", "quoted"])
    def test_a_long_name_with_address_syntax_does_not_change_the_recipients(self, written: str) -> None:
        name = "=?utf-8?b?" + base64.b64encode(self.NAME.encode()).decode() + "?=" if written == "encoded" else f'"{self.NAME}"'
        content = f"From: x@y.fi\r\nTo: {name} <a@example.com>; b@example.com\r\nSubject: s\r\n\r\nb\r\n".encode()
        out = one(content, ("a@example.com", "b@example.com"))

        assert ["a@example.com", "b@example.com"] == [a.addr_spec for a in parse(out)["To"].addresses]
        assert b"evil.example" not in out.content.split(b"\r\n\r\n")[0]

    def test_a_long_plain_name_keeps_its_name(self) -> None:
        name = "Rakennustarvike Virtanen ja Pojat Oy, Laskutusosasto ja Asiakaspalvelu"
        content = f'From: x@y.fi\r\nTo: "{name}" <a@example.com>; b@example.com\r\nSubject: s\r\n\r\nb\r\n'.encode()
        msg = parse(one(content, ("a@example.com", "b@example.com")))

        assert [(name, "a@example.com"), ("", "b@example.com")] == [(a.display_name, a.addr_spec) for a in msg["To"].addresses]

    def test_a_from_with_a_non_ascii_local_part_is_still_taken(self) -> None:
        """The Reply-To kept from the original From was rebuilt from its addr-spec, which the email package
        refuses for a non-ASCII local part: every such message got 451 (it had gone before)."""
        out = one("From: jörgen@example.fi\r\nSubject: l1\r\n\r\nbody\r\n".encode("latin-1"))

        assert b"body" in out.content
        assert parse(out)["Reply-To"] is None  # no encoded word where an address must be
        assert any("jörgen@example.fi not kept as Reply-To" in note for note in out.notes), out.notes


class TestMixedAndMislabelledText:
    """Found from outside (2026-12-07): the repair itself damaged text a reader showed right, and a lie
    inside quoted-printable went out unrepaired unless the user had a signature."""

    def test_utf8_with_a_few_stray_latin1_bytes_keeps_its_utf8(self) -> None:
        """A UTF-8 template filled with a field from a Latin-1 database: read wholly as windows-1252, every
        UTF-8 ä and the euro sign became mojibake; only the stray bytes are Latin-1."""
        subject = "Tilaus päivää asiakkaalle ".encode() + "Mäkelä".encode("latin-1")
        body = "Hyvää päivää, summa 100 €\r\nAsiakas: ".encode() + "Mäkelä\r\n".encode("latin-1")
        head = b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        msg = parse(one(b"Subject: " + subject + b"\r\n" + head + b"\r\n" + body))

        assert "Tilaus päivää asiakkaalle Mäkelä" == msg["Subject"]
        assert "Hyvää päivää, summa 100 €\r\nAsiakas: Mäkelä\r\n" == msg.get_content()
        assert "utf-8" == msg.get_content_charset()

    def test_utf8_under_a_latin1_label_is_read_as_utf8(self) -> None:
        body = "Hyvää päivää\r\n".encode()
        content = b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        out = one(content + b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body)

        assert ("utf-8", "Hyvää päivää\r\n") == (parse(out).get_content_charset(), parse(out).get_content())
        assert any("labelled iso-8859-1 but UTF-8" in note for note in out.notes), out.notes

    @pytest.mark.parametrize("cte", ["quoted-printable", "base64"])
    def test_a_lie_inside_an_encoded_part_is_repaired_without_a_signature(self, cte: str) -> None:
        latin1 = "Hyvää päivää\r\n".encode("latin-1")
        encoded = quopri.encodestring(latin1) if cte == "quoted-printable" else base64.encodebytes(latin1).replace(b"\n", b"\r\n")
        alternative = (
            b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: " + cte.encode() + b"\r\n\r\n"
            + encoded + b"--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>ok</p>\r\n--b--\r\n"
        )  # fmt: skip
        out = one(alternative)
        plain = parse(out).get_body(("plain",))

        assert plain is not None and "Hyvää päivää" == plain.get_content().rstrip("\r\n")
        assert any("labelled utf-8 but not valid utf-8" in note for note in out.notes), out.notes

    def test_a_correct_encoded_part_goes_as_it_came(self) -> None:
        body = quopri.encodestring("Hyvää päivää\r\n".encode())
        content = b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        content += b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"

        assert one(content + body).content.endswith(b"\r\n\r\n" + body)


class TestIssue16EightBitFileName:
    """Issue 16, 1.3: an ERP writes the invoice's file name in Latin-1 into the MIME parameters. It
    goes out as RFC 2231 ``filename*=`` (every current reader) plus an RFC 2047 ``name=`` in
    Content-Type (Outlook up to 2007 reads only that): all 7-bit, and the name round-trips."""

    PDF = base64.encodebytes(b"%PDF-1.4 lasku 9001").replace(b"\n", b"\r\n")
    ENCODED = "=?utf-8?b?bGFza3VfOTAwMV/DpC5wZGY=?="  # lasku_9001_ä.pdf

    def _invoice(self, fields: bytes, pdf: bytes = PDF) -> bytes:
        return (b"Subject: Lasku\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
                b"--b1\r\nContent-Type: text/plain\r\n\r\nLasku liitteena.\r\n"
                b"--b1\r\n" + fields + b"Content-Transfer-Encoding: base64\r\n\r\n" + pdf + b"--b1--\r\n")  # fmt: skip

    @pytest.mark.parametrize("fields", [
        b'Content-Type: application/pdf; name="lasku_9001_\xe4.pdf"\r\n'
        + b'Content-Disposition: attachment; filename="lasku_9001_\xe4.pdf"\r\n',
        b"Content-Type: application/pdf\r\n"
        + b'Content-Disposition: attachment;\r\n filename="lasku_9001_\xe4.pdf"\r\n',
        'Content-Type: application/pdf; name="lasku_9001_ä.pdf"\r\n'.encode()
        + 'Content-Disposition: attachment; filename="lasku_9001_ä.pdf"\r\n'.encode(),
    ], ids=["latin-1 in both", "latin-1 filename only", "utf-8 in both"])  # fmt: skip
    def test_the_file_name_goes_out_as_rfc_2231_and_an_outlook_name(self, fields: bytes) -> None:
        out = one(self._invoice(fields))
        attachment = parse(out).get_payload()[1]

        assert out.content.isascii()
        assert "lasku_9001_ä.pdf" == attachment.get_filename()
        assert b"Content-Disposition: attachment; filename*=utf-8''lasku_9001_%C3%A4.pdf\r\n" in out.content
        assert f'Content-Type: application/pdf;\r\n name="{self.ENCODED}"\r\n'.encode() in out.content
        assert "lasku_9001_ä.pdf" == str(make_header(decode_header(self.ENCODED)))
        assert base64.decodebytes(self.PDF) == attachment.get_content()
        note = "8-bit file name of an inner application/pdf part: RFC 2231 filename*= and RFC 2047 name="
        assert note in out.notes

    def test_a_message_that_is_the_attachment(self) -> None:
        """No multipart: the top-level fields carry the name."""
        content = (b"Subject: Lasku\r\nMIME-Version: 1.0\r\n"
                   b'Content-Type: application/pdf; name="lasku_9001_\xe4.pdf"\r\n'
                   b"Content-Transfer-Encoding: base64\r\n\r\n" + self.PDF)  # fmt: skip
        out = one(content)

        assert out.content.isascii()
        assert "lasku_9001_ä.pdf" == parse(out).get_filename()
        assert f'Content-Type: application/pdf;\r\n name="{self.ENCODED}"\r\n'.encode() in out.content

    def test_a_big_attachment_still_stands_aside(self) -> None:
        """The PDF body is not parsed for the new fields: it is spooled as the client's own bytes."""
        config, settings = make()
        pdf = base64.encodebytes(bytes(range(256)) * 1000).replace(b"\n", b"\r\n")
        content = self._invoice(b'Content-Type: application/pdf; name="lasku_9001_\xe4.pdf"\r\n', pdf)
        (out,) = rewrite(Submission("matti@firma.fi", ("a@x.fi",), content, "127.0.0.1"), settings, config)

        assert isinstance(out.content, Joined)
        pieces = out.content.pieces
        assert any(isinstance(p, memoryview) and p.obj is content and len(p) == len(pdf) - 2 for p in pieces)
        got = message_from_bytes(bytes(out.content), policy=default)
        assert "lasku_9001_ä.pdf" == got.get_payload()[1].get_filename()

    def test_other_8bit_fields_of_an_inner_part_become_encoded_words(self) -> None:
        out = one(self._invoice(b"Content-Type: application/pdf\r\nContent-Description: Lasku \xe4\r\n"))

        assert out.content.isascii()
        assert "Lasku ä" == parse(out).get_payload()[1]["Content-Description"]


class TestFastPath:
    def test_body_bytes_untouched_without_body_changes(self) -> None:
        """No signature, ASCII, short lines: only the header block is rewritten."""
        body = b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: application/pdf\r\n" \
               b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--b--\r\n"
        head = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        out = one(head + body)

        assert out.content.endswith(b"\r\n\r\n" + body)

    def test_25mb_attachment_is_never_parsed_whole(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Only the message's skeleton is parsed (the 25 MB attachment stands aside): without a signature
        to look for a text part with a lying label inside base64 or quoted-printable, with one to sign
        it. What that costs in time is bench/'s to measure, not a unit test's."""
        attachment = base64.encodebytes(bytes(range(256)) * 73_000).replace(b"\n", b"\r\n")
        content = (
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
            b"hi\r\n--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n" + attachment + b"--b--\r\n"
        )
        parsed: list[int] = []
        real = rewrite_module.BytesParser.parsebytes

        def counting(parser: Any, data: bytes, headersonly: bool = False) -> Any:
            parsed.append(len(data))
            return real(parser, data, headersonly)

        monkeypatch.setattr(rewrite_module.BytesParser, "parsebytes", counting)
        plain = one(content)
        assert parsed and max(parsed) < 100_000, parsed
        users = {"matti": {**BASE["users"]["matti"], "signature": "Matti"}}
        signed = one(content, users=users)

        assert len(content) > 24_000_000
        assert parsed and max(parsed) < 100_000, parsed
        assert attachment in plain.content and attachment in signed.content
        assert "Matti" in parse(signed).get_body(("plain",)).get_content()  # type: ignore[union-attr]


class TestLineLength:
    def test_long_text_line_becomes_quoted_printable(self) -> None:
        text = "word " * 2000
        out = one(b"Subject: x\r\n\r\n" + text.encode() + b"\r\n")

        assert_clean_lines(out.content)
        assert text + "\r\n" == parse(out).get_content()
        assert parse(out)["Content-Transfer-Encoding"] == "quoted-printable"

    def test_long_line_in_binary_part_becomes_base64(self) -> None:
        data = b"x" * 5000 + b"\r\n"
        content = (
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
            b"hi\r\n--b\r\nContent-Type: application/octet-stream\r\n\r\n" + data + b"--b--\r\n"
        )
        out = one(content)
        attachment = next(iter(parse(out).iter_attachments()))

        assert_clean_lines(out.content)
        assert data[:-2] == attachment.get_payload(decode=True)  # the last CRLF belongs to the boundary

    def test_long_header_is_folded(self) -> None:
        out = one(b"Subject: " + b"long " * 400 + b"\r\n\r\nbody\r\n")

        assert_clean_lines(out.content)
        assert ("long " * 400).strip() == parse(out)["Subject"].strip()


LONG = b"y" * 5000
BROKEN = {  # the QA reports: a "multipart" the parser cannot split, with one 5,000-character line
    "no boundary": b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\n",
    "boundary never used": b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="=_declared"\r\n\r\n',
}


def assert_no_encoded_multipart(msg: EmailMessage) -> None:
    for part in msg.walk():
        if part.get_content_maintype() == "multipart":
            assert str(part.get("Content-Transfer-Encoding", "7bit")).lower() in ("7bit", "8bit", "binary")


class TestBrokenMime:
    """Whatever the MIME damage, the output has CRLF lines of at most 998 octets, and a multipart never
    carries a transfer encoding: providers refuse anything else (``500 5.5.2 Line too long``)."""

    @pytest.mark.parametrize("head", BROKEN.values(), ids=BROKEN.keys())
    def test_broken_multipart_with_a_long_line_is_sent_as_the_text_it_is(self, head: bytes) -> None:
        body = b"Hei,\r\n" + LONG + b"\r\nTerveisin\r\n"
        out = one(b"Subject: x\r\n" + head + body)
        msg = parse(out)

        assert_clean_lines(out.content)
        assert_no_encoded_multipart(msg)
        assert "text/plain" == msg.get_content_type()
        assert body.decode() == msg.get_content()
        assert any("sent as the single text/plain part" in n for n in out.notes)
        assert not any("multipart/mixed: lines over 998" in n for n in out.notes)

    @pytest.mark.parametrize("head", BROKEN.values(), ids=BROKEN.keys())
    def test_broken_multipart_holding_parts_and_8bit_text(self, head: bytes) -> None:
        """A program that lost its boundary parameter: the parts it wrote become plain text, 8-bit decoded."""
        body = (
            b"--=_real\r\nContent-Type: text/plain\r\n\r\np\xe4iv\xe4\xe4 " + LONG + b"\r\n"
            b"--=_real\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--=_real--\r\n"
        )
        out = one(b"Subject: x\r\n" + head + body)
        msg = parse(out)

        assert_clean_lines(out.content)
        assert_no_encoded_multipart(msg)
        assert ("text/plain", "windows-1252") == (msg.get_content_type(), msg.get_content_charset())
        assert body.decode("windows-1252") == msg.get_content()

    def test_nested_broken_multipart(self) -> None:
        body = b"alt text " + LONG
        content = (
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
            b"--b\r\nContent-Type: multipart/alternative\r\n\r\n" + body + b"\r\n--b--\r\n"
        )
        out = one(content)
        msg = parse(out)
        parts = [p for p in msg.walk() if not p.is_multipart()]

        assert_clean_lines(out.content)
        assert_no_encoded_multipart(msg)
        assert ["hi", body.decode()] == [p.get_content() for p in parts]

    def test_broken_multipart_inside_a_forwarded_message(self) -> None:
        content = (
            b"MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n"
            b"Content-Type: multipart/mixed\r\n\r\n" + LONG + b"\r\n"
        )
        out = one(content)
        inner = parse(out).get_payload()[0]

        assert_clean_lines(out.content)
        assert (LONG + b"\r\n").decode() == inner.get_content()

    def test_multipart_with_a_transfer_encoding_loses_it(self) -> None:
        content = (
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            b"--b\r\nContent-Type: text/plain\r\n\r\n" + LONG + b"\r\n--b--\r\n"
        )
        out = one(content)
        msg = parse(out)

        assert_clean_lines(out.content)
        assert_no_encoded_multipart(msg)
        assert LONG.decode() == next(msg.iter_parts()).get_content()

    @pytest.mark.parametrize("where", ["preamble", "epilogue"])
    def test_long_lines_in_preamble_or_epilogue_are_wrapped(self, where: str) -> None:
        text = b"This is a multi-part message in MIME format. " + LONG
        parts = b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--\r\n"
        body = text + b"\r\n" + parts if where == "preamble" else parts + text + b"\r\n"
        out = one(b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + body)
        msg = parse(out)

        assert_clean_lines(out.content)
        assert ["hi"] == [p.get_content() for p in msg.iter_parts()]
        assert text.decode() == getattr(msg, where).replace("\r\n", "")
        assert any(f"{where} lines over 998 octets wrapped" in n for n in out.notes)

    def test_wrapped_preamble_that_would_read_as_a_boundary_is_dropped(self) -> None:
        text = b"x" * 998 + b"--b but not a boundary"
        out = one(b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + text + b"\r\n"
                  b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--\r\n")
        msg = parse(out)

        assert_clean_lines(out.content)
        assert ["hi"] == [p.get_content() for p in msg.iter_parts()]
        assert any("preamble with lines over 998 octets removed" in n for n in out.notes)

    @pytest.mark.parametrize(
        "field",
        [b"Subject: " + LONG, b'Content-Disposition: attachment; filename="' + LONG + b'.pdf"', b"Content-ID: <" + LONG + b">"],
    )
    def test_long_header_of_an_inner_part_is_folded(self, field: bytes) -> None:
        content = (
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n"
            + field + b"\r\n\r\nhi\r\n--b--\r\n"
        )
        out = one(content)

        assert_clean_lines(out.content)
        assert ["hi"] == [p.get_content() for p in parse(out).iter_parts()]

    def test_unbreakable_top_level_header_stays_readable(self) -> None:
        """One 5,000-character token in a structured field cannot be folded: encoded words keep it readable."""
        out = one(b"Subject: x\r\nContent-Language: x" + LONG + b"\r\n\r\nbody\r\n")
        value = out.content.split(b"Content-Language: ", 1)[1].split(b"\r\nFrom: ")[0].decode()

        assert_clean_lines(out.content)
        assert "x" + LONG.decode() == str(make_header(decode_header(value)))

    def test_unfoldable_message_id_is_replaced(self) -> None:
        out = one(b"Subject: x\r\nMessage-ID: <" + LONG + b"@x>\r\n\r\nbody\r\n")

        assert_clean_lines(out.content)
        assert parse(out)["Message-ID"].endswith("@firma.fi>")
        assert "Message-ID over 998 octets replaced" in out.notes

    def test_unknown_transfer_encoding_with_a_long_line(self) -> None:
        content = b"MIME-Version: 1.0\r\nContent-Type: application/x-foo\r\nContent-Transfer-Encoding: x-weird\r\n\r\n" + LONG + b"\r\n"
        out = one(content)

        assert_clean_lines(out.content)
        assert LONG + b"\r\n" == parse(out).get_payload(decode=True)


def _multipart(parts: int) -> bytes:
    body = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\npart\r\n" for _ in range(parts))
    return b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + body + b"--b--\r\n"


class TestHostileInput:
    @pytest.mark.parametrize(
        ("rcpt", "mail_from", "code"),
        [
            ("a@x.fi\r\nBcc: victim@y.fi", "matti@firma.fi", 501),
            ("a@x.fi\nRCPT TO:<b@y.fi>", "matti@firma.fi", 501),
            ("a@x.fi\0", "matti@firma.fi", 501),
            ("not-an-address", "matti@firma.fi", 501),
            ("a@x.fi", "matti@firma.fi\r\nX-Injected: 1", 501),
        ],
    )
    def test_crlf_injection_through_addresses_refused(self, rcpt: str, mail_from: str, code: int) -> None:
        error = refused(SIMPLE, (rcpt,), mail_from=mail_from)

        assert code == error.code
        assert "\r" not in error.reply and "\n" not in error.reply

    def test_crlf_in_config_values_is_refused_by_the_config(self) -> None:
        """from_name reaches a header: the config refuses line breaks before relay ever starts."""
        from relay.errors import ConfigError

        with pytest.raises(ConfigError):
            make(company={"from_name": "Firma\r\nBcc: victim@x.fi"})

    @pytest.mark.parametrize(
        ("content", "why"),
        [
            (b"Subject: " + b"word " * 20_000 + b"\r\n\r\nbody\r\n", "header field Subject over 64 KB"),
            (b"".join(b"X-H%d: %s\r\n" % (n, b"v" * 900) for n in range(300)) + b"\r\nbody\r\n", "header block over"),
        ],
    )
    def test_huge_headers_refused_quickly(self, content: bytes, why: str) -> None:
        """A megabyte-long header would take the stdlib's folder minutes: 554 at once instead."""
        error = refused(content)

        assert 554 == error.code
        assert why in error.reply

    def test_control_characters_in_headers_removed(self) -> None:
        out = one(b"Subject: a\x0bb\x0cc\x00d\x1ce\r\n\r\nbody\r\n")
        header_block = out.content.split(b"\r\n\r\n")[0]

        assert all(b >= 0x20 or b in (9, 10, 13) for b in header_block)

    @pytest.mark.parametrize("word", ["=?us-ascii?b?DQ==?=", "=?us-ascii?b?CkJjYzogdmljdGltQGV4YW1wbGUuY29t?="])
    @pytest.mark.parametrize("name", ["Subject", "X-Erp-Note"])
    def test_an_encoded_line_break_in_a_field_that_must_be_refolded_never_goes_out_raw(
        self, name: str, word: str
    ) -> None:
        """An encoded word that decodes to CR, or to LF and a header ("\\nBcc: victim@example.com"), in a
        field over 998 octets (refolded, so decoded first): found by the property test. The field goes out
        with no bare CR or LF, and no reader finds a Bcc in it; its text is kept (encoded, as it came)."""
        out = one(f"{name}: {word}{'x' * 1200}\r\nFrom: someone@else.fi\r\nTo: a@x.fi\r\n\r\nBody\r\n".encode())
        head = out.content.split(b"\r\n\r\n")[0]

        assert b"\r" not in head.replace(b"\r\n", b"") and b"\n" not in head.replace(b"\r\n", b"")
        message = parse(out)
        assert message["Bcc"] is None
        assert str(message[name]).replace(" ", "").startswith(word)  # readers see the source text

    def test_10000_parts_refused_when_the_body_must_change(self) -> None:
        users = {"matti": {**BASE["users"]["matti"], "signature": "Matti"}}
        error = refused(_multipart(10_000), users=users)

        assert error.reply == "554 5.6.0 Message cannot be relayed: more than 1000 MIME parts"

    def test_10000_parts_pass_untouched_when_only_headers_change(self) -> None:
        content = _multipart(10_000)

        assert one(content).content.endswith(content.split(b"\r\n\r\n", 1)[1])

    def test_deep_nesting_refused(self) -> None:
        depth = 200
        head = b"".join(f"--b{i}\r\nContent-Type: multipart/mixed; boundary=b{i + 1}\r\n\r\n".encode() for i in range(depth))
        tail = b"".join(f"--b{i}--\r\n".encode() for i in reversed(range(depth + 1)))
        content = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n" + head + tail
        users = {"matti": {**BASE["users"]["matti"], "signature": "Matti"}}
        error = refused(content, users=users)

        assert error.code == 554

    def test_50mb_single_line_is_repaired(self) -> None:
        """One 50 MB line: re-encoded so every line fits, in reasonable time."""
        started = time.perf_counter()
        out = one(b"Subject: x\r\n\r\n" + b"A" * 50_000_000)
        elapsed = time.perf_counter() - started

        assert max(map(len, out.content.split(b"\r\n"))) <= 998
        assert elapsed < 20, elapsed

    def test_invalid_base64_text_part_left_as_is_with_a_note(self) -> None:
        """The signature cannot be added safely to a body that does not decode: keep it, say so."""
        body = b"bm90IHZhbGlk!!!\r\n"
        content = b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        users = {"matti": {**BASE["users"]["matti"], "signature": "Matti"}}
        out = one(content + body, users=users)

        assert out.content.endswith(body)
        assert any("broken" in n for n in out.notes)

    def test_garbage_from_header_does_not_crash(self) -> None:
        out = one(b"From: <<<@@@>>> \"unterminated\r\nTo: ;;;,,,\r\n\r\nbody\r\n")

        assert parse(out)["From"].addresses[0].addr_spec == "matti@firma.fi"

    def test_no_header_separator(self) -> None:
        """A body right after the headers, or no body at all, still makes a valid message."""
        for content in (b"Subject: x\r\nThis is the body\r\n", b"Subject: only headers", b"", b"just text"):
            out = one(content)
            assert parse(out)["From"] is not None
            assert_clean_lines(out.content)

    def test_no_upstream_account(self) -> None:
        config, settings = make()
        from dataclasses import replace

        with pytest.raises(RefusedError) as info:
            rewrite(Submission("m@firma.fi", ("a@x.fi",), SIMPLE, "127.0.0.1"), replace(settings, account=None), config)
        assert info.value.code == 451


def test_split_recipients_is_public_and_strict() -> None:
    assert split_recipients(["a@x.fi;b@y.fi", "A@x.fi"]) == ["a@x.fi", "b@y.fi"]
    with pytest.raises(RefusedError):
        split_recipients(["a b@x.fi"])


class TestNulBytes:
    def test_nul_bytes_in_text_are_quoted_printable_not_sent_raw(self) -> None:
        """A legacy program's stray NULs: no NUL goes on the wire (7bit/8bit forbid it), the text keeps them."""
        out = one(b"From: someone@else.fi\r\nTo: a@x.fi\r\nSubject: Hello\r\n\r\nabc\x00def\x00\r\n")

        assert b"\x00" not in out.content
        msg = parse(out)
        assert "quoted-printable" == msg["Content-Transfer-Encoding"]
        assert "abc\x00def\x00" in msg.get_content()
        assert any("NUL bytes" in note for note in out.notes)

    def test_nul_bytes_in_an_attachment_are_base64(self) -> None:
        """An application/octet-stream part sent as 8bit with NULs in it goes out as base64, bytes unchanged."""
        data = b"PK\x03\x04\x00\x00binary\x00\r\n"
        content = (b"From: someone@else.fi\r\nTo: a@x.fi\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhei\r\n"
                   b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                   + data + b"--b--\r\n")  # fmt: skip
        out = one(content)

        assert b"\x00" not in out.content
        attachment = next(iter(parse(out).iter_attachments()))
        assert "base64" == attachment["Content-Transfer-Encoding"]
        assert data[:-2] == attachment.get_payload(decode=True)  # the CRLF before a boundary is the boundary's


class TestBigBody:
    """A big body that needs no change is not copied: headers and body are spooled as pieces."""

    def test_the_body_is_the_submissions_own_bytes(self) -> None:
        config, settings = make()
        content = b"Subject: liite\r\n\r\n" + (b"QUJD" * 19 + b"\r\n") * 5000
        (out,) = rewrite(Submission("matti@firma.fi", ("a@x.fi",), content, "127.0.0.1"), settings, config)

        assert isinstance(out.content, Joined)
        head, body = out.content.pieces
        assert isinstance(body, memoryview) and body.obj is content  # a view into what the client sent
        assert bytes(out.content).endswith(content.split(b"\r\n\r\n", 1)[1])
        assert len(out.content) == len(bytes(out.content)) and out.content.isascii()
        assert b"From: " in head and bytes(head).endswith(b"\r\n\r\n")

    def test_a_small_body_is_one_bytes(self) -> None:
        config, settings = make()
        content = b"Subject: lasku\r\n\r\nHyvaa paivaa\r\n"
        (out,) = rewrite(Submission("matti@firma.fi", ("a@x.fi",), content, "127.0.0.1"), settings, config)

        assert isinstance(out.content, bytes)

    def test_eight_bit_is_seen_past_the_first_slice(self) -> None:
        joined = Joined((b"Subject: x\r\n\r\n", memoryview(b"a" * (3 << 20) + b"\xe4\r\n")))

        assert not joined.isascii()

    def test_a_signed_invoice_keeps_its_pdf_as_received(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The signature goes into the text part; the 2 MB PDF's base64 is the client's own bytes, not a
        copy, and the message is what a whole parse and re-serialisation would have made."""
        config, settings = make()
        settings = replace(settings, signature="Matti Meikäläinen\nLaskutus")
        pdf = base64.encodebytes(bytes(range(256)) * 6000).replace(b"\n", b"\r\n").rstrip(b"\r\n")
        content = (
            b"From: matti@firma.fi\r\nTo: a@x.fi\r\nSubject: Lasku\r\nDate: Sun, 06 Dec 2026 06:00:00 +0000\r\n"
            b"Message-ID: <1@firma.fi>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
            b"--b1\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            b"Hei,\r\nlasku liitteen\xe4.\r\n"
            b"--b1\r\nContent-Type: application/pdf; name=lasku.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + pdf + b"\r\n--b1--\r\n"
        )  # fmt: skip
        sub = Submission("matti@firma.fi", ("a@x.fi",), content, "127.0.0.1")
        (out,) = rewrite(sub, settings, config)
        monkeypatch.setattr(rewrite_module, "JOIN_LIMIT", 1 << 40)  # the same message, parsed whole
        (whole,) = rewrite(sub, settings, config)

        assert isinstance(out.content, Joined)
        assert any(isinstance(p, memoryview) and p.obj is content and len(p) == len(pdf) for p in out.content.pieces)
        assert isinstance(whole.content, bytes)
        assert bytes(out.content) == whole.content
        assert "signature appended to text/plain" in out.notes
