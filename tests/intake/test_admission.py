"""Limits that protect the host and the mailbox, over real SMTP: connections at once (421) and messages a
minute per client and per user (450), each refusal logged; with the defaults a month-end burst passes."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import UpstreamFactory
from tests.servers import RelayRunner, Upstream

RelayFactory = Callable[..., RelayRunner]
MESSAGE = b"From: %s\r\nTo: asiakas@example.com\r\nSubject: Lasku %d\r\n\r\nInvoice %d\r\n"


@pytest.fixture
def provider(upstream: UpstreamFactory) -> Upstream:
    return upstream("provider", security="ssl", accounts={"laskutus@rakennus.fi": "pw"})


@pytest.fixture
def start(provider: Upstream, upstream: UpstreamFactory, relay_with: RelayFactory) -> Callable[..., RelayRunner]:
    def start(**limits: Any) -> RelayRunner:
        return relay_with(
            upstreams={"provider": upstream.account(provider, "laskutus@rakennus.fi")},
            company={"from_address": "laskutus@rakennus.fi", "upstream": "provider"},
            users={"matti": {"addresses": ["matti@rakennus.fi"]}, "liisa": {"addresses": ["liisa@rakennus.fi"]}},
            limits=limits,
        )

    return start


def greeting(port: int) -> int:
    """Connect and return the code of the server's first line (220, or 421 over the limits)."""
    client = smtplib.SMTP(timeout=10)
    try:
        code, _ = client.connect("127.0.0.1", port)
        return code
    except smtplib.SMTPConnectError as exc:
        return exc.smtp_code
    finally:
        client.close()


def limited(logs: list[dict[str, Any]]) -> list[str]:
    return [e["limit"] for e in logs if e["event"] == "client_limited"]


class TestConnections:
    @pytest.mark.parametrize("key", ["max_connections", "max_connections_per_client"])
    def test_a_connection_over_the_limit_gets_421_and_a_slot_freed_is_usable_again(
        self, start: Callable[..., RelayRunner], key: str
    ) -> None:
        """Two open sessions with a limit of 2: the third connection gets 421 4.7.0 instead of the greeting
        (and a log line naming the limit); once one session quits, a new connection is greeted again."""
        relay = start(**{key: 2})
        first = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
        second = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
        with capture_logs() as logs:
            try:
                third = greeting(relay.port)
            finally:
                first.quit()
        deadline = time.monotonic() + 10
        again = greeting(relay.port)
        while again != 220 and time.monotonic() < deadline:  # the quit is counted when relay sees the close
            time.sleep(0.05)
            again = greeting(relay.port)
        second.quit()

        assert (421, 220) == (third, again)
        assert [key] == limited(logs)


class TestRates:
    def test_the_client_s_message_over_its_minute_gets_450_at_mail(self, start: Callable[..., RelayRunner]) -> None:
        """messages_per_minute_per_client 3: in one session the fourth MAIL gets 450 4.7.1 (the client keeps
        the mail and tries later, as with Postfix's smtpd_client_message_rate_limit), logged."""
        relay = start(messages_per_minute_per_client=3)
        with capture_logs() as logs, smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            for n in range(3):
                client.sendmail("erp@legacy.local", ["asiakas@example.com"], MESSAGE % (b"erp@legacy.local", n, n))
            code, reply = client.mail("erp@legacy.local")

        assert (450, b"4.7.1 Error: too much mail from 127.0.0.1, try again later") == (code, reply)
        assert ["messages_per_minute_per_client"] == limited(logs)
        assert 3 == len([e for e in logs if e["event"] == "received"])

    def test_the_user_s_message_over_their_minute_gets_450_and_is_not_queued(
        self, start: Callable[..., RelayRunner], provider: Upstream
    ) -> None:
        """messages_per_minute_per_user 2: matti's third message gets 450 4.7.1 after DATA and is not queued;
        liisa, from the same client, still sends."""
        relay = start(messages_per_minute_per_user=2)
        codes = []
        with capture_logs() as logs, smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            for sender in ("matti", "matti", "matti", "liisa"):
                address = f"{sender}@rakennus.fi".encode()
                try:
                    client.sendmail(address.decode(), ["asiakas@example.com"], MESSAGE % (address, 1, 1))
                    codes.append(250)
                except smtplib.SMTPDataError as exc:
                    codes.append(exc.smtp_code)
                    assert b"4.7.1 Error: too much mail from user matti, try again later" == exc.smtp_error

        assert [250, 250, 450, 250] == codes
        assert ["messages_per_minute_per_user"] == limited(logs)
        assert ["matti", "matti", "liisa"] == [e["user"] for e in logs if e["event"] == "received"]
        assert 3 == len(provider.wait_for(3))


class TestDefaults:
    def test_a_month_end_burst_of_500_in_one_session_passes_with_the_defaults(
        self, start: Callable[..., RelayRunner]
    ) -> None:
        """One ERP, 500 invoices in one session, nothing set under limits: every one gets 250, none is
        limited (the rate limits are off by default)."""
        relay = start()
        codes = []
        with capture_logs() as logs, smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            for n in range(500):
                client.mail("erp@legacy.local")
                client.rcpt("asiakas@example.com")
                codes.append(client.data(MESSAGE % (b"erp@legacy.local", n, n))[0])

        assert [250] * 500 == codes
        assert [] == limited(logs)
