"""The archive: a Maildir copy of each delivered message per user, retention enforced by the daemon."""

from __future__ import annotations

import mailbox
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from relay.config.load import parse_config
from relay.config.warnings import check_warnings
from relay.errors import ConfigError
from relay.queue import archive
from relay.queue.spool import STATES, Spool
from tests.conftest import UpstreamFactory, build_config, smtp_send
from tests.servers import RelayRunner, Upstream

DAY = 86400


def wait_until_spool_empty(spool_dir: Path, timeout: float = 15.0) -> None:
    """Every entry finished (the archive copy is written before an entry is recorded as done)."""
    spool = Spool(spool_dir)
    deadline = time.monotonic() + timeout
    while any(spool.count(state) for state in STATES) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert {state: 0 for state in STATES} == {state: spool.count(state) for state in STATES}


def copies(root: Path, folder: str) -> list[bytes]:
    box = mailbox.Maildir(root / folder, create=False)
    return [box.get_bytes(key) for key in sorted(box.keys())]


def add_old_copy(root: Path, folder: str, age_days: float) -> Path:
    root.mkdir(exist_ok=True)
    box = mailbox.Maildir(root / folder, create=True)
    key = box.add(b"Subject: old\n\nold\n")
    path = root / folder / "new" / key
    then = time.time() - age_days * DAY
    os.utime(path, (then, then))
    return path


@pytest.fixture
def provider(upstream: UpstreamFactory) -> Upstream:
    return upstream("provider", security="ssl", accounts={"toimisto@rakennus.fi": "c-pw", "sms@rakennus.fi": "s-pw"})


def _sections(upstream: UpstreamFactory, up: Upstream, archive_dir: Path, **extra: object) -> dict[str, object]:
    return {
        "upstreams": {"provider": upstream.account(up, "toimisto@rakennus.fi"),
                      "sms-account": upstream.account(up, "sms@rakennus.fi")},
        "company": {"from_address": "toimisto@rakennus.fi", "upstream": "provider", "archive_days": 30},
        "users": {"matti": {"addresses": ["matti@erp.local"], "archive_days": 7},
                  "pekka": {"addresses": ["pekka@erp.local"], "archive_days": 0}},
        "sms": {"domain": "sms", "gateway": "{number}@sms.example.com", "upstream": "sms-account"},
        "archive": {"dir": str(archive_dir), "sweep_interval": 0.1},
        **extra,
    }  # fmt: skip


class TestArchiveDuringDelivery:
    def test_each_delivered_message_lands_in_its_users_maildir_and_old_copies_are_swept(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, relay_with: Callable[..., RelayRunner]
    ) -> None:
        """Matti's mail (with a Bcc-like envelope recipient) and the company's are archived as delivered;
        Pekka (archive_days 0) and SMS are not; a copy older than Matti's 7 days is removed while relay runs."""
        root = tmp_path / "archive"
        relay = relay_with(**_sections(upstream, provider, root))

        smtp_send(relay.port, "matti@erp.local", ["a@example.com", "b@example.com"],
                  b"From: matti@erp.local\r\nTo: a@example.com\r\nSubject: Tarjous\r\n\r\nTarjous 1\r\n")  # fmt: skip
        smtp_send(relay.port, "matti@erp.local", ["0401234567@sms"], b"Subject: Muistutus\r\n\r\nKlo 8\r\n")
        smtp_send(relay.port, "pekka@erp.local", ["c@example.com"], b"Subject: Pekka\r\n\r\nx\r\n")
        smtp_send(relay.port, "ajo@erp.local", ["d@example.com"], b"Subject: Lasku\r\n\r\nLasku 7\r\n")
        provider.wait_for(4)
        wait_until_spool_empty(tmp_path / "spool")

        [matti] = copies(root, "matti")
        [company] = copies(root, "_company")
        assert sorted(p.name for p in root.iterdir()) == ["_company", "matti"]
        delivered = next(r for r in provider.received if r.rcpt_tos == ["a@example.com", "b@example.com"])
        trace, _, rest = matti.partition(b"\nReceived: ")  # (relay's own trace field heads the message)
        assert [b"Return-Path: <toimisto@rakennus.fi>", b"X-Relay-Delivered-To: a@example.com",
                b"X-Relay-Delivered-To: b@example.com"] == [l for l in trace.split(b"\n") if b"Queue-ID" not in l]
        assert delivered.content.replace(b"\r\n", b"\n") == b"Received: " + rest
        assert b"Lasku 7" in company and b"X-Relay-Delivered-To: d@example.com\n" in company

        old = add_old_copy(root, "matti", age_days=8)
        recent = add_old_copy(root, "matti", age_days=6)
        deadline = time.monotonic() + 5
        while old.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (False, True) == (old.exists(), recent.exists())
        assert 2 == len(copies(root, "matti"))

    def test_an_archive_that_cannot_be_written_never_fails_or_repeats_a_delivery(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, relay_with: Callable[..., RelayRunner]
    ) -> None:
        """archive.dir is a file: the message is delivered once, the entry finishes, the log says why."""
        root = tmp_path / "not-a-directory"
        root.write_text("")
        with capture_logs() as logs:
            relay = relay_with(**_sections(upstream, provider, root))
            smtp_send(relay.port, "ajo@erp.local", ["d@example.com"], b"Subject: Lasku\r\n\r\nLasku 8\r\n")
            provider.wait_for(1)
            wait_until_spool_empty(tmp_path / "spool")
            relay.stop()

        assert 1 == len(provider.received)
        [failed] = [e for e in logs if e["event"] == "archive_failed"]
        assert "FileExistsError" in failed["error"] and failed["queue_id"]
        assert ["delivered"] == [e["result"] for e in logs if e["event"] == "delivery_attempt"]


    def test_a_hung_archive_disk_does_not_hold_up_the_record(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, relay_with: Callable[..., RelayRunner],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:  # fmt: skip
        """A copy that takes longer than STORE_TIMEOUT (a stale network mount) is given up: the delivery is
        recorded as done, once."""
        real_write = archive._write

        def stalled_write(*args: Any) -> str:
            time.sleep(0.5)
            return real_write(*args)

        monkeypatch.setattr(archive, "STORE_TIMEOUT", 0.1)
        monkeypatch.setattr(archive, "_write", stalled_write)
        with capture_logs() as logs:
            relay = relay_with(**_sections(upstream, provider, tmp_path / "archive"))
            smtp_send(relay.port, "ajo@erp.local", ["d@example.com"], b"Subject: Lasku\r\n\r\nLasku 9\r\n")
            wait_until_spool_empty(tmp_path / "spool")
            relay.stop()

        assert 1 == len(provider.received)
        [failed] = [e for e in logs if e["event"] == "archive_failed"]
        assert "no answer within 0.1 s" == failed["error"]

    def test_a_disk_that_never_answers_does_not_stop_relay_taking_mail(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, relay_with: Callable[..., RelayRunner],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:  # fmt: skip
        """Copies that hang for good keep only the archive's own threads: the spool's commits and
        claims still run, every message gets its 250 and is delivered, later copies are skipped."""
        hung = threading.Event()
        monkeypatch.setattr(archive, "STORE_TIMEOUT", 0.1)
        monkeypatch.setattr(archive, "_write", lambda *args: hung.wait(30) and "never")
        try:
            with capture_logs() as logs:
                relay = relay_with(**_sections(upstream, provider, tmp_path / "archive"))
                for n in range(10):  # more than the default executor has threads (6 on 2 cores)
                    smtp_send(relay.port, "ajo@erp.local", ["d@example.com"], b"Subject: %d\r\n\r\nx\r\n" % n)
                    provider.wait_for(n + 1)
                    time.sleep(0.15)  # the copy times out, its thread stays stuck
                wait_until_spool_empty(tmp_path / "spool")
                relay.stop()
        finally:
            hung.set()
        assert 10 == len(provider.received)
        errors = [e["error"] for e in logs if e["event"] == "archive_failed"]
        assert 10 == len(errors) and any("skipped" in error for error in errors)


class TestSweep:
    def test_retention_per_folder(self, tmp_path: Path) -> None:
        """Each folder keeps its user's days (the company's for _company and for users no longer
        configured); a folder whose archiving is off is left alone; stale Maildir tmp files go."""
        root = tmp_path / "archive"
        config, _ = build_config(
            tmp_path, upstreams={"o": {"host": "smtp.example.com"}}, company={"archive_days": 10},
            users={"matti": {"archive_days": 1}, "pekka": {"archive_days": 0}}, archive={"dir": str(root)},
        )  # fmt: skip
        gone = [add_old_copy(root, "matti", 2), add_old_copy(root, "_company", 11), add_old_copy(root, "former", 11)]
        kept = [add_old_copy(root, "matti", 0.5), add_old_copy(root, "_company", 9), add_old_copy(root, "pekka", 100)]
        stale_tmp = root / "matti" / "tmp" / "interrupted"
        stale_tmp.write_bytes(b"half")
        os.utime(stale_tmp, (time.time() - 2 * DAY,) * 2)

        assert 3 == archive.sweep(config)
        assert [False] * 3 == [p.exists() for p in gone]
        assert [True] * 3 == [p.exists() for p in kept]
        assert not stale_tmp.exists()

    def test_nothing_is_touched_without_archive_days(self, tmp_path: Path) -> None:
        root = tmp_path / "archive"
        config, _ = build_config(tmp_path, upstreams={"o": {"host": "smtp.example.com"}}, archive={"dir": str(root)})
        old = add_old_copy(root, "_company", 1000)

        assert 0 == archive.sweep(config)
        assert old.exists()


class TestArchiveConfig:
    def test_an_archived_user_id_must_be_a_folder_name(self) -> None:
        """A user id names the user's archive folder: no path separators or dot-names."""
        text = "upstreams: {o: {host: smtp.example.com}}\ncompany: {archive_days: 30}\nusers:\n  ../etc: {}\n"
        with pytest.raises(ConfigError) as refused:
            parse_config(text)

        [problem] = refused.value.problems
        assert ("users.../etc", 4) == (problem.path, problem.line)
        assert "folder" in problem.message

    def test_check_warns_when_the_archive_cannot_be_made(self, tmp_path: Path) -> None:
        """relay check tells the admin before the first copy fails (archive.dir's parent is a file), and
        says nothing about archive.dir while no one's mail is archived."""
        blocker = tmp_path / "blocker"
        blocker.write_text("")
        sections = {"upstreams": {"o": {"host": "smtp.example.com"}}, "archive": {"dir": str(blocker / "a")}}
        archived, _ = build_config(tmp_path, company={"archive_days": 30}, **sections)
        not_archived, _ = build_config(tmp_path, **sections)

        [warning] = [w for w in check_warnings(archived) if w.path == "archive.dir"]
        assert f"{blocker} is not a directory" in warning.message
        assert warning.message.endswith("no copies will be archived (mail is still delivered)")
        assert [] == [w for w in check_warnings(not_archived) if w.path == "archive.dir"]
