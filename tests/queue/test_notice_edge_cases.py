"""Notices about replies providers should never send, and still do: bytes that are not UTF-8, terminal
escape sequences, NUL, kilobytes of text. The sender must be told whatever the provider said."""

from __future__ import annotations

import json
import re
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from relay.commands import cli
from relay.queue import notices
from relay.queue.spool import QueueEntry, Spool
from tests.conftest import UpstreamFactory, build_config, queue_entries, smtp_send
from tests.queue.test_notices import INVOICE, POMO, dsn_fields, office, start, text_of, wait_until
from tests.servers import Received

RelayFactory = Any
PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # what a notice's bytes may not hold (CR, LF, tab may)

# the wire's bytes: aiosmtpd sends a reply given as bytes as it is (an old Exchange, Domino or a proxy
# answering in Latin-1, a provider echoing a client's escape sequence)
LATIN1 = b"550 5.1.1 K\xe4ytt\xe4j\xe4\xe4 ei l\xf6ydy \xff\x1b[31m end"
ODD_REPLIES: dict[str, bytes] = {
    "latin1@example.com": LATIN1,
    "nul@example.com": b"550 5.1.1 before\x00after",
    "osc@example.com": b"550 5.1.1 bad\x07bell\x1b]0;pwned\x07 end",
    "multi@example.com": b"550-5.1.1 first line\x1b[2J\r\n550 5.1.1 second\rline",
    "long@example.com": b"550 5.1.1 " + b"x" * 5000,
}


def fields_unfolded(report: EmailMessage) -> list[str]:
    """Every Diagnostic-Code of the report as a reader unfolds it (RFC 5322: CRLF before a space goes)."""
    return [str(block["Diagnostic-Code"]).replace("\r\n", "").replace("\n", "") for block in dsn_fields(report)[1:]]


def assert_well_formed(content: bytes) -> None:
    """RFC 5322's line limit, and no control character a mail reader or a terminal would act on."""
    assert max(len(line) for line in content.split(b"\r\n")) <= 998
    assert not CONTROLS.search(content.decode("ascii", "replace").replace("\ufffd", ""))


def entry(**fields: Any) -> QueueEntry:
    return QueueEntry(id="18F0000000000ABCDEF", account="o365", mail_from=POMO, recipients=("a@example.com",),
                      size=10, received_at=time.time(), user="pomo", **fields)  # fmt: skip


def build(tmp_path: Path, failed: list[tuple[str, str]], the_entry: QueueEntry | None = None) -> EmailMessage:
    """The notice as the scheduler builds it, from a config parsed as an admin's file is."""
    config, _ = build_config(tmp_path, upstreams={"o365": {"host": "127.0.0.1", "port": 2587}},
                             company={"upstream": "o365"}, users={"pomo": {"addresses": POMO}})  # fmt: skip
    out = notices.build(config, the_entry or entry(), failed, b"Subject: Lasku 4711\r\n", "failed", now=time.time())
    assert out is not None
    assert_well_formed(out.content)
    return Received(None, POMO, [POMO], out.content, True).message


class TestOddReplies:
    def test_replies_with_bytes_that_are_not_utf8_still_reach_the_sender(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """1. pomo sends to one good and five recipients the provider refuses with odd replies (Latin-1
        bytes, NUL, ESC and BEL, a bare CR in a multi-line reply, 5 KB)  2. relay builds the notice
        Result: pomo gets one notice naming all five, readable and well-formed, the odd bytes escaped.
        (The Latin-1 reply made building it fail: no notice at all, and the sender never knew.)"""
        up = office(upstream)
        up.faults.rcpt = ODD_REPLIES  # type: ignore[assignment]  (bytes: sent as they are)
        relay = start(relay_with, upstream, up)
        smtp_send(relay.port, POMO, ["asiakas@example.com", *ODD_REPLIES], INVOICE)
        mail, notice = sorted(up.wait_for(2), key=lambda r: r.message["Auto-Submitted"] is not None)
        wait_until(lambda: queue_entries(tmp_path / "spool", "failed"))

        assert mail.rcpt_tos == ["asiakas@example.com"] and notice.rcpt_tos == [POMO]
        [failed] = queue_entries(tmp_path / "spool", "failed")
        assert failed.notices and failed.notices[0].startswith("failed ")
        assert_well_formed(notice.content)
        diagnostics = fields_unfolded(notice.message)
        assert len(diagnostics) == len(ODD_REPLIES)
        assert all(PRINTABLE_ASCII.fullmatch(code) for code in diagnostics), diagnostics
        expected = "smtp; 550 5.1.1 K\\xe4ytt\\xe4j\\xe4\\xe4 ei l\\xf6ydy \\xff\\x1b[31m end"
        assert expected in diagnostics
        assert "smtp; 550 5.1.1 bad\\x07bell\\x1b]0;pwned\\x07 end" in diagnostics
        text = text_of(notice.message)
        assert not CONTROLS.search(text) and "K\\xe4ytt\\xe4j\\xe4\\xe4 ei l\\xf6ydy \\xff\\x1b[31m end" in text
        assert all(recipient in text for recipient in ODD_REPLIES)

    @pytest.mark.parametrize(
        ("reply", "shown"),
        [
            ("550 5.1.1 K\udce4ytt\udce4j\udce4 \udcff", "550 5.1.1 K\\xe4ytt\\xe4j\\xe4 \\xff"),
            ("550 5.1.1 a\x00b", "550 5.1.1 a\\x00b"),
            ("550 5.1.1 red\x1b[31m \x9b2J", "550 5.1.1 red\\x1b[31m \\x9b2J"),
            ("550-5.1.1 one\r\n550 5.1.1 two\x1b[0m", "550-5.1.1 one 550 5.1.1 two\\x1b[0m"),
        ],
        ids=["surrogate-escapes", "nul", "esc-and-csi", "crlf-and-esc"],
    )
    def test_a_reply_is_escaped_in_both_parts(self, tmp_path: Path, reply: str, shown: str) -> None:
        """What the provider said reaches the sender in both parts, every odd character as an escape."""
        report = build(tmp_path, [("a@example.com", reply)])

        assert fields_unfolded(report) == [f"smtp; {shown}"]
        assert f"the provider said: {shown}" in text_of(report)

    @pytest.mark.parametrize("reply", ["550 5.1.1 " + "x" * 5000, "550 5.1.1 " + "word " * 1000])
    def test_a_5kb_reply_is_cut_and_folded(self, tmp_path: Path, reply: str) -> None:
        """A reply of kilobytes (one word, or many) stays one logical field under 998 octets a line."""
        report = build(tmp_path, [("a@example.com", reply)])

        [code] = fields_unfolded(report)
        assert code.startswith("smtp; 550 5.1.1 ") and code.endswith(" more characters]")
        assert len(code) < len(reply)
        [block] = dsn_fields(report)[1:]
        assert "\n" not in str(block["Diagnostic-Code"]).replace("\n ", "")  # folded only before a space


def failed_mail(tmp_path: Path) -> QueueEntry:
    """The one failed entry of kind mail, once the scheduler has recorded it (after queueing its notice)."""
    wait_until(lambda: [e for e in queue_entries(tmp_path / "spool", "failed") if e.kind == "mail"], timeout=20)
    [entry] = [e for e in queue_entries(tmp_path / "spool", "failed") if e.kind == "mail"]
    return entry


def queued_notice(tmp_path: Path, entry: QueueEntry) -> EmailMessage:
    """The notice relay queued about ``entry``, as it lies in the spool (its provider is down)."""
    [note] = entry.notices
    content = Spool(tmp_path / "spool").body_path(note.split()[1]).read_bytes()
    return Received(None, POMO, [POMO], content, True).message


class TestExpiry:
    def test_an_expiry_notice_gives_the_last_error(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """1. the provider is down (connection refused) for the whole max_queue_lifetime  2. relay gives up
        Result: the notice says why: the last attempt's error, in the text and in Diagnostic-Code (it said
        "the provider said: expired in queue:" and "X-Relay; no reply")."""
        up = office(upstream)
        relay = start(relay_with, upstream, up, max_queue_lifetime=1.0, retry_interval=0.2, max_retry_interval=0.2)
        up.stop()
        smtp_send(relay.port, POMO, ["asiakas@example.com"], INVOICE)
        report = queued_notice(tmp_path, failed_mail(tmp_path))

        [code] = fields_unfolded(report)
        assert code.startswith("X-Relay; cannot connect") and dsn_fields(report)[1]["Status"] == "4.4.7"
        text = text_of(report)
        assert "not delivered within 1 second, relay's time limit" in text
        assert "the last attempt: cannot connect" in text and "expired in queue" not in text
        assert "relay kept trying until its time limit" in text

    def test_an_expired_recipient_is_bounced_with_the_last_error(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path, capsys: Any
    ) -> None:
        """1. the provider is down (connection refused) for the whole max_queue_lifetime  2. relay gives up
        Result: the recipient's bounce text names the error, as the notice does, in the envelope, in
        relay queue and --json, and in the delivery_failed event (each said "expired in queue: ")."""
        up = office(upstream)
        with capture_logs() as logs:
            relay = start(relay_with, upstream, up, max_queue_lifetime=1.0, retry_interval=0.2, max_retry_interval=0.2)
            up.stop()
            smtp_send(relay.port, POMO, ["asiakas@example.com"], INVOICE)
            entry = failed_mail(tmp_path)
            relay.stop()

        [(recipient, reason)] = entry.bounced
        assert recipient == "asiakas@example.com" and reason.startswith("expired in queue: cannot connect"), reason
        [failed] = [e for e in logs if e["event"] == "delivery_failed" and e["queue_id"] == entry.id]
        assert failed["bounced"] == {recipient: reason}
        capsys.readouterr()
        assert 0 == cli.main(["queue", "-c", str(tmp_path / "relay.yaml")])
        assert f"bounced: {recipient} ({reason})" in capsys.readouterr().out
        assert 0 == cli.main(["queue", "-c", str(tmp_path / "relay.yaml"), "--json"])
        [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines() if entry.id in line]
        assert row["bounced"] == [{"recipient": recipient, "reply": reason}]

    def test_a_lost_reply_is_not_called_undelivered(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """1. the provider takes the message at every attempt and the connection drops before its 250
        (RFC 1047)  2. max_queue_lifetime is reached
        Result: the notice says it may have been delivered and to ask the recipient, never "could NOT be
        delivered ... send it again" (the provider holds a copy from every attempt)."""
        up = office(upstream)
        up.faults.reply_lost = True
        relay = start(relay_with, upstream, up, max_queue_lifetime=1.0, retry_interval=0.2, max_retry_interval=0.2)
        smtp_send(relay.port, POMO, ["asiakas@example.com"], INVOICE)
        failed_mail(tmp_path)
        wait_until(lambda: any(r.message["Auto-Submitted"] for r in up.received))  # (its own 250 is lost too)
        [report] = [r.message for r in up.received if r.message["Auto-Submitted"]][:1]

        text = text_of(report)
        assert report["Subject"].startswith("Delivery uncertain: ")
        assert "may not have been delivered" in text and "could NOT" not in text
        assert "may have been delivered: the provider stopped answering after the whole message was sent" in text
        assert "Ask the recipient whether the message arrived" in text and "Check the addresses" not in text
        [code] = fields_unfolded(report)
        assert code.startswith("X-Relay; the upstream closed the connection")


SENDER = "does not let your account send as this sender"
REFUSALS = {
    "sendas@example.com": "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
    "spam@example.com": "550 5.7.1 Message rejected as spam by Content Filtering",
    "full@example.com": "552 5.2.2 Mailbox full",
    "gone@example.com": "550 5.1.1 User unknown",
    "big@example.com": "552 5.3.4 Message size exceeds fixed limit",
    "other@example.com": "550 5.1.1 No such user here",
}


class TestAdvice:
    def test_the_advice_follows_the_status_code(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """1. the provider refuses six recipients: a sender it may not send as, spam, a full mailbox, two
        unknown users, a size limit  2. relay tells the sender
        Result: one piece of advice per kind, each once; "check the addresses" only for the unknown users
        (a sender or spam refusal fails the same way however the addresses are typed)."""
        up = office(upstream)
        up.faults.rcpt = REFUSALS
        relay = start(relay_with, upstream, up)
        smtp_send(relay.port, POMO, list(REFUSALS), INVOICE)
        [notice] = up.wait_for(1)

        text = text_of(notice.message)
        advice = text.split("the message's headers are attached.)")[1].strip().splitlines()
        expected = [SENDER, "refused the message by its rules", "mailbox is full", "Check the recipient's address",
                    "too large"]  # fmt: skip
        assert len(advice) == len(expected) and all(words in line for words, line in zip(expected, advice, strict=True))
        assert "Check the addresses" not in text

    @pytest.mark.parametrize(
        ("reply", "advice"),
        [
            ("554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied", SENDER),
            ("553 5.1.8 Sender address rejected: Domain not found", SENDER),
            ("550 5.2.1 Mailbox disabled, not accepting messages", "mailbox does not take mail"),
        ],
        ids=["office365-after-data", "sender-domain", "mailbox-disabled"],
    )  # fmt: skip
    def test_the_sender_is_not_told_to_check_the_addresses(self, tmp_path: Path, reply: str, advice: str) -> None:
        """Office 365 refuses a sender after the data as 5.2.0 (a mailbox code): its words decide."""
        text = text_of(build(tmp_path, [("a@example.com", reply)]))

        assert advice in text.rstrip().splitlines()[-1] and "Check the addresses" not in text


class TestRelayQueue:
    def test_replies_and_headers_reach_the_terminal_escaped(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path, capsys: Any
    ) -> None:
        """1. a provider refuses with Latin-1 bytes and an ESC sequence; the Subject decodes to one too
        2. the admin runs relay queue, --show and --json
        Result: the text outputs show \\x1b and \\xe4, never the bytes (they recoloured the terminal);
        --json carries the reply as relay stored it, in ASCII (JSON escapes it)."""
        up = office(upstream)
        up.faults.rcpt = {"latin1@example.com": LATIN1}  # type: ignore[dict-item]
        relay = start(relay_with, upstream, up)
        message = b"From: erp@legacy.local\r\nSubject: =?utf-8?q?Lasku=1B]0;pwned=07?=\r\n\r\nInvoice\r\n"
        smtp_send(relay.port, POMO, ["latin1@example.com"], message)
        entry = failed_mail(tmp_path)
        config = str(tmp_path / "relay.yaml")
        capsys.readouterr()

        escaped = "K\\xe4ytt\\xe4j\\xe4\\xe4 ei l\\xf6ydy \\xff\\x1b[31m end"
        for extra in ([], ["--show", entry.id]):
            assert 0 == cli.main(["queue", "-c", config, *extra])
            out = capsys.readouterr().out
            assert escaped in out and not CONTROLS.search(out.replace("\t", "")), out
            assert not re.search("[\ud800-\udfff]", out)
        assert "Lasku\\x1b]0;pwned\\x07" in out  # --show's decoded Subject
        assert 0 == cli.main(["queue", "-c", config, "--json"])
        out = capsys.readouterr().out
        [row] = [json.loads(line) for line in out.splitlines() if entry.id in line]
        assert out.isascii() and row["bounced"][0]["reply"] == LATIN1.decode("utf-8", "surrogateescape")

    def test_a_notice_that_failed_is_not_called_sent(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path, capsys: Any
    ) -> None:
        """1. a recipient is refused  2. the provider refuses the notice to the sender too
        Result: relay queue and --show say the notice FAILED (the user was not told), not "notice sent"."""
        up = office(upstream)
        up.faults.rcpt = {"gone@example.com": "550 5.1.1 User unknown", POMO: "550 5.2.1 Mailbox disabled"}
        relay = start(relay_with, upstream, up)
        smtp_send(relay.port, POMO, ["gone@example.com"], INVOICE)
        wait_until(lambda: len(queue_entries(tmp_path / "spool", "failed")) == 2)
        entry = failed_mail(tmp_path)
        notice_id = entry.notices[0].split()[1]
        capsys.readouterr()

        for extra in ([], ["--show", entry.id]):
            assert 0 == cli.main(["queue", "-c", str(tmp_path / "relay.yaml"), *extra])
            out = capsys.readouterr().out
            assert f"failure notice (queue id {notice_id}; not delivered either, so the user was not told)" in out
            assert "notice FAILED:" in out and "notice sent" not in out
