"""A full spool filesystem, for real (a small tmpfs filled up as ``dd`` fills it): what a delivery achieved is
recorded anyway, from the spool's reserve, so a restart never sends to a delivered recipient again; the
reserve is never taken for mail by anything that lists the spool."""

from __future__ import annotations

import json
import smtplib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from relay.commands import cli
from relay.envelope import Outgoing
from relay.queue.metrics import Metrics
from relay.queue.spool import RESERVE, RESERVE_SIZE, STATES, Spool
from tests.conftest import (
    UpstreamFactory,
    build_config,
    fill_disk,
    queue_entries,
    smtp_send,
    wait_for_entries,
)
from tests.servers import RelayRunner, Upstream

RelayFactory = Callable[..., RelayRunner]
SmallDisk = Callable[[Path, int], Path]
LEGACY = b"Subject: Lasku 1234\r\nFrom: erp@legacy.local\r\nTo: customer@example.com\r\n\r\nInvoice attached.\r\n"
DISK = 16 * 1024 * 1024  # the spool's whole filesystem: room for the reserve and the listener's 4 MiB margin


def sections(up: Upstream, upstream: UpstreamFactory) -> dict[str, Any]:
    """A provider for everyone; retries an hour apart, so only ``relay queue --retry`` starts an attempt."""
    return {
        "upstreams": {"provider": upstream.account(up, "a@rakennus.fi")},
        "company": {"from_address": "a@rakennus.fi", "upstream": "provider"},
        "delivery": {"retry_interval": 3600, "max_retry_interval": 3600},
        "limits": {"max_message_size": "1M"},
    }


def retry(tmp_path: Path, *queue_ids: str) -> None:
    """What the admin types: ``relay queue --retry ID`` (the daemon takes it up within a second)."""
    assert 0 == cli.main(["queue", "-c", str(tmp_path / "relay.yaml"), "--retry", *queue_ids])


def wait_until(done: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Whether ``done()`` came true within ``timeout`` seconds (the caller asserts what it needs)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def mail_code(port: int) -> int:
    """The reply code to MAIL FROM in a fresh session."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("erp-server")
        return client.mail("erp@legacy.local")[0]


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


class TestPartialDeliveryOnAFullDisk:
    def test_the_delivered_recipient_is_recorded_from_the_reserve_and_never_sent_again_after_a_restart(
        self, small_disk: SmallDisk, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """The black-box tester's case (FINDINGS item 1): 1. a message for now@ and later@ waits in deferred/
        (the provider refused it)  2. a file fills the spool's filesystem  3. the retry: the provider takes
        now@ and refuses later@ for now (450 at RCPT)  4. relay restarts, the disk still full  5. later@ is
        taken. Result: now@ got the message once (it got it twice: the record of step 3 failed with ENOSPC
        and lived only in memory); the record used the reserve, said so in an error, and ``relay queue``
        showed now@ delivered. Meanwhile the listener answered MAIL with 452 4.3.1. Once the filler is
        gone, the reserve is made again and mail is taken again."""
        spool = small_disk(tmp_path / "spool", DISK)
        up = upstream("provider", security="ssl", accounts={"a@rakennus.fi": "pw"})
        up.faults.data = "451 4.3.0 test refusal"
        with capture_logs() as logs:
            relay = relay_with(**sections(up, upstream))
            smtp_send(relay.port, "erp@legacy.local", ["now@example.com", "later@example.com"], LEGACY)
            wait_for_entries(spool, "deferred")
            [waiting] = queue_entries(spool, "deferred")
            filler = fill_disk(spool)
            time.sleep(1.1)  # the listener's reading of the free space is a second old at most
            refused_mail = mail_code(relay.port)
            up.faults.data = None
            up.faults.rcpt = {"later@example.com": "450 4.2.1 mailbox busy"}
            retry(tmp_path, waiting.id)
            up.wait_for(1)
            assert wait_until(lambda: any(e["event"] in ("spool_reserve_used", "spool_write_failed") for e in logs))
            assert wait_until(lambda: bool(queue_entries(spool, "deferred")))
            capsys.readouterr()
            assert 0 == cli.main(["queue", "-c", str(tmp_path / "relay.yaml"), "--json"])
            [listed] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
            relay.close()

            up.faults.rcpt = {}
            restarted = relay_with(**sections(up, upstream))
            retry(tmp_path, waiting.id)
            up.wait_for(2)
            assert wait_until(lambda: not queue_entries(spool, "deferred"))
            time.sleep(0.3)  # (a resend to now@ would come in this attempt)

            filler.unlink()
            time.sleep(1.1)  # the listener's reading of the free space is a second old at most
            taken_mail = mail_code(restarted.port)
            assert 0 == cli.main(["queue", "-c", str(tmp_path / "relay.yaml"), "--flush"])  # (for its nudge)
            remade = wait_until(lambda: (spool / "state" / RESERVE).exists())

        assert [["now@example.com"], ["later@example.com"]] == [r.rcpt_tos for r in up.received]
        assert (["now@example.com"], "deferred") == (listed["delivered"], listed["state"])
        assert [] == events(logs, "spool_write_failed")
        [used] = events(logs, "spool_reserve_used")
        assert ("error", waiting.id) == (used["log_level"], used["queue_id"])
        assert "No space left on device" in used["error"]
        assert f"free space on the filesystem of {spool}" == used["fix"]
        assert 452 == refused_mail
        assert [] == [e for e in events(logs, "spool_low_on_space") if e["log_level"] != "error"]
        assert 250 == taken_mail
        assert remade and RESERVE_SIZE == (spool / "state" / RESERVE).stat().st_size
        assert 1 == len(events(logs, "spool_reserve_restored"))

    def test_with_the_reserve_used_up_a_failed_record_names_who_a_restart_would_send_to_again(
        self, small_disk: SmallDisk, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """1. two messages wait in deferred/  2. the disk is filled  3. the first is half delivered (its record
        uses the reserve)  4. the disk is filled again  5. the second is half delivered: its record fails.
        Result: ``spool_write_failed`` names the recipient only memory knows as delivered and what a restart
        would do; without a restart that recipient is not sent to again."""
        spool = small_disk(tmp_path / "spool", DISK)
        up = upstream("provider", security="ssl", accounts={"a@rakennus.fi": "pw"})
        up.faults.data = "451 4.3.0 test refusal"
        with capture_logs() as logs:
            relay = relay_with(**sections(up, upstream))
            smtp_send(relay.port, "erp@legacy.local", ["now1@example.com", "later1@example.com"], LEGACY)
            smtp_send(relay.port, "erp@legacy.local", ["now2@example.com", "later2@example.com"], LEGACY)
            assert wait_until(lambda: len(queue_entries(spool, "deferred")) == 2)
            first, second = queue_entries(spool, "deferred")
            fill_disk(spool)
            up.faults.data = None
            up.faults.rcpt = {"later1@example.com": "450 4.2.1 busy", "later2@example.com": "450 4.2.1 busy"}
            retry(tmp_path, first.id)
            used = wait_until(lambda: bool(events(logs, "spool_reserve_used")))
            fill_disk(spool, "filler2")
            retry(tmp_path, second.id)
            assert wait_until(lambda: bool(events(logs, "spool_write_failed")))
            assert wait_until(lambda: second.id in Spool(spool).ids("deferred"))  # (moved there after the event)
            on_disk = Spool(spool).find(second.id)
            up.faults.rcpt = {}
            retry(tmp_path, second.id)
            up.wait_for(3)
            assert wait_until(lambda: Spool(spool).find(second.id) is None)
            time.sleep(0.3)
            relay.close()

        assert [["now1@example.com"], ["now2@example.com"], ["later2@example.com"]] == [r.rcpt_tos for r in up.received]
        assert used
        [failed] = events(logs, "spool_write_failed")
        assert (second.id, ["now2@example.com"]) == (failed["queue_id"], failed["unrecorded_delivered"])
        assert "a restart before then sends to these recipients again" in failed["consequence"]
        assert on_disk is not None and () == on_disk[1].delivered  # what relay queue --show reads: stale, logged
        found = Spool(spool).find(first.id)
        assert found is not None and ("now1@example.com",) == found[1].delivered


class TestTheReserveIsNoMail:
    @pytest.fixture
    def spool(self, tmp_path: Path) -> Spool:
        """A spool with an entry in every state and its reserve made."""
        build_config(tmp_path, upstreams={"provider": {"host": "127.0.0.1", "port": 2587}},
                     company={"from_address": "a@rakennus.fi", "upstream": "provider"})  # fmt: skip
        spool = Spool(tmp_path / "spool")
        spool.setup()
        for n, state in enumerate(STATES):
            [entry] = spool.commit([Outgoing("provider", "a@rakennus.fi", (f"c{n}@example.com",), LEGACY)])
            if state != "incoming":
                spool.move(entry.id, source="incoming", target=state)
        assert spool.make_reserve()
        return spool

    def test_relay_queue_lists_the_entries_alone(
        self, spool: Spool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``relay queue --json``: one line per entry, nothing for the reserve, exit 0 (no damaged entry)."""
        code = cli.main(["queue", "-c", str(tmp_path / "relay.yaml"), "--json"])

        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert 0 == code
        assert sorted(STATES) == sorted(row["state"] for row in rows)
        assert all(spool.damaged(state) == [] for state in STATES)

    def test_recovery_keeps_it_and_counts_nothing_for_it(self, spool: Spool) -> None:
        """The start's repair (after a kill -9 too) leaves the reserve where it is and moves no entry for it;
        a second ``make_reserve`` finds it and writes nothing."""
        reserve = spool.state_path(RESERVE)
        inode = reserve.stat().st_ino

        counts = spool.recover()

        assert 1 == counts["requeued"]  # the entry in active/, as after any crash
        assert (0, 0, 0) == (counts["held"], counts["orphans"], counts["damaged"])
        assert spool.make_reserve()
        assert (inode, RESERVE_SIZE) == (reserve.stat().st_ino, reserve.stat().st_size)
        assert [] == list((spool.root / "tmp").iterdir())

    def test_metrics_count_the_entries_alone(self, spool: Spool) -> None:
        """The queue gauges, read from the state directories at each scrape: one entry per state."""
        samples = {
            sample.labels["state"]: sample.value
            for family in Metrics(spool).registry.collect() if family.name == "relay_queue_entries"
            for sample in family.samples
        }  # fmt: skip

        assert {state: 1.0 for state in STATES} == samples

    def test_a_daemon_started_on_the_spool_keeps_one_reserve_and_delivers_the_mail(
        self, spool: Spool, upstream: UpstreamFactory, relay_with: RelayFactory
    ) -> None:
        """A start on a spool that holds a reserve (a restart, or a kill -9's): the mail waiting is delivered,
        no entry comes of the reserve, and it is the only file in state/ besides the scheduler's own."""
        up = upstream("provider", security="ssl", accounts={"a@rakennus.fi": "pw"})
        relay_with(upstreams={"provider": upstream.account(up, "a@rakennus.fi")},
                   company={"from_address": "a@rakennus.fi", "upstream": "provider"})  # fmt: skip

        up.wait_for(3)  # incoming/, deferred/ (due) and active/ (recovered); hold/ and failed/ stay
        waiting = ("incoming", "active", "deferred")
        done = wait_until(lambda: not [e for state in waiting for e in queue_entries(spool.root, state)])

        assert done
        assert [] == [p.name for p in (spool.root / "state").iterdir() if p.name not in (RESERVE, "limits.json")]
        assert ["c0@example.com", "c1@example.com", "c2@example.com"] == sorted(r.rcpt_tos[0] for r in up.received)
        assert 1 == len(queue_entries(spool.root, "hold")) == len(queue_entries(spool.root, "failed"))


class TestTheReserve:
    @pytest.mark.parametrize(("disk", "made"), [(3 * RESERVE_SIZE // 2, False), (3 * RESERVE_SIZE, True)])
    def test_made_only_with_room_for_it_twice_over(
        self, small_disk: SmallDisk, tmp_path: Path, disk: int, made: bool
    ) -> None:
        """On a filesystem of 1.5 MiB the reserve would leave too little for the next record: not made, and
        nothing half-written is left; on 3 MiB it is made, and given back once."""
        spool = Spool(small_disk(tmp_path / "spool", disk))
        spool.setup()

        assert made == spool.make_reserve()
        assert [RESERVE] * made == [p.name for p in (spool.root / "state").iterdir()]
        assert [] == list((spool.root / "tmp").iterdir())
        assert [made, False] == [spool.release_reserve(), spool.release_reserve()]
