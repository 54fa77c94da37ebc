"""Stage 5: decide what is delivered when, run the delivery workers, record every outcome.

Input: queue ids (new ones from the listener, due ones from ``deferred/``, everything found on start).
For each: wait for a free connection of its account (``max_connections``) where it is, in ``incoming/``
or ``deferred/``; then claim it (``-> active``), resolve its account against the current config,
read the secret, make one attempt (``delivery.deliver``), then narrow the entry to the recipients still
pending and move it: done (deleted), ``deferred/`` with a next-attempt time, or ``failed/`` with the
reason. A bug while handling an entry puts it on ``hold/`` (Mailman's shunt queue): never deleted.
So ``active/`` holds only entries in an attempt: a kill counts a crash for those alone (``Spool.recover``).

Retry policy (Postfix qmgr): the wait doubles with each attempt, from ``delivery.retry_interval`` up to
``delivery.max_retry_interval``; an entry older than ``delivery.max_queue_lifetime`` fails for good.
One log line when an upstream goes down and one when it comes back, not one per message. A refused
login (AUTH) holds the account's other mail (``LoginHold``): one message tries the login per retry,
and a changed secret or a login that works lets everything go at once. The refused accounts are saved
(``state/logins.json``), so after a start the first attempt tries the login with one message too.

Sending limits (``limits.py``): an entry whose account has used its budget goes back to ``deferred/``
with ``waiting_for: limit`` and waits in that account's line (``limits.Lines``), holding no worker;
the line is let out as the budget allows; its queue lifetime and delay warning are looked at when due
too, not only at its turn (which may be a day away). Given-up recipients get a notice (``notices.py``),
queued as an entry of its own before the entry's new state is written (a crash between the two can
repeat a notice, never lose one).

A full disk: the record of an attempt (``_save``) may use the spool's reserve (spool.py, "The reserve"),
so that recipients already delivered are on disk as delivered before a restart can send to them again.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import json
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from relay import logs
from relay.config.accounts import account_for, graph_accounts
from relay.config.credentials import Secret, fingerprint, read_password
from relay.config.models import Config
from relay.envelope import USER_ACCOUNT_PREFIX, Account, Outgoing, SendLimits
from relay.errors import ConfigError, QueueFileDamagedError, SecretError
from relay.prepare.graph_split import plan
from relay.queue import archive, notices
from relay.queue.limits import STATE_FILE, Limiter, Lines, throttle_reply, too_many_recipients
from relay.queue.metrics import Metrics
from relay.queue.spool import MAX_CRASHES, RESERVE_SIZE, QueueEntry, Spool, State, free_space, out_of_space
from relay.transports import Transports
from relay.transports.graph_large import DraftRecord
from relay.transports.smtp import ConnectionPool, Outcome, advice

log = structlog.get_logger("relay.delivery")
RESCAN_INTERVAL = 10.0  # seconds between looks at incoming/ for entries an admin tool put there
NUDGE_INTERVAL = 1.0  # seconds between checks whether an admin tool asked for a look now (Spool.nudge)
# A body up to this size is read whole with the envelope's other files (one trip to a thread instead
# of one per chunk and one more for the end of the file); a bigger one is streamed from the spool.
INLINE_BODY_LIMIT = 256 * 1024

FRESH_MAX = 4096  # fresh entries kept from the intake's hints (past it they are dropped: their claims read the file)


class SpoolDrafts:
    """An entry's Graph draft record (``graph.DraftStore``) in the spool: written and fsynced before the step
    it announces, so the attempt after a crash can settle the draft (``GraphTransport._settle``)."""

    def __init__(self, spool: Spool, queue_id: str) -> None:
        self.spool, self.queue_id = spool, queue_id

    async def load(self) -> DraftRecord | None:
        raw = await asyncio.to_thread(self.spool.read_draft, self.queue_id)
        try:
            return DraftRecord.loads(raw) if raw is not None else None
        except (ValueError, KeyError, TypeError):  # damaged: nothing to act on, but say so
            log.error("graph_draft_record_unreadable", queue_id=self.queue_id, result="ignored")
            return None

    async def save(self, record: DraftRecord) -> None:
        await asyncio.to_thread(self.spool.write_draft, self.queue_id, record.dumps())

    async def clear(self) -> None:
        await asyncio.to_thread(self.spool.clear_draft, self.queue_id)


def _reply_text(reply: tuple[int | None, str]) -> str:
    code, text = reply
    return f"{code} {text}".strip() if code is not None else text


def _expiry_reason(reply: tuple[int | None, str], entry: QueueEntry) -> str:
    """Why a recipient expired: its own last reply, else the last attempt's error (``last_reply``: a
    connection refused, a timeout, a missing password file), which is what its notice tells the sender.
    Without it the bounce read "expired in queue: " in relay queue, the envelope and delivery_failed."""
    return _reply_text(reply) or entry.last_reply


def _summary(outcome: Outcome) -> str:
    """What ``relay queue`` shows as the last reply: our reason and the upstream's words.

    The reply that decided where the entry goes: when the session's last reply is a success (the message
    was taken for a ``copy_to`` recipient, say) but a recipient was refused or must wait, that
    recipient's reply (a deferral first: it is why the entry waits), not the ``250`` of the others.
    """
    failing = next(iter(outcome.deferred.values()), None) or next(iter(outcome.bounced.values()), None)
    succeeded = outcome.reply[0] is None or outcome.reply[0] < 400
    reply = _reply_text(failing if failing is not None and succeeded else outcome.reply)
    if outcome.error and reply and reply != outcome.error:
        return f"{outcome.error}: {reply}"
    return outcome.error or reply


@dataclass
class LoginHold:
    """An account whose login the provider refused (AUTH, 535): its mail waits for the next retry, where
    one message tries the login again, instead of every queued message trying the same refused secret.

    Providers lock an account after a few failed logins in a row (Office 365's smart lockout counts 10,
    Gmail locks too); with a wrong password and fifty messages queued, each trying on its own would be
    fifty failures a round. A changed secret (the admin fixed the password file) lifts the hold at once.
    """

    # a fingerprint of the refused secret (as the connection pool keys it), never the secret; ``None``: a
    # hold saved by an earlier run (fingerprints are this process's), taken from the first message to try
    secret: int | None
    until: float  # when one message may try the login again
    refusals: int = 1  # the wait doubles with each, like a message's own retries
    trying: str | None = None  # the entry trying the login now
    waiting: set[str] = field(default_factory=set)  # let go at once when the login works


LOGIN_WAIT = "waiting: the upstream refused this account's login; one message tries it again at each retry"
LOGIN_NOT_TRIED = "not tried: the upstream refuses this account's login (one message tries it at each retry)"
LOGIN_STATE = "logins.json"  # the accounts whose login is refused, and how often in a row


def _bind(entry: QueueEntry) -> None:
    """Name ``entry`` in every event logged while a worker handles it. A worker's context outlives the
    entry: bound only before an attempt, an entry failed without one (expired while waiting for its
    account's limit) was logged under the id, user and upstream of the worker's previous entry."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(queue_id=entry.id, user=entry.user, upstream=entry.account)


class Scheduler:
    """Workers pulling queue ids from a ready queue; a timer feeding due deferred entries back in."""

    def __init__(self, config: Config, spool: Spool, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.spool = spool
        self.metrics = metrics or Metrics()
        # (id, where it waits, its account if known): the account decides whether a connection is free
        self.ready: asyncio.Queue[tuple[str, State, str | None]] = asyncio.Queue()
        self._queued: set[str] = set()  # ids waiting in ``ready``: a rescan does not queue them twice
        # entries the intake just committed, as it wrote them (its hint): their first claim reads nothing
        self._fresh: dict[str, QueueEntry] = {}
        # (when, id, account or "", a limit check: only if the id still waits in its account's line)
        self._timers: list[tuple[float, str, str, bool]] = []
        self._wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._down: dict[str, str] = {}
        self._login_holds: dict[str, LoginHold] = {}  # per account whose login was refused (AUTH)
        self._logins_seen: set[str] = set()  # accounts whose login worked in this run (see ``_limit``)
        self._holds_saved = asyncio.Lock()
        self.pool = ConnectionPool()
        # SMTP (password or XOAUTH2) or Microsoft Graph; a token that cannot be had is counted
        self.transports = Transports(self.pool, on_token_failure=self.metrics.token_refresh_failed, graph_planner=plan)
        self._busy: dict[str, int] = {}  # connection slots taken per account (at most its max_connections)
        # per account, ids waiting for a slot, and where: they stay in incoming/ or deferred/ (not claimed),
        # so a kill counts no crash for them and queue tools can hold or delete them meanwhile
        self._parked: dict[str, deque[tuple[str, State]]] = {}
        self._parked_ids: set[str] = set()  # the ids in ``_parked``: not queued, not taken up elsewhere
        self._unrecorded: dict[str, QueueEntry] = {}
        self._reserve_held: bool | None = None  # whether the spool's reserve is there (None: not looked yet)
        self._reserve_lock = asyncio.Lock()  # made or given up one at a time
        self.limits = Limiter()
        self.lines = Lines(lambda name, queue_id: self._enqueue(queue_id, "deferred", name), self._capacity)
        self._reserved: dict[str, int] = {}  # id -> recipients counted as starting (``Limiter.start``)
        # ids whose next transaction carries one recipient: a server refused every one of the last (452)
        self._one_at_a_time: set[str] = set()
        self._limits_saved = asyncio.Lock()
        self.in_flight = 0
        self._stopping = False

    # region #### lifecycle ####

    async def recover(self) -> None:
        """Repair the spool after a crash. Must run before any listener accepts mail: it removes
        temporary files and bodies without an envelope, which a running commit would still own."""
        counts = await asyncio.to_thread(self.spool.recover)
        if any(counts.values()):
            held = {"held_ids": self.spool.recovered_held} if self.spool.recovered_held else {}
            log.warning("spool_recovered", **counts, **held)
        await self._keep_reserve()

    async def start(self) -> None:
        """Queue everything the spool holds, start the workers and the retry timer."""
        await self._load_limits()
        await self._load_login_holds()
        for _, queue_id, name in await asyncio.to_thread(self._incoming_at_start):
            self._enqueue(queue_id, "incoming", name)
        for entry in await asyncio.to_thread(lambda: list(self.spool.entries("deferred"))):
            due = entry.next_attempt_at
            if entry.waiting_for == "limit":  # its lifetime or delay warning may come first
                due = min(due, self._limit_check_at(entry, now=0.0) or due)
            self._schedule(entry.id, due, entry.account)
        for n in range(self.config.delivery.workers):
            self._spawn(self._worker(), f"delivery-worker-{n}")
        self.check_graph_permissions()
        self._spawn(self._timer(), "retry-timer")

    def _incoming_at_start(self) -> list[tuple[int, str, str | None]]:
        """incoming/ in the order to try it: arrival order, but entries that were in an attempt when
        relay stopped (``crashes``) after the others, so that a kill during a hanging upstream does not
        count crashes against the same few entries over and over (a poisoned one still gets there)."""
        found: list[tuple[int, str, str | None]] = []
        for queue_id in self.spool.ids("incoming"):
            try:
                entry = self.spool.peek(queue_id, "incoming")
            except (ValueError, TypeError):  # damaged: a worker claims it and puts it on hold
                found.append((MAX_CRASHES, queue_id, None))
                continue
            if entry is not None:
                found.append((entry.crashes, queue_id, entry.account))
        return sorted(found, key=lambda item: (item[0], item[1]))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, timeout: float) -> int:
        """Let in-flight attempts finish within ``timeout``, then cancel; return how many were cut."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = self.in_flight
        self.lines.close()  # the waiting entries are in deferred/ with their time
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._parked.clear()  # never claimed: they wait in incoming/ or deferred/, where the next start looks
        self._parked_ids.clear()
        await self.transports.aclose()
        return cut

    def check_graph_permissions(self) -> None:
        """Learn, in the background, whether each Graph account's token carries Mail.ReadWrite: the listener
        decides at submission whether a message over sendMail's 4 MB may be taken (``GraphTransport.may_upload``)."""
        for account in graph_accounts(self.config):
            self._spawn(self._check_graph(account), f"graph-permissions-{account.name}")

    async def _check_graph(self, account: Account) -> None:
        verdict = await self.transports.graph.check_permissions(account)
        if verdict is not None:
            (log.info if verdict else log.warning)("graph_permissions", upstream=account.name, mail_readwrite=verdict,
                    large_messages="up to limits.max_message_size" if verdict else "refused over about 3 MB (552)")  # fmt: skip

    def reconfigure(self, config: Config) -> None:
        self.config = config
        self.check_graph_permissions()
        self.lines.reopen()  # raised limits apply to mail already waiting, not only to new mail
        for name in list(self._parked):  # a raised max_connections opens its new slots for the waiting mail
            self._open_slots(name)

    def _open_slots(self, name: str) -> None:
        """Start as many of the account's parked entries as its free connections allow."""
        for _ in range(max(self._limit(name) - self._busy.get(name, 0), 0)):  # (_serve counts itself in)
            following = None if self._stopping else self._next_parked(name)
            if following is None:
                break
            self._busy[name] = self._busy.get(name, 0) + 1  # now, so no worker takes the slot meanwhile
            self._spawn(self._serve(name, *following, counted=True), f"delivery-slot-{name}")
        self.lines.release(name)

    # endregion

    def submit(self, entries: list[QueueEntry]) -> None:
        """New entries just committed by the listener."""
        self.metrics.received(entries)
        for entry in entries:
            if len(self._fresh) >= FRESH_MAX:  # a backlog (or ids an admin deleted before their claim)
                self._fresh.clear()
            self._fresh[entry.id] = entry
            self._enqueue(entry.id, "incoming", entry.account)

    def _schedule(self, queue_id: str, when: float, name: str | None, *, check: bool = False) -> None:
        heapq.heappush(self._timers, (when, queue_id, name or "", check))
        self._wakeup.set()

    def _enqueue(self, queue_id: str, source: State, name: str | None = None) -> None:
        """Queue an id for a worker; not one already queued, nor one parked (it waits for a slot)."""
        if queue_id not in self._queued and queue_id not in self._parked_ids:
            self._queued.add(queue_id)
            self.ready.put_nowait((queue_id, source, name))

    async def _rescan(self) -> None:
        """Pick up entries an admin put into incoming/ (retry now, release from hold) while we run."""
        for queue_id in await asyncio.to_thread(self.spool.ids, "incoming"):
            self._enqueue(queue_id, "incoming")

    async def _timer(self) -> None:
        last_scan = time.monotonic()
        nudged = await asyncio.to_thread(self.spool.nudged_at)
        while True:
            seen = await asyncio.to_thread(self.spool.nudged_at)  # relay queue --flush / --retry / --release
            if seen != nudged or time.monotonic() - last_scan >= RESCAN_INTERVAL:
                last_scan, nudged = time.monotonic(), seen
                await self._rescan()
                if not self._reserve_held:
                    await self._keep_reserve()
            now = time.time()
            while self._timers and self._timers[0][0] <= now:
                _, queue_id, name, check = heapq.heappop(self._timers)
                if not check or self.lines.holds(queue_id):  # (a check of one let out since is moot)
                    self._enqueue(queue_id, "deferred", name or None)
            wait = min(self._timers[0][0] - now, NUDGE_INTERVAL) if self._timers else NUDGE_INTERVAL
            self._wakeup.clear()
            try:
                async with asyncio.timeout(max(wait, 0.01)):
                    await self._wakeup.wait()
            except TimeoutError:
                pass

    async def _worker(self) -> None:
        """Take the next entry; if its account already has ``max_connections`` slots taken, park its id
        for that account (in memory: the entry stays where it waits) and move on, so one slow provider
        cannot hold every worker. A free slot is taken before the claim, so the common path costs the
        claim's rename alone."""
        while True:
            queue_id, source, name = await self.ready.get()
            self._queued.discard(queue_id)
            if self._stopping:  # take nothing new once a stop was asked for
                return
            if queue_id in self._parked_ids:
                continue
            if name is None:  # found by a rescan: read its account (no claim, no write)
                name = self._account_of(queue_id, source)  # a small read: on the loop (see spool.py)
                if name is None or queue_id in self._parked_ids:  # gone meanwhile, or parked by another
                    continue
            if self._busy.get(name, 0) >= self._limit(name):
                self._parked.setdefault(name, deque()).append((queue_id, source))
                self._parked_ids.add(queue_id)
                continue
            await self._serve(name, queue_id, source)

    async def _serve(self, name: str, queue_id: str, source: State, *, counted: bool = False) -> None:
        """In one connection slot of account ``name``: claim and attempt the entry, then the account's
        parked ones, at its own pace, until none is left (or relay stops). ``counted``: the caller has
        already taken the slot in ``_busy``."""
        if not counted:
            self._busy[name] = self._busy.get(name, 0) + 1
        try:
            while True:
                entry = self._claim_from(queue_id, source)  # a rename and a small read: on the loop (see spool.py)
                if entry is not None:  # else an admin tool moved or deleted it, or a worker has it
                    await self._run(entry)
                if self._busy[name] > self._limit(name):  # max_connections was lowered: give this slot up
                    return
                following = None if self._stopping else self._next_parked(name)
                if following is None:
                    return
                queue_id, source = following
        finally:
            self._busy[name] -= 1
            self.lines.release(name)

    def _account_of(self, queue_id: str, source: State) -> str | None:
        """The account of a waiting entry, read where it waits; ``None`` if it waits nowhere now."""
        other: State = "deferred" if source == "incoming" else "incoming"
        for state in (source, other):
            try:
                entry = self.spool.peek(queue_id, state)
            except (ValueError, TypeError):  # damaged: the claim puts it on hold for a person
                claimed = self._claim_from(queue_id, state)
                if claimed is not None:  # rewritten meanwhile after all: leave it where it was
                    self.spool.move(queue_id, source="active", target=state)
                return None
            if entry is not None:
                return entry.account
        return None

    def _limit(self, name: str) -> int:
        """The account's connections at once: ``max_connections``, but one until a password login of it has
        worked in this run. Three sessions opened at once with a wrong password were three failed logins
        in a second (and three doublings of the wait), where the provider's lockout counts each."""
        try:
            account = account_for(self.config, name)
        except ConfigError:
            return 1  # the attempt will only report the problem; one at a time is plenty
        if account.username and account.oauth2 is None and name not in self._logins_seen:
            return 1
        return account.max_connections

    def _next_parked(self, name: str) -> tuple[str, State] | None:
        parked = self._parked.get(name)
        if not parked:
            return None
        queue_id, source = parked.popleft()
        self._parked_ids.discard(queue_id)
        return queue_id, source

    async def _run(self, entry: QueueEntry) -> None:
        """One claimed entry through its sending limits and one attempt; whatever happens, it ends up
        in a state directory. The caller holds a connection slot of the entry's account."""
        self.in_flight += 1
        attempting = False
        _bind(entry)
        try:
            if await self._over_limit(entry):
                return
            attempting = True
            await self._attempt(entry)
        except asyncio.CancelledError:
            if attempting:  # (cut in ``_over_limit``, its own write to deferred/ may be under way)
                # named, so a copy that arrives twice can be traced (Postfix logs the lost session by queue id)
                log.warning("delivery_interrupted", queue_id=entry.id, user=entry.user, upstream=entry.account,
                            result="requeued", error="relay stopped during the attempt; if the provider "
                            "already had the whole message, the next start sends it again")  # fmt: skip
                requeue = asyncio.to_thread(self.spool.move, entry.id, source="active", target="incoming")
                await asyncio.shield(requeue)
            raise
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):  # the queue file itself is gone: a person must look
                await self._hold(entry, exc)
            else:
                await self._spool_trouble(entry, exc)
        except Exception as exc:  # noqa: BLE001  (a bug in one attempt holds that entry for a person, never the worker)
            await self._hold(entry, exc)
        finally:
            self.in_flight -= 1
            if entry.id in self._reserved:  # the attempt ended before reaching the provider
                self.limits.end(entry.account, self._limits_of(entry.account), self._reserved.pop(entry.id), sent=False)
            self.lines.release(entry.account)

    async def _hold(self, entry: QueueEntry, exc: BaseException) -> None:
        """A bug or a broken entry: park it in hold/ for a person (Mailman's shunt), never delete it."""
        error = f"{type(exc).__name__}: {exc}"
        log.error("delivery_crashed", queue_id=entry.id, result="hold", error=error, exc_info=exc)
        await asyncio.to_thread(self._park, entry.id, error)

    def _park(self, queue_id: str, error: str) -> None:
        """Move an entry to hold/ with the reason in its record, so that ``relay queue`` says why it
        waits: the record is read again from active/ (what the attempt saved, never the worker's older
        copy, which could list delivered recipients as waiting)."""
        try:
            current = self.spool.peek(queue_id, "active")
        except (ValueError, TypeError):  # a damaged envelope: moved as it is
            current = None
        if current is None:
            self.spool.move(queue_id, source="active", target="hold")
            return
        reason = f"held after an internal error ({error[:300]}); fix the cause, then relay queue --retry {queue_id}"
        self.spool.update(replace(current, last_reply=reason), state="hold", source="active")

    async def _spool_trouble(self, entry: QueueEntry, exc: OSError) -> None:
        """The disk refused a write (full, I/O error): nothing is wrong with the message; try again later.

        A rename needs no free space, so the entry goes back to deferred/ as it was before the attempt;
        what the attempt achieved is kept in memory (``_unrecorded``) and written with the next attempt,
        so accepted recipients are not sent to again. Only a restart before that write loses it, and
        then those recipients get the message once more.
        """
        attempts = self._unrecorded[entry.id].attempts if entry.id in self._unrecorded else entry.attempts
        retry_in = self._backoff(max(attempts, 1))
        log.error("spool_write_failed", queue_id=entry.id, error=f"{type(exc).__name__}: {exc}", result="deferred",
                  retry_in=retry_in, **self._unrecorded_fields(entry))  # fmt: skip
        try:
            await asyncio.to_thread(self.spool.move, entry.id, source="active", target="deferred")
        except OSError:  # stays in active/: recovered at the next start
            return
        self._schedule(entry.id, time.time() + retry_in, entry.account)

    def _unrecorded_fields(self, entry: QueueEntry) -> dict[str, Any]:
        """For a failed record: the recipients delivered whose delivery only this process remembers (``entry``
        is what the disk holds). The admin must hear it: a restart now sends to them again, and ``relay
        queue --show`` still lists them as waiting."""
        remembered = self._unrecorded.get(entry.id)
        delivered = [r for r in remembered.delivered if r not in entry.delivered] if remembered else []
        if not delivered:
            return {}
        return {"unrecorded_delivered": delivered, "consequence": (
            "delivered, but not recorded on disk: relay remembers it until a write succeeds; a restart before "
            "then sends to these recipients again, and relay queue --show lists them as still waiting"
        ), "fix": f"free space on the filesystem of {self.spool.root}"}  # fmt: skip

    async def _save(self, entry: QueueEntry, state: State) -> None:
        """Write an attempt's record; if the disk is full, once more after giving up the spool's reserve
        (spool.py, "The reserve"): recipients delivered must be on disk as such before a restart could send
        to them again. A second failure is raised (the record then waits in ``_unrecorded``)."""
        try:
            await asyncio.to_thread(self.spool.update, entry, state=state)
            return
        except OSError as exc:
            if not out_of_space(exc):
                raise
            await self._use_reserve(entry, exc)
        await asyncio.to_thread(self.spool.update, entry, state=state)

    async def _use_reserve(self, entry: QueueEntry, exc: OSError) -> None:
        """Remove the reserve for a record the full disk refused; logged as an error, as it means the
        spool's filesystem is full (the listener refuses new mail meanwhile). Without a reserve left (used
        by an earlier record, or by another worker a moment ago) the record is just tried once more."""
        async with self._reserve_lock:
            released = self.spool.release_reserve()  # an unlink: on the loop (see spool.py)
            if released:
                self._reserve_held = False
        if released:
            log.error(
                "spool_reserve_used", queue_id=entry.id, error=f"{type(exc).__name__}: {exc}", spool=str(self.spool.root),
                freed=RESERVE_SIZE, problem="the spool's filesystem is full: relay removed its reserve file to record "
                "what deliveries did; new mail is refused (452) until there is room, and once the reserve is used up "
                "a restart may send delivered mail again", fix=f"free space on the filesystem of {self.spool.root}",
            )  # fmt: skip

    async def _keep_reserve(self) -> None:
        """Make the spool's reserve if it is missing and the filesystem has room for it (at start, and at each
        rescan while it is missing); each change of whether relay holds one is logged once."""
        async with self._reserve_lock:
            try:
                held = await asyncio.to_thread(self.spool.make_reserve)
            except OSError as exc:  # the spool is unusable: every other write says so too
                log.error("spool_reserve_not_made", spool=str(self.spool.root), error=f"{type(exc).__name__}: {exc}")
                held = False
            was, self._reserve_held = self._reserve_held, held
        if held and was is False:
            log.info("spool_reserve_restored", spool=str(self.spool.root), size=RESERVE_SIZE)
        elif not held and was is None:
            log.warning(
                "spool_reserve_missing", spool=str(self.spool.root), free=self._free_space(),
                problem=f"less than {2 * RESERVE_SIZE} bytes free on the spool's filesystem: if it fills up, what "
                "deliveries did may be left unrecorded, and a restart then sends it again",
                fix=f"free space on the filesystem of {self.spool.root}",
            )  # fmt: skip

    def _free_space(self) -> int | None:
        try:
            return free_space(self.spool.root)
        except OSError:
            return None

    def _claim_from(self, queue_id: str, source: State) -> QueueEntry | None:
        """Move the entry to active/, from where it was seen or from the other waiting state if an admin
        moved it. Made on the loop, so a stop cannot come between the rename and the attempt that owns it."""
        other: State = "deferred" if source == "incoming" else "incoming"
        known = self._fresh.pop(queue_id, None)
        try:
            return self.spool.claim(queue_id, source=source, known=known) or self.spool.claim(
                queue_id, source=other, known=known
            )
        except (ValueError, TypeError):  # a damaged envelope: park it for a person, keep the worker alive
            log.error("queue_file_damaged", queue_id=queue_id, result="hold")
            self.spool.move(queue_id, source="active", target="hold")
            return None

    # region #### one attempt and its bookkeeping ####

    def _load(self, entry: QueueEntry) -> tuple[Path, bytes | Path, Account | None, Secret | None, str | None]:
        """Everything an attempt reads from disk, in one trip to a worker thread: the body itself when
        it is small (``INLINE_BODY_LIMIT``), else its path, and the body is streamed a chunk at a time."""
        body = self.spool.body_path(entry.id)
        content: bytes | Path = body
        try:
            if entry.size <= INLINE_BODY_LIMIT:
                content = self.spool.read_body(entry.id)
                size = len(content)
            else:
                size = os.stat(body).st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"queue file {body} is missing") from None
        if size != entry.size:  # never send what is not the message as received (spool.py, "Reusing files")
            raise QueueFileDamagedError(f"queue file {body} holds {size} octets, not the {entry.size} queued")
        try:
            account = account_for(self.config, entry.account)
            return body, content, account, read_password(account), None
        except (ConfigError, SecretError) as exc:
            return body, content, None, None, str(exc)

    async def _attempt(self, entry: QueueEntry) -> None:
        entry = self._unrecorded.get(entry.id, entry)  # what the disk could not take last time
        attempt = entry.attempts + 1
        done = set(entry.delivered) | {r for r, _ in entry.bounced}  # a 5xx recipient is never retried
        pending = [r for r in entry.recipients if r not in done]
        if entry.size <= INLINE_BODY_LIMIT:  # small reads on the loop (see spool.py)
            body, content, account, secret, problem = self._load(entry)
        else:
            body, content, account, secret, problem = await asyncio.to_thread(self._load, entry)
        if account is not None and account.limits.recipients_per_message:  # the rest go in the next batch
            pending = pending[: account.limits.recipients_per_message]
        one_alone = entry.id in self._one_at_a_time
        self._one_at_a_time.discard(entry.id)
        if one_alone:
            pending = pending[:1]
        if not pending:  # everyone was decided in an attempt whose record the disk refused
            outcome = Outcome()
        elif account is None:
            outcome = Outcome(
                deferred={r: (None, "") for r in pending}, error=problem, reply=(None, ""), session_failed=True
            )
        elif self._held_but_due(entry, secret):  # its lifetime or delay warning is due: recorded, no login
            outcome = Outcome(deferred={r: (None, LOGIN_WAIT) for r in pending}, error=LOGIN_NOT_TRIED,
                              reply=(None, LOGIN_WAIT), session_failed=True)  # fmt: skip
            account = None  # (nothing was tried: neither the upstream's state nor the login's is news)
        else:
            wait_until = self._login_wait(entry, secret)
            if wait_until is not None:
                await self._wait_for_login(entry, wait_until)
                return
            try:
                outcome = await self.transports.deliver(
                    account, secret, entry.mail_from, pending, content,
                    deadline=self.config.delivery.deadline, eightbit=entry.eightbit,
                    drafts=SpoolDrafts(self.spool, entry.id),
                    logged_in=functools.partial(self._login_works, entry.account, secret),
                )  # fmt: skip
            finally:
                hold = self._login_holds.get(entry.account)
                if hold is not None and hold.trying == entry.id:
                    hold.trying = None
        self._log_attempt(entry, attempt, account, outcome)
        self.metrics.attempted(entry, outcome)
        if outcome.delivered:  # before the record: once recorded as done, the body is gone
            await archive.store(self.config, entry, body, outcome.delivered)
        self._track_upstream(entry.account, outcome)
        if account is not None and pending:
            self._track_login(entry.account, secret, outcome)
        await self._record(entry, attempt, outcome, at_once=self._split(entry, pending, outcome, one_alone))

    def _split(self, entry: QueueEntry, batch: list[str], outcome: Outcome, one_alone: bool) -> bool:
        """Whether the recipients still waiting go in a new transaction at once: the server took fewer
        recipients than the transaction had (452), and nothing else in it must wait for a retry. When it
        took none of several, the next transaction carries one: only one recipient refused so is a deferral."""
        excess = too_many_recipients(batch, outcome)
        if excess and not outcome.delivered:
            self._one_at_a_time.add(entry.id)
        others = [r for r in outcome.deferred if r not in excess]
        return not others and (bool(excess) or (one_alone and bool(outcome.delivered)))

    def _log_attempt(self, entry: QueueEntry, attempt: int, account: Account | None, outcome: Outcome) -> None:
        level = "info" if outcome.result == "delivered" else "warning"
        if level == "info" and not logs.enabled("relay.delivery"):
            return
        code, text = outcome.reply
        fields = {
            "attempt": attempt, "upstream_host": account.label if account else None, "duration": round(outcome.duration, 3),
            "result": outcome.result, "code": code, "reply": text, "recipients": len(outcome.delivered) + len(outcome.deferred)
            + len(outcome.bounced), "delivered": outcome.delivered, "deferred": sorted(outcome.deferred),
            "bounced": {r: _reply_text(rep) for r, rep in outcome.bounced.items()},
        }  # fmt: skip
        if outcome.error:
            fields["error"] = outcome.error
        signin = (account.own_user or account.name) if account else None
        hint = outcome.advice or advice(*outcome.reply, signin=signin)
        if hint:
            fields["advice"] = hint
        getattr(log, level)("delivery_attempt", **fields)

    # region #### a refused login: one message tries it per retry (LoginHold) ####

    def _login_wait(self, entry: QueueEntry, secret: Secret | None) -> float | None:
        """When ``entry`` may try its account's refused login, or ``None``: now (it is the one that tries).

        It goes now when the secret changed (the hold is lifted), when the retry time came and nobody is
        trying, or when its own lifetime or delay warning is due (the attempt's outcome decides those).
        """
        hold = self._login_holds.get(entry.account)
        if hold is None:
            return None
        if hold.secret is None:  # saved by an earlier run: the secret refused is the one in use now
            hold.secret = fingerprint(secret)
        if hold.secret != fingerprint(secret):
            self._lift_login_hold(entry.account, "the secret changed")
            return None
        now = time.time()
        if self._bookkeeping_due(entry, now):
            return None
        if hold.trying is None and now >= hold.until:
            hold.trying = entry.id
            return None
        hold.waiting.add(entry.id)
        # while one tries, the rest wait a retry interval; they are let go at once if the login works
        at = hold.until if now < hold.until else now + self._backoff(1)
        check = self._limit_check_at(entry, now=now)
        return min(at, check) if check is not None else at

    def _held_but_due(self, entry: QueueEntry, secret: Secret | None) -> bool:
        """The account's login is refused (a hold of this secret) and the entry's lifetime or delay warning
        is due, which only an attempt records: it gets an attempt that does not log in. Before, each such
        entry tried the refused secret, and so did every queued notice at each retry (a tester counted 33
        failed logins where 7 were due). A hold from an earlier run (its secret not known) is tried as
        usual: the password may have been fixed while relay was stopped."""
        hold = self._login_holds.get(entry.account)
        if hold is None or hold.secret is None or hold.secret != fingerprint(secret):
            return False
        return self._bookkeeping_due(entry, time.time())

    def _bookkeeping_due(self, entry: QueueEntry, now: float) -> bool:
        """The entry's queue lifetime is over, or its delay warning is due: only an attempt records those."""
        cfg = self.config.delivery
        if now - entry.received_at >= cfg.max_queue_lifetime:
            return True
        if not notices.wanted(self.config, entry):  # a notice gets no notice about itself
            return False
        warned = any(n.startswith("delayed ") for n in entry.notices)
        return bool(cfg.delay_warning) and not warned and now - entry.received_at >= cfg.delay_warning

    async def _wait_for_login(self, entry: QueueEntry, until: float) -> None:
        """Back to deferred/ without an attempt (none is counted): the account's login is being refused."""
        entry = replace(entry, next_attempt_at=until, waiting_for="retry", last_reply=entry.last_reply or LOGIN_WAIT)
        await self._save(entry, "deferred")  # (it may carry what the disk could not take last time)
        self._unrecorded.pop(entry.id, None)  # what it held is on disk now
        self._schedule(entry.id, until, entry.account)
        log.info("waiting_for_login", queue_id=entry.id, user=entry.user, upstream=entry.account,
                 result="deferred", retry_in=round(until - time.time(), 3))  # fmt: skip

    def _track_login(self, name: str, secret: Secret | None, outcome: Outcome) -> None:
        """A refused login holds the account's mail until the next retry; a login that worked lifts it."""
        if outcome.login_refused:
            self._logins_seen.discard(name)  # one connection again until a login works (``_limit``)
            hold = self._login_holds.get(name)
            if hold is None or hold.secret != fingerprint(secret):
                hold = self._login_holds[name] = LoginHold(fingerprint(secret), 0.0, refusals=0)
            hold.refusals += 1
            hold.until = time.time() + self._backoff(hold.refusals)
            self._save_login_holds()
            log.warning("login_refused_holding", upstream=name, retry_in=round(hold.until - time.time(), 3),
                        reason="the upstream refused the login: the account's other mail waits, and one "
                        "message tries again at each retry, so a wrong password is not tried once per "
                        "message (providers lock accounts after repeated failures)")  # fmt: skip
        elif not outcome.session_failed:
            self._login_works(name, secret)

    def _login_works(self, name: str, secret: Secret | None) -> None:
        """A session of ``name`` is logged in with ``secret``: its other connections may open now (see
        ``_limit``), and a hold is lifted, now rather than when the message that logged in is delivered
        (which may take long: a big one, a slow provider)."""
        if name in self._logins_seen and name not in self._login_holds:
            return
        self._logins_seen.add(name)
        hold = self._login_holds.get(name)
        if hold is not None and hold.secret in (None, fingerprint(secret)):
            self._lift_login_hold(name, "the login works")
        self._open_slots(name)

    def _lift_login_hold(self, name: str, why: str) -> None:
        hold = self._login_holds.pop(name, None)
        if hold is None:
            return
        for queue_id in hold.waiting:
            self._enqueue(queue_id, "deferred", name)
        log.info("login_hold_lifted", upstream=name, reason=why, released=len(hold.waiting))
        self._save_login_holds()

    async def _load_login_holds(self) -> None:
        """The holds of the last run, each to be tried at once by one message: without them, an account's
        queued mail tried a refused password on each of its connections at every start (3 failures
        toward the provider's lockout per restart, not one per retry)."""
        raw = await asyncio.to_thread(self.spool.read_state, LOGIN_STATE)
        try:
            refused = json.loads(raw)["refused"] if raw is not None else {}
            holds = {str(name): LoginHold(None, 0.0, refusals=int(count)) for name, count in refused.items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # damaged, or edited by hand
            log.error("login_state_unreadable", file=str(self.spool.state_path(LOGIN_STATE)), error=str(exc),
                      result="no login held")  # fmt: skip
            return
        self._login_holds.update(holds)

    def _save_login_holds(self) -> None:
        """Write the refused accounts in the background (each write takes the state of its moment)."""
        self._spawn(self._write_login_holds(), "login-holds-save")

    async def _write_login_holds(self) -> None:
        def state() -> bytes:
            refused = {name: hold.refusals for name, hold in self._login_holds.items()}
            return json.dumps({"version": 1, "refused": refused}, separators=(",", ":")).encode()

        await self._write_state(LOGIN_STATE, state, self._holds_saved, "login_state_not_saved")

    async def _write_state(self, name: str, state: Callable[[], bytes], lock: asyncio.Lock, event: str) -> None:
        """Save one state file of the spool, one write at a time, with the state of the moment it starts;
        a disk that refuses it is logged as ``event`` (the state stays in memory: only a restart now
        would forget it)."""
        async with lock:
            try:
                await asyncio.to_thread(self.spool.write_state, name, state())
            except OSError as exc:
                log.error(event, error=f"{type(exc).__name__}: {exc}")

    # endregion

    def _track_upstream(self, name: str, outcome: Outcome) -> None:
        """Log an upstream going down once, and coming back once."""
        attempt_wide = outcome.session_failed
        if attempt_wide and name not in self._down:
            self._down[name] = outcome.error or ""
            hint = outcome.advice or advice(*outcome.reply, signin=name.removeprefix(USER_ACCOUNT_PREFIX))
            log.error("upstream_down", upstream=name, reason=outcome.error, code=outcome.reply[0],
                      reply=outcome.reply[1], **({"advice": hint} if hint else {}))  # fmt: skip
        elif not attempt_wide and name in self._down:
            del self._down[name]
            log.info("upstream_up", upstream=name)

    async def _record(self, entry: QueueEntry, attempt: int, outcome: Outcome, *, at_once: bool = False) -> None:
        now = time.time()
        throttled = await self._count_send(entry, outcome)
        entry = replace(
            entry,
            attempts=attempt,
            crashes=0,  # relay survived this attempt: crashes count attempts in a row it did not
            delivered=entry.delivered + tuple(outcome.delivered),
            bounced=entry.bounced + tuple((r, _reply_text(rep)) for r, rep in outcome.bounced.items()),
            last_reply=_summary(outcome),
        )
        try:
            await self._store(entry, outcome, now, throttled=throttled, at_once=at_once)
        except OSError:
            # remembered until a write succeeds, so the next attempt does not resend to these recipients
            self._unrecorded[entry.id] = entry
            raise
        self._unrecorded.pop(entry.id, None)

    async def _store(
        self, entry: QueueEntry, outcome: Outcome, now: float, *, throttled: bool = False, at_once: bool = False
    ) -> None:
        """Decide the entry's next state; a notice for the recipients given up on goes first. ``at_once``:
        the recipients left go in a new transaction now (``_split``)."""
        unsent = [r for r in entry.recipients if r not in entry.delivered and r not in dict(entry.bounced)
                  and r not in outcome.deferred]  # fmt: skip
        waiting = {**outcome.deferred, **{r: (None, "") for r in unsent}}
        alive = now - entry.received_at < self.config.delivery.max_queue_lifetime
        given_up = [(r, _reply_text(rep)) for r, rep in outcome.bounced.items()]
        if waiting and not alive:
            expired = tuple((r, notices.EXPIRED + _expiry_reason(rep, entry)) for r, rep in waiting.items())
            entry = replace(entry, bounced=entry.bounced + expired)
            given_up += expired
        entry = await self._notify(entry, given_up, "failed")
        if waiting and alive:
            entry = await self._warn_delay(entry, outcome, now)
            if at_once:
                await self._next_transaction(entry, now)
            else:
                await self._defer(entry, outcome, now, throttled=throttled)
        elif entry.bounced:
            # an attempt that only delivered (the rest of a split) did not fail it: show the refusal that did
            said = entry.last_reply if outcome.bounced or outcome.deferred else entry.bounced[-1][1]
            entry = replace(entry, waiting_for="", last_reply=said)
            await self._save(entry, "failed")
            self.metrics.bounced(entry.account)
            # a notice's own entry says which (the user's, or the admin copy) and about what: nobody else is told
            about = {"notice": "; ".join(entry.notes)} if entry.kind == notices.KIND else {}
            log.error("delivery_failed", queue_id=entry.id, user=entry.user, upstream=entry.account,
                      bounced=dict(entry.bounced), reason=entry.last_reply, **about)  # fmt: skip
        else:
            # two renames (or unlinks), no fsync: on the loop; a small body was read whole, and is reused
            # unless an archive copy is read from it (see spool.py, "Reusing files")
            small = entry.size <= INLINE_BODY_LIMIT
            self.spool.finish(entry, reuse_body=small and not archive.copies(self.config, entry))

    async def _defer(self, entry: QueueEntry, outcome: Outcome, now: float, *, throttled: bool) -> None:
        """Back to deferred/: after a failure with the doubling backoff; for the account's limits (a
        throttling reply, or recipients left for the next batch) in the account's line."""
        if outcome.deferred and not throttled:
            # the provider's own Retry-After wins over the doubling: earlier tries would only be refused,
            # and later ones would leave the mailbox idle after the pause
            retry_in = outcome.retry_after if outcome.retry_after is not None else self._backoff(entry.attempts)
            entry = replace(entry, next_attempt_at=now + retry_in, waiting_for="retry")
            await self._save(entry, "deferred")
            self._schedule(entry.id, entry.next_attempt_at, entry.account)
            self.metrics.deferred(entry.account)
            return
        wait, _ = self.limits.wait(entry.account, self._limits_of(entry.account), 1)
        entry = replace(entry, next_attempt_at=now + wait, waiting_for="limit")
        await self._save(entry, "deferred")
        self.metrics.limit_wait(entry.account)
        self.lines.join(entry.account, entry.id, wait, front=True)
        self._check_limit_wait(entry, now)

    async def _next_transaction(self, entry: QueueEntry, now: float) -> None:
        """Recipients a server would not take in that transaction go in a new one now, as Postfix sends
        them: not a failure (no backoff), nor the account sending too fast (its other mail goes on).
        Through the ready queue, so the account's connections and sending limits still decide."""
        entry = replace(entry, next_attempt_at=now, waiting_for="retry")
        await self._save(entry, "deferred")
        self._enqueue(entry.id, "deferred", entry.account)
        log.info("next_transaction", queue_id=entry.id, user=entry.user, upstream=entry.account,
                 reason="the upstream took fewer recipients than the transaction had (452)")  # fmt: skip

    def _backoff(self, attempt: int) -> float:
        cfg = self.config.delivery
        doublings = min(max(attempt - 1, 0), 60)  # 2**1024 is no float: a week of short retries got there
        return float(min(cfg.retry_interval * 2**doublings, max(cfg.max_retry_interval, cfg.retry_interval)))

    # endregion

    # region #### notices ####

    async def _notify(self, entry: QueueEntry, recipients: list[tuple[str, str]], action: notices.Action) -> QueueEntry:
        """Queue a notice about ``recipients`` to the entry's user, and its admin copy as an entry of its
        own when that does not ride along (``notices.admin_copy``); return the entry noting each. A
        user who cannot be told (no address, an account gone from the config) does not cost the admin copy."""
        if not recipients or not notices.wanted(self.config, entry):
            return entry
        fields = {"queue_id": entry.id, "user": entry.user, "upstream": entry.account, "action": action}
        try:
            queued, problem = await asyncio.to_thread(self._commit_notices, entry, recipients, action)
        except Exception as exc:  # noqa: BLE001  (logged with its type: the entry itself is kept as it was)
            level = "error" if isinstance(exc, (ConfigError, OSError)) else "exception"
            getattr(log, level)("notice_not_queued", **fields, error=f"{type(exc).__name__}: {exc}")
            return entry
        if isinstance(problem, ConfigError):
            log.error("notice_not_queued", **fields, error=f"ConfigError: {problem}")
        elif problem is not None:
            log.warning("notice_not_queued", **fields, error=problem)
        for audience, notice in queued:
            # (not ``submit``: a notice is not mail received from a client)
            self._enqueue(notice.id, "incoming", notice.account)
            log.info("notice_queued", **fields, notice_id=notice.id, audience=audience, notice_upstream=notice.account,
                     to=list(notice.recipients), recipients=[r for r, _ in recipients])  # fmt: skip
            entry = replace(entry, notices=entry.notices + (notices.note(action, notice.id, audience),))
        return entry

    def _commit_notices(
        self, entry: QueueEntry, recipients: list[tuple[str, str]], action: notices.Action
    ) -> tuple[list[tuple[notices.Audience, QueueEntry]], ConfigError | str | None]:
        """The user's notice and the admin copy, committed together; and why the user gets none, if not."""
        with open(self.spool.body_path(entry.id), "rb") as file:
            headers = notices.original_headers(file.read(notices.HEADERS_MAX), kind=entry.kind)
        now = time.time()
        built: list[tuple[notices.Audience, Outgoing]] = []
        problem: ConfigError | str | None = None
        try:
            mine = notices.build(self.config, entry, recipients, headers, action, now=now)
        except ConfigError as exc:
            mine, problem = None, exc
        if mine is not None:
            built.append(("user", mine))
        elif problem is None:
            problem = "the user has no address to send a notice to"
        admin = notices.admin_copy(self.config, entry, recipients, headers, action, now=now)
        if admin is not None:
            built.append(("admin", admin))
        if not built:
            return [], problem
        committed = self.spool.commit([out for _, out in built], identified_by="notice")
        return [(audience, notice) for (audience, _), notice in zip(built, committed, strict=True)], problem

    async def _warn_delay(self, entry: QueueEntry, outcome: Outcome, now: float) -> QueueEntry:
        """One "still trying" notice once ``delivery.delay_warning`` seconds have passed (0: never)."""
        after = self.config.delivery.delay_warning
        if not after or not outcome.deferred or now - entry.received_at < after:
            return entry
        if any(n.startswith("delayed ") for n in entry.notices):
            return entry
        return await self._notify(entry, [(r, _reply_text(rep)) for r, rep in outcome.deferred.items()], "delayed")

    # endregion

    # region #### sending limits (limits.py) ####

    def _account(self, name: str) -> Account | None:
        try:
            return account_for(self.config, name)
        except ConfigError:
            return None  # the attempt reports the missing account; nothing to count against

    def _limits_of(self, name: str) -> SendLimits:
        account = self._account(name)
        return account.limits if account is not None else SendLimits()

    async def _load_limits(self) -> None:
        raw = await asyncio.to_thread(self.spool.read_state, STATE_FILE)
        try:
            if raw is not None:
                self.limits.loads(raw)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:  # damaged, or edited by hand
            log.error("limits_state_unreadable", file=str(self.spool.state_path(STATE_FILE)), error=str(exc),
                      result="counting from zero")  # fmt: skip

    async def _save_limits(self) -> None:
        await self._write_state(STATE_FILE, self.limits.dumps, self._limits_saved, "limits_state_not_saved")

    async def _over_limit(self, entry: QueueEntry) -> bool:
        """Start the entry within its account's limits (``False``), or put it in the account's line: in
        its place if it is still in it (taken up early for its queue lifetime or delay warning), where it
        may also expire or be warned about."""
        self.lines.taken(entry.account, entry.id)
        in_line = self.lines.holds(entry.id)
        limits = self._limits_of(entry.account)
        done = set(entry.delivered) | {r for r, _ in entry.bounced}
        pending = [r for r in entry.recipients if r not in done]
        recipients = len(pending)
        if limits.recipients_per_message:
            recipients = min(recipients, limits.recipients_per_message)
        if entry.id in self._one_at_a_time:
            recipients = min(recipients, 1)
        wait, reason = self.limits.wait(entry.account, limits, recipients)
        if wait <= 0:
            self.lines.drop(entry.account, entry.id)
            self.limits.start(entry.account, recipients)
            self._reserved[entry.id] = recipients
            return False
        now = time.time()
        # what the recipients are waiting for, for a notice (as a provider's reply would be)
        why = f"waiting for the account's sending limit ({reason})"
        waiting = Outcome(deferred={r: (None, why) for r in pending})
        if now - entry.received_at >= self.config.delivery.max_queue_lifetime:
            self.lines.drop(entry.account, entry.id)
            await self._store(replace(entry, last_reply=f"expired while {why}"), waiting, now)
            return True
        entry = await self._warn_delay(entry, waiting, now)
        spacing = limits.window / limits.messages if limits.messages else 0.0
        eta = now + wait + self.lines.length(entry.account) * spacing  # for relay queue and a restart
        first = entry.waiting_for != "limit"
        entry = replace(entry, waiting_for="limit", next_attempt_at=eta)
        try:
            await asyncio.to_thread(self.spool.update, entry, state="deferred")
        except OSError as exc:
            self.lines.drop(entry.account, entry.id)
            await self._spool_trouble(entry, exc)
            return True
        if not in_line:
            self.lines.join(entry.account, entry.id, wait)
        self._check_limit_wait(entry, now)
        if first:
            self.metrics.limit_wait(entry.account)
            log.info("waiting_for_limit", queue_id=entry.id, user=entry.user, upstream=entry.account,
                     waiting_for="limit", limit=reason, retry_in=round(wait, 3),
                     in_line=self.lines.length(entry.account))  # fmt: skip
        return True

    def _limit_check_at(self, entry: QueueEntry, *, now: float) -> float | None:
        """When an entry waiting for a limit must be looked at for its own sake, after ``now``: its queue
        lifetime ends, or its delay warning is due (``None``: neither is still to come)."""
        cfg = self.config.delivery
        due = [entry.received_at + cfg.max_queue_lifetime]
        if cfg.delay_warning and not any(n.startswith("delayed ") for n in entry.notices):
            due.append(entry.received_at + cfg.delay_warning)
        return min((at for at in due if at > now), default=None)

    def _check_limit_wait(self, entry: QueueEntry, now: float) -> None:
        """An entry joined its account's line: if its lifetime or delay warning comes before its turn,
        a timer takes it up then (``_over_limit`` expires it, or warns and puts it back in its place)."""
        at = self._limit_check_at(entry, now=now)
        if at is not None and at < entry.next_attempt_at:
            self._schedule(entry.id, at, entry.account, check=True)

    def _capacity(self, name: str) -> tuple[int, float]:
        """For ``Lines``: how many of the account's entries may start now (budget and free connections),
        and in how many seconds the budget allows more."""
        limits = self._limits_of(name)
        room = min(self.limits.room(name, limits), self._limit(name) - self._busy.get(name, 0))
        return room, self.limits.wait(name, limits, 1)[0]

    async def _count_send(self, entry: QueueEntry, outcome: Outcome) -> bool:
        """Count an attempt that reached the provider; slow the account down on a throttling reply.
        Returns whether the provider throttled."""
        account = self._account(entry.account)
        limits = account.limits if account is not None else SendLimits()
        recipients = self._reserved.pop(entry.id, None)
        if recipients is not None:  # counted when a transaction reached the provider, as providers count
            reached = bool(outcome.delivered or outcome.bounced or outcome.deferred) and not outcome.session_failed
            self.limits.end(entry.account, limits, recipients, sent=reached)
        # (Graph's 429 comes with Retry-After, the provider's own number, which graph.py keeps per mailbox)
        throttle = throttle_reply(outcome) if account is not None and account.transport != "graph" else None
        if throttle is not None:
            pause = self.limits.throttled(entry.account, limits)
            log.warning("account_throttled", queue_id=entry.id, user=entry.user, upstream=entry.account,
                        code=throttle[0], reply=throttle[1], paused_for=round(pause, 3), waiting_for="limit")  # fmt: skip
        if (recipients is not None and limits != SendLimits()) or throttle is not None:
            await self._save_limits()  # (an account without limits has nothing worth a disk write)
        return throttle is not None

    # endregion
