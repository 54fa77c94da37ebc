"""The scheduler where a provider misbehaves in ways that are not the account sending too fast, and where
the log must name the right message: found by a black-box pass against misbehaving upstreams. Each test
runs relay in-process against real SMTP servers on 127.0.0.1."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session
from structlog.testing import capture_logs

from relay.commands import cli
from relay.queue.spool import QueueEntry
from tests.conftest import UpstreamFactory, queue_entries
from tests.servers import FaultySMTP, RecordingHandler, RelayRunner, Upstream

RelayFactory = Callable[..., RelayRunner]
SLOW_DOWN = "421 4.7.0 Too many messages, slow down"
TOO_MANY = "452 4.5.3 Error: too many recipients"  # Postfix's smtpd_recipient_limit
SLOW_RETRIES = {"retry_interval": 30, "max_retry_interval": 30}  # what waits for a retry shows


@contextmanager
def events() -> Iterator[list[MutableMapping[str, Any]]]:
    """Log events as the daemon writes them: with the queue id, user and upstream bound to the worker."""
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        yield logs


def send(port: int, sender: str, recipients: list[str], subject: str = "Lasku") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(sender, recipients, f"Subject: {subject}\r\n\r\nx\r\n".encode())


def wait_until(check: Callable[[], bool], timeout: float = 10.0, step: Callable[[], None] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        if step is not None:
            step()
        time.sleep(0.05)


class RecipientLimitHandler(RecordingHandler):
    """Postfix's ``smtpd_recipient_limit``: each RCPT past the limit in one transaction gets a 452."""

    upstream: RecipientLimitUpstream

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.upstream.tried.append(address)
        if len(envelope.rcpt_tos) >= self.upstream.limit:
            return self.upstream.reply
        return await super().handle_RCPT(server, session, envelope, address, options)


class RecipientLimitUpstream(Upstream):
    """A plain-text upstream taking at most ``limit`` recipients per transaction."""

    def __init__(self, limit: int, reply: str) -> None:
        super().__init__(f"limit{limit}", security="none", server_context=None, accounts={})
        self.limit, self.reply = limit, reply
        self.tried: list[str] = []  # every RCPT, in order

    def _protocol(self) -> SMTP:
        self.connections += 1
        return FaultySMTP(self, RecipientLimitHandler(self), hostname="limited.upstream.test")


@pytest.fixture
def limited() -> Iterator[Callable[[int, str], RecipientLimitUpstream]]:
    started: list[RecipientLimitUpstream] = []

    def start(limit: int, reply: str) -> RecipientLimitUpstream:
        up = RecipientLimitUpstream(limit, reply)
        started.append(up)
        up.start()
        return up

    yield start
    for up in started:
        up.close()


def mail_in(spool: Path, state: str) -> list[QueueEntry]:
    return [e for e in queue_entries(spool, state) if e.kind == "mail"]  # type: ignore[arg-type]


class TestExpiredWhileThrottled:
    def test_each_expiry_is_logged_under_its_own_queue_id_user_and_upstream(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """1. two accounts throttled (421 4.7.0 at MAIL: paused for a minute), one message each
        2. a third account keeps delivering on the same single worker  3. the two expire (1.5 s)
        Result: each delivery_failed names the entry that failed, not the worker's previous message
        (an admin greps the log by queue id, or alerts per user and upstream)."""
        slow_a, slow_c, ok = (upstream(name, security="none") for name in ("slow_a", "slow_c", "ok"))
        slow_a.faults.mail = slow_c.faults.mail = SLOW_DOWN
        users = {name: {"addresses": f"{name}@rakennus.fi", "upstream": name} for name in ("slow_a", "slow_c", "ok")}
        relay = relay_with(
            upstreams={name: upstream.account(up, None) for name, up in
                       (("slow_a", slow_a), ("slow_c", slow_c), ("ok", ok))},
            company={"from_address": "ok@rakennus.fi", "upstream": "ok"}, users=users,
            delivery={"workers": 1, "max_queue_lifetime": 1.5},
        )  # fmt: skip
        spool = tmp_path / "spool"
        with events() as logs:
            send(relay.port, "slow_a@rakennus.fi", ["asiakas@example.com"])
            send(relay.port, "slow_c@rakennus.fi", ["asiakas@example.com"])
            wait_until(lambda: len([e for e in mail_in(spool, "deferred") if e.waiting_for == "limit"]) == 2)
            # the single worker delivers other mail until the two expire
            wait_until(lambda: len(mail_in(spool, "failed")) == 2,
                       step=lambda: send(relay.port, "ok@rakennus.fi", ["asiakas@example.com"]))  # fmt: skip
            relay.stop()

        failed = {e.id: e for e in queue_entries(spool, "failed")}
        logged = [(e["queue_id"], e["user"], e["upstream"]) for e in logs if e["event"] == "delivery_failed"]
        assert {(e.id, e.user, e.account) for e in mail_in(spool, "failed")} <= set(logged)
        assert [(i, failed[i].user, failed[i].account) for i, _, _ in logged] == logged


class TestTooManyRecipients:
    """RFC 5321 4.5.3.1.10: a server out of room for recipients in a transaction answers 452 to the rest,
    and the client sends them in a further transaction (Postfix does so at once). Retries are 30 s here:
    anything that waits for one shows."""

    @pytest.mark.parametrize("reply", [TOO_MANY, "452 Too many recipients received"])
    def test_the_rest_go_in_new_transactions_at_once_and_other_mail_is_not_held(
        self, reply: str, limited: Callable[[int, str], RecipientLimitUpstream], upstream: UpstreamFactory,
        relay_with: RelayFactory, tmp_path: Path,
    ) -> None:  # fmt: skip
        """1. a server taking 2 recipients a transaction  2. a message to 5, then one to 1
        Result: transactions of 2, 2 and 1 within moments, each recipient once; the other message is not
        held behind a pause of the account (it was paused 60 s, then 120 s)."""
        up = limited(2, reply)
        relay = relay_with(upstreams={"up": upstream.account(up, None)}, delivery=SLOW_RETRIES,
                           company={"from_address": "laskutus@rakennus.fi", "upstream": "up"})  # fmt: skip
        everyone = [f"r{n}@example.com" for n in range(5)]
        with events() as logs:
            send(relay.port, "laskutus@rakennus.fi", everyone, "Tiedote")
            send(relay.port, "laskutus@rakennus.fi", ["single@example.com"], "Lasku")
            got = up.wait_for(4, timeout=5)
            wait_until(lambda: not any(queue_entries(tmp_path / "spool", s) for s in ("incoming", "deferred", "active")))

        tiedote = [r.rcpt_tos for r in got if r.message["Subject"] == "Tiedote"]
        assert [2, 2, 1] == [len(rcpts) for rcpts in tiedote]
        assert everyone == [a for rcpts in tiedote for a in rcpts]
        assert [["single@example.com"]] == [r.rcpt_tos for r in got if r.message["Subject"] == "Lasku"]
        assert [] == [e for e in logs if e["event"] == "account_throttled"]
        assert [] == queue_entries(tmp_path / "spool", "failed")

    def test_one_recipient_refused_alone_is_a_deferral_of_that_message_not_a_pause(
        self, limited: Callable[[int, str], RecipientLimitUpstream], upstream: UpstreamFactory,
        relay_with: RelayFactory, tmp_path: Path,
    ) -> None:  # fmt: skip
        """1. a server answering 452 4.5.3 to every RCPT  2. a message to 2
        Result: a second transaction with one recipient at once; refused too, the message waits for its
        retry (waiting for: retry), and the account is not paused."""
        up = limited(0, TOO_MANY)
        relay = relay_with(upstreams={"up": upstream.account(up, None)}, delivery=SLOW_RETRIES,
                           company={"from_address": "laskutus@rakennus.fi", "upstream": "up"})  # fmt: skip
        with events() as logs:
            send(relay.port, "laskutus@rakennus.fi", ["a@example.com", "b@example.com"])
            wait_until(lambda: bool(queue_entries(tmp_path / "spool", "deferred")) and len(up.tried) >= 3)
            time.sleep(0.3)  # a further transaction would come now
            [entry] = queue_entries(tmp_path / "spool", "deferred")

        assert ["a@example.com", "b@example.com", "a@example.com"] == up.tried
        assert ("retry", 2) == (entry.waiting_for, entry.attempts)
        assert 25 < entry.next_attempt_at - time.time() <= 30
        assert [] == [e for e in logs if e["event"] == "account_throttled"]


class TestRefusedLoginAfterAStart:
    def test_after_a_restart_one_message_tries_the_refused_login(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """1. five messages, the account's password wrong, max_connections 3: the login is refused, the
        messages wait  2. relay restarts; the admin retries the queue at once (relay queue --flush)
        Result: one more failed login, not one per connection (three at every restart, toward the
        provider's lockout); the messages wait for the next retry. 3. the password fixed, relay restarts
        Result: all five go."""
        up = upstream("o365", accounts={"laskutus@rakennus.fi": "right-pw"})
        sections: dict[str, Any] = {
            "upstreams": {"o365": {**upstream.account(up, "laskutus@rakennus.fi", password="wrong-pw"), "max_connections": 3}},
            "company": {"from_address": "laskutus@rakennus.fi", "upstream": "o365"},
            "delivery": {**SLOW_RETRIES, "workers": 4},
        }  # fmt: skip
        spool = tmp_path / "spool"
        first = relay_with(**sections)
        with smtplib.SMTP("127.0.0.1", first.port, timeout=30) as client:
            for n in range(5):
                client.sendmail("erp@legacy.local", ["asiakas@example.com"], b"Subject: %d\r\n\r\nx\r\n" % n)
        wait_until(lambda: len(queue_entries(spool, "deferred")) == 5)
        first.stop()
        failed_before, tried_before = len(up.failed_logins), len(up.auth_commands)

        second = relay_with(**sections)
        assert 0 == cli.main(["queue", "-c", str(tmp_path / "relay.yaml"), "--flush"])
        wait_until(lambda: len(up.auth_commands) > tried_before)  # the attempt after the restart
        wait_until(lambda: len(queue_entries(spool, "deferred")) == 5)
        time.sleep(0.3)  # a login still under way would show now
        assert 1 == len(up.failed_logins) - failed_before
        assert [] == up.received

        # the admin fixes the password and restarts: the hold saved for the old one holds nothing back
        second.stop()
        Path(sections["upstreams"]["o365"]["password_file"]).write_text("right-pw\n")
        relay_with(**sections)
        assert 0 == cli.main(["queue", "-c", str(tmp_path / "relay.yaml"), "--flush"])
        assert 5 == len({r.message["Subject"] for r in up.wait_for(5)})


class TestNotTheAccountsLimits:
    @pytest.mark.parametrize(
        ("step", "reply"),
        [("data", "451 4.7.1 Try again later (greylisted)"), ("rcpt", "421 4.7.0 closing")], ids=["greylisted", "rcpt-421"],
    )  # fmt: skip
    def test_a_per_message_temporary_reply_waits_for_its_retry_not_the_accounts_limits(
        self, step: str, reply: str, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """Greylisting after the data, and a 421 to one recipient: the message is retried, the account is
        not paused; relay queue said "waiting for: limit, the account's sending limits", which sent the
        admin looking for limits that were not involved."""
        up = upstream("up", security="none")
        if step == "data":
            up.faults.data = reply
        else:
            up.faults.rcpt = {"asiakas@example.com": reply}
        relay = relay_with(upstreams={"up": upstream.account(up, None)}, delivery=SLOW_RETRIES,
                           company={"from_address": "laskutus@rakennus.fi", "upstream": "up"})  # fmt: skip
        with events() as logs:
            send(relay.port, "laskutus@rakennus.fi", ["asiakas@example.com"])
            wait_until(lambda: bool(queue_entries(tmp_path / "spool", "deferred")))
            [entry] = queue_entries(tmp_path / "spool", "deferred")
            assert 0 == cli.main(["queue", "-c", str(tmp_path / "relay.yaml")])

        assert ("retry", 1) == (entry.waiting_for, entry.attempts)
        assert "(waiting for: retry)" in capsys.readouterr().out
        assert [] == [e for e in logs if e["event"] == "account_throttled"]
