"""The scheduler where a provider misbehaves in ways that are not the account sending too fast, and where
the log must name the right message: found by a black-box pass against misbehaving upstreams. Each test
runs relay in-process against real SMTP servers on 127.0.0.1."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from structlog.testing import capture_logs

from relay.queue.spool import QueueEntry
from tests.conftest import UpstreamFactory, queue_entries
from tests.servers import RelayRunner

RelayFactory = Callable[..., RelayRunner]
SLOW_DOWN = "421 4.7.0 Too many messages, slow down"


@contextmanager
def events() -> Iterator[list[dict[str, Any]]]:
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
