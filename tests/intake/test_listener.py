"""The listener: each hook reached, replies as promised, legacy input accepted, nothing dropped."""

from __future__ import annotations

import base64
import logging
import re
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosmtpd.smtp
import pytest
from structlog.testing import capture_logs

from relay.intake import listener, serve
from tests.conftest import UpstreamFactory, queue_entries, smtp_send, wait_for_entries
from tests.servers import RelayRunner

RelayFactory = Callable[..., RelayRunner]


@pytest.fixture
def provider(upstream: UpstreamFactory) -> Any:
    return upstream("provider", security="ssl", accounts={"a@rakennus.fi": "pw"})


@pytest.fixture
def relay(provider: Any, upstream: UpstreamFactory, relay_with: RelayFactory) -> RelayRunner:
    return relay_with(
        upstreams={"provider": upstream.account(provider, "a@rakennus.fi")},
        company={"from_address": "a@rakennus.fi", "upstream": "provider"},
        limits={"max_message_size": "64K", "max_recipients": 3},
    )


def raw_session(port: int, lines: list[bytes], *, read_timeout: float = 10) -> list[bytes]:
    """Speak SMTP byte for byte (what smtplib would normalise away); return every reply line."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        stream = sock.makefile("rb")
        replies = [stream.readline()]
        for line in lines:
            sock.sendall(line)
            if line == b"DATA\r\n" or not line.startswith((b"EHLO", b"DATA")) or line.endswith(b"\r\n.\r\n"):
                reply = stream.readline()
                while reply[3:4] == b"-":
                    replies.append(reply)
                    reply = stream.readline()
                replies.append(reply)
            if line.startswith(b"EHLO"):
                reply = stream.readline()
                while reply[3:4] == b"-":
                    replies.append(reply)
                    reply = stream.readline()
                replies.append(reply)
        return replies


class TestHooks:
    def test_ehlo_advertises_size_8bitmime_smtputf8(self, relay: RelayRunner) -> None:
        """EHLO shows the configured SIZE limit and the 8-bit extensions legacy mail needs."""
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("erp")

            assert str(64 * 1024) == client.esmtp_features["size"]
            assert "8bitmime" in client.esmtp_features
            assert "smtputf8" in client.esmtp_features

    def test_rcpt_hook_limits_recipients(self, relay: RelayRunner) -> None:
        """The fourth RCPT gets 452 when max_recipients is 3 (handle_RCPT is reached)."""
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.mail("erp@legacy.local")
            codes = [client.rcpt(f"r{n}@example.com")[0] for n in range(4)]

        assert codes == [250, 250, 250, 452]

    def test_list_members_count_toward_the_limit_at_the_rcpt_that_crosses_it(self, relay: RelayRunner) -> None:
        """max_recipients 3: a two-member list, then another two-member list (4 > 3) gets 452 there, not a 452
        after DATA that the client would retry forever; a single one still fits."""
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.mail("erp@legacy.local")
            codes = [client.docmd("RCPT", f"TO:<{rcpt}>")[0]
                     for rcpt in ("r1@example.com; r2@example.com", "r3@example.com; r4@example.com", "r3@example.com")]  # fmt: skip
            reply = client.data(b"Subject: x\r\n\r\nbody\r\n")

        assert [250, 452, 250] == codes
        assert 250 == reply[0]

    def test_an_empty_recipient_is_refused_at_rcpt(self, relay: RelayRunner) -> None:
        """``RCPT TO:<>`` names nobody: 501 there, instead of a 250 for a recipient that is then dropped."""
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.mail("erp@legacy.local")
            code, text = client.docmd("RCPT", "TO:<>")

        assert (501, True) == (code, text.startswith(b"5.1.3"))

    def test_a_phone_number_is_refused_when_sms_is_not_set_up(self, relay: RelayRunner, provider: Any) -> None:
        """No sms: section: ``<a@x.test; +358401234567@sms>`` would go as mail to a domain that does not exist;
        refused at RCPT with the reason, and the ERP's next list without the number goes."""
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.mail("erp@legacy.local")
            code, text = client.docmd("RCPT", "TO:<a@x.test; +358401234567@sms>")
            ok = client.docmd("RCPT", "TO:<a@x.test>")[0]

        assert (550, 250) == (code, ok)
        assert b"SMS" in text and b"+358401234567@sms" in text

    def test_too_big_is_refused_with_552(self, relay: RelayRunner, tmp_path: Path) -> None:
        """A message over max_message_size gets 552 and nothing is queued."""
        body = b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * 1000
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.mail("erp@legacy.local")
            client.rcpt("c@example.com")
            code, _text = client.data(body)

        assert code == 552
        assert queue_entries(tmp_path / "spool", "incoming") == []

    def test_unexpected_error_in_a_stage_is_a_451_not_a_500(
        self, relay: RelayRunner, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bug behind handle_DATA must make the client retry later, never bounce (aiosmtpd says 500)."""

        def broken(*args: object) -> None:
            raise ValueError("a bug")

        monkeypatch.setattr(listener, "prepare", broken)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.mail("erp@legacy.local")
            client.rcpt("c@example.com")
            code, _ = client.data(b"Subject: x\r\n\r\nbody\r\n")

        assert code == 451

    def test_spool_write_failure_is_a_451(self, relay: RelayRunner, tmp_path: Path) -> None:
        """If the spool cannot store the message, the client is told to try again later."""
        tmp = tmp_path / "spool" / "tmp"
        tmp.rmdir()
        tmp.write_text("not a directory")  # root ignores permissions; a file where a dir should be does not
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.mail("erp@legacy.local")
            client.rcpt("c@example.com")
            code, text = client.data(b"Subject: x\r\n\r\nbody\r\n")

        assert code == 451
        assert b"4.3.0" in text


ENHANCED = re.compile(rb"^(?P<code>[45]\d\d)[ -](?P<cls>[45])\.\d{1,3}\.\d{1,3} \S")


class TestEnhancedStatusCodes:
    """Every 4xx and 5xx relay sends carries an enhanced status code (RFC 3463), aiosmtpd's own included."""

    def test_every_refusal_of_a_confused_client(self, relay: RelayRunner) -> None:
        """What a confused or old client may send, each answered by aiosmtpd or relay: the code's class and
        the enhanced code's class agree, and the reply still says what was wrong."""
        commands = [
            "FOO", "HELO", "EHLO", "RCPT TO:<a@x.fi>", "DATA", "MAIL FROM:", "MAIL FROM:<a@x.fi> FOO=BAR",
            "MAIL FROM:<a@x.fi>", "MAIL FROM:<b@x.fi>", "RCPT TO: a@x.fi b@x.fi c", "RCPT TO:", "DATA x",
            "RCPT TO:<a@x.fi> FOO=BAR", "AUTH", "AUTH CRAM-MD5", "STARTTLS", "EXPN staff", "VRFY", "RSET x",
            "NOOP x", "QUIT x",
        ]  # fmt: skip
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("erp")
            answers = {command: client.docmd(command) for command in commands}

        refusals = {command: b"%d %s" % (code, text) for command, (code, text) in answers.items() if code >= 400}
        assert {"FOO", "HELO", "RCPT TO:<a@x.fi>", "MAIL FROM:", "RCPT TO: a@x.fi b@x.fi c", "STARTTLS"} <= set(refusals)
        assert refusals["RCPT TO: a@x.fi b@x.fi c"].startswith(b"501 5.5.4 Syntax: RCPT TO: <address>")
        for command, reply in refusals.items():
            match = ENHANCED.match(reply)
            assert match is not None and match["code"][:1] == match["cls"], (command, reply)

    def test_swaks_sees_the_code_on_a_malformed_recipient(self, relay: RelayRunner) -> None:
        """The issue's case with a real client: swaks sending a recipient aiosmtpd cannot parse."""
        if shutil.which("swaks") is None:
            pytest.skip("swaks is not installed")
        done = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{relay.port}", "--from", "erp@legacy.local", "--to", "a@x.fi b@x.fi c",
             "--quit-after", "RCPT", "--timeout", "10"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip

        assert "<** 501 5.5.4 Syntax: RCPT TO: <address>" in done.stdout, done.stdout


def test_the_ehlo_reply_leaves_in_one_piece(relay: RelayRunner) -> None:
    """EHLO's lines go out in one write, as Postfix sends them: the first read after the command holds
    the whole reply (aiosmtpd wrote a system call and a packet per line; then a read right after the
    command got only the first line or two)."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        stream = sock.makefile("rb")
        assert stream.readline().startswith(b"220 ")
        for _ in range(5):
            sock.sendall(b"EHLO erp.legacy.local\r\n")
            first = sock.recv(65536)  # what had arrived when the first packet woke us
            assert first.startswith(b"250-") and first.endswith(b"\r\n"), first
            assert re.search(rb"^250 [^\r]*\r\n\Z", first, re.MULTILINE), first  # ends with the last line
            assert 4 <= first.count(b"\r\n"), first


class TestLegacyInput:
    def test_semicolon_list_in_one_rcpt_reaches_every_address(self, relay: RelayRunner, provider: Any) -> None:
        """``RCPT TO:<a@x; b@y>``, as some ERPs send their recipient field, delivers to both."""
        replies = raw_session(relay.port, [
            b"HELO erp\r\n", b"MAIL FROM:<erp@legacy.local>\r\n",
            b"RCPT TO:<customer@example.com; boss@example.com>\r\n", b"DATA\r\n",
            b"Subject: x\r\n\r\nhi\r\n.\r\n", b"QUIT\r\n",
        ])  # fmt: skip
        [got] = provider.wait_for(1)

        assert replies[3].startswith(b"250")
        assert got.rcpt_tos == ["customer@example.com", "boss@example.com"]

    def test_a_recipient_field_longer_than_512_octets_in_one_rcpt_reaches_everyone(
        self, provider: Any, upstream: UpstreamFactory, relay_with: RelayFactory
    ) -> None:
        """An ERP's whole customer list in one RCPT: 60 addresses, 2,470 octets (RFC 5321's 512 is a
        minimum; aiosmtpd refused the command, and so every one of them, as "line too long")."""
        relay = relay_with(
            upstreams={"provider": upstream.account(provider, "a@rakennus.fi")},
            company={"from_address": "a@rakennus.fi", "upstream": "provider"},
        )
        customers = [f"asiakas.{n:02}@rakennustarvike-esimerkki.fi" for n in range(60)]
        line = f"RCPT TO:<{'; '.join(customers)}>\r\n".encode()
        replies = raw_session(relay.port, [
            b"EHLO erp\r\n", b"MAIL FROM:<erp@legacy.local>\r\n", line, b"DATA\r\n",
            b"Subject: x\r\n\r\nhi\r\n.\r\n", b"QUIT\r\n",
        ])  # fmt: skip
        [got] = provider.wait_for(1)

        assert len(line) > 2400
        assert replies[-4].startswith(b"250"), replies
        assert customers == got.rcpt_tos

    def test_a_message_still_arriving_is_not_cut_off_as_idle(
        self, relay: RelayRunner, provider: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The idle timeout is for a client that sends nothing: DATA still arriving after it (35 MB over a
        1 Mbit/s line takes longer than 5 minutes) was cut off, no reply, nothing logged. Here the timeout
        is 1 s and the data comes in pieces for 3 s; a silent client is still cut off after it."""
        monkeypatch.setattr(serve, "IDLE_TIMEOUT", 1.0)
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            stream = sock.makefile("rb")
            stream.readline()
            for command in (b"HELO erp\r\n", b"MAIL FROM:<erp@legacy.local>\r\n", b"RCPT TO:<c@example.com>\r\n", b"DATA\r\n"):
                sock.sendall(command)
                stream.readline()
            sock.sendall(b"Subject: slow\r\n\r\n")
            for n in range(10):
                time.sleep(0.3)
                sock.sendall(b"line %d\r\n" % n)
            sock.sendall(b".\r\n")
            reply = stream.readline()
            idle_since = time.monotonic()
            closed = stream.readline()  # nothing more sent: the idle timeout ends the session
        [got] = provider.wait_for(1)

        assert reply.startswith(b"250 2.0.0 Ok: queued"), reply
        assert b"line 9" in got.content
        assert closed.startswith(b"421 4.4.2 ") and b"Error: timeout exceeded" in closed, closed  # (aiosmtpd: nothing)
        assert time.monotonic() - idle_since < 5

    @pytest.mark.parametrize("command", [
        b"MAIL FROM:<mat\x00ti@erp.local>\r\n", b"RCPT TO:<cr@evil.com\r.example.com>\r\n",
        b"RCPT TO:<ff@exa\x0cmple.com>\r\n", b"RCPT TO:<vt@evil\x0bcom>\r\n", b"RCPT TO:<del@exa\x7fmple.com>\r\n",
    ], ids=["NUL in MAIL", "CR in a domain", "FF", "VT", "DEL"])  # fmt: skip
    def test_a_control_character_in_an_address_is_refused_at_its_command(self, relay: RelayRunner, command: bytes) -> None:
        """The email package's parser drops CR, VT and FF from a domain: mail went to an address nobody
        gave (``cr@evil.com.example.com``); a NUL in MAIL FROM was refused only after the whole DATA."""
        lines = [b"EHLO erp\r\n", b"MAIL FROM:<erp@legacy.local>\r\n", command, b"QUIT\r\n"]
        if command.startswith(b"MAIL"):
            lines = [b"EHLO erp\r\n", command, b"QUIT\r\n"]
        replies = raw_session(relay.port, lines)

        assert replies[-2][:1] == b"5", replies
        assert replies[-2][4:5] == b"5", replies  # with an enhanced status code

    def test_a_size_no_message_has_gets_552_not_a_451(self, relay: RelayRunner) -> None:
        """Command lines of 64 KiB let ``SIZE=`` carry 5,000 digits, which aiosmtpd's ``int()`` refused
        (ValueError: a 451 and a logged traceback); the session goes on."""
        replies = raw_session(relay.port, [b"EHLO erp\r\n", b"MAIL FROM:<erp@legacy.local> SIZE=" + b"9" * 5000 + b"\r\n",
                                           b"MAIL FROM:<erp@legacy.local> SIZE=1000\r\n", b"QUIT\r\n"])  # fmt: skip

        assert replies[-3].startswith(b"552 5.3.4"), replies
        assert replies[-2].startswith(b"250"), replies

    def test_mail_takes_the_auth_parameter_a_logged_in_client_adds(self, relay: RelayRunner, provider: Any) -> None:
        """RFC 4954 section 5: a server that offers AUTH takes ``MAIL FROM:<x> AUTH=<>`` (Sendmail, Exchange
        and JavaMail add it after a login); a malformed value gets 501, and the next MAIL goes."""
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.login("vanha-isp-tunnus", "vanha-salasana")
            bad = client.docmd("MAIL", "FROM:<erp@legacy.local> AUTH=a=b")
            mail = client.docmd("MAIL", "FROM:<erp@legacy.local> AUTH=<> BODY=8BITMIME")
            client.rcpt("c@example.com")
            data = client.data(b"Subject: x\r\n\r\nhi\r\n")
            client.rset()
            named = client.docmd("MAIL", "FROM:<erp@legacy.local> auth=erp+40legacy.local")
        [got] = provider.wait_for(1)

        assert (501, 250, 250, 250) == (bad[0], mail[0], data[0], named[0])
        assert ["c@example.com"] == got.rcpt_tos

    def test_command_lines_logged_by_aiosmtpd_still_hide_the_login(
        self, relay: RelayRunner, provider: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        """With aiosmtpd's ``mail.log`` turned up to DEBUG, its command lines are logged, the AUTH secret
        masked, as aiosmtpd itself does it."""
        secret = base64.b64encode(b"\0vanha-isp-tunnus\0vanha-salasana").decode()
        with caplog.at_level(logging.DEBUG, logger="mail.log"):
            replies = raw_session(relay.port, [b"EHLO erp\r\n", f"AUTH PLAIN {secret}\r\n".encode(), b"QUIT\r\n"])
        logged = "\n".join(record.getMessage() for record in caplog.records if record.name == "mail.log")

        assert replies[-2].startswith(b"235"), replies
        assert "EHLO erp" in logged and "AUTH PLAIN ********" in logged
        assert secret not in logged and "vanha-salasana" not in logged

    def test_command_lines_are_not_masked_for_a_log_that_is_off(
        self, relay: RelayRunner, provider: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """At relay's own level for ``mail.log`` (ERROR) the lines aiosmtpd would log are not even masked:
        that was a regular expression over every command line for nothing."""
        masked: list[bytes] = []
        real_sanitize = aiosmtpd.smtp.sanitize

        def recording_sanitize(text: bytes) -> bytes:
            masked.append(text)
            return real_sanitize(text)

        monkeypatch.setattr(aiosmtpd.smtp, "sanitize", recording_sanitize)
        logging.getLogger("mail.log").setLevel(logging.ERROR)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("erp@legacy.local", ["c@example.com"], b"Subject: x\r\n\r\nhi\r\n")
        provider.wait_for(1)

        assert masked == []

    def test_bare_lf_and_long_lines_are_accepted_and_repaired(self, relay: RelayRunner, provider: Any) -> None:
        """Bare LF line ends and a 5,000-octet line are accepted; the upstream gets CRLF and short lines."""
        body = b"Subject: unix\nFrom: erp@legacy.local\n\nfirst line\n" + b"y" * 5000 + b"\nlast line\n"
        replies = raw_session(relay.port, [
            b"EHLO erp\r\n", b"MAIL FROM:<erp@legacy.local>\r\n", b"RCPT TO:<c@example.com>\r\n", b"DATA\r\n",
            body + b"\r\n.\r\n", b"QUIT\r\n",
        ])  # fmt: skip
        [got] = provider.wait_for(1)

        assert replies[-2].startswith(b"250 2.0.0 Ok: queued as")
        assert b"\n" not in got.content.replace(b"\r\n", b"")
        assert max(len(line) for line in got.content.split(b"\r\n")) <= 998
        assert "y" * 5000 in got.message.get_content().replace("\r\n", "").replace("\n", "")

    def test_lf_dot_lf_does_not_end_the_message(self, relay: RelayRunner, provider: Any) -> None:
        """SMTP smuggling: a bare ``LF.LF`` is content, only ``CRLF.CRLF`` ends DATA."""
        body = b"Subject: one\r\n\r\nfirst\n.\nMAIL FROM:<evil@example.com>\r\nstill the first message\r\n"
        replies = raw_session(relay.port, [
            b"EHLO erp\r\n", b"MAIL FROM:<erp@legacy.local>\r\n", b"RCPT TO:<c@example.com>\r\n", b"DATA\r\n",
            body + b"\r\n.\r\n", b"QUIT\r\n",
        ])  # fmt: skip
        [got] = provider.wait_for(1)
        time.sleep(0.3)

        assert len(provider.received) == 1
        assert sum(r.startswith(b"250 2.0.0 Ok: queued") for r in replies) == 1
        assert b"still the first message" in got.content
        assert b"evil@example.com" in got.content

    def test_a_client_that_only_speaks_bare_lf_may_end_with_lf_dot_lf(self, relay: RelayRunner, provider: Any) -> None:
        """An old Unix program writing LF everywhere, even the final dot, is not left hanging."""
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            stream = sock.makefile("rb")
            stream.readline()
            for command in (b"HELO erp\n", b"MAIL FROM:<erp@legacy.local>\n", b"RCPT TO:<c@example.com>\n", b"DATA\n"):
                sock.sendall(command)
                stream.readline()
            sock.sendall(b"Subject: unix\n\n..dotted line\nlast line\n.\n")
            reply = stream.readline()
            sock.sendall(b"QUIT\n")
        [got] = provider.wait_for(1)

        assert reply.startswith(b"250 2.0.0 Ok: queued")
        assert ".dotted line\nlast line\n" == got.message.get_content().replace("\r\n", "\n")

    def test_dot_stuffed_lines_come_back_unstuffed(self, relay: RelayRunner, provider: Any) -> None:
        """A line starting with a dot survives the trip (RFC 5321 4.5.2)."""
        smtp_send(relay.port, "erp@legacy.local", ["c@example.com"], b"Subject: dots\r\n\r\n.hidden\r\n..two\r\n")
        [got] = provider.wait_for(1)

        assert got.message.get_content().split("\n-- ")[0].replace("\r\n", "\n") == ".hidden\n..two\n"


@pytest.mark.parametrize(
    ("typed", "parsed"),
    [
        ("<(040) 123 4569@sms>", "0401234569@sms"),
        ("<+358 (0)40 123-4567@sms>", "+358401234567@sms"),
        ("<040 123 4567@sms>", "0401234567@sms"),
        ("<a@b.fi>", "a@b.fi"),
    ],
)
def test_phone_numbers_as_typed_in_rcpt(typed: str, parsed: str) -> None:
    """ERP phone fields carry spaces, dashes and brackets; the number survives, not just its tail."""
    session = listener.RelaySMTP.__new__(listener.RelaySMTP)
    session.local_part_limit = 0

    assert (parsed, "") == session._getaddr(typed)


def test_unstuff() -> None:
    """Dot-unstuffing applies at the start and after each CRLF only."""
    assert listener.unstuff(b"..a\r\n..b\r\nc..d") == b".a\r\n.b\r\nc..d"


class TestRegressions:
    def test_latin1_byte_in_mail_from_is_accepted_when_the_sender_is_replaced(
        self, relay: RelayRunner, provider: Any
    ) -> None:
        """An old program's 8-bit MAIL FROM is not a reason to refuse: relay sends as the mailbox anyway."""
        replies = raw_session(relay.port, [
            b"HELO erp\r\n", b"MAIL FROM:<m\xe4tti@erp.local>\r\n", b"RCPT TO:<c@example.com>\r\n", b"DATA\r\n",
            b"Subject: x\r\n\r\nbody\r\n.\r\n", b"QUIT\r\n",
        ])  # fmt: skip
        [got] = provider.wait_for(1)

        assert replies[5].startswith(b"250 2.0.0 Ok: queued")
        assert "a@rakennus.fi" == got.mail_from

    def test_a_bad_recipient_is_refused_at_rcpt_and_the_others_still_go(
        self, relay: RelayRunner, provider: Any
    ) -> None:
        """``RCPT TO:<postmaster>`` (no domain) gets 501 on its own; the message goes to the valid one."""
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("erp")
            client.mail("erp@legacy.local")
            bad, _ = client.rcpt("postmaster")
            good, _ = client.rcpt("c@example.com")
            code, _ = client.data(b"Subject: x\r\n\r\nbody\r\n")
        [got] = provider.wait_for(1)

        assert (501, 250, 250) == (bad, good, code)
        assert ["c@example.com"] == got.rcpt_tos

    def test_utf8_recipient_to_an_upstream_without_smtputf8_bounces_that_recipient_only(
        self, relay: RelayRunner, provider: Any, tmp_path: Path
    ) -> None:
        """A non-ASCII address cannot go to a server without SMTPUTF8: 553 for it, delivery for the rest."""
        replies = raw_session(relay.port, [
            b"EHLO erp\r\n", b"MAIL FROM:<erp@legacy.local> SMTPUTF8\r\n", "RCPT TO:<äiti@example.fi>\r\n".encode(),
            b"RCPT TO:<c@example.com>\r\n", b"DATA\r\n", b"Subject: x\r\n\r\nbody\r\n.\r\n", b"QUIT\r\n",
        ])  # fmt: skip
        got, _notice = provider.wait_for(2)  # the message, then the failure notice naming äiti@ to the sender
        wait_for_entries(tmp_path / "spool", "failed")

        assert any(r.startswith(b"250 2.0.0 Ok: queued") for r in replies)
        assert ["c@example.com"] == got.rcpt_tos
        [entry] = queue_entries(tmp_path / "spool", "failed")
        assert "äiti@example.fi" == entry.bounced[0][0]
        assert "5.6.7" in entry.bounced[0][1]
        assert [] == queue_entries(tmp_path / "spool", "hold")


    @pytest.mark.parametrize("encoding", ["windows-1252", "utf-8"])
    def test_an_idn_recipient_in_the_erps_code_page_goes_as_its_a_label(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, encoding: str
    ) -> None:
        """A Windows ERP writes ``info@yhtiö.fi`` in its ANSI code page, without SMTPUTF8 (``ö`` is the byte
        0xF6): it was 501 "Bad recipient address syntax"; read as windows-1252 as 8-bit headers are, it
        goes, as its A-label to a provider without SMTPUTF8. A byte windows-1252 leaves undefined is
        still refused."""
        plain = upstream("plain", security="ssl", accounts={"a@rakennus.fi": "pw"})
        assert not plain.smtputf8
        relay = relay_with(
            upstreams={"plain": upstream.account(plain, "a@rakennus.fi")},
            company={"from_address": "a@rakennus.fi", "upstream": "plain"},
        )
        with capture_logs() as logs:
            replies = raw_session(relay.port, [
                b"EHLO erp\r\n", b"MAIL FROM:<erp@legacy.local>\r\n", "RCPT TO:<info@yhtiö.fi>\r\n".encode(encoding),
                b"RCPT TO:<x@bad\x81.fi>\r\n", b"DATA\r\n", b"Subject: x\r\n\r\nbody\r\n.\r\n", b"QUIT\r\n",
            ])  # fmt: skip
            [got] = plain.wait_for(1)

        assert [b"250 2.1.5 OK\r\n", b"501"] == [replies[-5], replies[-4][:3]], replies
        assert ["info@xn--yhti-8qa.fi"] == got.rcpt_tos
        [received] = [e for e in logs if e["event"] == "received"]  # the form sent, beside the form given
        assert (["info@yhtiö.fi"], ["info@xn--yhti-8qa.fi"]) == (received["to"], received["to_ascii"])


def test_a_quoted_local_part_is_a_recipient(relay: RelayRunner, provider: Any) -> None:
    """RFC 5321's Quoted-string local part, which Postfix takes: ``"a;b"@x`` was cut at its ``;`` and
    ``"c d"@x`` refused, both with 501. A list around them is still split (sent as typed: smtplib would
    cut the list to its first address)."""
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("erp")
        client.mail("erp@legacy.local")
        replies = [client.rcpt('"c d"@example.com')[0]]  # (max_recipients 3 here)
        replies.append(client.docmd('RCPT TO:<"a;b"@example.com; "e,f"@example.com>')[0])
        client.data(b"Subject: quoted\r\n\r\nlasku\r\n")

    assert [250, 250] == replies
    expected = ['"c d"@example.com', '"a;b"@example.com', '"e,f"@example.com']
    got = provider.wait_for(1)[0]
    assert expected == got.rcpt_tos, got.rcpt_tos


class TestLegacyLogin:
    @pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
    def test_a_program_that_insists_on_logging_in_is_let_in(
        self, relay: RelayRunner, provider: Any, mechanism: str
    ) -> None:
        """An ERP still set up with its old ISP relay's username and password sends AUTH over plain text:
        taken (any login; mail comes only from allowed_networks anyway) and the mail goes."""
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("erp")
            assert "auth" in client.esmtp_features
            client.user, client.password = "old.isp.login", "old-password"
            code, _ = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"), initial_response_ok=False)
            client.sendmail("erp@legacy.local", ["customer@example.com"], b"Subject: x\r\n\r\nlasku\r\n")

        assert 235 == code
        assert ["customer@example.com"] == provider.wait_for(1)[0].rcpt_tos


    def test_auth_login_prompts_as_postfix_sends_them(self, relay: RelayRunner) -> None:
        """An old mail component that waits for the prompt 'Username:' (base64 VXNlcm5hbWU6), as Postfix and
        Exchange send it, hung on aiosmtpd's 'User Name\\0'."""
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            stream = sock.makefile("rb")
            stream.readline()
            sock.sendall(b"EHLO erp\r\n")
            while stream.readline()[3:4] == b"-":
                pass
            sock.sendall(b"AUTH LOGIN\r\n")
            user = stream.readline()
            sock.sendall(base64.b64encode(b"old.isp.login") + b"\r\n")
            password = stream.readline()
            sock.sendall(base64.b64encode(b"old-password") + b"\r\n")
            done = stream.readline()

        assert (b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n") == (user, password)  # Username: / Password:
        assert done.startswith(b"235 ")


def _reference_end(data: bytes, limit: int | None) -> tuple[bytes | None, bytes, bool] | None:
    """The end of DATA found in the whole input at once: ``CRLF.CRLF`` (RFC 5321 4.1.1.4), or for a
    client that sent no CRLF before it, ``LF.LF``. Returns the content (``None`` if over ``limit``),
    what follows the marker, and whether it was ``LF.LF``; ``None`` while there is no end."""
    stream = b"\r\n" + data  # the CRLF before the first line: a lone "." line first is an empty message
    crlf, lf = stream.find(b"\r\n", 2), stream.find(b"\n.\n", 1)
    if lf >= 0 and (crlf < 0 or crlf > lf):
        content, rest, lf_only = stream[2 : lf + 1], stream[lf + 3 :], True
    elif (at := stream.find(b"\r\n.\r\n")) >= 0:
        content, rest, lf_only = stream[2 : at + 2], stream[at + 5 :], False
    else:
        return None
    return (None if limit and len(content) > limit else content), rest, lf_only


class TestEndOfData:
    """The end-of-DATA scan sees chunks as the network cuts them: the same answer for every cut."""

    @staticmethod
    def scan(chunks: list[bytes], limit: int | None) -> tuple[bytes | None, bytes, bool] | None:
        scan, kept = listener._EndScan(), bytearray()
        for n, chunk in enumerate(chunks):
            found = scan.feed(chunk)
            kept += chunk
            if found is not None:  # what follows is left unread, for the next command
                after = found + scan.marker_length
                content = bytes(kept[:found]) if not (limit and found > limit) else None
                return content, bytes(kept[after:]) + b"".join(chunks[n + 1 :]), scan.lf_only
        return None

    @pytest.mark.parametrize(
        "data",
        [b".\r\n", b".\n", b"a\r\n.\r\n", b"a\n.\nMAIL FROM:<x>\r\n", b"a\r\nb\n.\nc\r\n.\r\nRSET\r\n",
         b"x" * 70 + b"\r\n.\r\nQUIT\r\n", b"\r\n.\r\n", b"a\n.\r\n.\r\n"],
    )  # fmt: skip
    def test_every_cut_of_known_inputs(self, data: bytes) -> None:
        want = _reference_end(data, None)
        for cut in range(len(data) + 1):
            for cut2 in range(cut, len(data) + 1):
                chunks = [c for c in (data[:cut], data[cut:cut2], data[cut2:]) if c]
                assert want == self.scan(chunks, None), (data, cut, cut2)

    def test_random_inputs_and_cuts(self) -> None:
        import random

        rng = random.Random(2026)
        alphabet = [b"\r\n", b"\n", b"\r", b".", b"x", b"\r\n.\r\n", b"\n.\n", b".."]
        for _ in range(3000):
            data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
            limit = rng.choice([None, 3, 8])
            cuts = sorted(rng.sample(range(len(data) + 1), min(3, len(data) + 1)))
            chunks = [c for c in (data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)) if c]
            assert _reference_end(data, limit) == self.scan(chunks, limit), (data, chunks, limit)


    def test_the_scan_sees_every_stuffed_line_however_cut(self) -> None:
        """The scan notes a stuffed line (``CRLF..``) on its way to the end marker, so that ``unstuff``
        need not search the body again: for every cut, the body comes out as a full search makes it."""
        import random

        rng = random.Random(7)
        alphabet = [b"\r\n", b"\r\n..", b"..", b".", b"x", b"\r\n.x", b"\r", b"\n"]
        for _ in range(3000):
            data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10))) + b"\r\n.\r\n"
            cuts = sorted(rng.sample(range(len(data) + 1), min(3, len(data) + 1)))
            chunks = [c for c in (data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)) if c]
            scan, kept = listener._EndScan(), b""
            for chunk in chunks:
                kept += chunk
                if (found := scan.feed(chunk)) is not None:
                    break
            assert found is not None, (data, chunks)
            if scan.lf_only:
                continue
            content = kept[:found]
            assert listener.unstuff(content) == listener.unstuff(content, stuffed=scan.stuffed), (data, chunks)


def test_a_big_message_is_received_whole_with_pipelined_commands_after_it(
    relay: RelayRunner, provider: Any
) -> None:
    """60 KB in many small writes with the next command in the same write as the end marker."""
    body = b"".join(b"line %05d ........................................\r\n" % n for n in range(1100))
    message = b"Subject: iso\r\n\r\n" + body
    assert len(message) < 64 * 1024
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        stream = sock.makefile("rb")
        stream.readline()
        sock.sendall(b"HELO erp\r\nMAIL FROM:<erp@legacy.local>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n")
        got = [stream.readline() for _ in range(4)]
        assert got[-1].startswith(b"354")
        for at in range(0, len(message), 997):
            sock.sendall(message[at : at + 997])
        sock.sendall(b".\r\nQUIT\r\n")
        assert stream.readline().startswith(b"250")
        assert stream.readline().startswith(b"221")
    (received,) = provider.wait_for(1)
    assert received.content.endswith(body)
