"""The scheduler over long runs and odd state: a queue entry retried a thousand times, a hand-edited
``limits.json``. Each runs the real scheduler against the real spool."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest

from relay.envelope import Outgoing
from relay.scheduler import Scheduler
from relay.spool import Spool
from tests.conftest import build_config, free_port


def _run_briefly(scheduler: Scheduler, seconds: float) -> None:
    async def main() -> None:
        await scheduler.start()
        await asyncio.sleep(seconds)
        await scheduler.stop(1)

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
