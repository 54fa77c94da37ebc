"""Group commit for the intake: every session's messages made durable by one thread, in batches.

A spool commit is two halves (``Spool.stage`` writes the files, ``Spool.seal`` fsyncs and renames
them). Before this, each DATA sent the whole commit to a worker thread of its own. Under the load of
many clients the worker and the event loop then passed the GIL to each other at each of the commit's
~20 system calls: some 130 futex calls and a dozen context switches per message in the intake
process (``strace -c -f`` and ``perf`` under the shared bench's load), a fifth of its CPU.

Here the event loop stages a small message itself (writing a few kilobytes into the page cache does
not wait for the disk) and hands it to one committing thread, which seals whatever has queued up while
it was busy in one go: the fsyncs, one sync of each directory for the whole batch, and one wake-up of
the loop to answer every client in it. A big message is staged in a worker thread, as before, so that
copying it into the page cache cannot stall the other sessions. 250 still means "on disk": a client's
future is resolved only after the seal that made its files and their directory entries durable.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading

from relay.envelope import Outgoing
from relay.queue.spool import QueueEntry, Spool, Staged

STAGE_ON_LOOP_LIMIT = 256 * 1024  # octets of a commit's messages staged on the event loop; bigger: a thread

_Waiting = tuple[Staged, asyncio.Future[list[QueueEntry]], asyncio.AbstractEventLoop]


class Committer:
    """Commits for every session of one event loop, through one thread started at the first commit."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._queue: queue.SimpleQueue[_Waiting] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def commit(self, messages: list[Outgoing], *, client: str = "", identified_by: str = "") -> list[QueueEntry]:
        """``Spool.commit``'s promise (raises ``OSError`` if the disk refused), for many sessions at once."""
        if sum(len(out.content) for out in messages) <= STAGE_ON_LOOP_LIMIT:
            staged = self.spool.stage(messages, client=client, identified_by=identified_by)
        else:
            staged = await asyncio.to_thread(self.spool.stage, messages, client=client, identified_by=identified_by)
        loop = asyncio.get_running_loop()
        sealed: asyncio.Future[list[QueueEntry]] = loop.create_future()
        self._start()
        self._queue.put((staged, sealed, loop))
        # not cancellable half-way: once handed over the commit completes, like a thread it runs in
        return await asyncio.shield(sealed)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="relay-committer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        _yield_to_the_loop()
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                errors: list[OSError | None] | BaseException = self.spool.seal([staged for staged, _, _ in batch])
            except BaseException as exc:  # noqa: BLE001  (a bug in the seal fails this batch's clients, not the thread)
                errors = exc
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Waiting, BaseException | None]]] = {}
            for index, waiting in enumerate(batch):
                error = errors if isinstance(errors, BaseException) else errors[index]
                by_loop.setdefault(waiting[2], []).append((waiting, error))
            for loop, results in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_resolve, results)
                except RuntimeError:  # that loop is closed: its sessions are gone
                    for (staged, _, _), _ in results:
                        staged.close()
            try:  # after the clients are answered: the files the next commits may reuse (spool.py)
                self.spool.refill_free()
            except OSError:  # new files are made instead
                pass


def _yield_to_the_loop() -> None:
    """Run this thread as ``SCHED_BATCH``, so that its wake-ups never preempt the event loop's thread.

    The thread wakes at each commit handed over and at each fsync's end, and then needs the GIL, which the
    event loop's thread holds: woken as a normal thread it took that thread's CPU only to wait for the GIL
    at once, and switched back (the GIL convoy). Under the shared bench's load that was 17 involuntary
    context switches per message of the loop's thread; as a batch thread 7, and the intake's CPU per
    message fell by a sixth (1.41 -> 1.15 ms; paired rounds, the whole daemon 1.9 -> 1.7 ms). It still
    runs at once on an idle CPU; on a busy one at the loop's next system call or the next tick. Nothing
    about durability changes: a client hears 250 only after the seal. No privilege is needed; where
    the policy does not exist the thread runs as before.

    The price is latency: on a busy machine the thread waits for a scheduler tick after each fsync of a
    batch, and a seal under the shared bench's load takes 14-16 ms where a normal thread takes 3.5-4
    (a client's wait for its 250 ~20 ms against ~13; the machine 11% idle against 6%). Measured again
    on 2026-12-07 through the shared harness in alternating rounds: a normal thread gave the same
    messages a second (0.97x) for 14% more CPU per message. A process of its own for the seal (the
    files' descriptors passed over a socketpair, the same ``Spool.seal``; prototyped, not kept) kept the
    machine busier (95% against 88%) but gave 0.94x the messages a second for 29% more CPU: the second
    interpreter's work per batch costs more than the GIL hand-overs it saves.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # 0: the calling thread (Linux)
    except (AttributeError, OSError):
        pass


def _resolve(results: list[tuple[_Waiting, BaseException | None]]) -> None:
    """On the event loop: answer the sessions, then close the sealed files (here, not in the committing
    thread, whose every system call is a pass of the GIL: see ``Staged.sync``)."""
    for (staged, sealed, _), error in results:
        if sealed.done():  # (the session is gone: a shielded future's waiter was cancelled)
            continue
        if error is None:
            sealed.set_result(staged.entries)
        else:
            sealed.set_exception(error)
    for (staged, _, _), _ in results:
        staged.close()
