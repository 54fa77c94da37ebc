"""The intake's group commit: many sessions' messages sealed by one thread, each answered only once durable."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest

from relay.queue import committer as committer_module
from relay.queue.committer import STAGE_ON_LOOP_LIMIT, Committer
from relay.queue.spool import QueueEntry, Spool
from tests.queue.test_spool import files, outgoing


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")  # fsync on: the batching of the directory syncs is under test
    spool.setup()
    return spool


def test_concurrent_sessions_each_find_their_message_once(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sixty commits at once: each gets its own entries back, every body and envelope is in place, tmp/
    is empty, and the thread sealed them in fewer batches than there were commits."""
    seals: list[int] = []
    real_seal = Spool.seal

    def counted(self: Spool, batch: list) -> list:  # type: ignore[type-arg]
        seals.append(len(batch))
        return real_seal(self, batch)

    monkeypatch.setattr(Spool, "seal", counted)

    async def main() -> list[list[QueueEntry]]:
        committer = Committer(spool)
        return await asyncio.gather(*(committer.commit([outgoing(n)], client=f"127.0.0.{n + 1}") for n in range(60)))

    results = asyncio.run(main())

    ids = [entry.id for entries in results for entry in entries]
    assert 60 == len(set(ids))
    for n, entries in enumerate(results):
        assert (f"c{n}@example.com",) == entries[0].recipients
        assert f"127.0.0.{n + 1}" == entries[0].client
        assert f"Invoice {n}." in spool.read_body(entries[0].id).decode()
    assert sorted(f"{i}.json" for i in ids) == files(spool, "incoming")
    assert sorted(f"{i}.eml" for i in ids) == files(spool, "msg")
    assert [] == files(spool, "tmp")
    assert 60 == sum(seals)
    assert len(seals) < 60  # batched: the loop staged many while the thread sealed the first


def test_a_failed_commit_fails_its_client_only(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """In one batch, a commit whose file cannot be synced raises OSError for its session and leaves
    nothing behind (its files closed and removed); the others in the batch are durable and answered."""
    good, bad, other = (spool.stage([outgoing(n)]) for n in range(3))
    broken = bad.bodies[0].fd
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        if fd == broken:
            raise OSError(errno.EIO, "Input/output error")  # as a failing disk answers
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)

    errors = spool.seal([good, bad, other])
    good.close()
    other.close()
    assert (None, None) == (bad.bodies[0].fd, bad.envelopes[0].fd)

    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], OSError)
    assert sorted(f"{e.id}.json" for e in (*good.entries, *other.entries)) == files(spool, "incoming")
    assert sorted(f"{e.id}.eml" for e in (*good.entries, *other.entries)) == files(spool, "msg")
    assert [] == files(spool, "tmp")


def test_the_session_hears_the_disk_error(spool: Spool) -> None:
    """A commit the disk refuses raises in the session awaiting it (the listener answers 451), and
    leaves no body behind. (incoming/ replaced by a file: the rename fails even for root.)"""
    (spool.root / "incoming").rmdir()
    (spool.root / "incoming").write_bytes(b"")

    async def main() -> None:
        await Committer(spool).commit([outgoing(1)])

    with pytest.raises(NotADirectoryError):
        asyncio.run(main())
    assert ([], []) == (files(spool, "msg"), files(spool, "tmp"))


def test_a_big_message_is_staged_off_the_loop(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over ``STAGE_ON_LOOP_LIMIT`` the files are written in a worker thread, not on the event loop."""
    staged_in: list[str] = []
    real_stage = Spool.stage

    def where(self: Spool, *args: object, **kwargs: object) -> object:
        staged_in.append(threading.current_thread().name)
        return real_stage(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Spool, "stage", where)
    big = b"Subject: big\r\n\r\n" + b"x" * 76 + b"\r\n"
    big = big * (STAGE_ON_LOOP_LIMIT // len(big) + 2)

    async def main() -> tuple[list[QueueEntry], list[QueueEntry]]:
        committer = Committer(spool)
        return await committer.commit([outgoing(1)]), await committer.commit([outgoing(2, content=big)])

    _, large = asyncio.run(main())

    assert staged_in[0] == threading.main_thread().name
    assert staged_in[1] != threading.main_thread().name
    assert big == spool.read_body(large[0].id)
    assert committer_module.STAGE_ON_LOOP_LIMIT < len(big)
    assert 2 == len(files(spool, "incoming"))


def test_the_committing_thread_offers_delivered_files_for_reuse(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a seal the thread looks in free/ (``Spool.refill_free``): the commit after it is written into
    the files a delivery let go of, and reads back whole."""
    monkeypatch.setattr("relay.queue.spool.FREE_REFILL_INTERVAL", 0.0)

    async def main() -> list[QueueEntry]:
        # The first message is queued without the thread: its look into free/ after a seal of its own could
        # list free/ halfway through the finish below and offer the envelope alone (a race in this test only).
        [first] = spool.commit([outgoing(0)])
        committer = Committer(spool)
        spool.claim(first.id, source="incoming")
        inodes = {os.stat(spool._entry_file("active", first.id)).st_ino, spool.body_path(first.id).stat().st_ino}
        spool.finish(first, reuse_body=True)  # as the delivery process does
        [second] = await committer.commit([outgoing(1)])  # its seal is followed by a look into free/
        for _ in range(200):  # the thread looks after answering the commit: give it a moment
            if spool._reusable:
                break
            await asyncio.sleep(0.01)
        [third] = await committer.commit([outgoing(2)])
        assert inodes == {os.stat(spool._entry_file("incoming", third.id)).st_ino, spool.body_path(third.id).stat().st_ino}
        return [second, third]

    second, third = asyncio.run(main())

    assert outgoing(2).content == spool.read_body(third.id)
    assert third == spool.peek(third.id, "incoming")
    assert [] == files(spool, "free")
    assert sorted([f"{second.id}.eml", f"{third.id}.eml"]) == files(spool, "msg")


def test_the_committing_thread_never_preempts_the_event_loop(spool: Spool) -> None:
    """The committing thread runs as ``SCHED_BATCH`` (committer._yield_to_the_loop): its wake-ups leave the
    event loop's thread on its CPU, which holds the GIL the woken thread would wait for at once. The event
    loop's own thread keeps the normal policy."""

    async def main() -> None:
        committer = Committer(spool)
        await committer.commit([outgoing(0)])
        assert committer._thread is not None
        assert os.SCHED_BATCH == os.sched_getscheduler(committer._thread.native_id)  # type: ignore[arg-type]

    asyncio.run(main())
    assert os.SCHED_OTHER == os.sched_getscheduler(0)
