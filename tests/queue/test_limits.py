"""Provider sending limits: paced on the upstream's clock, per account, throttle-aware, kept over restarts.

The burst tests use short windows (80 messages a second instead of 30 a minute) so they take seconds;
relay unthrottled moves about 180 messages a second here, so a limit that did nothing would show.
"""

from __future__ import annotations

import asyncio
import signal
import smtplib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from relay.commands import cli
from relay.config.accounts import effective
from relay.config.models import SendingLimits
from relay.daemon import event_loop_factory
from relay.envelope import SendLimits
from relay.queue.limits import Limiter, Lines, is_throttle, throttle_reply
from relay.queue.spool import QueueEntry, Spool
from relay.transports.smtp import Outcome
from tests.conftest import UpstreamFactory, queue_entries
from tests.servers import Received, RelayRunner
from tests.test_daemon import RelayProcess, write_config

RelayFactory = Any


def most_in_any_window(arrivals: list[Received], window: float) -> int:
    """The largest number of arrivals inside any ``window`` seconds, as the provider counts them."""
    times = sorted(r.at for r in arrivals)
    return max((sum(1 for t in times[i:] if t < start + window) for i, start in enumerate(times)), default=0)


def submit(port: int, count: int, *, sender: str = "erp@legacy.local", first: int = 0) -> None:
    """Like an ERP's month-end run: one session, one message after another."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for n in range(first, first + count):
            client.sendmail(sender, ["asiakas@example.com"], b"Subject: Lasku %d\r\n\r\nInvoice %d\r\n" % (n, n))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class TestLimiter:
    def test_provider_defaults_fill_only_the_keys_left_out(self) -> None:
        o365 = effective("SMTP.Office365.com", SendingLimits(recipients_per_day=500))
        assert (30, 60.0, 500) == (o365.messages, o365.window, o365.recipients_per_day)
        gmail = effective("smtp.gmail.com", SendingLimits(messages_per_day=0))
        assert (0, 100, 0) == (gmail.messages_per_day, gmail.recipients_per_message, gmail.messages)
        assert SendLimits() == effective("mail.example.com", SendingLimits())

    def test_window_counts_from_the_end_of_each_transaction(self) -> None:
        clock = FakeClock()
        limiter, limits = Limiter(clock), SendLimits(messages=2, window=10)
        for _ in range(2):
            assert (0.0, "") == limiter.wait("a", limits, 1)
            limiter.start("a", 1)
        assert limiter.wait("a", limits, 1)[0] == 10  # both still running: wait for an end
        clock.now += 3
        limiter.end("a", limits, 1, sent=True)
        limiter.end("a", limits, 1, sent=True)
        clock.now += 4
        wait, reason = limiter.wait("a", limits, 1)
        assert (pytest.approx(6.0), "2 messages per 10 s") == (wait, reason)
        assert (0.0, "") == limiter.wait("b", limits, 1)  # another account has its own budget

    def test_throttle_pauses_halves_and_recovers(self) -> None:
        clock = FakeClock()
        limiter, limits = Limiter(clock), SendLimits(messages=30, window=60)
        assert 60 == limiter.throttled("a", limits)
        clock.now += 1
        assert 59 == limiter.throttled("a", limits)  # the other connections' replies to the same burst
        assert limiter.wait("a", limits, 1) == (59, "paused after a throttling reply from the provider")
        clock.now += 59
        assert 15 == limiter.room("a", limits)  # half the rate for the next clean window
        clock.now += 60
        assert 30 == limiter.room("a", limits)

    def test_throttles_in_a_row_double_the_pause(self) -> None:
        clock = FakeClock()
        limiter, limits = Limiter(clock), SendLimits(messages=30, window=60)
        assert 60 == limiter.throttled("a", limits)
        clock.now += 61  # throttled again in the half-rate window after the pause
        assert 120 == limiter.throttled("a", limits)
        clock.now += 120
        assert 7 == limiter.room("a", limits)  # a quarter of the rate (30 // 4) once the pause is over

    def test_day_budget_and_counts_survive_a_dump_and_load(self) -> None:
        clock = FakeClock()
        limiter, limits = Limiter(clock), SendLimits(recipients_per_day=5)
        limiter.start("a", 4)
        limiter.end("a", limits, 4, sent=True)
        restarted = Limiter(clock)
        restarted.loads(limiter.dumps())
        wait, reason = restarted.wait("a", limits, 2)
        assert reason == "5 recipients per day" and 86000 < wait <= 86460
        assert (0.0, "") == restarted.wait("a", limits, 1)

    @pytest.mark.parametrize(
        ("code", "text", "throttle"),
        [(432, "4.3.2 Concurrent connections limit exceeded", True), (421, "4.7.0 Too many messages", True),
         (451, "4.7.500 Server busy", True), (452, "4.5.3 Too many recipients", True),
         (451, "4.3.0 Try again later", False), (550, "5.7.0 rate", False), (None, "", False)],
    )  # fmt: skip
    def test_throttling_replies(self, code: int | None, text: str, throttle: bool) -> None:
        assert throttle == is_throttle(code, text)

    def test_a_reply_to_one_recipient_is_not_the_account_sending_too_fast(self) -> None:
        """Postfix greylisting / policy at RCPT, or its recipients per transaction (452 4.5.3: the rest go in
        a new transaction); the same code to the whole transaction is a throttle."""
        greylisted = Outcome(deferred={"a@example.com": (451, "4.7.1 try again")}, reply=(451, "4.7.1 try again"))
        assert throttle_reply(greylisted) is None
        busy = Outcome(deferred={"a@example.com": (451, "4.7.500 busy")}, reply=(451, "4.7.500 busy"), error="x")
        assert (451, "4.7.500 busy") == throttle_reply(busy)
        too_many = Outcome(delivered=["b@example.com"], deferred={"a@example.com": (452, "4.5.3 Too many recipients")})
        assert throttle_reply(too_many) is None


class TestLines:
    @pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, event_loop_factory()], ids=["asyncio", "daemon"])
    def test_a_line_lets_out_only_what_the_budget_has_room_for(
        self, loop_factory: Callable[[], asyncio.AbstractEventLoop]
    ) -> None:
        """Ids let out count against the room until a worker takes them up, so none is let out twice.
        Also on the daemon's own loop (uvloop, whose timer for a time already due has no ``when()``)."""

        async def scenario() -> list[list[str]]:
            out: list[str] = []
            lines = Lines(lambda name, queue_id: out.append(queue_id), lambda name: (2, 0.05))
            for n in range(5):
                lines.join("o365", f"id{n}", 0.0)
            await asyncio.sleep(0.02)
            first = list(out)  # the timer fired once: room for 2
            lines.release("o365")
            again = list(out)  # nothing taken up yet: still 2
            lines.taken("o365", "id0")
            lines.taken("o365", "id1")
            lines.release("o365")
            taken = list(out)
            lines.close()
            await asyncio.sleep(0.1)
            return [first, again, taken, list(out)]

        with asyncio.Runner(loop_factory=loop_factory) as runner:
            first, again, taken, closed = runner.run(scenario())
        assert first == again == ["id0", "id1"]
        assert taken == closed == ["id0", "id1", "id2", "id3"]  # and nothing after close


class TestPacing:
    def test_500_message_burst_goes_out_at_the_limit_while_another_account_keeps_flowing(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """1. 500 invoices for one account limited to 80 messages a second  2. 10 mails of another user
        Result: on the upstream's clock never more than 80 in any second, at nearly that pace; the other
        user's mail is not queued behind the burst; mail waiting shows ``waiting_for: limit``."""
        burst = upstream("o365", accounts={"laskutus@rakennus.fi": "pw1"})
        other = upstream("gmail", accounts={"myynti@rakennus.fi": "pw2"})
        relay: RelayRunner = relay_with(
            upstreams={
                "o365": {**upstream.account(burst, "laskutus@rakennus.fi"), "sending_limits": {"messages": 80, "window": 1}},
                "gmail": upstream.account(other, "myynti@rakennus.fi"),
            },
            company={"from_address": "laskutus@rakennus.fi", "upstream": "o365"},
            users={"myynti": {"addresses": "myynti@rakennus.fi", "upstream": "gmail"}},
            delivery={"workers": 4},
        )
        submit(relay.port, 200)
        sent_other = time.monotonic()
        submit(relay.port, 10, sender="myynti@rakennus.fi")
        with ThreadPoolExecutor(3) as sessions:  # the rest in three sessions: faster than the limit on a busy machine
            running = [sessions.submit(submit, relay.port, 100, first=200 + 100 * k) for k in range(3)]
            listing, deadline = "", time.monotonic() + 30
            while "(waiting for: limit" not in listing and len(burst.received) < 500 and time.monotonic() < deadline:
                assert 0 == cli.main(["queue", "-c", str(tmp_path / "relay.yaml")])  # what an admin sees meanwhile
                listing = capsys.readouterr().out
                time.sleep(0.1)
            for done in running:
                done.result()
        others = other.wait_for(10, timeout=10)
        got = burst.wait_for(500, timeout=30)

        span = got[-1].at - got[0].at
        print(f"burst: 500 in {span:.2f} s = {499 / span:.1f}/s (limit 80/s), most in any 1 s: "
              f"{most_in_any_window(got, 1.0)}; other account: 10 in {others[-1].at - sent_other:.2f} s")  # fmt: skip
        assert most_in_any_window(got, 1.0) <= 80
        assert 5.2 <= span < 15.0  # 500 at 80 a second: no faster, and not crawling
        assert others[-1].at - sent_other < 2.0
        assert sum(1 for r in got if r.at > others[-1].at) >= 150  # the other user's mail did not queue behind
        assert "(waiting for: limit, the account's sending limits)" in listing
        metrics = relay.run(lambda daemon: generate_latest(daemon.scheduler.metrics.registry).decode())
        [waits] = [line for line in metrics.splitlines() if line.startswith('relay_limit_waits_total{account="o365"}')]
        # how many waited depends on how fast the 500 were submitted (a loaded machine submits slower)
        assert float(waits.split()[-1]) >= 50 and 'relay_limit_waits_total{account="gmail"}' not in metrics

    def test_a_throttling_reply_pauses_the_account_not_just_the_message(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """1. the provider answers 451 4.7.500 at DATA for a moment  2. it recovers
        Result: relay waits a whole window before trying that account again (no retry at full speed)."""
        up = upstream("o365", accounts={"laskutus@rakennus.fi": "pw1"})
        up.faults.data = "451 4.7.500 Server busy. Please try again later"
        relay: RelayRunner = relay_with(
            upstreams={"o365": {**upstream.account(up, "laskutus@rakennus.fi"), "sending_limits": {"messages": 20, "window": 1.0}}},
            company={"from_address": "laskutus@rakennus.fi", "upstream": "o365"},
            delivery={"retry_interval": 0.1, "max_retry_interval": 0.1},
        )  # fmt: skip
        submit(relay.port, 1)
        deadline = time.monotonic() + 5
        def tried_and_throttled() -> list[QueueEntry]:  # not one that waits behind it without an attempt
            return [e for e in queue_entries(tmp_path / "spool", "deferred") if e.waiting_for == "limit" and e.attempts]

        while not (throttled := tried_and_throttled()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        submit(relay.port, 2, first=1)  # after the throttle: these must wait for the account, not go at once
        up.faults.data = None
        got = up.wait_for(3, timeout=10)
        wall = time.time() - time.monotonic()  # puts the upstream's arrival times on the queue's wall clock

        assert throttled[0].attempts == 1
        assert throttled[0].next_attempt_at - throttled[0].received_at >= 0.95  # a window, not the 0.1 s retry
        assert min(r.at for r in got) + wall >= throttled[0].next_attempt_at - 0.01  # nothing went before
        assert 3 == len(got)

    def test_more_recipients_than_a_message_may_have_go_in_several_transactions(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """recipients_per_message (Gmail: 100): 5 recipients with a limit of 2 -> transactions of 2, 2, 1."""
        up = upstream("gmail", accounts={"laskutus@rakennus.fi": "pw1"})
        relay: RelayRunner = relay_with(
            upstreams={"gmail": {**upstream.account(up, "laskutus@rakennus.fi"), "sending_limits": {"recipients_per_message": 2}}},
            company={"from_address": "laskutus@rakennus.fi", "upstream": "gmail"},
        )  # fmt: skip
        everyone = [f"asiakas{n}@example.com" for n in range(5)]
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.sendmail("erp@legacy.local", everyone, b"Subject: Tiedote\r\n\r\nBody\r\n")
        got = up.wait_for(3)
        wait_for_empty = time.monotonic() + 5
        while queue_entries(tmp_path / "spool", "deferred") and time.monotonic() < wait_for_empty:
            time.sleep(0.02)

        assert [2, 2, 1] == [len(r.rcpt_tos) for r in got]
        assert everyone == [a for r in got for a in r.rcpt_tos]
        assert 1 == len({r.content for r in got})
        assert [] == queue_entries(tmp_path / "spool", "deferred") + queue_entries(tmp_path / "spool", "failed")

    def test_mail_that_does_not_fit_the_days_recipients_waits_quietly(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """9 of 10 recipients a day used: five 2-recipient messages cannot go today. They wait for the day
        without being taken up and rewritten again and again (the day still has room for a 1-recipient
        message, which made each release of the account's line let them out at once)."""
        up = upstream("o365", accounts={"laskutus@rakennus.fi": "pw1"})
        up.faults.hang = 0.5  # the 9-recipient message is still being sent when the five arrive
        relay: RelayRunner = relay_with(
            upstreams={"o365": {**upstream.account(up, "laskutus@rakennus.fi"), "sending_limits": {"recipients_per_day": 10}}},
            company={"from_address": "laskutus@rakennus.fi", "upstream": "o365"},
        )  # fmt: skip
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.sendmail("erp@legacy.local", [f"a{n}@example.com" for n in range(9)], b"Subject: 9\r\n\r\nx\r\n")
            for n in range(5):
                client.sendmail("erp@legacy.local", [f"b{n}@example.com", f"c{n}@example.com"], b"Subject: 2\r\n\r\nx\r\n")
        up.wait_for(1)
        deadline = time.monotonic() + 5
        while len(queue_entries(tmp_path / "spool", "deferred")) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "spool" / "deferred").iterdir()}
        time.sleep(2.0)

        assert 5 == len(written)
        assert written == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "spool" / "deferred").iterdir()}
        assert 1 == len(up.received)

        # the admin raises the day's budget and reloads: the waiting mail goes now, not tomorrow
        path = tmp_path / "relay.yaml"
        data = yaml.safe_load(path.read_text())
        data["upstreams"]["o365"]["sending_limits"]["recipients_per_day"] = 100
        path.write_text(yaml.safe_dump(data))
        up.faults.hang = 0
        relay.run(lambda daemon: daemon.request_reload())
        assert 6 == len(up.wait_for(6, timeout=10))


class TestLifetimeWhileWaiting:
    def test_mail_waiting_for_a_used_day_budget_is_warned_about_and_expires_on_time(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, tmp_path: Path
    ) -> None:
        """1. a day budget of 1 message, used by the first  2. a second message, whose turn is a day away
        Result: its delay warning is queued after delivery.delay_warning (1 s), and it fails as expired
        at delivery.max_queue_lifetime (2.5 s), with a failure notice; not a day later."""
        up = upstream("o365", accounts={"laskutus@rakennus.fi": "pw1"})
        relay: RelayRunner = relay_with(
            upstreams={"o365": {**upstream.account(up, "laskutus@rakennus.fi"), "sending_limits": {"messages_per_day": 1}}},
            company={"from_address": "laskutus@rakennus.fi", "upstream": "o365"},
            delivery={"max_queue_lifetime": 2.5, "delay_warning": 1.0},
        )  # fmt: skip
        spool = tmp_path / "spool"
        submit(relay.port, 1)
        up.wait_for(1)
        submit(relay.port, 1, first=1)
        deadline = time.monotonic() + 8
        while not any(e.waiting_for == "limit" for e in queue_entries(spool, "deferred")):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        [waiting] = [e for e in queue_entries(spool, "deferred") if e.kind == "mail"]
        assert waiting.next_attempt_at - time.time() > 3600  # its turn: when the day's message leaves the 24 h
        while not [e for e in queue_entries(spool, "deferred") if e.id == waiting.id and e.notices]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        warned_after = time.time() - waiting.received_at
        [warned] = [e for e in queue_entries(spool, "deferred") if e.id == waiting.id]
        while not [e for e in queue_entries(spool, "failed") if e.id == waiting.id]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        expired_after = time.time() - waiting.received_at
        [failed] = [e for e in queue_entries(spool, "failed") if e.kind == "mail"]

        assert 1.0 <= warned_after < 2.5 and 2.5 <= expired_after < 4.5, (warned_after, expired_after)
        assert [n.split()[0] for n in warned.notices] == ["delayed"] and warned.waiting_for == "limit"
        assert warned.next_attempt_at == pytest.approx(waiting.next_attempt_at, abs=5)  # still in the line
        assert failed.id == waiting.id and failed.attempts == 0
        assert [n.split()[0] for n in failed.notices] == ["delayed", "failed"]
        [(recipient, reason)] = failed.bounced
        assert recipient == "asiakas@example.com"
        assert reason.startswith("expired in queue: waiting for the account's sending limit (1 messages per day)")
        for notice_id in {n.split()[1] for n in failed.notices}:  # (each may be moving between states)
            while (found := Spool(spool).find(notice_id)) is None:
                assert time.monotonic() < deadline
            assert "notice" == found[1].kind
        assert 1 == len(up.received)


@pytest.mark.slow
class TestRestart:
    def test_a_restart_mid_burst_keeps_the_pace(
        self, tmp_path: Path, upstream: UpstreamFactory, processes: list[RelayProcess]
    ) -> None:
        """1. 8 messages, limit 4 per 2.5 s  2. SIGTERM right after the first 4 arrived  3. start again
        Result: still never more than 4 in any 2.5 s on the upstream's clock: the counts were kept."""
        up = upstream("provider", accounts={"laskutus@rakennus.fi": "daemon-test-secret-9f2c"})
        path = write_config(tmp_path, upstream, up)
        data = yaml.safe_load(path.read_text())
        data["upstreams"]["provider"]["sending_limits"] = {"messages": 4, "window": 2.5}
        path.write_text(yaml.safe_dump(data))
        relay = RelayProcess(path).start()
        processes.append(relay)
        submit(relay.port, 8)
        up.wait_for(4)
        relay.signal(signal.SIGTERM)
        assert relay.wait() == 0
        again = RelayProcess(path).start()
        processes.append(again)
        got = up.wait_for(8, timeout=20)
        again.signal(signal.SIGTERM)
        assert again.wait() == 0

        times = [round(r.at - got[0].at, 2) for r in got]
        print(f"arrivals (s): {times}; most in any 2.5 s: {most_in_any_window(got, 2.5)}")
        assert most_in_any_window(got, 2.5) <= 4
        assert relay.named("waiting_for_limit") and (tmp_path / "spool" / "state" / "limits.json").exists()
        assert 8 == len({r.message["Subject"] for r in got})
