"""Legacy client -> relay -> provider-like upstream, over real sockets with real TLS and AUTH."""

from __future__ import annotations

import base64
import smtplib
import time
from collections.abc import Callable
from email import message_from_bytes
from email.header import decode_header, make_header
from email.message import Message
from email.policy import compat32
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from relay.envelope import Outgoing
from relay.queue.spool import Spool
from tests.conftest import UpstreamFactory, queue_entries, smtp_send, wait_for_entries
from tests.servers import RelayRunner

RelayFactory = Callable[..., RelayRunner]

LEGACY = b"Subject: Lasku 1234\r\nFrom: erp@legacy.local\r\nTo: customer@example.com\r\n\r\nInvoice attached.\r\n"


def compat32_message(data: bytes) -> Message:
    """The message as an old reader parses it: parameters as written, no RFC 2047 decoding."""
    return message_from_bytes(data, policy=compat32)


def _company(upstream: str, address: str, **extra: object) -> dict[str, object]:
    return {"from_address": address, "from_name": "Rakennus Oy", "upstream": upstream, **extra}


class TestLegacyClientToTlsUpstream:
    @pytest.mark.parametrize("security", ["ssl", "starttls"])
    def test_plain_client_reaches_authenticated_tls_upstream(
        self, security: str, upstream: UpstreamFactory, relay_with: RelayFactory
    ) -> None:
        """A client with no TLS and no AUTH gets its mail delivered over TLS with AUTH."""
        up = upstream("provider", security=security, accounts={"laskutus@rakennus.fi": "s3cret-pw"})
        relay = relay_with(
            upstreams={"provider": upstream.account(up, "laskutus@rakennus.fi")},
            company=_company("provider", "laskutus@rakennus.fi"),
        )

        reply = smtp_send(relay.port, "erp@legacy.local", ["customer@example.com"], LEGACY)
        [got] = up.wait_for(1)

        assert reply.startswith("2.0.0 Ok: queued as ")
        assert up.logins == ["laskutus@rakennus.fi"]
        assert got.tls
        assert got.mail_from == "laskutus@rakennus.fi"
        assert got.rcpt_tos == ["customer@example.com"]
        assert str(got.message["From"]) == "Rakennus Oy <laskutus@rakennus.fi>"
        assert None is got.message["Reply-To"]  # erp@legacy.local: nobody outside could answer it
        assert got.message["Subject"] == "Lasku 1234"

    def test_the_signature_once_and_no_relay_header_even_when_sent_twice(
        self, upstream: UpstreamFactory, relay_with: RelayFactory
    ) -> None:
        """The provider gets the signature and no X-Relay-* header; the delivered message sent through
        relay again (a second installation, an ERP re-sending it) keeps its one signature."""
        up = upstream("provider", security="starttls", accounts={"laskutus@rakennus.fi": "s3cret-pw"})
        relay = relay_with(
            upstreams={"provider": upstream.account(up, "laskutus@rakennus.fi")},
            company=_company("provider", "laskutus@rakennus.fi", signature="--\nRakennus Oy\nLaskutus"),
        )

        smtp_send(relay.port, "erp@legacy.local", ["customer@example.com"], LEGACY)
        [first] = up.wait_for(1)
        smtp_send(relay.port, "erp@legacy.local", ["customer@example.com"], first.content)
        second = up.wait_for(2)[1]

        for got in (first, second):
            assert [] == [name for name in got.message if name.lower().startswith("x-relay")]
            text = got.message.get_body().get_content().replace("\r\n", "\n")  # type: ignore[union-attr]
            assert 1 == text.count("Rakennus Oy\nLaskutus"), text

    def test_250_only_after_the_entry_is_on_disk(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """With the upstream down, the accepted message is in the spool, with the id the client was told."""
        up = upstream("provider", security="ssl", accounts={"a@rakennus.fi": "pw"})
        up.stop()
        relay = relay_with(upstreams={"provider": upstream.account(up, "a@rakennus.fi")},
                           company=_company("provider", "a@rakennus.fi"))  # fmt: skip

        reply = smtp_send(relay.port, "erp@legacy.local", ["customer@example.com"], LEGACY)
        queue_id = reply.rsplit(" ", 1)[1]

        time.sleep(0.3)
        ids = [e.id for state in ("incoming", "active", "deferred") for e in queue_entries(tmp_path / "spool", state)]
        assert [queue_id] == ids
        assert (tmp_path / "spool" / "msg" / f"{queue_id}.eml").exists()


class TestRoutingPerUser:
    def test_two_users_two_accounts_and_a_company_fallback(
        self, upstream: UpstreamFactory, relay_with: RelayFactory
    ) -> None:
        """Each user goes out through their own account; an unknown sender through the company's."""
        company_up = upstream("company", security="starttls", accounts={"toimisto@rakennus.fi": "c-pw"})
        matti_up = upstream("matti", security="ssl", accounts={"matti@rakennus.fi": "m-pw"})
        relay = relay_with(
            upstreams={
                "company": upstream.account(company_up, "toimisto@rakennus.fi"),
                "matti": upstream.account(matti_up, "matti@rakennus.fi"),
            },
            company=_company("company", "toimisto@rakennus.fi"),
            users={
                "matti": {"addresses": ["matti@erp.local"], "from_address": "matti@rakennus.fi",
                          "from_name": "Matti Meikäläinen", "upstream": "matti"},
                # own account fields laid over the company's account: same server, own login
                "anna": {"addresses": ["anna@erp.local"], "from_address": "anna@rakennus.fi",
                         "upstream": {"username": "anna@rakennus.fi",
                                      "password_file": str(upstream.secret("anna", "a-pw"))}},
            },
        )  # fmt: skip
        company_up.accounts["anna@rakennus.fi"] = "a-pw"

        smtp_send(relay.port, "matti@erp.local", ["m@example.com"], LEGACY)
        smtp_send(relay.port, "anna@erp.local", ["a@example.com"], LEGACY)
        smtp_send(relay.port, "someone@erp.local", ["s@example.com"], LEGACY)
        [matti] = matti_up.wait_for(1)
        company_up.wait_for(2)

        assert matti_up.logins == ["matti@rakennus.fi"]
        assert matti.mail_from == "matti@rakennus.fi"
        assert str(matti.message["From"]) == "Matti Meikäläinen <matti@rakennus.fi>"
        by_login = {r.login: r for r in company_up.received}
        assert {"anna@rakennus.fi", "toimisto@rakennus.fi"} == set(by_login)
        assert by_login["anna@rakennus.fi"].mail_from == "anna@rakennus.fi"
        assert by_login["anna@rakennus.fi"].rcpt_tos == ["a@example.com"]
        assert by_login["toimisto@rakennus.fi"].mail_from == "toimisto@rakennus.fi"
        assert by_login["toimisto@rakennus.fi"].rcpt_tos == ["s@example.com"]
        assert str(by_login["toimisto@rakennus.fi"].message["From"]) == "Rakennus Oy <toimisto@rakennus.fi>"

    def test_copy_to_is_added_to_the_recipients(
        self, upstream: UpstreamFactory, relay_with: RelayFactory
    ) -> None:
        """The seeds' default recipient (Vakio vastaanottaja) gets every message."""
        up = upstream("provider", security="ssl", accounts={"a@rakennus.fi": "pw"})
        relay = relay_with(upstreams={"provider": upstream.account(up, "a@rakennus.fi")},
                           company=_company("provider", "a@rakennus.fi", copy_to="arkisto@rakennus.fi"))  # fmt: skip

        smtp_send(relay.port, "erp@legacy.local", ["customer@example.com"], LEGACY)
        [got] = up.wait_for(1)

        assert got.rcpt_tos == ["customer@example.com", "arkisto@rakennus.fi"]
        assert "arkisto" not in got.content.decode("latin-1")


class TestReplyTo:
    def test_replies_go_where_someone_can_read_them(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """Issue 16: the ERP-internal From (``matti@erp.local``) never becomes Reply-To; the company's
        ``reply_to`` does, a user's own ``reply_to`` overrides it, and an answerable original From is
        kept for a company without one. Asserted on the bytes the provider got."""
        up = upstream("provider", security="starttls", accounts={"toimisto@rakennus.fi": "pw"})
        account = upstream.account(up, "toimisto@rakennus.fi")
        users = {"matti": {"addresses": ["matti@erp.local"], "reply_to": "matti@rakennus.fi"},
                 "anna": {"addresses": ["anna@erp.local"]}}  # fmt: skip
        relay = relay_with(upstreams={"provider": account}, users=users,
                           company=_company("provider", "toimisto@rakennus.fi", reply_to="laskutus@rakennus.fi"))  # fmt: skip
        plain = relay_with(upstreams={"provider": account}, company=_company("provider", "toimisto@rakennus.fi"),
                           spool_dir=str(tmp_path / "spool-plain"))  # fmt: skip

        for port, sender in [(relay.port, "matti@erp.local"), (relay.port, "anna@erp.local"),
                             (plain.port, "erp@legacy.local"), (plain.port, "Myynti <myynti@rakennus.fi>")]:  # fmt: skip
            smtp_send(port, "erp@legacy.local", ["customer@example.com"],
                      f"From: {sender}\r\nSubject: Lasku\r\n\r\nx\r\n".encode())  # fmt: skip
            up.wait_for(len(up.received) + 1)
        headers = [got.content.split(b"\r\n\r\n")[0].split(b"\r\n") for got in up.received]

        reply_tos = [[line for line in lines if line.lower().startswith(b"reply-to:")] for lines in headers]
        assert [[b"Reply-To: matti@rakennus.fi"], [b"Reply-To: laskutus@rakennus.fi"], [],
                [b"Reply-To: Myynti <myynti@rakennus.fi>"]] == reply_tos  # fmt: skip
        assert b"erp.local" not in b"".join(got.content for got in up.received)


class TestBrokenMimeReachesAStrictProvider:
    @pytest.mark.parametrize(
        "content_type", ["multipart/mixed", 'multipart/mixed; boundary="=_declared"'], ids=["no boundary", "boundary never used"]
    )
    def test_broken_multipart_with_a_5000_character_line_is_delivered_once(
        self, content_type: str, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """The QA report: such a message got 250, then the provider refused relay's rewrite of it (bare LF,
        a base64 multipart) with ``500 5.5.2 Line too long`` for five days, logged as upstream_down."""
        up = upstream("provider", security="starttls", accounts={"a@rakennus.fi": "pw"})
        up.faults.strict_lines = True
        body = b"Lasku 1234\r\n" + b"x" * 5000 + b"\r\nTerveisin\r\n"
        content = f"Subject: Lasku\r\nMIME-Version: 1.0\r\nContent-Type: {content_type}\r\n\r\n".encode() + body
        with capture_logs() as logs:
            relay = relay_with(upstreams={"provider": upstream.account(up, "a@rakennus.fi")},
                               company=_company("provider", "a@rakennus.fi"))  # fmt: skip
            smtp_send(relay.port, "erp@legacy.local", ["customer@example.com"], content)
            [got] = up.wait_for(1)
            time.sleep(0.5)  # a second copy would arrive within a few retry intervals
            relay.stop()

        assert 1 == len(up.received)
        assert "text/plain" == got.message.get_content_type()
        assert body.decode() == got.message.get_content()
        assert [] == [e for e in logs if e["event"] == "upstream_down"]
        assert [] == queue_entries(tmp_path / "spool", "failed") + queue_entries(tmp_path / "spool", "deferred")


    def test_a_message_refused_after_the_dot_with_500_fails_once_and_the_upstream_is_not_down(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """Were a body still refused (``500 5.5.2 Line too long``), it goes to failed/ at once instead of
        five days of retries logged as upstream_down."""
        up = upstream("provider", security="starttls", accounts={"a@rakennus.fi": "pw"})
        up.faults.data = "500 5.5.2 Line too long"
        with capture_logs() as logs:
            relay = relay_with(upstreams={"provider": upstream.account(up, "a@rakennus.fi")},
                               company=_company("provider", "a@rakennus.fi"))  # fmt: skip
            smtp_send(relay.port, "erp@legacy.local", ["customer@example.com"], LEGACY)
            wait_for_entries(tmp_path / "spool", "failed")
            relay.stop()

        [entry] = [e for e in queue_entries(tmp_path / "spool", "failed") if e.kind == "mail"]
        assert "5.5.2 Line too long" in entry.last_reply
        assert [] == [e for e in logs if e["event"] == "upstream_down"]


def _waiting(spool: Path) -> set[str]:
    """The ids of the entries waiting to be delivered (incoming/, active/, deferred/), read three times:
    an entry renamed from one state to another between two directory listings is in neither for one
    pass. (For a moment when none can be delivered: an entry read once stays counted.)"""
    return {e.id for _ in range(3) for state in ("incoming", "active", "deferred") for e in queue_entries(spool, state)}


class TestFailuresKeepMail:
    def test_wrong_upstream_password_keeps_the_message_and_logs_why(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """AUTH refused: the mail stays queued (deferred), the log names the reason, not the password."""
        up = upstream("provider", security="starttls", accounts={"a@rakennus.fi": "right-pw"})
        with capture_logs() as logs:
            relay = relay_with(
                upstreams={"provider": upstream.account(up, "a@rakennus.fi", password="wrong-pw")},
                company=_company("provider", "a@rakennus.fi"),
            )
            smtp_send(relay.port, "erp@legacy.local", ["customer@example.com"], LEGACY)
            wait_for_entries(tmp_path / "spool", "deferred")
            relay.stop()

        [entry] = queue_entries(tmp_path / "spool", "deferred") or queue_entries(tmp_path / "spool", "incoming")
        assert "535" in entry.last_reply
        attempts = [e for e in logs if e["event"] == "delivery_attempt"]
        assert attempts and attempts[0]["result"] == "deferred"
        assert attempts[0]["error"] == "upstream refused the login (AUTH)"
        assert attempts[0]["code"] == 535
        assert f"(the password comes from password_file {tmp_path}/secrets/provider-a@rakennus.fi)" in attempts[0]["advice"]
        assert "wrong-pw" not in repr(logs)
        assert up.received == []

    def test_a_wrong_password_costs_one_login_per_attempt_and_the_mail_goes_once_fixed(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """Issue 16: providers lock an account after repeated failed logins, and aiosmtplib's ``login()``
        tried PLAIN and then LOGIN with the same wrong secret. Counted on the provider's side: one AUTH
        command per connection, attempt after attempt; the mail waits in deferred/ (never failed/), and
        goes out at the next retry once the password file is right."""
        up = upstream("provider", security="starttls", accounts={"a@rakennus.fi": "right-pw"})
        account = upstream.account(up, "a@rakennus.fi", password="wrong-pw")
        relay = relay_with(upstreams={"provider": account}, company=_company("provider", "a@rakennus.fi"))

        smtp_send(relay.port, "erp@legacy.local", ["customer@example.com"], LEGACY)
        deadline = time.monotonic() + 10
        while len(up.auth_sessions()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        tried = up.auth_sessions()
        waiting = _waiting(tmp_path / "spool")
        Path(account["password_file"]).write_text("right-pw\n")
        [got] = up.wait_for(1)

        assert 3 <= len(tried) and all(["PLAIN"] == mechanisms for mechanisms in tried), tried
        assert len(tried) == len(up.failed_logins)
        assert [] == queue_entries(tmp_path / "spool", "failed") and 1 == len(waiting)
        assert ["customer@example.com"] == got.rcpt_tos
        assert ["PLAIN"] == up.auth_sessions()[-1]

    def test_a_refused_login_holds_the_accounts_other_mail(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """Ten messages queued behind a wrong password: one login per retry for the account, not one per
        message (ten failures in a second lock an Office 365 mailbox); the others wait in deferred/
        without an attempt, and all go once the password file is fixed."""
        up = upstream("provider", security="starttls", accounts={"a@rakennus.fi": "right-pw"})
        account = upstream.account(up, "a@rakennus.fi", password="wrong-pw")
        with capture_logs() as logs:
            relay = relay_with(upstreams={"provider": account}, company=_company("provider", "a@rakennus.fi"),
                               delivery={"retry_interval": 0.5, "max_retry_interval": 1})  # fmt: skip
            for n in range(10):
                smtp_send(relay.port, "erp@legacy.local", [f"c{n}@example.com"], LEGACY)
            time.sleep(2)
            refused = len(up.failed_logins)
            waiting = _waiting(tmp_path / "spool")
            Path(account["password_file"]).write_text("right-pw\n")
            up.wait_for(10)

        # one at the first attempt (the others wait for its outcome), then one per retry (0.5 s, then 1 s)
        assert 2 <= refused <= 4, refused
        assert 10 == len(waiting) and [] == queue_entries(tmp_path / "spool", "failed")
        assert sorted(f"c{n}@example.com" for n in range(10)) == sorted(r for got in up.received for r in got.rcpt_tos)
        events = {e["event"] for e in logs}
        assert {"login_refused_holding", "waiting_for_login", "login_hold_lifted"} <= events

    def test_the_first_refused_login_is_one_login_not_one_per_connection(
        self, upstream: UpstreamFactory, relay_with: RelayFactory
    ) -> None:
        """A tester's count: six messages queued at a start with a wrong password, and the provider saw three
        failed logins in the first second (one per connection, ``max_connections`` 3), each doubling the
        wait. Until a login of this secret has worked once, one message tries it and the rest wait."""
        up = upstream("provider", security="starttls", accounts={"a@rakennus.fi": "right-pw"})
        account = upstream.account(up, "a@rakennus.fi", password="wrong-pw")
        with capture_logs() as logs:
            relay = relay_with(upstreams={"provider": account}, company=_company("provider", "a@rakennus.fi"),
                               delivery={"retry_interval": 3, "max_retry_interval": 3, "workers": 4})  # fmt: skip
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:  # six at once, one session
                for n in range(6):
                    client.sendmail("erp@legacy.local", [f"c{n}@example.com"], LEGACY)
            time.sleep(1.5)

        assert 1 == len(up.failed_logins), up.failed_logins
        holding = [e for e in logs if e["event"] == "login_refused_holding"]
        assert [3.0] == [round(e["retry_in"]) for e in holding]  # one refusal: the first wait, not doubled

    def test_due_bookkeeping_under_a_refused_login_logs_in_no_more(
        self, upstream: UpstreamFactory, relay_with: RelayFactory
    ) -> None:
        """With ``delay_warning`` set, each message logged in when its warning fell due, and every queued
        'still trying' notice (through the same account) at each of its retries: 33 failed logins where 7
        were due. Now such an attempt records what is due without a login."""
        up = upstream("provider", security="starttls", accounts={"a@rakennus.fi": "right-pw"})
        account = upstream.account(up, "a@rakennus.fi", password="wrong-pw")
        with capture_logs() as logs:
            relay = relay_with(upstreams={"provider": account}, company=_company("provider", "a@rakennus.fi"),
                               delivery={"retry_interval": 1, "max_retry_interval": 1, "delay_warning": 1.5})  # fmt: skip
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
                for n in range(6):
                    client.sendmail("erp@legacy.local", [f"c{n}@example.com"], LEGACY)
            time.sleep(4.5)

        delayed = [e for e in logs if e["event"] == "notice_queued" and e["action"] == "delayed"]
        assert 6 <= len(delayed)  # every message's warning was recorded (and queued) without a login
        assert len(up.failed_logins) <= 6, len(up.failed_logins)  # about one a retry (1 s): not 6 + notices'
        assert any(e.get("error", "").startswith("not tried: the upstream refuses") for e in logs)

    def test_upstream_down_at_submission_then_up(
        self, upstream: UpstreamFactory, relay_with: RelayFactory
    ) -> None:
        """The client gets 250 while the upstream is down; the message arrives once it is back."""
        up = upstream("provider", security="ssl", accounts={"a@rakennus.fi": "pw"})
        up.stop()
        relay = relay_with(upstreams={"provider": upstream.account(up, "a@rakennus.fi")},
                           company=_company("provider", "a@rakennus.fi"))  # fmt: skip

        reply = smtp_send(relay.port, "erp@legacy.local", ["customer@example.com"], LEGACY)
        time.sleep(0.5)
        assert up.received == []
        up.start()
        [got] = up.wait_for(1)

        assert reply.startswith("2.0.0 Ok: queued as ")
        assert got.rcpt_tos == ["customer@example.com"]

    def test_permanent_refusal_moves_the_message_to_failed_with_the_reason(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """A 5xx is not retried: the entry lands in failed/ with the provider's reply."""
        up = upstream("provider", security="ssl", accounts={"a@rakennus.fi": "pw"})
        up.faults.require_sender_is_login = True
        relay = relay_with(upstreams={"provider": upstream.account(up, "a@rakennus.fi")},
                           company=_company("provider", "other@rakennus.fi"))  # fmt: skip

        smtp_send(relay.port, "erp@legacy.local", ["customer@example.com"], LEGACY)
        wait_for_entries(tmp_path / "spool", "failed")

        # the notice to other@rakennus.fi is refused the same way; it lands beside it, with no notice of its own
        [entry] = [e for e in queue_entries(tmp_path / "spool", "failed") if e.kind == "mail"]
        assert "SendAsDenied" in entry.last_reply
        assert [("customer@example.com", entry.bounced[0][1])] == list(entry.bounced)
        assert (tmp_path / "spool" / "msg" / f"{entry.id}.eml").exists()

    def test_some_recipients_refused_others_delivered(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """Per-recipient outcomes: a 550 for one address does not hold up the other."""
        up = upstream("provider", security="ssl", accounts={"a@rakennus.fi": "pw"})
        up.faults.rcpt = {"gone@example.com": "550 5.1.1 No such user"}
        relay = relay_with(upstreams={"provider": upstream.account(up, "a@rakennus.fi")},
                           company=_company("provider", "a@rakennus.fi"))  # fmt: skip

        smtp_send(relay.port, "erp@legacy.local", ["ok@example.com", "gone@example.com"], LEGACY)
        got, notice = up.wait_for(2)  # the message, then the failure notice to the sender
        wait_for_entries(tmp_path / "spool", "failed")

        assert got.rcpt_tos == ["ok@example.com"]
        assert notice.rcpt_tos == ["a@rakennus.fi"] and notice.message["Auto-Submitted"] == "auto-replied"
        [entry] = queue_entries(tmp_path / "spool", "failed")
        assert entry.delivered == ("ok@example.com",)
        assert entry.bounced[0][0] == "gone@example.com"


class TestRestart:
    def test_stopped_with_mail_in_spool_then_started_delivers_each_once(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """1. upstream down, 5 messages accepted  2. relay stopped  3. upstream up, relay started
        Result: each message arrives exactly once."""
        up = upstream("provider", security="ssl", accounts={"a@rakennus.fi": "pw"})
        up.stop()
        sections = {"upstreams": {"provider": upstream.account(up, "a@rakennus.fi")},
                        "company": _company("provider", "a@rakennus.fi")}  # fmt: skip
        first = relay_with(**sections)
        for n in range(5):
            smtp_send(first.port, "erp@legacy.local", [f"c{n}@example.com"], LEGACY)
        first.close()
        assert sum(len(queue_entries(tmp_path / "spool", s)) for s in ("incoming", "deferred")) == 5

        up.start()
        relay_with(**sections)
        up.wait_for(5)
        time.sleep(0.5)

        assert sorted(f"c{n}@example.com" for n in range(5)) == sorted(r.rcpt_tos[0] for r in up.received)
        assert queue_entries(tmp_path / "spool", "deferred") + queue_entries(tmp_path / "spool", "incoming") == []


class TestAccessControl:
    def test_client_outside_allowed_networks_is_refused(
        self, upstream: UpstreamFactory, relay_with: RelayFactory
    ) -> None:
        """Only allowed networks may relay: 127.0.0.2 is loopback but not in the list."""
        up = upstream("provider", security="ssl", accounts={"a@rakennus.fi": "pw"})
        relay: RelayRunner = relay_with(
            listeners=[{"address": "127.0.0.1", "port": 0, "allowed_networks": ["127.0.0.2/32"]}],
            upstreams={"provider": upstream.account(up, "a@rakennus.fi")},
            company=_company("provider", "a@rakennus.fi"),
        )

        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("intruder")
            code, text = client.mail("spammer@example.com")
            rcpt_code, _ = client.rcpt("victim@example.com")

        assert code == 554
        assert b"127.0.0.1" in text
        assert rcpt_code == 503 or rcpt_code == 554
        time.sleep(0.3)
        assert up.received == []


class TestStop:
    def test_a_delivery_cut_by_a_stop_is_named(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The provider has the whole message and has not answered when relay stops: the attempt is cut
        and sent again at the next start. It was counted (``deliveries_interrupted: 1``) and never named,
        so the copy that arrives twice could not be traced: ``delivery_interrupted`` names its queue id."""
        monkeypatch.setattr("relay.daemon.DELIVERY_STOP_TIMEOUT", 0.5)  # (10 s in the daemon)
        provider = upstream("provider", security="ssl", accounts={"a@rakennus.fi": "pw"})
        provider.faults.hang_after_data = 5.0
        with capture_logs() as logs:
            relay = relay_with(
                upstreams={"provider": upstream.account(provider, "a@rakennus.fi")},
                company={"from_address": "a@rakennus.fi", "upstream": "provider"},
            )
            queue_id = smtp_send(relay.port, "erp@legacy.local", ["c@example.com"], b"Subject: x\r\n\r\nx\r\n")
            deadline = time.monotonic() + 10
            while not provider.received and time.monotonic() < deadline:  # the body is there, its 250 is not
                time.sleep(0.02)
            relay.stop()

        [cut] = [e for e in logs if e["event"] == "delivery_interrupted"]
        assert (queue_id.rsplit(" ", 1)[1], "provider", "requeued") == (cut["queue_id"], cut["upstream"], cut["result"])
        assert "sends it again" in cut["error"]
        assert [1] == [e["deliveries_interrupted"] for e in logs if e["event"] == "relay_stopped"]
        assert all("open_sessions" in e for e in logs if e["event"] == "relay_stopping")  # known when inline


class TestSpoolTrouble:
    def test_a_failed_spool_write_defers_and_does_not_resend(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """1. the upstream takes one recipient and defers the other  2. recording that fails (the disk
        refuses writes)  3. later the disk and the upstream are fine
        Result: the entry waited in deferred/, not hold/; the accepted recipient got the message once."""
        up = upstream("provider", security="ssl", accounts={"a@rakennus.fi": "pw"})
        up.faults.rcpt = {"later@example.com": "451 4.2.1 mailbox busy"}
        up.faults.hang = 0.5  # time to break the spool while the first attempt is under way
        relay = relay_with(upstreams={"provider": upstream.account(up, "a@rakennus.fi")},
                           company=_company("provider", "a@rakennus.fi"))  # fmt: skip
        spool_tmp = tmp_path / "spool" / "tmp"

        with capture_logs() as logs:
            smtp_send(relay.port, "erp@legacy.local", ["now@example.com", "later@example.com"], LEGACY)
            spool_tmp.rmdir()
            spool_tmp.write_text("a file where a directory should be: every spool write fails")
            deadline = time.monotonic() + 10
            while sum(e["event"] == "spool_write_failed" for e in logs) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            spool_tmp.unlink()
            spool_tmp.mkdir()
            up.faults.rcpt = {}
            up.wait_for(2)
            time.sleep(0.5)

        assert any(e["event"] == "spool_write_failed" and e["result"] == "deferred" for e in logs)
        assert [] == queue_entries(tmp_path / "spool", "hold")
        assert [["now@example.com"], ["later@example.com"]] == [r.rcpt_tos for r in up.received]


class TestQueueToolsBesideTheDaemon:
    def test_retry_of_a_held_entry_is_delivered_by_the_running_daemon(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``relay queue --retry`` moves the entry to incoming/; the daemon picks it up by itself."""
        from relay.commands import cli
        from relay.queue import scheduler

        monkeypatch.setattr(scheduler, "RESCAN_INTERVAL", 0.2)
        up = upstream("provider", security="ssl", accounts={"a@rakennus.fi": "pw"})
        relay = relay_with(upstreams={"provider": upstream.account(up, "a@rakennus.fi")},
                           company=_company("provider", "a@rakennus.fi"))  # fmt: skip
        spool = Spool(tmp_path / "spool")
        [entry] = spool.commit([Outgoing("provider", "a@rakennus.fi", ("c@example.com",), LEGACY)])
        spool.move(entry.id, source="incoming", target="hold")
        time.sleep(0.5)
        assert [] == up.received

        assert 0 == cli.main(["queue", "-c", str(tmp_path / "relay.yaml"), "--retry", entry.id])
        [got] = up.wait_for(1)

        assert ["c@example.com"] == got.rcpt_tos
        assert relay.port


class TestAccountsAreIndependent:
    def test_a_slow_provider_does_not_hold_up_another_account(
        self, upstream: UpstreamFactory, relay_with: RelayFactory
    ) -> None:
        """1. provider B answers after 3 s; four messages for B are queued  2. one message for A follows
        Result: A's message arrives at once; B's trickle through its single connection."""
        fast = upstream("fast", security="ssl", accounts={"a@rakennus.fi": "pw"})
        slow = upstream("slow", security="ssl", accounts={"b@rakennus.fi": "pw"})
        slow.faults.hang = 3.0
        relay = relay_with(
            upstreams={"fast": upstream.account(fast, "a@rakennus.fi"),
                       "slow": {**upstream.account(slow, "b@rakennus.fi"), "max_connections": 1}},
            company=_company("fast", "a@rakennus.fi"),
            users={"bertta": {"addresses": ["bertta@erp.local"], "from_address": "b@rakennus.fi", "upstream": "slow"}},
            delivery={"workers": 2, "retry_interval": 0.2, "max_retry_interval": 0.5},
        )  # fmt: skip
        for n in range(4):
            smtp_send(relay.port, "bertta@erp.local", [f"b{n}@example.com"], LEGACY)
        time.sleep(0.3)
        started = time.monotonic()
        smtp_send(relay.port, "erp@legacy.local", ["a@example.com"], LEGACY)
        fast.wait_for(1, timeout=10)

        assert time.monotonic() - started < 2.0
        assert len(slow.received) <= 1


class TestIssue16LegacyBytesReachTheProviderAsValidMime:
    """Issue 16, 1.2 and 1.3, over real sockets: what a legacy ERP writes, what the provider gets."""

    def test_latin1_labelled_utf8_arrives_repaired_and_signed(
        self, upstream: UpstreamFactory, relay_with: RelayFactory
    ) -> None:
        """``charset=utf-8`` on Latin-1 bytes: was sent raw (``Hyv?? p?iv??``) and unsigned; now a note in
        the log, the signature, and 7-bit windows-1252 quoted-printable the provider's reader decodes."""
        up = upstream("provider", security="starttls", accounts={"a@rakennus.fi": "pw"})
        up.faults.strict_lines = True
        company = _company("provider", "a@rakennus.fi", signature="Terveisin\nRakennus Oy")
        content = (b"Subject: Lasku\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                   b"Hyv\xe4\xe4 p\xe4iv\xe4\xe4\r\n")  # fmt: skip
        with capture_logs() as logs:
            relay = relay_with(upstreams={"provider": upstream.account(up, "a@rakennus.fi")}, company=company)
            smtp_send(relay.port, "erp@legacy.local", ["customer@example.com"], content)
            [got] = up.wait_for(1)
            relay.stop()

        assert got.content.isascii()
        assert "windows-1252" == got.message.get_content_charset()
        assert "quoted-printable" == got.message["Content-Transfer-Encoding"]
        assert "Hyvää päivää\r\n\r\nTerveisin\r\nRakennus Oy\r\n" == got.message.get_content()
        [received] = [e for e in logs if e["event"] == "received"]
        note = "text/plain: labelled utf-8 but not valid utf-8, written as windows-1252 quoted-printable"
        assert note in received["notes"]

    def test_an_8bit_file_name_arrives_as_rfc_2231_and_an_outlook_name(
        self, upstream: UpstreamFactory, relay_with: RelayFactory
    ) -> None:
        """``filename="lasku_9001_\\xe4.pdf"`` reached the provider raw; now all 7-bit, and the stdlib reads
        the name back from both fields (Content-Disposition's RFC 2231, Content-Type's RFC 2047 words)."""
        up = upstream("provider", security="starttls", accounts={"a@rakennus.fi": "pw"})
        up.faults.strict_lines = True
        relay = relay_with(upstreams={"provider": upstream.account(up, "a@rakennus.fi")},
                           company=_company("provider", "a@rakennus.fi"))  # fmt: skip
        pdf = bytes(range(256)) * 400  # over skeleton.STAND_IN_MIN once in base64: it stands aside
        content = (b"Subject: Lasku 9001\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n"
                   b"--b1\r\nContent-Type: text/plain\r\n\r\nLasku liitteena.\r\n--b1\r\n"
                   b'Content-Type: application/pdf; name="lasku_9001_\xe4.pdf"\r\n'
                   b'Content-Disposition: attachment; filename="lasku_9001_\xe4.pdf"\r\n'
                   b"Content-Transfer-Encoding: base64\r\n\r\n"
                   + base64.encodebytes(pdf).replace(b"\n", b"\r\n") + b"--b1--\r\n")  # fmt: skip

        smtp_send(relay.port, "erp@legacy.local", ["customer@example.com"], content)
        [got] = up.wait_for(1)
        attachment = got.message.get_payload()[1]

        assert got.content.isascii()
        assert "lasku_9001_ä.pdf" == attachment.get_filename()
        assert "lasku_9001_ä.pdf" == attachment["Content-Type"].params["name"]
        raw = compat32_message(got.content).get_payload()[1]
        assert "attachment; filename*=utf-8''lasku_9001_%C3%A4.pdf" == raw["Content-Disposition"]
        name = raw.get_param("name")  # as Outlook reads it: RFC 2047 words inside the quotes
        assert isinstance(name, str) and "lasku_9001_ä.pdf" == str(make_header(decode_header(name)))
        assert pdf == attachment.get_content()
