"""Providers whose replies relay cannot read, or that fail halfway through a message (black-box findings
2, 9, 10 and 7 of the upstream exploration).

A garbage reply to the end of a message was logged as "upstream refused the session", code -1, and each
retry sent the message again with no word that the provider may hold it already (it held 44 copies); an
8 KB ``550`` to one RCPT deferred the whole message until it expired; a connection dropped while the body
was being sent was logged as "the whole message was sent ... may arrive twice". aiosmtpd cannot be made
to answer like that, so these providers are raw asyncio servers (implicit TLS, AUTH PLAIN) that answer
each step with the bytes a test gives.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay.config.credentials import Secret
from relay.transports.smtp import Outcome, deliver
from tests.servers import RawUpstream, settle
from tests.transports.test_delivery import BODY, LOGIN, PASSWORD

TWICE = "if it took the message, the next attempt sends it twice"


@dataclass
class Script:
    """How the provider answers: ``replies`` replaces its answer at a step (``AUTH``, ``MAIL``, ``RCPT <address>``,
    ``DATA`` for the 354, ``END`` for the reply to the final dot or ``BDAT ... LAST``), as raw bytes."""

    replies: dict[str, bytes] = field(default_factory=dict)
    pipelining: bool = False
    chunking: bool = False
    abort_after: int | None = None  # octets of the body read before the connection is aborted


class ScriptedUpstream(RawUpstream):
    """A provider that keeps every message it read whole (before its reply, as providers do)."""

    name = "scripted"

    def __init__(self, server_context: ssl.SSLContext, script: Script) -> None:
        super().__init__(server_context)
        self.script = script
        self.kept: list[bytes] = []
        self.body_read = 0  # octets of message body read, over all connections

    def _answer(self, step: str, default: bytes) -> bytes:
        return self.script.replies.get(step, default)

    def _ehlo(self) -> bytes:
        offers = [b"scripted", b"AUTH PLAIN"]
        offers += [b"PIPELINING"] if self.script.pipelining else []
        offers += [b"CHUNKING"] if self.script.chunking else []
        return b"".join(b"250-" + offer + b"\r\n" for offer in offers[:-1]) + b"250 " + offers[-1] + b"\r\n"

    async def _body(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        """The message after a 354, up to the final dot; ``None`` when the connection ends first."""
        body = b""
        while (line := await reader.readline()) != b".\r\n":
            if not line:
                return None
            body += line
            self.body_read += len(line)
            if self.script.abort_after is not None and len(body) > self.script.abort_after:
                writer.transport.abort()
                return None
        return body

    async def _answer_line(self, line: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one command; ``False`` when the session is over."""
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO"):
            writer.write(self._ehlo())
        elif verb == b"AUTH":
            writer.write(self._answer("AUTH", b"235 2.7.0 Authentication successful\r\n"))
        elif verb == b"MAIL":
            writer.write(self._answer("MAIL", b"250 2.1.0 Ok\r\n"))
        elif verb == b"RCPT":
            address = line.split(b"<", 1)[-1].split(b">", 1)[0].decode()
            writer.write(self._answer(f"RCPT {address}", b"250 2.1.5 Ok\r\n"))
        elif verb == b"DATA":
            writer.write(self._answer("DATA", b"354 End data with <CR><LF>.<CR><LF>\r\n"))
            await writer.drain()
            body = await self._body(reader, writer)
            if body is None:
                return False
            self._keep(body, writer)
        elif verb == b"BDAT":
            body = await reader.readexactly(int(line.split()[1]))
            self._keep(body, writer)
        elif verb == b"QUIT":
            writer.write(b"221 2.0.0 Bye\r\n")
            return False
        else:  # RSET, NOOP
            writer.write(b"250 2.0.0 Ok\r\n")
        await writer.drain()
        return True

    def _keep(self, body: bytes, writer: asyncio.StreamWriter) -> None:
        self.kept.append(body)
        writer.write(self._answer("END", b"250 2.0.0 Ok: queued\r\n"))

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 scripted ESMTP\r\n")
        try:
            while (line := await reader.readline()) and await self._answer_line(line, reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.transport.abort()



def attempt(
    server_context: ssl.SSLContext, ca_file: Path, script: Script, recipients: list[str], body: bytes = BODY
) -> tuple[Outcome, ScriptedUpstream]:
    """One delivery to a provider following ``script``."""

    async def run(up: ScriptedUpstream) -> Outcome:
        outcome = await deliver(up.account(ca_file, LOGIN), Secret(PASSWORD), LOGIN, recipients, body)
        await settle()
        return outcome

    with ScriptedUpstream(server_context, script) as up:
        return asyncio.run(run(up)), up


MODES = {  # how the message goes: DATA one command at a time, DATA pipelined, BDAT pipelined
    "one-by-one": {},
    "pipelining": {"pipelining": True},
    "chunking": {"pipelining": True, "chunking": True},
}


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> dict[str, bool]:
    return MODES[request.param]


class TestAnUnreadableReplyToTheWholeMessage:
    @pytest.mark.parametrize(
        ("reply", "shown"),
        [(b"2x0 garbage\r\n", "2x0 garbage"), (b"250 " + b"B" * 2_000_000 + b"\r\n", "250 BBBB")],
        ids=["garbage", "2-MB-line"],
    )
    def test_is_a_lost_reply_the_message_may_arrive_twice(
        self, server_context: ssl.SSLContext, ca_file: Path, mode: dict[str, bool], reply: bytes, shown: str
    ) -> None:
        """The provider had the whole message when it answered something relay cannot read: it may have
        taken it, exactly as when the reply is lost (RFC 1047). Deferred with the duplicate warning and
        what was received, never "refused the session" with aiosmtplib's -1 for a code."""
        outcome, up = attempt(server_context, ca_file, Script(replies={"END": reply}, **mode), ["a@example.com"])

        assert ("deferred", 1) == (outcome.result, len(up.kept))
        assert None is outcome.reply[0]
        error = outcome.error or ""
        assert error.startswith("unreadable reply from the provider at "), error
        assert shown in error and TWICE in error, error
        assert len(error) < 400, error  # what was received is cut short
        assert "refused the session" not in error


class TestUnreadableRepliesBeforeTheMessage:
    @pytest.mark.parametrize(
        ("reply", "shown"),
        [(b"hello this is garbage\r\n", "hello this is garbage"), (b"250 " + b"A" * 2_000_000 + b"\r\n", "250 AAA")],
        ids=["garbage", "2-MB-line"],
    )
    def test_at_mail_is_named_and_deferred(
        self, server_context: ssl.SSLContext, ca_file: Path, mode: dict[str, bool], reply: bytes, shown: str
    ) -> None:
        """No duplicate warning where the message was not sent; with BDAT it went in the same write as MAIL,
        and a server out of step may have kept it (this one did)."""
        outcome, up = attempt(server_context, ca_file, Script(replies={"MAIL": reply}, **mode), ["a@example.com"])

        assert ("deferred", None) == (outcome.result, outcome.reply[0])
        error = outcome.error or ""
        assert error.startswith("unreadable reply from the provider at MAIL: " + shown), error
        assert (TWICE in error, len(up.kept)) == ((True, 1) if mode.get("chunking") else (False, 0)), error
        assert len(error) < 400, error

    def test_at_a_step_aiosmtplib_reads_the_step_is_named(self, server_context: ssl.SSLContext, ca_file: Path) -> None:
        outcome, _ = attempt(server_context, ca_file, Script(replies={"AUTH": b"oops\r\n"}), ["a@example.com"])

        assert ("deferred", None) == (outcome.result, outcome.reply[0])
        assert "unreadable reply from the provider at AUTH: oops" == outcome.error

    def test_a_control_character_in_what_was_received_is_shown_escaped(
        self, server_context: ssl.SSLContext, ca_file: Path
    ) -> None:
        """What was received goes to the log and the admin's terminal: printable only."""
        script = Script(replies={"MAIL": b"hi\x1b]0;pwned\x07 there\r\n"})

        outcome, _ = attempt(server_context, ca_file, script, ["a@example.com"])

        assert "\x1b" not in (outcome.error or "") and "\\x1b]0;pwned\\x07 there" in (outcome.error or "")

    def test_an_over_long_refusal_of_one_recipient_is_read_by_its_code(
        self, server_context: ssl.SSLContext, ca_file: Path, mode: dict[str, bool]
    ) -> None:
        """An 8 KB ``550`` line is longer than aiosmtplib reads, but it is a well-formed refusal of that
        recipient: it bounces, the others are delivered (it deferred the whole message until it expired)."""
        refusal = b"550 5.1.1 " + b"long-reason " * 700 + b"\r\n"
        script = Script(replies={"RCPT bad@example.com": refusal}, **mode)

        outcome, up = attempt(server_context, ca_file, script, ["ok@example.com", "bad@example.com"])

        assert ["ok@example.com"] == outcome.delivered
        code, text = outcome.bounced["bad@example.com"]
        assert 550 == code and text.startswith("5.1.1 long-reason long-reason") and len(text) < 1024
        assert 1 == len(up.kept)


class TestAConnectionLostWhileTheMessageIsSent:
    def test_is_a_plain_deferral_not_a_possible_duplicate(
        self, server_context: ssl.SSLContext, ca_file: Path, mode: dict[str, bool]
    ) -> None:
        """The provider read 200 octets of a 20 MB body and dropped the connection. Writes into a connection
        whose end relay has not noticed yet go nowhere without an error: the rest of the body was counted
        as sent and the attempt logged as "the whole message was sent ... may arrive twice", which only a
        lost reply to a whole message may say (``TestAnUnreadableReplyToTheWholeMessage``)."""
        body = b"Subject: big\r\n\r\n" + (b"y" * 76 + b"\r\n") * (20 * 1024 * 1024 // 78)

        outcome, up = attempt(server_context, ca_file, Script(abort_after=200, **mode), ["a@example.com"], body)

        assert ("deferred", []) == (outcome.result, up.kept)
        error = outcome.error or ""
        assert "connection lost while sending the message" in error and TWICE not in error, error
        assert up.body_read < len(body)
