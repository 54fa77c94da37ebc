"""One delivery attempt (``relay.delivery.deliver``) against real TLS+AUTH upstreams: every outcome per recipient."""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from relay.config.credentials import Secret
from relay.envelope import Account
from relay.transports import smtp as smtp_transport
from relay.transports.smtp import ConnectionPool, Outcome, advice, deliver
from tests.conftest import UpstreamFactory, queue_entries, smtp_send, wait_for_entries
from tests.servers import RelayRunner, Upstream, settle

RelayFactory = Callable[..., RelayRunner]

LOGIN = "laskutus@rakennus.fi"
PASSWORD = "s3cret-pw"
BODY = b"From: laskutus@rakennus.fi\r\nTo: customer@example.com\r\nSubject: Lasku 1234\r\n\r\nInvoice attached.\r\n"


def account_of(up: Upstream, ca_file: Path | None, *, security: str | None = None, timeout: float = 5) -> Account:
    """The account ``deliver`` needs to reach ``up`` as ``LOGIN`` (``ca_file=None``: only the system CAs)."""
    return Account(
        name=up.name, host="127.0.0.1", port=up.port, security=security or up.security,  # type: ignore[arg-type]
        username=LOGIN, ca_file=ca_file, timeout=timeout,
    )  # fmt: skip


def send(
    account: Account, recipients: list[str], *, password: str = PASSWORD, deadline: float | None = None,
    mail_from: str = LOGIN,
) -> Outcome:
    """One attempt on a fresh loop, as a blocking call from the test."""

    async def attempt() -> Outcome:
        outcome = await deliver(account, Secret(password), mail_from, recipients, BODY, deadline=deadline)
        await settle()  # before asyncio.run closes the loop
        return outcome

    return asyncio.run(attempt())


def send_pooled(account: Account, attempts: list[tuple[str, Callable[[], Any] | None]]) -> list[Outcome]:
    """Several attempts through one ``ConnectionPool`` on one loop; a step may run between attempts."""

    async def run() -> list[Outcome]:
        pool = ConnectionPool()
        outcomes = []
        try:
            for password, between in attempts:
                if between is not None:
                    await asyncio.to_thread(between)
                outcomes.append(await deliver(account, Secret(password), LOGIN, ["a@example.com"], BODY, pool=pool))
        finally:
            await pool.close_all()
            await settle()
        return outcomes

    return asyncio.run(run())


@pytest.fixture(params=["one-by-one", "pipelining", "chunking"])
def provider(upstream: UpstreamFactory, request: pytest.FixtureRequest) -> Upstream:
    """A provider with STARTTLS and AUTH; every test runs against one without PIPELINING, one with, and
    one with PIPELINING and CHUNKING (BDAT, RFC 3030), as Office 365, Gmail and Postfix offer."""
    up = upstream("provider", security="starttls", accounts={LOGIN: PASSWORD})
    up.pipelining = request.param != "one-by-one"
    up.chunking = request.param == "chunking"
    smtp_transport._NO_BDAT.clear()  # a port an earlier test's upstream refused BDAT on may be this one's
    return up


class TestTlsAndAuth:
    @pytest.mark.parametrize("security", ["ssl", "starttls"])
    def test_delivered_over_tls_with_auth(self, security: str, upstream: UpstreamFactory, ca_file: Path) -> None:
        """Implicit TLS and STARTTLS both log in and deliver every recipient with the upstream's 250."""
        up = upstream("provider", security=security, accounts={LOGIN: PASSWORD})

        outcome = send(account_of(up, ca_file), ["a@example.com", "b@example.com"])
        [got] = up.received

        assert "delivered" == outcome.result
        assert ["a@example.com", "b@example.com"] == outcome.delivered
        assert (250, "2.0.0 OK queued upstream") == outcome.reply
        assert outcome.error is None
        assert [LOGIN] == up.logins
        assert got.tls
        assert LOGIN == got.login
        assert ["a@example.com", "b@example.com"] == got.rcpt_tos
        assert "Lasku 1234" == got.message["Subject"]

    @pytest.mark.parametrize("security", ["ssl", "starttls"])
    def test_untrusted_certificate_defers_everyone(
        self, security: str, upstream: UpstreamFactory
    ) -> None:
        """Without the private CA the certificate fails verification: all deferred, the error says why."""
        up = upstream("provider", security=security, accounts={LOGIN: PASSWORD})

        outcome = send(account_of(up, None), ["a@example.com", "b@example.com"])

        assert "deferred" == outcome.result
        assert {"a@example.com", "b@example.com"} == set(outcome.deferred)
        assert outcome.error is not None and "certificate" in outcome.error
        assert [] == up.logins
        assert [] == up.received

    def test_starttls_required_but_not_offered(self, upstream: UpstreamFactory) -> None:
        """``security: starttls`` against a plain server is a deferral, never a login or send in clear."""
        up = upstream("plain", security="none", accounts={LOGIN: PASSWORD})

        outcome = send(account_of(up, None, security="starttls"), ["a@example.com"])

        assert "deferred" == outcome.result
        assert ["a@example.com"] == list(outcome.deferred)
        assert outcome.error is not None and "does not offer STARTTLS" in outcome.error
        assert [] == up.logins
        assert [] == up.failed_logins
        assert [] == up.received

    def test_wrong_password_defers_with_535(self, provider: Upstream, ca_file: Path) -> None:
        """A refused login keeps the mail queued (soft bounce) and reports the upstream's 535."""
        outcome = send(account_of(provider, ca_file), ["a@example.com", "b@example.com"], password="wrong-pw")

        assert "deferred" == outcome.result
        assert {"a@example.com", "b@example.com"} == set(outcome.deferred)
        assert "upstream refused the login (AUTH)" == outcome.error
        assert 535 == outcome.reply[0]
        assert "wrong-pw" not in repr(outcome)
        assert [LOGIN] == provider.failed_logins
        assert [["PLAIN"]] == provider.auth_sessions()  # one mechanism: a second would be a second failure
        assert [] == provider.received

    @pytest.mark.parametrize(
        ("exclude", "configured", "expected"),
        [([], None, "PLAIN"), (["PLAIN"], None, "LOGIN"), ([], "login", "LOGIN"), ([], "plain", "PLAIN")],
    )
    def test_one_mechanism_per_login(
        self, provider: Upstream, ca_file: Path, exclude: list[str], configured: str | None, expected: str
    ) -> None:
        """PLAIN when offered, else LOGIN; ``auth_mechanism`` picks one (a server that offers PLAIN but
        only takes LOGIN). Right or wrong password, one AUTH command per connection."""
        provider.auth_exclude = exclude
        account = replace(account_of(provider, ca_file), auth_mechanism=configured)

        good, bad = send(account, ["a@example.com"]), send(account, ["a@example.com"], password="wrong-pw")

        assert ("delivered", "deferred") == (good.result, bad.result)
        assert [[expected], [expected]] == provider.auth_sessions()

    def test_a_configured_mechanism_the_server_does_not_offer_is_named(self, provider: Upstream, ca_file: Path) -> None:
        provider.auth_exclude = ["LOGIN"]
        outcome = send(replace(account_of(provider, ca_file), auth_mechanism="login"), ["a@example.com"])

        assert "deferred" == outcome.result
        assert "does not offer AUTH LOGIN (auth_mechanism); it offers PLAIN" in (outcome.error or "")
        assert [] == provider.auth_sessions()


def _reads_with(up: Upstream, *parts: bytes) -> list[bytes]:
    return [read for read in up.reads if all(part in read for part in parts)]


class TestPipelining:
    """RFC 2920: where the provider offers PIPELINING, MAIL, every RCPT and DATA go in one write."""

    def test_commands_go_together_where_offered(self, upstream: UpstreamFactory, ca_file: Path) -> None:
        up = upstream("pipelining", security="starttls", accounts={LOGIN: PASSWORD})
        up.pipelining = True
        rcpts = ["a@example.com", "b@example.com", "c@example.com"]

        outcome = send(account_of(up, ca_file), rcpts)

        assert rcpts == outcome.delivered
        [group] = _reads_with(up, b"MAIL FROM:", b"DATA\r\n")  # one read: sent before any reply came
        assert [f"RCPT TO:<{r}>".encode() in group for r in rcpts] == [True] * 3
        assert rcpts == up.received[0].rcpt_tos

    @pytest.mark.parametrize("chunking", [False, True])
    def test_each_reply_of_the_group_has_the_whole_timeout(
        self, upstream: UpstreamFactory, ca_file: Path, chunking: bool
    ) -> None:
        """A tester's server answered each RCPT 25 s late with a 60 s timeout: the group's replies shared one
        60 s budget, and the message was deferred at every attempt until it expired. Here each of four
        RCPTs takes 0.4 s with a 1 s timeout (1.6 s in all)."""
        up = upstream("slow", security="starttls", accounts={LOGIN: PASSWORD})
        up.pipelining, up.chunking = True, chunking
        up.faults.slow_rcpt = 0.4
        rcpts = ["a@example.com", "b@example.com", "c@example.com", "d@example.com"]

        outcome = send(account_of(up, ca_file, timeout=1), rcpts)

        assert (rcpts, None) == (outcome.delivered, outcome.error)
        up.faults.slow_rcpt = 1.5  # and one reply later than its timeout still fails the attempt
        assert "deferred" == send(account_of(up, ca_file, timeout=1), rcpts[:1]).result

    def test_one_by_one_where_not_offered(self, upstream: UpstreamFactory, ca_file: Path) -> None:
        up = upstream("plain", security="starttls", accounts={LOGIN: PASSWORD})

        outcome = send(account_of(up, ca_file), ["a@example.com", "b@example.com"])

        assert "delivered" == outcome.result
        assert [] == _reads_with(up, b"MAIL FROM:", b"RCPT TO:")
        assert 1 == len(_reads_with(up, b"MAIL FROM:")) == len(_reads_with(up, b"DATA\r\n"))

    def test_without_starttls_or_auth_the_extensions_are_asked_first(self, upstream: UpstreamFactory) -> None:
        """No STARTTLS and no login: nothing has sent EHLO yet, and PIPELINING is used all the same."""
        up = upstream("open", security="none")
        up.pipelining = True
        account = Account(name="open", host="127.0.0.1", port=up.port, security="none", timeout=5)

        outcome = asyncio.run(_deliver_and_settle(account, None, ["a@example.com"]))

        assert "delivered" == outcome.result
        assert 1 == len(_reads_with(up, b"MAIL FROM:", b"RCPT TO:<a@example.com>", b"DATA\r\n"))


class TestChunking:
    """RFC 3030: where the provider offers CHUNKING too, a small message goes with MAIL and RCPT as
    ``BDAT <size> LAST`` in the same write: one round trip a message."""

    def chunking(self, upstream: UpstreamFactory) -> Upstream:
        up = upstream("chunking", security="starttls", accounts={LOGIN: PASSWORD})
        up.pipelining = up.chunking = True
        smtp_transport._NO_BDAT.clear()
        return up

    def send_body(self, up: Upstream, ca_file: Path, body: bytes, recipients: list[str]) -> Outcome:
        async def attempt() -> Outcome:
            outcome = await deliver(account_of(up, ca_file), Secret(PASSWORD), LOGIN, recipients, body)
            await settle()
            return outcome

        return asyncio.run(attempt())

    def test_the_message_goes_with_its_commands_unstuffed(self, upstream: UpstreamFactory, ca_file: Path) -> None:
        """One write holds MAIL, both RCPTs, BDAT and the message; a line starting with a dot arrives as
        it was (BDAT counts octets: no dot-stuffing, no final dot)."""
        up = self.chunking(upstream)
        body = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nlast line without CRLF"

        outcome = self.send_body(up, ca_file, body, ["a@example.com", "b@example.com"])

        assert ["a@example.com", "b@example.com"] == outcome.delivered
        assert body == up.received[0].content
        [group] = _reads_with(up, b"MAIL FROM:", b"RCPT TO:<b@example.com>", b"BDAT %d LAST\r\n" % len(body))
        assert group.endswith(body) or len(group) == 512  # the recorded read is cut at 512 octets
        assert [] == _reads_with(up, b"DATA\r\n")

    def test_a_refused_recipient_leaves_the_others_delivered(self, upstream: UpstreamFactory, ca_file: Path) -> None:
        up = self.chunking(upstream)
        up.faults.rcpt["b@example.com"] = "550 5.1.1 User unknown"

        outcome = self.send_body(up, ca_file, BODY, ["a@example.com", "b@example.com", "c@example.com"])

        assert ["a@example.com", "c@example.com"] == outcome.delivered
        assert (550, "5.1.1 User unknown") == outcome.bounced["b@example.com"]
        assert ["a@example.com", "c@example.com"] == up.received[0].rcpt_tos

    def test_no_recipient_accepted_sends_nothing_and_the_connection_stays_in_step(
        self, upstream: UpstreamFactory, ca_file: Path
    ) -> None:
        """Every RCPT refused: the server reads the chunk and refuses it (RFC 3030), nothing is delivered,
        and the next message on the same connection goes through."""
        up = self.chunking(upstream)
        up.faults.rcpt["a@example.com"] = "550 5.1.1 User unknown"

        async def run() -> list[Outcome]:
            pool, account = ConnectionPool(), account_of(up, ca_file)
            try:
                return [await deliver(account, Secret(PASSWORD), LOGIN, [rcpt], BODY, pool=pool) for rcpt in
                        ("a@example.com", "b@example.com")]  # fmt: skip
            finally:
                await pool.close_all()
                await settle()

        first, second = asyncio.run(run())

        assert "bounced" == first.result
        assert ["b@example.com"] == second.delivered
        assert 1 == up.connections
        assert [["b@example.com"]] == [r.rcpt_tos for r in up.received]

    def test_a_big_message_goes_by_data(self, upstream: UpstreamFactory, ca_file: Path) -> None:
        """Over one write's worth (``CHUNK``), the message is streamed after DATA as before."""
        up = self.chunking(upstream)
        body = b"Subject: big\r\n\r\n" + b"0123456789abcdef\r\n" * 5000

        outcome = self.send_body(up, ca_file, body, ["a@example.com"])

        assert "delivered" == outcome.result
        assert body == up.received[0].content
        assert 1 == len(_reads_with(up, b"DATA\r\n"))
        assert [] == _reads_with(up, b"BDAT")

    def test_a_server_that_refuses_bdat_gets_data_from_then_on(self, upstream: UpstreamFactory, ca_file: Path) -> None:
        """CHUNKING offered, BDAT answered "502 command not implemented": the attempt is deferred as a
        session error (never a bounce) and the next one sends DATA."""
        up = self.chunking(upstream)
        up.faults.bdat = "502 5.5.1 Command not implemented"

        first = send(account_of(up, ca_file), ["a@example.com"])
        second = send(account_of(up, ca_file), ["a@example.com"])

        assert ("deferred", True) == (first.result, first.session_failed)
        assert "the upstream answered BDAT with a session error" in (first.error or "")
        assert "delivered" == second.result
        assert 1 == len(up.received)
        assert 1 == len(_reads_with(up, b"DATA\r\n"))

    @pytest.mark.parametrize(("reply", "result"), [("554 5.6.0 Message content rejected", "bounced"),
                                                    ("451 4.3.0 Try again later", "deferred")])  # fmt: skip
    def test_the_reply_to_bdat_decides_like_the_final_dot(
        self, reply: str, result: str, upstream: UpstreamFactory, ca_file: Path
    ) -> None:
        up = self.chunking(upstream)
        up.faults.data = reply

        outcome = send(account_of(up, ca_file), ["a@example.com"])

        assert (result, False) == (outcome.result, outcome.session_failed)
        assert "message refused after DATA" == outcome.error


async def _deliver_and_settle(account: Account, secret: Secret | None, recipients: list[str]) -> Outcome:
    outcome = await deliver(account, secret, LOGIN, recipients, BODY)
    await settle()
    return outcome


def test_a_server_that_never_greets_is_not_called_a_connection_timeout() -> None:
    """A tester's upstream took the connection and said nothing: "timed out connecting to the upstream"
    sent the admin to look at the network, where nothing was wrong."""

    async def run() -> Outcome:
        accepted: list[asyncio.StreamWriter] = []  # closed at the end: left to the GC, a later test saw its warning
        silent = await asyncio.start_server(lambda reader, writer: accepted.append(writer), "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        account = Account(name="silent", host="127.0.0.1", port=port, security="none", timeout=0.5)
        try:
            return await deliver(account, None, LOGIN, ["a@example.com"], BODY)
        finally:
            for writer in accepted:
                writer.close()
            silent.close()
            await settle()

    silent = asyncio.run(run())

    assert silent.error == "connected, but the upstream sent no greeting (220) in time: the server is overloaded or hangs"
    assert ["a@example.com"] == list(silent.deferred)


class TestRepliesPerRecipient:
    def test_mail_from_5xx_bounces_everyone(self, provider: Upstream, ca_file: Path) -> None:
        """A permanent refusal of the sender bounces every recipient with the upstream's reply."""
        provider.faults.mail = "550 5.7.60 SMTP; Client does not have permissions to send as this sender"

        outcome = send(account_of(provider, ca_file), ["a@example.com", "b@example.com"])

        assert "bounced" == outcome.result
        assert {"a@example.com", "b@example.com"} == set(outcome.bounced)
        assert 550 == outcome.bounced["a@example.com"][0]
        assert "5.7.60" in outcome.bounced["a@example.com"][1]
        assert f"sender {LOGIN} refused by the upstream" == outcome.error
        assert [] == provider.received

    def test_mail_from_4xx_defers_everyone(self, provider: Upstream, ca_file: Path) -> None:
        """A temporary refusal of the sender defers every recipient."""
        provider.faults.mail = "451 4.7.500 Server busy, try again later"

        outcome = send(account_of(provider, ca_file), ["a@example.com", "b@example.com"])

        assert "deferred" == outcome.result
        assert {"a@example.com", "b@example.com"} == set(outcome.deferred)
        assert 451 == outcome.reply[0]
        assert {} == outcome.bounced

    def test_rcpt_outcomes_are_per_recipient(self, provider: Upstream, ca_file: Path) -> None:
        """RCPT 5xx bounces that recipient, 4xx defers that one, and the accepted one is still delivered."""
        provider.faults.rcpt = {
            "gone@example.com": "550 5.1.1 User unknown",
            "full@example.com": "452 4.2.2 Mailbox full",
        }

        outcome = send(account_of(provider, ca_file), ["gone@example.com", "full@example.com", "ok@example.com"])
        [got] = provider.received

        assert "partial" == outcome.result
        assert ["ok@example.com"] == outcome.delivered
        assert {"gone@example.com": (550, "5.1.1 User unknown")} == outcome.bounced
        assert {"full@example.com": (452, "4.2.2 Mailbox full")} == outcome.deferred
        assert ["ok@example.com"] == got.rcpt_tos

    def test_all_rcpts_refused_sends_no_data(self, provider: Upstream, ca_file: Path) -> None:
        """With no recipient accepted nothing is sent; the first refusal is the attempt's reply."""
        provider.faults.rcpt = {"gone@example.com": "550 5.1.1 User unknown"}

        outcome = send(account_of(provider, ca_file), ["gone@example.com"])

        assert "bounced" == outcome.result
        assert (550, "5.1.1 User unknown") == outcome.reply
        assert [] == provider.received

    def test_data_554_bounces(self, provider: Upstream, ca_file: Path) -> None:
        """A permanent refusal after DATA bounces the accepted recipients."""
        provider.faults.data = "554 5.6.0 Message content rejected"

        outcome = send(account_of(provider, ca_file), ["a@example.com", "b@example.com"])

        assert "bounced" == outcome.result
        assert {"a@example.com", "b@example.com"} == set(outcome.bounced)
        assert (554, "5.6.0 Message content rejected") == outcome.reply
        assert "message refused after DATA" == outcome.error

    def test_500_after_the_dot_bounces_and_the_upstream_is_not_down(self, provider: Upstream, ca_file: Path) -> None:
        """``500 5.5.2 Line too long`` to the final dot refuses this message's data, on a fresh connection:
        retrying the same bytes cannot help, so it is no session error (no upstream_down, no 5-day retry)."""
        provider.faults.data = "500 5.5.2 Line too long"

        outcome = send(account_of(provider, ca_file), ["a@example.com"])
        if provider.chunking:  # a 500 to BDAT may say BDAT is unknown: DATA decides, at the next attempt
            assert ("deferred", True) == (outcome.result, outcome.session_failed)
            outcome = send(account_of(provider, ca_file), ["a@example.com"])

        assert ("bounced", False) == (outcome.result, outcome.session_failed)
        assert (500, "5.5.2 Line too long") == outcome.bounced["a@example.com"]
        assert "message refused after DATA" == outcome.error

    @pytest.mark.parametrize("reply", ["500 5.5.1 Command unrecognized", "503 5.5.1 Bad sequence", "421 4.3.2 closing"])
    def test_session_reply_to_the_data_command_still_defers(self, reply: str, provider: Upstream, ca_file: Path) -> None:
        """Before any data was sent, 500/502/503/421 say nothing about the message: deferred, never bounced."""
        provider.faults.data_command = reply

        outcome = send(account_of(provider, ca_file), ["a@example.com"])

        assert ("deferred", True) == (outcome.result, outcome.session_failed)
        assert "session error" in (outcome.error or "")

    def test_421_after_the_dot_still_defers(self, provider: Upstream, ca_file: Path) -> None:
        provider.faults.data = "421 4.4.2 closing"

        outcome = send(account_of(provider, ca_file), ["a@example.com"])

        assert ("deferred", True) == (outcome.result, outcome.session_failed)

    def test_drop_in_data_defers(self, provider: Upstream, ca_file: Path) -> None:
        """The upstream closing the connection mid-DATA defers everyone (it did not accept the message)."""
        provider.faults.drop_in_data = True

        outcome = send(account_of(provider, ca_file), ["a@example.com", "b@example.com"])

        assert "deferred" == outcome.result
        assert {"a@example.com", "b@example.com"} == set(outcome.deferred)
        assert [] == outcome.delivered
        assert outcome.error is not None and "closed the connection" in outcome.error

    def test_a_reply_lost_after_the_message_is_deferred_not_sent_again_at_once(
        self, provider: Upstream, ca_file: Path
    ) -> None:
        """The provider takes the message and the connection ends before its 250 reaches relay (RFC 1047),
        on a kept connection: deferred, saying it may arrive twice, and not sent again at once on a fresh
        connection (as a kept connection that ends before the message is sent is): the copy sent is the
        only one until the next attempt."""
        faults = provider.faults
        first, second, third = send_pooled(account_of(provider, ca_file), [
            (PASSWORD, None), (PASSWORD, lambda: setattr(faults, "reply_lost", True)),
            (PASSWORD, lambda: setattr(faults, "reply_lost", False)),
        ])  # fmt: skip

        assert ("delivered", "deferred", "delivered") == (first.result, second.result, third.result)
        assert "before its reply" in (second.error or "") and "twice" in (second.error or "")
        assert (3, 2) == (len(provider.received), provider.connections)  # the kept one, a fresh one for the third

    def test_no_reply_to_a_whole_message_in_time_says_it_may_arrive_twice(
        self, provider: Upstream, ca_file: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The provider takes the message and its 250 does not come within the wait for it (RFC 1047):
        deferred like any timeout, and the reason says that it may arrive twice (a silence at MAIL says no
        such thing: ``test_one_silent_command_times_out``)."""
        monkeypatch.setattr(smtp_transport, "FINAL_REPLY_TIMEOUT", 0.5, raising=False)
        provider.faults.hang_after_data = 2.0

        outcome = send(account_of(provider, ca_file, timeout=0.5), ["a@example.com"])

        assert ("deferred", 1) == (outcome.result, len(provider.received))
        assert "stopped answering (timeout) after the whole message was sent" in (outcome.error or "")
        assert "twice" in (outcome.error or "")

    @pytest.mark.parametrize("deadline", [None, 1.0], ids=["timeout", "deadline"])
    def test_a_provider_slow_to_answer_the_whole_message_is_waited_for(
        self, provider: Upstream, ca_file: Path, monkeypatch: pytest.MonkeyPatch, deadline: float | None
    ) -> None:
        """A provider may scan a message before it answers its end (RFC 5321 4.5.3.2.6 gives it 10 minutes,
        Postfix waits 600 s): given up on after the per-command timeout, or at the attempt's deadline, the
        message went again at every retry, and the provider kept every copy. Here 10 minutes are 3 s."""
        monkeypatch.setattr(smtp_transport, "FINAL_REPLY_TIMEOUT", 3.0, raising=False)
        provider.faults.hang_after_data = 1.2

        outcome = send(account_of(provider, ca_file, timeout=0.3), ["a@example.com"], deadline=deadline)

        assert ("delivered", 1) == (outcome.result, len(provider.received)), outcome.error

    def test_hanging_upstream_hits_the_deadline(self, provider: Upstream, ca_file: Path) -> None:
        """An upstream that stops answering is abandoned at the attempt's deadline, everyone deferred."""
        provider.faults.hang = 2.0

        started = time.monotonic()
        outcome = send(account_of(provider, ca_file), ["a@example.com"], deadline=0.5)
        elapsed = time.monotonic() - started

        assert "deferred" == outcome.result
        assert ["a@example.com"] == list(outcome.deferred)
        assert outcome.error is not None and "deadline" in outcome.error
        assert elapsed < 1.5, elapsed
        assert [] == provider.received

    def test_one_silent_command_times_out(self, provider: Upstream, ca_file: Path) -> None:
        """The account's per-command timeout defers everyone and says the upstream stopped answering."""
        provider.faults.hang = 2.0

        started = time.monotonic()
        outcome = send(account_of(provider, ca_file, timeout=0.3), ["a@example.com"])
        elapsed = time.monotonic() - started

        assert "deferred" == outcome.result
        assert "the upstream stopped answering (timeout)" == outcome.error
        assert elapsed < 1.5, elapsed


class TestConnectionPool:
    def test_one_login_for_two_messages(self, provider: Upstream, ca_file: Path) -> None:
        """Two deliveries through one pool ride one authenticated connection."""
        outcomes = send_pooled(account_of(provider, ca_file), [(PASSWORD, None), (PASSWORD, None)])

        assert ["delivered", "delivered"] == [o.result for o in outcomes]
        assert [LOGIN] == provider.logins
        assert 2 == len(provider.received)

    def test_changed_secret_opens_a_new_connection(self, provider: Upstream, ca_file: Path) -> None:
        """A new password never rides the old login: the pool opens (and authenticates) a new connection."""

        def change_password() -> None:
            provider.accounts[LOGIN] = "new-pw"

        outcomes = send_pooled(account_of(provider, ca_file), [(PASSWORD, None), ("new-pw", change_password)])

        assert ["delivered", "delivered"] == [o.result for o in outcomes]
        assert [LOGIN, LOGIN] == provider.logins

    def test_connection_closed_by_the_server_is_replaced(self, provider: Upstream, ca_file: Path) -> None:
        """A parked connection the provider dropped (restart on the same port) is replaced transparently."""
        port = provider.port

        def restart() -> None:
            provider.stop()
            provider.start()

        outcomes = send_pooled(account_of(provider, ca_file), [(PASSWORD, None), (PASSWORD, restart)])

        assert port == provider.port
        assert ["delivered", "delivered"] == [o.result for o in outcomes]
        assert [LOGIN, LOGIN] == provider.logins
        assert 2 == len(provider.received)


    def test_a_login_left_under_an_old_account_or_password_is_closed_once_idle(
        self, provider: Upstream, ca_file: Path
    ) -> None:
        """A reload changed the account (a timeout), then the password changed: nobody asks for the old logins
        again, and once they have idled past the timeout they are closed, not kept open until relay stops."""
        before = account_of(provider, ca_file)
        reloaded = account_of(provider, ca_file, timeout=6)

        async def run() -> list[int]:
            pool = ConnectionPool(idle_timeout=0.3)
            open_at = []
            try:
                for account, password in ((before, PASSWORD), (reloaded, PASSWORD), (reloaded, "new-pw")):
                    provider.accounts[LOGIN] = password
                    await deliver(account, Secret(password), LOGIN, ["a@example.com"], BODY, pool=pool)
                    await asyncio.sleep(0.1)
                    open_at.append(len(provider._sessions))
                await asyncio.sleep(1.1)  # idle past the timeout, and a sweep is due
                await deliver(reloaded, Secret("new-pw"), LOGIN, ["a@example.com"], BODY, pool=pool)
                await asyncio.sleep(0.2)
                open_at.append(len(provider._sessions))
            finally:
                await pool.close_all()
                await settle()
            return open_at

        assert [1, 2, 3, 1] == asyncio.run(run())
        assert 4 == len(provider.received)


class TestAdvice:
    @pytest.mark.parametrize(
        ("code", "text", "expected"),
        [
            (535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant",
             "switch this upstream to auth: oauth2"),
            (550, "5.7.30 Basic authentication is not supported for Client Submission", "Basic"),
            (554, "5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
             "from_address"),
            (534, "5.7.9 Application-specific password required", "App Password"),
            (535, "5.7.3 Authentication unsuccessful", "wrong password"),
            (535, "Authentication failed", "refused the login"),
        ],
    )  # fmt: skip
    def test_known_provider_replies(self, code: int, text: str, expected: str) -> None:
        """Each known provider reply gets a plain instruction for the admin."""
        hint = advice(code, text)

        assert hint is not None and expected in hint, hint

    def test_unknown_reply_has_no_advice(self) -> None:
        """An ordinary refusal gets no made-up advice."""
        assert advice(550, "5.1.1 User unknown") is None
        assert advice(None, "") is None


class TestThroughRelay:
    def test_partial_delivery_retries_only_the_deferred_recipient(
        self, provider: Upstream, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """End to end: the accepted recipient goes once, the bounced one is never retried, the deferred one is."""
        provider.faults.rcpt = {
            "gone@example.com": "550 5.1.1 User unknown",
            "full@example.com": "452 4.2.2 Mailbox full",
        }
        with capture_logs() as logs:
            relay = relay_with(
                upstreams={"provider": upstream.account(provider, LOGIN)},
                company={"from_address": LOGIN, "upstream": "provider"},
            )
            smtp_send(relay.port, "erp@legacy.local", ["gone@example.com", "full@example.com", "ok@example.com"], BODY)
            deadline = time.monotonic() + 10
            attempts: list[dict[str, Any]] = []
            while len(attempts) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
                attempts = [e for e in logs if e["event"] == "delivery_attempt" and LOGIN not in e["delivered"]]
            relay.stop()

        [entry] = queue_entries(tmp_path / "spool", "deferred") or queue_entries(tmp_path / "spool", "incoming")
        first, second = attempts[:2]
        mail = [got for got in provider.received if got.message["Auto-Submitted"] is None]  # not the notice
        assert ["ok@example.com"] == [r for got in mail for r in got.rcpt_tos]
        assert "partial" == first["result"]
        assert ["full@example.com"] == second["deferred"]
        assert 1 == second["recipients"]
        assert ("ok@example.com",) == entry.delivered
        assert ["gone@example.com"] == [r for r, _ in entry.bounced]


class TestInternationalisedDomains:
    """An ASCII local part at an IDN domain (``info@yhtiö.fi``) goes to an upstream without SMTPUTF8 with
    the domain as its A-label, as Postfix sends it; every result still names the address as queued."""

    def test_an_idn_recipient_goes_as_its_a_label(self, provider: Upstream, ca_file: Path) -> None:
        outcome = send(account_of(provider, ca_file), ["info@yhtiö.fi"])
        [got] = provider.received

        assert ("delivered", ["info@yhtiö.fi"], {}) == (outcome.result, outcome.delivered, outcome.bounced)
        assert ["info@xn--yhti-8qa.fi"] == got.rcpt_tos
        assert 1 == len(_reads_with(provider, b"RCPT TO:<info@xn--yhti-8qa.fi>\r\n"))

    def test_ascii_idn_and_non_ascii_local_part_recipients(self, provider: Upstream, ca_file: Path) -> None:
        """The ASCII and the IDN recipient go; ``äiti@`` has no ASCII form: 553 for it alone, as before."""
        outcome = send(account_of(provider, ca_file), ["a@example.com", "myynti@müller.de", "äiti@example.fi"])
        [got] = provider.received

        assert "partial" == outcome.result
        assert ["a@example.com", "myynti@müller.de"] == outcome.delivered
        assert {"äiti@example.fi": smtp_transport.NO_SMTPUTF8} == outcome.bounced
        assert ["a@example.com", "myynti@xn--mller-kva.de"] == got.rcpt_tos

    def test_an_idn_sender_goes_as_its_a_label(self, provider: Upstream, ca_file: Path) -> None:
        outcome = send(account_of(provider, ca_file), ["a@example.com"], mail_from="laskutus@yhtiö.fi")
        [got] = provider.received

        assert ["a@example.com"] == outcome.delivered
        assert "laskutus@xn--yhti-8qa.fi" == got.mail_from
        assert 1 == len(_reads_with(provider, b"MAIL FROM:<laskutus@xn--yhti-8qa.fi>"))

    def test_a_refused_idn_recipient_is_named_as_queued(self, provider: Upstream, ca_file: Path) -> None:
        """The upstream's refusal of the A-label form is recorded for the address the entry holds."""
        provider.faults.rcpt = {"info@xn--yhti-8qa.fi": "550 5.1.1 User unknown"}

        outcome = send(account_of(provider, ca_file), ["info@yhtiö.fi", "a@example.com"])

        assert ["a@example.com"] == outcome.delivered
        assert {"info@yhtiö.fi": (550, "5.1.1 User unknown")} == outcome.bounced

    @pytest.mark.parametrize("domain", ["ab--cö.fi", "☃.example", "yhtiö..fi"])
    def test_an_invalid_idn_recipient_domain_bounces_with_553(
        self, domain: str, provider: Upstream, ca_file: Path
    ) -> None:
        """A domain IDNA2008 refuses (hyphens in the 3rd and 4th place, a disallowed code point, an empty
        label) has no A-label: 553 saying so for that recipient, the others still go."""
        outcome = send(account_of(provider, ca_file), [f"info@{domain}", "a@example.com"])
        [got] = provider.received

        assert ["a@example.com"] == outcome.delivered
        assert {f"info@{domain}": smtp_transport.NOT_IDN} == outcome.bounced
        assert 553 == outcome.bounced[f"info@{domain}"][0]
        assert "not a valid internationalised domain name" in outcome.bounced[f"info@{domain}"][1]
        assert ["a@example.com"] == got.rcpt_tos

    def test_an_invalid_idn_sender_domain_bounces_everyone(self, provider: Upstream, ca_file: Path) -> None:
        outcome = send(account_of(provider, ca_file), ["a@example.com", "b@example.com"], mail_from="laskutus@ab--cö.fi")

        assert "bounced" == outcome.result
        assert dict.fromkeys(["a@example.com", "b@example.com"], smtp_transport.NOT_IDN) == outcome.bounced
        assert [] == provider.received
        assert [] == _reads_with(provider, b"MAIL FROM:")

    def test_an_upstream_with_smtputf8_gets_the_address_as_it_is(self, provider: Upstream, ca_file: Path) -> None:
        provider.smtputf8 = True

        outcome = send(account_of(provider, ca_file), ["info@yhtiö.fi"], mail_from="laskutus@yhtiö.fi")
        [got] = provider.received

        assert ["info@yhtiö.fi"] == outcome.delivered
        assert ("laskutus@yhtiö.fi", ["info@yhtiö.fi"]) == (got.mail_from, got.rcpt_tos)
        assert 1 == len(_reads_with(provider, "MAIL FROM:<laskutus@yhtiö.fi>".encode(), b" SMTPUTF8"))

    def test_through_relay_every_record_names_the_address_as_queued(
        self, provider: Upstream, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """End to end, with a legacy ``To:`` list in UTF-8: the IDN recipient arrives by its A-label, in the
        envelope and in the To header; the log, the spool entry and the failure notice name the addresses
        as the client gave them, and only ``äiti@`` (no ASCII form) is bounced."""
        rcpts = ["a@example.com", "info@yhtiö.fi", "äiti@example.fi"]
        content = "To: a@example.com; info@yhtiö.fi\r\nSubject: Lasku 1234\r\n\r\nInvoice attached.\r\n".encode()
        with capture_logs() as logs:
            relay = relay_with(
                upstreams={"provider": upstream.account(provider, LOGIN)},
                company={"from_address": LOGIN, "upstream": "provider"},
            )
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
                client.ehlo("erp-server")
                client.mail("erp@legacy.local", ["SMTPUTF8"])
                assert [250] * 3 == [client.rcpt(r)[0] for r in rcpts]
                assert 250 == client.data(content)[0]
            mail, notice = provider.wait_for(2)
            wait_for_entries(tmp_path / "spool", "failed")
            relay.stop()

        [attempt] = [e for e in logs if e["event"] == "delivery_attempt" and e["delivered"] != [LOGIN]]
        [entry] = queue_entries(tmp_path / "spool", "failed")
        assert ["a@example.com", "info@xn--yhti-8qa.fi"] == mail.rcpt_tos
        assert b"\r\nTo: a@example.com, info@xn--yhti-8qa.fi\r\n" in b"\r\n" + mail.content  # no RFC 2047 word
        assert ["a@example.com", "info@yhtiö.fi"] == attempt["delivered"]
        assert ["äiti@example.fi"] == list(attempt["bounced"])
        assert ("a@example.com", "info@yhtiö.fi") == entry.delivered
        assert [("äiti@example.fi", "553 " + smtp_transport.NO_SMTPUTF8[1])] == list(entry.bounced)
        report = notice.message.get_body(("plain",))
        assert report is not None and "äiti@example.fi" in report.get_content()
        assert "yhti" not in report.get_content()


def test_a_message_over_the_providers_size_is_refused_at_mail_before_the_body(provider: Upstream, ca_file: Path) -> None:
    """RFC 1870, as Postfix sends it: MAIL carries ``SIZE=``, so a provider whose limit the message passes
    refuses it at MAIL instead of after taking the whole body (30 MB over a slow line, then the 552)."""
    provider.size_limit = len(BODY) - 1
    outcome = send(account_of(provider, ca_file), ["a@example.com"])

    assert "bounced" == outcome.result
    assert 552 == outcome.reply[0] and "fixed maximum message size" in outcome.reply[1], outcome.reply  # (MAIL's words)
    assert [] == provider.received
