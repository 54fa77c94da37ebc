"""Provider sending limits, per upstream account: relay paces itself instead of being refused.

Providers count what a mailbox sends: Office 365 takes 30 messages a minute and 10,000 recipients a
day, Gmail 2,000 messages a day and 100 recipients a message. Past that they first delay, then answer
``4.7.x`` / ``5.2.0`` and, after repeated errors, throttle the whole mailbox. So relay keeps the count
itself and holds the rest in its queue (``scheduler.py`` parks such entries in ``deferred/`` with
``waiting_for: limit``; they do not hold a worker):

- at most ``messages`` in any ``window`` seconds, counted at the *end* of each transaction: the next
  one starts only once the oldest of the last ``messages`` ended a whole window ago, so the provider,
  whose clock runs between the two, never sees more than ``messages`` in a window;
- at most ``messages_per_day`` and ``recipients_per_day`` in any 24 hours (minute buckets);
- a throttling reply to a whole transaction (``432 4.3.2``, ``421 4.7.x``, ``451 4.7.x``, ``452 4.5.3``)
  pauses the account for a window and halves its rate; each throttle in a row doubles both; each clean
  window halves the slowdown again (TCP's multiplicative decrease, for one mailbox). A reply to one
  recipient is about that transaction or that address, never the account: ``452`` for too many
  recipients sends the rest in a new transaction at once (``too_many_recipients``).

The counts are saved in ``<spool_dir>/state/limits.json`` (written atomically) after every transaction, so a
restart does not hand out the day's budget, or the current window, a second time.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from relay.envelope import SendLimits

if TYPE_CHECKING:
    from relay.transports.smtp import Outcome

DAY = 86400.0
MAX_SLOWDOWN = 32
STATE_FILE = "limits.json"


_THROTTLE = re.compile(r"^(432 4\.3\.2|421 4\.7\.\d+|451 4\.7\.\d+|452 4\.5\.3)\b")
_GREYLISTING = re.compile(r"gr[ae]y-?list", re.IGNORECASE)
# how transports/smtp.py words a session reply (421...) to a RCPT: about that recipient's transaction
_RCPT_SESSION_ERROR = "the upstream answered RCPT "



def is_throttle(code: int | None, text: str) -> bool:
    """A reply that says "you send too fast" (about the account, not about this message). Greylisting
    (``451 4.7.1 ... greylisted``, also after the data: milter-greylist) is about this message: its retry."""
    return code is not None and _THROTTLE.match(f"{code} {text}") is not None and not _GREYLISTING.search(text)


def throttle_reply(outcome: Outcome) -> tuple[int | None, str] | None:
    """The throttling reply of an attempt, if any: one to the whole transaction (connection, MAIL, DATA).
    A reply to one recipient is not the account sending too fast: ``451 4.7.1`` there is greylisting or
    a policy about that address (Postfix), ``452 4.5.3`` the server's recipients per transaction, and a
    ``421`` there ends that session: each is the message's own retry (``waiting for: retry``)."""
    error = outcome.error
    if error is not None and not error.startswith(_RCPT_SESSION_ERROR) and is_throttle(*outcome.reply):
        return outcome.reply
    return None


def too_many_recipients(batch: list[str], outcome: Outcome) -> list[str]:
    """The recipients of ``batch`` a server would not take in this transaction, to go in a new one at once
    (RFC 5321 4.5.3.1.10; Postfix does so): ``452 4.5.3``, or a ``452`` after a recipient it took
    (Postfix's ``smtpd_recipient_limit``, Exchange's recipients per message). A transaction of one
    recipient refused so, or one that failed as a whole, is a deferral like any other."""
    if len(batch) < 2 or outcome.error is not None or outcome.session_failed:
        return []
    excess: list[str] = []
    took_one = False
    for rcpt in batch:
        code, text = outcome.deferred.get(rcpt, (None, ""))
        took_one = took_one or rcpt in outcome.delivered
        if code == 452 and (took_one or text.startswith("4.5.3")):
            excess.append(rcpt)
    return excess


@dataclass
class _Counts:
    """What one account sent lately, and how hard it was throttled."""

    recent: deque[float] = field(default_factory=deque)  # end times, the last ``messages`` of them
    days: dict[int, list[int]] = field(default_factory=dict)  # minute -> [messages, recipients]
    starting: int = 0  # transactions started and not yet ended
    starting_recipients: int = 0
    throttled_at: float = 0.0
    slowdown: int = 1
    paused_until: float = 0.0
    window: float = 60.0  # of the account's ``messages`` limit when last counted: how long ``recent`` matters

    def slowdown_at(self, now: float, window: float) -> int:
        """The rate divisor now: halved for each whole clean window since the pause ended."""
        clean = int(max(now - self.paused_until, 0.0) // window) if self.throttled_at else 64
        return max(1, self.slowdown >> min(clean, 16))

    def day_totals(self, now: float) -> tuple[int, int]:
        first = int((now - DAY) // 60)  # minute m counts until (m + 1) * 60 + DAY: a full 24 hours
        for minute in [minute for minute in self.days if minute < first]:
            del self.days[minute]
        return sum(m for m, _ in self.days.values()), sum(r for _, r in self.days.values())

    def to_json(self, now: float) -> dict[str, Any]:
        first = int((now - DAY) // 60)
        return {
            "recent": [t for t in self.recent if t > now - self.window], "window": self.window,
            "days": {str(minute): pair for minute, pair in self.days.items() if minute >= first},
            "throttled_at": self.throttled_at, "slowdown": self.slowdown, "paused_until": self.paused_until,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Counts:
        return cls(
            recent=deque(float(t) for t in data.get("recent", ())),
            days={int(minute): [int(pair[0]), int(pair[1])] for minute, pair in data.get("days", {}).items()},
            throttled_at=float(data.get("throttled_at", 0.0)), slowdown=int(data.get("slowdown", 1)),
            paused_until=float(data.get("paused_until", 0.0)), window=float(data.get("window", 60.0)),
        )  # fmt: skip


class Limiter:
    """Counts per account name (what a queue entry stores); the caller supplies the account's limits.

    ``clock`` is wall time: the counts outlive the process, and a restart must see the same clock.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._counts: dict[str, _Counts] = {}

    def _get(self, name: str) -> _Counts:
        return self._counts.setdefault(name, _Counts())

    def wait(self, name: str, limits: SendLimits, recipients: int) -> tuple[float, str]:
        """Seconds before ``name`` may start a transaction for ``recipients`` (0: now), and why."""
        now = self.clock()
        counts = self._get(name)
        if counts.paused_until > now:
            return counts.paused_until - now, "paused after a throttling reply from the provider"
        if limits.messages:
            allowed = max(1, limits.messages // counts.slowdown_at(now, limits.window))
            ends = [t for t in counts.recent if t > now - limits.window]
            if len(ends) + counts.starting >= allowed:
                index = len(ends) + counts.starting - allowed  # the end that must leave the window first
                wait = ends[index] + limits.window - now if index < len(ends) else limits.window
                return max(wait, 0.001), f"{allowed} messages per {limits.window:g} s"
        return self._day_wait(counts, limits, recipients, now)

    def _day_wait(self, counts: _Counts, limits: SendLimits, recipients: int, now: float) -> tuple[float, str]:
        messages, sent = counts.day_totals(now)
        over_messages = limits.messages_per_day and messages + counts.starting >= limits.messages_per_day
        budget = limits.recipients_per_day
        in_use = sent + counts.starting_recipients
        over_recipients = budget and in_use and in_use + recipients > budget
        if not (over_messages or over_recipients):
            return 0.0, ""
        oldest = min(counts.days, default=int(now // 60))
        wait = max((oldest + 1) * 60 + DAY - now, 1.0)  # until the oldest minute leaves the 24 hours
        reason = f"{limits.messages_per_day} messages per day" if over_messages else f"{budget} recipients per day"
        return wait, reason

    def room(self, name: str, limits: SendLimits) -> int:
        """How many transactions the message rate lets start now (the day limits are checked per entry)."""
        counts, now = self._get(name), self.clock()
        if counts.paused_until > now:
            return 0
        if not limits.messages:
            return 1_000_000
        allowed = max(1, limits.messages // counts.slowdown_at(now, limits.window))
        return max(0, allowed - counts.starting - sum(1 for t in counts.recent if t > now - limits.window))

    def start(self, name: str, recipients: int) -> None:
        counts = self._get(name)
        counts.starting += 1
        counts.starting_recipients += recipients

    def end(self, name: str, limits: SendLimits, recipients: int, *, sent: bool) -> None:
        """A transaction started with ``start`` ended; ``sent``: it reached the provider (it counts)."""
        counts = self._get(name)
        counts.starting = max(0, counts.starting - 1)
        counts.starting_recipients = max(0, counts.starting_recipients - recipients)
        if not sent:
            return
        now = self.clock()
        counts.window = limits.window
        counts.recent.append(now)
        while len(counts.recent) > max(limits.messages, 1):
            counts.recent.popleft()
        pair = counts.days.setdefault(int(now // 60), [0, 0])
        pair[0] += 1
        pair[1] += recipients

    def throttled(self, name: str, limits: SendLimits) -> float:
        """The provider said "too fast": pause the account and slow it down; return the pause."""
        now = self.clock()
        counts = self._get(name)
        if counts.paused_until > now:  # another connection's answer to the same burst: one throttle, not three
            return counts.paused_until - now
        counts.slowdown = min(counts.slowdown_at(now, limits.window) * 2, MAX_SLOWDOWN)
        counts.throttled_at = now
        pause = limits.window * counts.slowdown / 2
        counts.paused_until = max(counts.paused_until, now + pause)
        return pause

    def dumps(self) -> bytes:
        now = self.clock()
        accounts = {name: counts.to_json(now) for name, counts in self._counts.items()}
        return json.dumps({"version": 1, "accounts": accounts}, separators=(",", ":")).encode()

    def loads(self, raw: bytes) -> None:
        """Counts saved by an earlier run; a damaged file only costs the counts (logged by the caller)."""
        data = json.loads(raw)
        self._counts = {name: _Counts.from_json(value) for name, value in data.get("accounts", {}).items()}


class Lines:
    """Per account, the queue ids waiting (in ``deferred/``) for its budget, let out as the budget allows.

    ``let_out(name, queue_id)`` hands an id back to the scheduler's ready queue; ``capacity(name)`` says
    how many of the account's entries may start now and in how many seconds more may. An id let out counts against that
    room until a worker takes it up (``taken``), or for ``GRACE`` seconds if it never comes (an admin
    deleted it meanwhile), so one budget is never handed out twice.
    """

    GRACE = 10.0

    def __init__(
        self, let_out: Callable[[str, str], None], capacity: Callable[[str], tuple[int, float]]
    ) -> None:
        self._let_out = let_out
        self._capacity = capacity
        self._lines: dict[str, deque[str]] = {}
        # with the time each fires at: uvloop hands out a plain Handle (no ``when()``) for a time already due
        self._timers: dict[str, tuple[float, asyncio.Handle]] = {}
        self._out: dict[str, dict[str, float]] = {}  # per account: ids let out and not yet taken, and when
        # each waiting id's own earliest start (its own wait: a message needing more recipients than the
        # day has left waits for the day, even when the next 1-recipient message could go now); its keys
        # are exactly the ids in a line
        self._ready: dict[str, float] = {}
        self._closed = False

    def length(self, name: str) -> int:
        return len(self._lines.get(name, ()))

    def holds(self, queue_id: str) -> bool:
        """Whether ``queue_id`` waits in a line (joined and not let out since)."""
        return queue_id in self._ready

    def drop(self, name: str, queue_id: str) -> None:
        """Take ``queue_id`` out of the account's line (a worker took it up another way: a check of its
        queue lifetime, an admin's flush), so that it is not let out later for nothing."""
        if self._ready.pop(queue_id, None) is not None:
            line = self._lines.get(name)
            if line is not None and queue_id in line:
                line.remove(queue_id)

    def join(self, name: str, queue_id: str, wait: float, *, front: bool = False) -> None:
        """Queue ``queue_id`` (at the back, or at the ``front`` for one already started once)."""
        self.drop(name, queue_id)  # never twice in a line
        line = self._lines.setdefault(name, deque())
        self._ready[queue_id] = time.monotonic() + max(wait, 0.0)
        if front:
            line.appendleft(queue_id)
        else:
            line.append(queue_id)
        self._arm(name, wait)

    def taken(self, name: str, queue_id: str) -> None:
        self._out.get(name, {}).pop(queue_id, None)

    def release(self, name: str) -> None:
        """Let out as many of the account's line as its capacity allows; look again when more may go."""
        line = self._lines.get(name)
        _, handle = self._timers.pop(name, (0.0, None))
        if handle is not None:
            handle.cancel()
        if not line or self._closed:
            return
        now = time.monotonic()
        out = {queue_id: at for queue_id, at in self._out.get(name, {}).items() if at > now - self.GRACE}
        room, wait = self._capacity(name)
        room -= len(out)
        not_yet: deque[str] = deque()
        while line and room > 0:
            queue_id = line.popleft()
            if self._ready.get(queue_id, 0.0) > now:  # its own wait is not over: it would only wait again
                not_yet.append(queue_id)
                continue
            self._ready.pop(queue_id, None)
            out[queue_id] = now
            self._let_out(name, queue_id)
            room -= 1
        not_yet.extend(line)
        self._lines[name] = line = not_yet
        self._out[name] = out
        if line:  # a finished attempt calls ``release`` too; the timer is the fallback
            earliest = min(self._ready.get(queue_id, now) for queue_id in line) - now
            self._arm(name, max(earliest, wait, 0.5) if room <= 0 else earliest)

    def reopen(self) -> None:
        """The limits may have changed (a reload): every waiting id may try again now."""
        for queue_id in self._ready:
            self._ready[queue_id] = 0.0
        for name in list(self._lines):
            self.release(name)

    def close(self) -> None:
        """Stop letting anything out (the daemon stops; the waiting entries are safe in ``deferred/``)."""
        self._closed = True
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    def _arm(self, name: str, wait: float) -> None:
        """Release the account's line in ``wait`` seconds (an earlier timer already set is kept)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(wait, 0.0)
        armed = self._timers.get(name)
        if armed is not None and armed[0] <= when:
            return
        if armed is not None:
            armed[1].cancel()
        self._timers[name] = (when, loop.call_at(when, self.release, name))
