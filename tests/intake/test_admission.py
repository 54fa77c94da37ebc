"""Limits that protect the host and the mailbox, over real SMTP: connections at once (421), messages a
minute per client and per user (450), each refusal logged; with the defaults a month-end burst passes."""

from __future__ import annotations

import os
import smtplib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from relay.intake.admission import SPACE_CHECK_INTERVAL, SpoolSpace
from relay.queue.spool import free_space
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


class TestSpoolSpace:
    """No disk is filled here: ``limits.max_message_size`` is set from what the test's own filesystem has free,
    so "1.5 times the largest message" is more, or less, than there is (tests/queue/test_disk_full.py fills a
    real one)."""

    def test_mail_gets_452_while_the_spool_has_less_than_1_5_largest_messages_free_and_250_again_after(
        self, start: Callable[..., RelayRunner], provider: Upstream, tmp_path: Path
    ) -> None:
        """1. max_message_size is all the spool's filesystem has free: two MAILs in a session  2. a reload
        to half of it (1.5 times that is 3/4 of the free space)  3. a message  4. MAIL with SIZE= that
        half. Result: 452 4.3.1 twice, logged once as an error with the numbers; then taken, logged as
        ``spool_space_ok``, and delivered; then 452 again, the announced size counted on top (Postfix too)."""
        free = free_space(tmp_path)
        with capture_logs() as logs:
            relay = start(max_message_size=free)
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
                client.ehlo("erp-server")
                refused = [client.mail("erp@legacy.local"), client.mail("erp@legacy.local")]
            reload(relay, tmp_path, free // 2, logs)
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
                client.ehlo("erp-server")
                client.sendmail("erp@legacy.local", ["asiakas@example.com"], MESSAGE % (b"erp@legacy.local", 1, 1))
                announced = client.mail("erp@legacy.local", options=[f"SIZE={free // 2}"])

        storage = b"4.3.1 Insufficient system storage: the mail queue's disk is nearly full, try again later"
        assert [(452, storage)] * 2 == refused
        assert (452, storage) == announced
        assert 1 == len(provider.wait_for(1))
        low, ok, low_again = [e for e in logs if e["event"] in ("spool_low_on_space", "spool_space_ok")]
        assert ("spool_low_on_space", "error", 1) == (low["event"], low["log_level"], low["refused"])
        assert int(1.5 * free) == low["wanted"] and 0 < low["free"] < low["wanted"]
        assert str(tmp_path / "spool") == low["spool"]
        assert ("spool_space_ok", 1) == (ok["event"], ok["refused"])
        assert ("spool_low_on_space", free // 2) == (low_again["event"], low_again["size"])

    def test_a_burst_of_mail_reads_the_free_space_once_a_second(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``statvfs`` is asked at most once per ``SPACE_CHECK_INTERVAL``, however many MAILs come."""
        calls = []
        real = os.statvfs
        monkeypatch.setattr(os, "statvfs", lambda path: calls.append(path) or real(path))
        now = [100.0]
        space = SpoolSpace(tmp_path, clock=lambda: now[0])

        readings = [space.free() for _ in range(500)]
        now[0] += SPACE_CHECK_INTERVAL
        readings.append(space.free())

        assert 2 == len(calls)
        assert all(isinstance(free, int) and free > 0 for free in readings)


def reload(relay: RelayRunner, tmp_path: Path, max_message_size: int, logs: list[dict[str, Any]]) -> None:
    """Write ``limits.max_message_size`` into relay.yaml, reload (SIGHUP's path) and wait until it applies."""
    path = tmp_path / "relay.yaml"
    data = yaml.safe_load(path.read_text())
    data["limits"]["max_message_size"] = max_message_size
    path.write_text(yaml.safe_dump(data))
    relay.run(lambda daemon: daemon.request_reload())
    deadline = time.monotonic() + 10
    while not any(e["event"] == "config_reloaded" for e in logs):
        assert time.monotonic() < deadline, [e["event"] for e in logs]
        time.sleep(0.02)
