"""A kept connection never fails mail (issue 13, section 1).

Seen against a real Postfix upstream: a ``451`` at the end of DATA left Postfix's transaction open, the
connection went back to relay's pool as it was, the next MAIL on it got ``503 5.5.1 Error: nested MAIL
command``, and relay bounced that message as "sender refused". Here the upstream behaves like that
Postfix (``faults.keep_failed_transaction``) and fails in the other ways a provider fails on a reused
connection; every message must arrive exactly once, and none may go to ``failed/`` unless its own 5xx
says so.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay.envelope import Account
from relay.transports.smtp import Outcome
from tests.conftest import UpstreamFactory, queue_entries, smtp_send
from tests.servers import RawUpstream, RelayRunner, Upstream
from tests.transports.test_delivery import LOGIN, PASSWORD, send_pooled

RelayFactory = Callable[..., RelayRunner]


@pytest.fixture(params=[True, False], ids=["pipelining", "one-by-one"])
def postfix(upstream: UpstreamFactory, request: pytest.FixtureRequest) -> Upstream:
    """An upstream that keeps a refused transaction open until RSET, as the Postfix of the report did;
    with PIPELINING as Postfix offers it, and without."""
    up = upstream("postfix", security="starttls", accounts={LOGIN: PASSWORD})
    up.faults.keep_failed_transaction = True
    up.pipelining = request.param
    return up


def account_of(up: Upstream, ca_file: Path) -> Account:
    return Account(name=up.name, host="127.0.0.1", port=up.port, security="starttls", username=LOGIN,
                   ca_file=ca_file, timeout=5)  # fmt: skip


def through_one_pool(account: Account, steps: list[Callable[[], Any] | None]) -> list[Outcome]:
    """One delivery per step, all through one ``ConnectionPool``; each step changes the upstream first."""
    return send_pooled(account, [(PASSWORD, step) for step in steps])


def setter(up: Upstream, **faults: Any) -> Callable[[], None]:
    def apply() -> None:
        for name, value in faults.items():
            setattr(up.faults, name, value)

    return apply


class TestOnAKeptConnection:
    def test_451_after_the_dot_then_the_next_message_is_delivered_on_the_same_connection(
        self, postfix: Upstream, ca_file: Path
    ) -> None:
        """The refused transaction is reset (RSET), so the connection is clean for the next message."""
        first, second = through_one_pool(
            account_of(postfix, ca_file),
            [setter(postfix, data="451 4.3.0 Error: queue file write error"), setter(postfix, data=None)],
        )
        assert ("deferred", "delivered") == (first.result, second.result)
        assert (1, 1, 1) == (postfix.resets, postfix.connections, len(postfix.received))

    def test_451_at_the_data_command_is_reset_before_reuse(self, postfix: Upstream, ca_file: Path) -> None:
        first, second = through_one_pool(
            account_of(postfix, ca_file),
            [setter(postfix, data_command="451 4.3.0 try again later"), setter(postfix, data_command=None)],
        )
        assert ("deferred", "delivered") == (first.result, second.result)
        assert 1 == len(postfix.received)

    def test_554_after_the_dot_bounces_only_that_message(self, postfix: Upstream, ca_file: Path) -> None:
        first, second = through_one_pool(
            account_of(postfix, ca_file), [setter(postfix, data="554 5.7.1 spam rejected"), setter(postfix, data=None)]
        )
        assert ("bounced", "delivered") == (first.result, second.result)
        assert (554, "5.7.1 spam rejected") == first.bounced["a@example.com"]
        assert 1 == postfix.connections

    def test_500_after_the_dot_on_a_reused_connection_is_checked_on_a_fresh_one(
        self, postfix: Upstream, ca_file: Path
    ) -> None:
        """A kept connection may be out of step, so its 500 to the dot is not taken for a refusal of the
        message; a fresh connection that says the same bounces it (the data itself is refused)."""
        first, second, third = through_one_pool(
            account_of(postfix, ca_file),
            [None, setter(postfix, data="500 5.5.2 Line too long"), setter(postfix, data=None)],
        )
        assert ("delivered", "bounced", "delivered") == (first.result, second.result, third.result)
        assert not second.session_failed
        assert (500, "5.5.2 Line too long") == second.bounced["a@example.com"]
        assert (2, 2) == (postfix.connections, len(postfix.received))

    def test_503_at_mail_is_never_a_bounce(self, postfix: Upstream, ca_file: Path) -> None:
        """A bad-sequence reply is about the session: deferred (a fresh connection is tried), then delivered."""
        first, second, third = through_one_pool(
            account_of(postfix, ca_file),
            [None, setter(postfix, mail="503 5.5.1 Error: nested MAIL command"), setter(postfix, mail=None)],
        )
        assert ("delivered", "deferred", "delivered") == (first.result, second.result, third.result)
        assert not second.bounced
        assert "session error" in (second.error or "")
        assert 2 == len(postfix.received)

    def test_a_5xx_at_mail_on_a_reused_connection_is_checked_on_a_fresh_one(
        self, postfix: Upstream, ca_file: Path
    ) -> None:
        """The reused connection's word is not taken for a permanent refusal; a fresh one confirms it."""
        first, second = through_one_pool(
            account_of(postfix, ca_file), [None, setter(postfix, mail="550 5.7.60 SMTP; Client does not have permissions")]
        )
        assert ("delivered", "bounced") == (first.result, second.result)
        assert 2 == postfix.connections

    def test_connection_dropped_between_messages(self, postfix: Upstream, ca_file: Path) -> None:
        outcomes = through_one_pool(account_of(postfix, ca_file), [None, postfix.drop_connections, None])
        assert ["delivered"] * 3 == [o.result for o in outcomes]
        assert 3 == len(postfix.received)


def _message(n: int) -> bytes:
    return f"Message-ID: <n{n}@erp.local>\r\nSubject: Lasku {n}\r\n\r\nInvoice {n}.\r\n".encode()


def _arrivals(up: Upstream) -> Counter[str]:
    return Counter(str(r.message["Message-ID"]) for r in up.received)


def _relay_for(relay_with: RelayFactory, up: Upstream, upstream: UpstreamFactory) -> RelayRunner:
    return relay_with(
        upstreams={"o365": upstream.account(up, LOGIN)},
        company={"upstream": "o365", "from_address": LOGIN},
        delivery={"retry_interval": 0.2, "max_retry_interval": 0.5, "workers": 2},
    )


class TestThroughRelay:
    def test_the_reported_case_every_copy_arrives_once(
        self, postfix: Upstream, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """451 at the end of DATA for a while, then recovery: 7 messages, 7 arrivals, nothing failed."""
        relay = _relay_for(relay_with, postfix, upstream)
        smtp_send(relay.port, LOGIN, ["kunde@example.com"], _message(0))
        postfix.wait_for(1)  # a connection is now parked in the pool
        postfix.faults.data = "451 4.3.0 Error: queue file write error"
        for n in range(1, 8):
            smtp_send(relay.port, LOGIN, ["kunde@example.com"], _message(n))
        time.sleep(1.5)
        postfix.faults.data = None
        postfix.wait_for(8)
        time.sleep(0.5)  # nothing more arrives: no duplicates
        assert {f"<n{n}@erp.local>": 1 for n in range(8)} == dict(_arrivals(postfix))
        assert [] == queue_entries(tmp_path / "spool", "failed")

    def test_flapping_upstream_through_every_failure_twice(
        self, postfix: Upstream, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """The upstream cycles through tempfail at RCPT, after the dot, at the DATA command, a 503 at
        MAIL, refused connections and dropped ones, twice over (13 s) while 50 messages are sent; every
        message arrives exactly once and none goes to failed/."""
        relay = _relay_for(relay_with, postfix, upstream)
        phases: list[Callable[[], None]] = [
            setter(postfix, rcpt={"kunde@example.com": "451 4.7.1 try again"}),
            setter(postfix, data="451 4.3.0 Error: queue file write error"),
            setter(postfix, data_command="451 4.3.0 try again later"),
            setter(postfix, mail="503 5.5.1 Error: nested MAIL command"),
            postfix.stop,
            postfix.start,
            postfix.drop_connections,
            setter(postfix, data="421 4.4.2 closing"),
        ]
        clear = setter(postfix, rcpt={}, data=None, data_command=None, mail=None)
        stop = threading.Event()

        def flap() -> None:
            for phase in itertools.cycle(phases):
                if stop.wait(0.8):
                    return
                clear()
                phase()

        flapper = threading.Thread(target=flap, daemon=True)
        flapper.start()
        try:
            deadline = time.monotonic() + 2 * len(phases) * 0.8 + 0.2  # every phase twice
            for n in range(50):
                smtp_send(relay.port, LOGIN, ["kunde@example.com"], _message(n))
                time.sleep(max(0.0, min(0.25, deadline - time.monotonic())))
            time.sleep(max(0.0, deadline - time.monotonic()))
        finally:
            stop.set()
            flapper.join(5)
            clear()
            postfix.start()  # idempotent when it is up: the same port
        deadline = time.monotonic() + 60  # bounded: a loaded 2-core machine retries slowly
        while len(_arrivals(postfix)) < 50 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        arrivals = _arrivals(postfix)
        failed = {e.id: e.last_reply for e in queue_entries(tmp_path / "spool", "failed")}
        held = [e.id for e in queue_entries(tmp_path / "spool", "hold")]
        missing = sorted({f"<n{n}@erp.local>" for n in range(50)} - set(arrivals))
        twice = {mid: count for mid, count in arrivals.items() if count > 1}
        assert (missing, twice, failed, held) == ([], {}, {}, [])


class OutOfStepUpstream(RawUpstream):
    """A provider that breaks the protocol in one way (implicit TLS, AUTH PLAIN): replies nobody
    asked for, or reply codes that are no answer to the command. aiosmtpd cannot be made to do this."""

    name = "out-of-step"

    def __init__(self, server_context: ssl.SSLContext, mode: str, *, pipelining: bool = False) -> None:
        super().__init__(server_context)
        self.mode = mode
        self.pipelining = pipelining
        self.connections = 0
        self.accepted: list[bytes] = []

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 out-of-step ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    offer = b"250-PIPELINING\r\n" if self.pipelining else b""
                    writer.write(b"250-out-of-step\r\n" + offer + b"250 AUTH PLAIN\r\n")
                elif verb == b"AUTH":
                    ok = base64.b64decode(line.split()[-1]) == b"\0" + LOGIN.encode() + b"\0" + PASSWORD.encode()
                    writer.write(b"235 2.7.0 OK\r\n" if ok else b"535 5.7.8 no\r\n")
                elif verb == b"RCPT" and self.mode == "354 to RCPT":
                    writer.write(b"354 go ahead\r\n")
                elif verb == b"RCPT" and self.mode == "354 to DATA after every RCPT refused":
                    writer.write(b"550 5.1.1 no such user\r\n")
                elif verb in (b"MAIL", b"RCPT") and self.mode == "each reply in its own segment":
                    await asyncio.sleep(0.02)  # the next reply comes later, in a read of its own
                    writer.write(b"250-OK\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.02)  # even a reply's lines apart
                    writer.write(b"250 OK\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    body = b""
                    while (chunk := await reader.readline()) not in (b".\r\n", b""):
                        body += chunk
                    if not chunk:  # the client went away without the final dot: nothing was sent
                        break
                    self.accepted.append(body)
                    twice = self.mode == "two replies to the dot"
                    writer.write(b"250 2.0.0 OK\r\n" + (b"250 2.0.0 OK again\r\n" if twice else b""))
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:  # MAIL, RCPT, RSET
                    writer.write(b"250 OK\r\n")
                await writer.drain()
        finally:
            writer.close()



@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelining"])
class TestAnUpstreamOutOfStep:
    def test_a_second_reply_to_the_dot_keeps_the_connection_from_being_reused(
        self, server_context: ssl.SSLContext, ca_file: Path, pipelining: bool
    ) -> None:
        """Its extra reply would be read as the next command's: that connection is dropped instead."""
        with OutOfStepUpstream(server_context, "two replies to the dot", pipelining=pipelining) as up:
            outcomes = through_one_pool(up.account(ca_file, LOGIN), [None, None])
        assert ["delivered", "delivered"] == [o.result for o in outcomes]
        assert (2, 2) == (up.connections, len(up.accepted))

    def test_a_reply_that_is_no_answer_defers_and_drops_the_connection(
        self, server_context: ssl.SSLContext, ca_file: Path, pipelining: bool
    ) -> None:
        """354 to RCPT is no refusal of the recipient: deferred, never bounced, and not reused."""
        with OutOfStepUpstream(server_context, "354 to RCPT", pipelining=pipelining) as up:
            outcomes = through_one_pool(up.account(ca_file, LOGIN), [None, None])
        assert ["deferred", "deferred"] == [o.result for o in outcomes]
        assert all("session error" in (o.error or "") for o in outcomes)
        assert 2 == up.connections


class TestPipelinedRepliesOutOfStep:
    def test_replies_in_separate_reads_are_paired_in_order(self, server_context: ssl.SSLContext, ca_file: Path) -> None:
        """Replies to a pipelined group that come one segment (even one line) at a time are each kept
        and paired with their command: aiosmtplib's own reader drops a reply that arrives while the
        one before it waits to be picked up. Two messages on one connection: it stays in step."""
        with OutOfStepUpstream(server_context, "each reply in its own segment", pipelining=True) as up:
            outcomes = through_one_pool(up.account(ca_file, LOGIN), [None, None])
        assert ["delivered", "delivered"] == [o.result for o in outcomes]
        assert (1, 2) == (up.connections, len(up.accepted))

    def test_354_to_data_with_every_recipient_refused_sends_nothing(
        self, server_context: ssl.SSLContext, ca_file: Path
    ) -> None:
        """RFC 2920 says DATA must be refused when no RCPT was accepted; a server that says 354 anyway
        gets no message (an empty one would be accepted): the refusals stand and the connection goes."""
        with OutOfStepUpstream(server_context, "354 to DATA after every RCPT refused", pipelining=True) as up:
            outcomes = through_one_pool(up.account(ca_file, LOGIN), [None, None])
        assert ["bounced", "bounced"] == [o.result for o in outcomes]
        assert [(550, "5.1.1 no such user")] * 2 == [o.reply for o in outcomes]
        assert (2, []) == (up.connections, up.accepted)
