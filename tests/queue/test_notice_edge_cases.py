"""Notices about replies providers should never send, and still do: bytes that are not UTF-8, terminal
escape sequences, NUL, kilobytes of text. The sender must be told whatever the provider said."""

from __future__ import annotations

import re
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from relay.queue import notices
from relay.queue.spool import QueueEntry
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
