"""Failure and delay notices: RFC 3464 reports to the sending user through the user's own login, and the admin copy
through the company's."""

from __future__ import annotations

import json
import time
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from relay import replies
from relay.commands import cli
from relay.queue import notices
from relay.queue.spool import QueueEntry, Spool
from tests.conftest import UpstreamFactory, build_config, free_port, queue_entries, smtp_send
from tests.servers import Received, RelayRunner, Upstream

RelayFactory = Any
POMO = "pomo@rakennus.fi"
COMPANY = "laskutus@rakennus.fi"
ADMIN = "it-tuki@rakennus.fi"  # delivery.notify
INVOICE = b"From: erp@legacy.local\r\nTo: asiakas@example.com\r\nSubject: Lasku 4711\r\n\r\nInvoice\r\n"


def dsn_fields(report: EmailMessage) -> list[Message]:
    """The field groups of the ``message/delivery-status`` part: per message, then per recipient."""
    [part] = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    return list(part.get_payload())


def text_of(report: EmailMessage) -> str:
    """The plain-language first part (the field groups of the report parse as text/plain too)."""
    part = report.get_payload()[0]
    assert part.get_content_type() == "text/plain"
    return str(part.get_content())


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def office(upstream: UpstreamFactory) -> Upstream:
    """An Office-365-like provider: every login may send only as its own mailbox."""
    up = upstream("o365", security="starttls", accounts={COMPANY: "pw-company", POMO: "pw-pomo"})
    up.faults.require_sender_is_login = True
    return up


def start(relay_with: RelayFactory, upstream: UpstreamFactory, up: Upstream, **delivery: Any) -> RelayRunner:
    """Company account plus user pomo with an own login on the same server (the seed's POMO)."""
    account = upstream.account(up, COMPANY)
    pomo = upstream.account(up, POMO)
    return relay_with(  # type: ignore[no-any-return]
        upstreams={"o365": account},
        company={"from_address": COMPANY, "upstream": "o365"},
        users={"pomo": {"from_address": POMO, "upstream": {"username": POMO, "password_file": pomo["password_file"]}}},
        delivery=delivery,
    )


class TestFailureNotice:
    def test_notice_reaches_the_sender_through_the_senders_own_login(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path, capsys: Any
    ) -> None:
        """1. pomo sends to a good and a refused address  2. the provider refuses the one with 550
        Result: pomo's mailbox gets one RFC 3464 report, sent as pomo through pomo's login; the admin copy
        goes through the company's login, as the company; the failed entry names both (relay queue shows them)."""
        up = office(upstream)
        up.faults.rcpt = {"gone@example.com": "550 5.1.1 <gone@example.com>: User unknown in virtual table"}
        relay = start(relay_with, upstream, up, notify="it-tuki@rakennus.fi")
        smtp_send(relay.port, POMO, ["asiakas@example.com", "gone@example.com"], INVOICE)
        received = up.wait_for(3)
        [mail] = [r for r in received if r.message["Auto-Submitted"] is None]
        [notice, copy] = sorted((r for r in received if r.message["Auto-Submitted"]), key=lambda r: r.login != POMO)
        wait_until(lambda: queue_entries(tmp_path / "spool", "failed"))

        assert (mail.login, mail.rcpt_tos) == (POMO, ["asiakas@example.com"])
        assert (notice.login, notice.mail_from, notice.rcpt_tos) == (POMO, POMO, [POMO])
        assert (copy.login, copy.mail_from, copy.rcpt_tos) == (COMPANY, COMPANY, ["it-tuki@rakennus.fi"])
        assert dsn_fields(copy.message)[1]["Diagnostic-Code"] == dsn_fields(notice.message)[1]["Diagnostic-Code"]
        report = notice.message
        assert report.get_content_type() == "multipart/report"
        assert report.get_param("report-type") == "delivery-status"
        assert (report["Auto-Submitted"], report["To"]) == ("auto-replied", POMO)
        assert POMO in report["From"] and "Lasku 4711" in report["Subject"]
        per_message, per_recipient = dsn_fields(report)
        assert per_message["Reporting-MTA"].startswith("dns; ")
        assert per_recipient["Final-Recipient"] == "rfc822; gone@example.com"
        assert (per_recipient["Action"], per_recipient["Status"]) == ("failed", "5.1.1")
        assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 <gone@example.com>: User unknown in virtual table"
        assert "gone@example.com" in text_of(report) and "User unknown" in text_of(report)
        assert "asiakas@example.com" not in text_of(report)  # delivered: not a failure
        [headers] = [p for p in report.walk() if p.get_content_type() == "text/rfc822-headers"]
        assert b"Subject: Lasku 4711" in headers.get_payload(decode=True)
        [entry] = queue_entries(tmp_path / "spool", "failed")
        assert per_message["X-Relay-Queue-ID"] == entry.id
        note, admin_note = entry.notices
        assert note.startswith("failed ") and note.split()[1] != entry.id
        assert admin_note.startswith("failed ") and admin_note.endswith(" admin")
        capsys.readouterr()
        assert 0 == cli.main(["queue", "-c", str(tmp_path / "relay.yaml"), "--json"])
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        [row] = [r for r in rows if r["id"] == entry.id]  # (the notice's own entry may not be removed yet)
        assert row["notices"] == list(entry.notices) and row["state"] == "failed"
        sent = (note.split()[1], admin_note.split()[1])  # "sent" once it has left
        wait_until(lambda: all(Spool(tmp_path / "spool").find(queue_id) is None for queue_id in sent))
        assert 0 == cli.main(["queue", "-c", str(tmp_path / "relay.yaml"), "--show", entry.id])
        out = capsys.readouterr().out
        assert f"notice sent:  failure notice (queue id {note.split()[1]})" in out
        assert f"notice sent:  failure notice, admin copy (queue id {admin_note.split()[1]})" in out

    def test_no_notice_about_a_notice(self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path) -> None:
        """1. a recipient is refused  2. the notice to the sender is refused too
        Result: both end in failed/, the notice marked as one, and nothing else is queued or sent."""
        up = office(upstream)
        up.faults.rcpt = {"gone@example.com": "550 5.1.1 User unknown", POMO: "550 5.2.1 Mailbox disabled"}
        relay = start(relay_with, upstream, up)
        smtp_send(relay.port, POMO, ["gone@example.com"], INVOICE)
        wait_until(lambda: len(queue_entries(tmp_path / "spool", "failed")) == 2)
        relay.stop()

        original, notice = sorted(queue_entries(tmp_path / "spool", "failed"), key=lambda e: e.received_at)
        assert (original.kind, notice.kind) == ("mail", "notice")
        assert original.notices == (f"failed {notice.id}",) and notice.notices == ()
        assert notice.bounced == ((POMO, "550 5.2.1 Mailbox disabled"),)
        for state in ("incoming", "active", "deferred", "hold"):
            assert [] == queue_entries(tmp_path / "spool", state)
        assert [] == up.received

    def test_lifetime_expiry_sends_a_notice(self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path) -> None:
        """A recipient that only ever gets 4xx fails when max_queue_lifetime is reached, and pomo is told."""
        up = office(upstream)
        up.faults.rcpt = {"slow@example.com": "451 4.2.0 Mailbox busy, try later"}
        relay = start(relay_with, upstream, up, max_queue_lifetime=1.0, retry_interval=0.2, max_retry_interval=0.2)
        smtp_send(relay.port, POMO, ["slow@example.com"], INVOICE)
        [notice] = up.wait_for(1)
        wait_until(lambda: queue_entries(tmp_path / "spool", "failed"))  # (the notice is queued before this record)

        [entry] = queue_entries(tmp_path / "spool", "failed")
        assert entry.attempts >= 2 and entry.bounced[0][1].startswith("expired in queue: 451 4.2.0")
        _, per_recipient = dsn_fields(notice.message)
        assert (per_recipient["Action"], per_recipient["Status"]) == ("failed", "4.4.7")
        assert per_recipient["Diagnostic-Code"] == "smtp; 451 4.2.0 Mailbox busy, try later"
        assert notice.login == POMO and "slow@example.com" in text_of(notice.message)

    def test_delay_warning_once_then_delivery(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """delivery.delay_warning: one "still trying" report after that time, however many retries follow."""
        up = office(upstream)
        up.faults.rcpt = {"slow@example.com": "452 4.2.2 Mailbox full"}
        relay = start(relay_with, upstream, up, delay_warning=0.3, retry_interval=0.1, max_retry_interval=0.1)
        smtp_send(relay.port, POMO, ["slow@example.com"], INVOICE)
        [warning] = up.wait_for(1)
        wait_until(lambda: any(e.attempts >= 6 for e in queue_entries(tmp_path / "spool", "deferred")))
        up.faults.rcpt = {}
        up.wait_for(2)
        relay.stop()

        assert [warning] == [r for r in up.received if r.message["Auto-Submitted"]]
        assert warning.message["Subject"].startswith("Delayed mail")
        _, per_recipient = dsn_fields(warning.message)
        assert (per_recipient["Action"], per_recipient["Status"]) == ("delayed", "4.2.2")
        assert "Will-Retry-Until" in per_recipient
        assert up.received[1].rcpt_tos == ["slow@example.com"]


def start_accounts(
    relay_with: RelayFactory, upstream: UpstreamFactory, up: Upstream, *, company_port: int, pomo_port: int,
    **delivery: Any,
) -> RelayRunner:  # fmt: skip
    """As ``start``, each account on a port of its own (a dead one: a port nothing listens on)."""
    company = {**upstream.account(up, COMPANY), "port": company_port}
    pomo = {"username": POMO, "password_file": upstream.account(up, POMO)["password_file"], "port": pomo_port}
    return relay_with(  # type: ignore[no-any-return]
        upstreams={"o365": company}, company={"from_address": COMPANY, "upstream": "o365"},
        users={"pomo": {"from_address": POMO, "upstream": pomo}}, delivery={"notify": ADMIN, **delivery},
    )  # fmt: skip


def settled(spool: Path) -> bool:
    """Nothing is waiting or being delivered: every entry has left or failed."""
    return not any(queue_entries(spool, state) for state in ("incoming", "active", "deferred"))


class TestAdminCopy:
    """delivery.notify's copy goes through the company's account: the user's may be the one that is down."""

    def test_the_admin_is_told_through_the_company_account_when_the_users_is_down(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path, capsys: Any
    ) -> None:
        """1. pomo's own account cannot be reached (a port nothing listens on); the company's works
        2. pomo's mail gets a delay warning, then expires (max_queue_lifetime)
        Result: the admin copy of each notice arrives through the company's login, from the company's
        address; pomo's own notices stay on pomo's account and fail with it, no notice about them.
        (Both went as one notice on pomo's dead account: the admin was never told either.)"""
        up = office(upstream)
        relay = start_accounts(relay_with, upstream, up, company_port=up.port, pomo_port=free_port(),
                               max_queue_lifetime=1.0, delay_warning=0.3, retry_interval=0.2, max_retry_interval=0.2)  # fmt: skip
        smtp_send(relay.port, POMO, ["asiakas@example.com"], INVOICE)
        warning, failure = up.wait_for(2)
        spool = tmp_path / "spool"
        wait_until(lambda: len(queue_entries(spool, "failed")) == 3 and settled(spool), timeout=20)
        relay.stop()

        for copy in (warning, failure):
            assert (copy.login, copy.mail_from, copy.rcpt_tos) == (COMPANY, COMPANY, [ADMIN])
            assert COMPANY in copy.message["From"] and copy.message["To"] == ADMIN
            assert "a copy for the administrator" in text_of(copy.message)
            assert f"The message of pomo <{POMO}>" in text_of(copy.message)
        assert warning.message["Subject"].startswith("Delayed mail") and "Lasku 4711" in warning.message["Subject"]
        assert failure.message["Subject"].startswith("Undelivered mail")
        assert dsn_fields(failure.message)[1]["Diagnostic-Code"].startswith("X-Relay; cannot connect")
        assert len(up.received) == 2
        [mail] = [e for e in queue_entries(spool, "failed") if e.kind == "mail"]
        actions = [(n.split()[0], n.endswith(" admin")) for n in mail.notices]
        assert actions == [("delayed", False), ("delayed", True), ("failed", False), ("failed", True)]
        own = [e for e in queue_entries(spool, "failed") if e.kind == "notice"]
        assert {(e.account, e.mail_from, e.recipients, e.notices) for e in own} == {("user:pomo", POMO, (POMO,), ())}
        assert {e.id for e in own} == {n.split()[1] for n in mail.notices if not n.endswith(" admin")}
        capsys.readouterr()
        assert 0 == cli.main(["queue", "-c", str(tmp_path / "relay.yaml"), "--show", mail.id])
        out = capsys.readouterr().out
        assert f"notice FAILED: failure notice (queue id {mail.notices[2].split()[1]}; not delivered either, " \
               "so the user was not told)" in out  # fmt: skip
        assert f"notice sent:  failure notice, admin copy (queue id {mail.notices[3].split()[1]})" in out

    def test_one_notice_when_the_users_account_is_the_companys(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """1. myynti sends through the company's account, as the company  2. a recipient is refused
        Result: one notice, to the company's mailbox and the admin together, as before: a copy of its
        own would take the same account, so it is not made. (A guard: this held before the change too.)"""
        up = office(upstream)
        relay = relay_with(upstreams={"o365": upstream.account(up, COMPANY)},
                           company={"from_address": COMPANY, "upstream": "o365"},
                           users={"myynti": {"addresses": "myynti@rakennus.fi"}}, delivery={"notify": ADMIN})  # fmt: skip
        up.faults.rcpt = {"gone@example.com": "550 5.1.1 User unknown"}
        smtp_send(relay.port, "myynti@rakennus.fi", ["asiakas@example.com", "gone@example.com"], INVOICE)
        up.wait_for(2)
        spool = tmp_path / "spool"
        wait_until(lambda: queue_entries(spool, "failed") and settled(spool))
        relay.stop()

        [notice] = [r for r in up.received if r.message["Auto-Submitted"]]
        assert (notice.login, notice.mail_from, notice.rcpt_tos) == (COMPANY, COMPANY, [COMPANY, ADMIN])
        assert "a copy for the administrator" not in text_of(notice.message)
        [entry] = queue_entries(spool, "failed")
        [note] = entry.notices
        assert note.startswith("failed ") and not note.endswith(" admin")

    def test_a_failed_admin_copy_is_logged_and_told_to_nobody(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path, capsys: Any
    ) -> None:
        """1. the company's account is the dead one; pomo's own works  2. the provider refuses a recipient
        Result: pomo is told through pomo's account; the admin copy waits on the company's account, then
        fails: logged (delivery_failed naming it), shown as FAILED in relay queue, and no notice about it."""
        up = office(upstream)
        up.faults.rcpt = {"gone@example.com": "550 5.1.1 User unknown"}
        with capture_logs() as logs:
            relay = start_accounts(relay_with, upstream, up, company_port=free_port(), pomo_port=up.port,
                                   max_queue_lifetime=1.0, retry_interval=0.2, max_retry_interval=0.2)  # fmt: skip
            smtp_send(relay.port, POMO, ["gone@example.com"], INVOICE)
            spool = tmp_path / "spool"
            wait_until(lambda: len(queue_entries(spool, "failed")) == 2 and settled(spool), timeout=20)
            relay.stop()

        [notice] = up.received
        assert (notice.login, notice.rcpt_tos) == (POMO, [POMO])
        [mail] = [e for e in queue_entries(spool, "failed") if e.kind == "mail"]
        [copy] = [e for e in queue_entries(spool, "failed") if e.kind == "notice"]
        assert (copy.account, copy.mail_from, copy.recipients, copy.notices) == ("o365", COMPANY, (ADMIN,), ())
        assert copy.user is None  # the company's mail: not in pomo's archive folder
        assert mail.notices[1] == f"failed {copy.id} admin"
        [failed] = [e for e in logs if e["event"] == "delivery_failed" and e["queue_id"] == copy.id]
        assert failed["notice"] == f"admin copy of the failed notice about {mail.id}"
        assert failed["bounced"][ADMIN].startswith("expired in queue: cannot connect")
        assert [e for e in logs if e["event"] == "notice_queued" and e["queue_id"] == copy.id] == []
        capsys.readouterr()
        assert 0 == cli.main(["queue", "-c", str(tmp_path / "relay.yaml")])
        assert f"failure notice, admin copy (queue id {copy.id}; not delivered either, so the administrator " \
               "(delivery.notify) was not told)" in capsys.readouterr().out  # fmt: skip


class TestBuild:
    def entry(self, **fields: Any) -> QueueEntry:
        fields = {"account": "o365", **fields}
        return QueueEntry(id="18F0000000000ABCDEF", mail_from=POMO, recipients=("a@example.com",),
                          size=10, received_at=time.time(), user="pomo", **fields)  # fmt: skip

    def test_provider_text_cannot_inject_fields_and_odd_addresses_stay_ascii(self, tmp_path: Path) -> None:
        config, _ = build_config(tmp_path, upstreams={"o365": {"host": "127.0.0.1", "port": 2587}},
                                 company={"upstream": "o365"}, users={"pomo": {"addresses": POMO}})  # fmt: skip
        failed = [("äiti@example.fi", "553 5.6.7 no SMTPUTF8"), ("b@example.com", "550 bad\r\nX-Injected: 1")]
        out = notices.build(config, self.entry(), failed, b"Subject: =?utf-8?q?L=C3=A4hete?=\r\n", "failed", now=time.time())

        assert out is not None and out.kind == "notice" and out.recipients == (POMO,)
        report = Received(None, POMO, [POMO], out.content, True).message
        first, second = dsn_fields(report)[1:]
        assert first["Final-Recipient"] == "utf-8; \\x{E4}iti@example.fi"
        assert second["Diagnostic-Code"] == "smtp; 550 bad X-Injected: 1" and "X-Injected" not in second
        assert (second["Status"], "Lähete" in report["Subject"]) == ("5.0.0", True)

    def test_relays_own_refusal_is_not_put_in_the_providers_mouth(self, tmp_path: Path) -> None:
        """A non-ASCII local part with a provider without SMTPUTF8 never reaches the provider: the notice said
        "the provider said" and named it as Remote-MTA. The provider's own refusals still say so."""
        config, _ = build_config(tmp_path, upstreams={"o365": {"host": "127.0.0.1", "port": 2587}},
                                 company={"upstream": "o365"}, users={"pomo": {"addresses": POMO}})  # fmt: skip
        failed = [("äiti@example.fi", replies.R553_NO_SMTPUTF8), ("b@example.com", "550 5.1.1 unknown")]
        out = notices.build(config, self.entry(), failed, b"Subject: x\r\n", "failed", now=time.time())

        assert out is not None
        report = Received(None, POMO, [POMO], out.content, True).message
        text = report.get_payload()[0].get_content()
        assert f"relay could not send to this address: {replies.R553_NO_SMTPUTF8}" in text
        assert "the provider said: 550 5.1.1 unknown" in text
        first, second = dsn_fields(report)[1:]
        assert (None, "dns; 127.0.0.1") == (first["Remote-MTA"], second["Remote-MTA"])

    def test_a_notice_to_an_idn_address_is_written(self, tmp_path: Path) -> None:
        """A user whose mailbox is at an IDN domain gets the notice: its Message-ID was ``<...@yhtiö.fi>``,
        which no 7-bit header can hold, and writing the notice failed (notice_not_queued); its From and
        To name the mailbox by the domain's A-label, and the envelope by the address as configured."""
        mailbox = "laskutus@yhtiö.fi"
        config, _ = build_config(tmp_path, upstreams={"o365": {"host": "127.0.0.1", "port": 2587}},
                                 company={"upstream": "o365"}, users={"pomo": {"addresses": mailbox}})  # fmt: skip
        out = notices.build(config, self.entry(), [("a@example.com", "550 5.1.1 unknown")], b"Subject: x\r\n",
                            "failed", now=time.time())  # fmt: skip

        assert out is not None and (out.mail_from, out.recipients) == (mailbox, (mailbox,))
        report = Received(None, mailbox, [mailbox], out.content, True).message
        assert report["Message-ID"].endswith("@xn--yhti-8qa.fi>")
        assert ["laskutus@xn--yhti-8qa.fi"] * 2 == [report[n].addresses[0].addr_spec for n in ("From", "To")]

    def test_an_sms_gateway_password_in_the_subject_is_not_repeated(self, tmp_path: Path) -> None:
        """sms.password_in: subject puts the gateway's secret in the Subject: the notice leaves it out."""
        config, _ = build_config(tmp_path, upstreams={"o365": {"host": "127.0.0.1"}}, company={"upstream": "o365"},
                                 users={"pomo": {"addresses": POMO}})  # fmt: skip
        queued = b"From: pomo@rakennus.fi\r\nTo: +358401234567@sms.example\r\nSubject: s3cret-gw\r\n\r\nHei\r\n"
        headers = notices.original_headers(queued, kind="sms")
        out = notices.build(config, self.entry(kind="sms"), [("+358401234567@sms.example", "550 no")], headers,
                            "failed", now=time.time())  # fmt: skip

        assert out is not None and b"s3cret-gw" not in out.content and b"+358401234567@sms.example" in out.content

    def test_no_notice_for_a_notice_entry(self, tmp_path: Path) -> None:
        config, _ = build_config(tmp_path, upstreams={"o365": {"host": "127.0.0.1"}}, company={"upstream": "o365"})
        assert notices.wanted(config, self.entry()) and not notices.wanted(config, self.entry(kind="notice"))

    def test_an_admin_copy_goes_once_per_mailbox(self, tmp_path: Path) -> None:
        """``notify: "it@corp.test; IT@corp.test"`` and the user's own address among them: one copy each."""
        config, _ = build_config(tmp_path, upstreams={"o365": {"host": "127.0.0.1"}}, company={"upstream": "o365"},
                                 users={"pomo": {"addresses": POMO}},
                                 delivery={"notify": f"it@corp.test; IT@corp.test; {POMO.upper()}"})  # fmt: skip
        out = notices.build(config, self.entry(), [("a@example.com", "550 no")], b"Subject: x\r\n", "failed",
                            now=time.time())  # fmt: skip

        assert out is not None and (POMO, "it@corp.test") == out.recipients
        assert notices.admin_copy(config, self.entry(), [("a@example.com", "550 no")], b"", "failed", now=time.time()) is None

    def test_an_admin_copy_of_its_own_leaves_out_the_users_mailbox(self, tmp_path: Path) -> None:
        """pomo's own account: the copy goes from the company's address, once per admin mailbox, and not
        to pomo (pomo's notice has it); pomo's notice goes to pomo alone."""
        config, _ = build_config(tmp_path, upstreams={"o365": {"host": "127.0.0.1"}},
                                 company={"upstream": "o365", "from_address": COMPANY},
                                 users={"pomo": {"from_address": POMO, "upstream": {"username": POMO}}},
                                 delivery={"notify": f"it@corp.test; IT@corp.test; {POMO.upper()}"})  # fmt: skip
        failed = [("a@example.com", "550 no")]
        mine = notices.build(config, self.entry(account="user:pomo"), failed, b"", "failed", now=time.time())
        copy = notices.admin_copy(config, self.entry(account="user:pomo"), failed, b"", "failed", now=time.time())

        assert mine is not None and (mine.account, mine.mail_from, mine.recipients) == ("user:pomo", POMO, (POMO,))
        assert copy is not None and (copy.account, copy.mail_from, copy.recipients) == ("o365", COMPANY, ("it@corp.test",))
        report = Received(None, COMPANY, ["it@corp.test"], copy.content, True).message
        assert (report["To"], report["Auto-Submitted"]) == ("it@corp.test", "auto-replied") and COMPANY in report["From"]
        assert "user's account (user:pomo)" in text_of(report)
