"""The scheduler over long runs and odd state: a queue entry retried a thousand times, a hand-edited
``limits.json``, crash counts, entries waiting for a connection. Each runs the real scheduler against
the real spool."""

from __future__ import annotations

import asyncio
import os
import smtplib
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from relay.commands import cli
from relay.envelope import Outgoing
from relay.queue import spool as spool_module
from relay.queue.scheduler import INLINE_BODY_LIMIT, Scheduler
from relay.queue.spool import QueueEntry, Spool
from tests.conftest import UpstreamFactory, build_config, free_port
from tests.servers import RelayRunner, settle


def _run_briefly(scheduler: Scheduler, seconds: float) -> None:
    async def main() -> None:
        await scheduler.start()
        await asyncio.sleep(seconds)
        await scheduler.stop(1)
        await settle()

    asyncio.run(main())


def test_an_entry_retried_over_a_thousand_times_stays_deferred(tmp_path: Path) -> None:
    """2**1024 is no float: the doubling backoff must stop doubling, not crash the entry into hold/."""
    config, _ = build_config(
        tmp_path, delivery={"retry_interval": 60, "max_retry_interval": 300},
        upstreams={"a": {"host": "127.0.0.1", "port": free_port(), "security": "none"}}, company={"upstream": "a"},
    )  # fmt: skip
    spool = Spool(config.spool_dir, fsync=False)
    spool.setup()
    [entry] = spool.commit([Outgoing("a", "s@example.com", ("r@example.com",), b"Subject: s\r\n\r\nx\r\n")])
    spool.claim(entry.id, source="incoming")
    spool.update(replace(entry, attempts=1024), state="incoming")  # a week of short retries

    _run_briefly(Scheduler(config, spool), 1.0)

    [deferred] = list(spool.entries("deferred"))
    assert (entry.id, 1025) == (deferred.id, deferred.attempts)
    assert 290 <= deferred.next_attempt_at - time.time() <= 300  # max_retry_interval, not an overflow
    assert [] == spool.ids("hold")


@pytest.mark.parametrize("raw", [b"[]", b"null", b'{"accounts": []}', b'{"accounts": {"o365": null}}', b"{not json"])
def test_a_damaged_limits_state_costs_only_the_counts(tmp_path: Path, raw: bytes) -> None:
    config, _ = build_config(tmp_path, upstreams={"o365": {"host": "127.0.0.1", "port": free_port(),
                                                           "security": "none"}})  # fmt: skip
    spool = Spool(config.spool_dir, fsync=False)
    spool.setup()
    spool.write_state("limits.json", raw)

    _run_briefly(Scheduler(config, spool), 0.1)  # starts (and stops) instead of failing at start


def test_a_recorded_attempt_resets_the_crash_count(tmp_path: Path) -> None:
    """``crashes`` counts attempts in a row that relay did not survive: two kills, then an attempt that
    ends (deferred here), then a third kill leaves the entry waiting with one crash, not on hold."""
    config, _ = build_config(
        tmp_path, upstreams={"a": {"host": "127.0.0.1", "port": free_port(), "security": "none"}},
        company={"upstream": "a"}, delivery={"retry_interval": 60, "max_retry_interval": 60},
    )  # fmt: skip
    spool = Spool(config.spool_dir, fsync=False)
    spool.setup()
    [entry] = spool.commit([Outgoing("a", "s@example.com", ("r@example.com",), b"Subject: s\r\n\r\nx\r\n")])
    for _ in range(2):  # killed twice during its attempt
        assert spool.claim(entry.id, source="incoming") is not None
        spool.recover()
    assert 2 == spool.find(entry.id)[1].crashes  # type: ignore[index]

    _run_briefly(Scheduler(config, spool), 0.5)  # an attempt that ends: connection refused, deferred

    [deferred] = list(spool.entries("deferred"))
    assert (1, 0) == (deferred.attempts, deferred.crashes)
    assert spool.claim(entry.id, source="deferred") is not None
    spool.recover()  # killed during the next attempt
    assert [] == spool.ids("hold")
    [requeued] = list(spool.entries("incoming"))
    assert (1, 1) == (requeued.attempts, requeued.crashes)


def test_a_body_that_is_not_the_size_queued_is_held_not_sent(tmp_path: Path, upstream: UpstreamFactory) -> None:
    """A body that is not what its envelope recorded (disk trouble, a file cut by hand) is held for a
    person, small (read whole) or big (streamed), and nothing of it is sent."""
    up = upstream("a", security="none")
    config, _ = build_config(tmp_path, upstreams={"a": {"host": "127.0.0.1", "port": up.port, "security": "none"}},
                             company={"upstream": "a"})  # fmt: skip
    spool = Spool(config.spool_dir, fsync=False)
    spool.setup()
    small, big = spool.commit([
        Outgoing("a", "s@example.com", ("r@example.com",), b"Subject: s\r\n\r\nx\r\n"),
        Outgoing("a", "s@example.com", ("r@example.com",), b"Subject: b\r\n\r\n" + b"x" * (INLINE_BODY_LIMIT + 10)),
    ])  # fmt: skip
    os.truncate(spool.body_path(small.id), 0)
    os.truncate(spool.body_path(big.id), 1000)

    _run_briefly(Scheduler(config, spool), 1.0)

    assert sorted([small.id, big.id]) == spool.ids("hold")
    assert [] == up.received


def test_an_attempt_that_crashes_holds_the_entry_and_says_why(tmp_path: Path, upstream: UpstreamFactory,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An error relay did not foresee (here aiosmtplib refusing an EHLO name with a space, from a config that
    skipped validation) holds the entry; ``relay queue`` then names the error and the way out, and what an
    earlier attempt recorded (a recipient delivered) is kept."""
    up = upstream("a", security="none")
    config, path = build_config(tmp_path, upstreams={"a": {"host": "127.0.0.1", "port": up.port, "security": "none"}},
                                company={"upstream": "a"})  # fmt: skip
    broken = config.upstreams["a"].model_copy(update={"local_hostname": "bad host"})  # not validated
    config = config.model_copy(update={"upstreams": {"a": broken}})
    spool = Spool(config.spool_dir, fsync=False)
    spool.setup()
    [entry] = spool.commit([Outgoing("a", "s@example.com", ("r@example.com", "done@example.com"),
                                     b"Subject: s\r\n\r\nx\r\n")])  # fmt: skip
    spool.claim(entry.id, source="incoming")
    spool.update(replace(entry, delivered=("done@example.com",), attempts=1), state="deferred")

    _run_briefly(Scheduler(config, spool), 1.0)

    [held] = list(spool.entries("hold"))
    assert ("done@example.com",) == held.delivered
    assert "ValueError" in held.last_reply and f"relay queue --retry {entry.id}" in held.last_reply
    assert [] == up.received
    assert 0 == cli.main(["queue", "-c", str(path)])
    assert "held after an internal error (ValueError" in capsys.readouterr().out


def test_entries_waiting_for_a_connection_stay_where_queue_tools_reach_them(
    tmp_path: Path, upstream: UpstreamFactory, relay_with: Callable[..., RelayRunner]
) -> None:
    """1. an upstream that hangs at MAIL, an account with max_connections 1, 4 messages
    Result: one entry in active/ (the attempt), three waiting in incoming/, not claimed: relay queue
    --hold takes one of them, and the others are delivered once the upstream answers again."""
    up = upstream("o365", accounts={"laskutus@rakennus.fi": "pw1"})
    up.faults.hang = 1.0
    relay = relay_with(
        upstreams={"o365": {**upstream.account(up, "laskutus@rakennus.fi"), "max_connections": 1}},
        company={"from_address": "laskutus@rakennus.fi", "upstream": "o365"}, delivery={"workers": 4},
    )  # fmt: skip
    spool_dir = tmp_path / "spool"
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        for n in range(4):
            client.sendmail("erp@legacy.local", ["asiakas@example.com"], b"Subject: Lasku %d\r\n\r\nx\r\n" % n)
    deadline = time.monotonic() + 5
    while len(Spool(spool_dir).ids("incoming")) != 3 or len(Spool(spool_dir).ids("active")) != 1:
        assert time.monotonic() < deadline, (Spool(spool_dir).ids("incoming"), Spool(spool_dir).ids("active"))
        time.sleep(0.01)
    held = Spool(spool_dir).ids("incoming")[-1]
    up.faults.hang = 0

    assert 0 == cli.main(["queue", "-c", str(tmp_path / "relay.yaml"), "--hold", held])
    got = up.wait_for(3, timeout=10)
    time.sleep(0.3)
    assert [held] == Spool(spool_dir).ids("hold")
    assert 3 == len({r.message["Subject"] for r in got}) == len(up.received)
    assert [] == Spool(spool_dir).ids("incoming") + Spool(spool_dir).ids("active") + Spool(spool_dir).ids("deferred")


def test_a_reload_that_changes_max_connections_applies_to_mail_already_waiting(
    tmp_path: Path, upstream: UpstreamFactory, relay_with: Callable[..., RelayRunner]
) -> None:
    """1. a slow upstream (0.3 s at MAIL), max_connections 3, 30 messages waiting  2. SIGHUP with 1
    3. SIGHUP with 3 again. Result: after the lowering, at most one attempt at a time (the provider said
    too many connections); after the raising, three again; all 30 delivered once."""
    up = upstream("o365", accounts={"laskutus@rakennus.fi": "pw1"})
    up.faults.hang = 0.3
    account = {**upstream.account(up, "laskutus@rakennus.fi"), "max_connections": 3}
    relay = relay_with(upstreams={"o365": account}, company={"from_address": "laskutus@rakennus.fi", "upstream": "o365"},
                       delivery={"workers": 4})  # fmt: skip
    spool_dir, config_path = tmp_path / "spool", tmp_path / "relay.yaml"

    def reload_with(connections: int) -> None:
        data = yaml.safe_load(config_path.read_text())
        data["upstreams"]["o365"]["max_connections"] = connections
        config_path.write_text(yaml.safe_dump(data))
        relay.run(lambda daemon: daemon.request_reload())

    def attempts_at_once(seconds: float) -> int:
        most, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            most = max(most, len(Spool(spool_dir).ids("active")))
            time.sleep(0.01)
        return most

    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        for n in range(30):
            client.sendmail("erp@legacy.local", ["asiakas@example.com"], b"Subject: Lasku %d\r\n\r\nx\r\n" % n)
    before = attempts_at_once(0.6)
    reload_with(1)
    time.sleep(0.5)  # the attempts under way finish
    lowered = attempts_at_once(1.0)
    reload_with(3)
    raised = attempts_at_once(0.8)
    got = up.wait_for(30, timeout=30)

    assert (3, 1, 3) == (before, lowered, raised)
    assert 30 == len({r.message["Subject"] for r in got}) == len(up.received)


def test_a_fresh_entry_is_claimed_without_reading_its_envelope(
    tmp_path: Path, upstream: UpstreamFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry the intake hands over (``submit``) is attempted as handed: its first claim renames the
    envelope and reads nothing. One only found in incoming/ (a rescan; here the second) is read."""
    up = upstream("a", security="none")
    config, _ = build_config(tmp_path, upstreams={"a": {"host": "127.0.0.1", "port": up.port, "security": "none"}},
                             company={"upstream": "a"})  # fmt: skip
    spool = Spool(config.spool_dir, fsync=False)
    spool.setup()
    def committed(n: int) -> QueueEntry:
        return spool.commit([Outgoing("a", "s@example.com", ("r@example.com",), b"Subject: %d\r\n\r\nx\r\n" % n)])[0]

    found = committed(0)  # there when the scheduler starts: its first look at incoming/ finds it
    read: list[str] = []
    real_read = spool_module._read_file

    def recorded(path: str) -> bytes:
        read.append(os.path.basename(path))
        return real_read(path)

    monkeypatch.setattr(spool_module, "_read_file", recorded)
    scheduler = Scheduler(config, spool)

    async def main() -> QueueEntry:
        await scheduler.start()
        fresh = committed(1)
        scheduler.submit([fresh])
        await asyncio.sleep(1.0)
        await scheduler.stop(1)
        await settle()
        return fresh

    fresh = asyncio.run(main())

    assert 2 == len(up.wait_for(2, timeout=10))
    assert f"{fresh.id}.json" not in read
    assert f"{found.id}.json" in read
