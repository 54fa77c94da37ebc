"""The durable queue (``relay.spool.Spool``) on a real directory: commit, states, recovery, concurrency."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from relay.envelope import Outgoing
from relay.queue.spool import MAX_CRASHES, SCHEMA_VERSION, STATES, QueueEntry, Spool, StagedFile


def outgoing(n: int = 0, **fields: object) -> Outgoing:
    values: dict[str, object] = {
        "account": "o365", "mail_from": "laskutus@rakennus.fi", "recipients": (f"c{n}@example.com",),
        "content": f"Subject: Lasku {n}\r\n\r\nInvoice {n}.\r\n".encode(), "user": "matti",
    }  # fmt: skip
    values.update(fields)
    return Outgoing(**values)  # type: ignore[arg-type]


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.setup()
    return spool


def files(spool: Spool, name: str) -> list[str]:
    return sorted(os.listdir(spool.root / name))


class TestCommit:
    def test_body_and_envelope_with_every_field(self, spool: Spool) -> None:
        """A commit writes the body into msg/ and the envelope into incoming/, with every field set."""
        before = time.time()
        content = b"Subject: Lasku 1\r\n\r\nInvoice \xe4.\r\n"
        [entry] = spool.commit(
            [Outgoing("o365", "laskutus@rakennus.fi", ("a@example.com", "b@example.com"), content, user="matti",
                      kind="sms", notes=("copy_to added",))],
            client="192.0.2.23", identified_by="envelope_sender",
        )  # fmt: skip

        [listed] = list(spool.entries("incoming"))
        assert entry == listed
        assert content == spool.read_body(entry.id)
        assert "o365" == listed.account
        assert "laskutus@rakennus.fi" == listed.mail_from
        assert ("a@example.com", "b@example.com") == listed.recipients
        assert len(content) == listed.size
        assert before <= listed.received_at <= time.time()
        assert listed.received_at == listed.next_attempt_at
        assert "matti" == listed.user
        assert "sms" == listed.kind
        assert "192.0.2.23" == listed.client
        assert "envelope_sender" == listed.identified_by
        assert ("copy_to added",) == listed.notes
        assert ((), (), 0, 0, "") == (listed.delivered, listed.bounced, listed.attempts, listed.crashes,
                                      listed.last_reply)  # fmt: skip
        assert SCHEMA_VERSION == listed.version
        assert [] == files(spool, "tmp")
        assert ("incoming", entry) == spool.find(entry.id)

    def test_files_are_private(self, spool: Spool) -> None:
        """Queued mail is readable by the daemon's user only."""
        [entry] = spool.commit([outgoing()])

        assert 0o600 == spool.body_path(entry.id).stat().st_mode & 0o777
        assert 0o600 == (spool.root / "incoming" / f"{entry.id}.json").stat().st_mode & 0o777

    def test_ids_sort_by_arrival(self, spool: Spool) -> None:
        """Ids are unique and listing order is arrival order (FIFO by name)."""
        committed = [spool.commit([outgoing(n)])[0].id for n in range(5)]
        committed += [e.id for e in spool.commit([outgoing(n) for n in range(5, 10)])]

        assert committed == spool.ids("incoming")
        assert 10 == len(set(committed))
        assert [f"c{n}@example.com" for n in range(10)] == [e.recipients[0] for e in spool.entries("incoming")]

    def test_failed_commit_leaves_nothing(self, spool: Spool) -> None:
        """A commit that cannot write raises OSError and leaves no body, envelope or tmp file behind."""
        (spool.root / "tmp").rmdir()
        (spool.root / "tmp").write_bytes(b"")  # tmp is a file now: every write into it fails

        with pytest.raises(OSError):
            spool.commit([outgoing(1), outgoing(2)])

        assert [] == files(spool, "msg")
        assert [] == files(spool, "incoming")

    def test_failure_after_the_first_message_rolls_back_all(
        self, spool: Spool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """All or nothing: a failure while staging the second message removes the first one's files too."""
        real = Spool._open_tmp
        calls = []

        def flaky(self: Spool, name: str, data: bytes, final: str, *, in_place: bool = False) -> StagedFile:
            calls.append(name)
            if len(calls) == 3:
                raise OSError(28, "No space left on device")
            return real(self, name, data, final, in_place=in_place)

        monkeypatch.setattr(Spool, "_open_tmp", flaky)

        with pytest.raises(OSError):
            spool.commit([outgoing(1), outgoing(2)])

        assert 3 == len(calls)
        assert ([], [], []) == (files(spool, "tmp"), files(spool, "msg"), files(spool, "incoming"))

    def test_a_commit_whose_last_sync_fails_keeps_its_message_whole(
        self, spool: Spool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The envelope is renamed into incoming/ and then that directory's fsync fails: the client hears
        451, but the entry stays with its body (a resend is a duplicate, never a loss of the first)."""
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}").endswith("/incoming"):
                raise OSError(errno.EIO, "Input/output error")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        staged = spool.stage([outgoing(1)])

        [error] = spool.seal([staged])

        assert isinstance(error, OSError)
        [entry] = staged.entries
        assert [f"{entry.id}.json"] == files(spool, "incoming")
        assert outgoing(1).content == spool.read_body(entry.id)
        assert [] == files(spool, "tmp")

    def test_250_waits_for_every_sync_in_the_protocols_order(
        self, spool: Spool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two commits sealed together, their system calls recorded as made: the bodies are written in
        msg/ (no rename: until their envelope arrives they are what a crash leaves to ``recover``), the
        envelopes in tmp/; each file is synced, then the bodies' directory, then the envelopes are renamed
        into incoming/ and that directory is synced last, each directory once for the batch (through the
        descriptor it keeps open, the same directory at every commit). The seal closes nothing: the
        files are closed after it (``Staged.close``), outside the committing thread."""
        calls: list[tuple[str, str]] = []
        real_fsync, real_fdatasync, real_rename, real_close = os.fsync, os.fdatasync, os.rename, os.close

        def fsync(fd: int) -> None:
            calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def fdatasync(fd: int) -> None:  # a file's data (and its size): all that reading it back needs
            calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fdatasync(fd)

        def rename(src: str, dst: str) -> None:
            calls.append(("rename", str(dst)))
            real_rename(src, dst)

        def close(fd: int) -> None:
            calls.append(("close", ""))
            real_close(fd)

        spool.commit([outgoing(0)])  # the directories are opened once, here
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "close", close)
        staged = [spool.stage([outgoing(1)]), spool.stage([outgoing(2)])]
        assert [] == calls  # staging reuses nothing (free/ is empty): no rename, no sync
        assert [None, None] == spool.seal(staged)

        root = os.path.realpath(spool.root)  # as /proc names the descriptors' files
        bodies = [f"{root}/msg/{s.entries[0].id}.eml" for s in staged]
        envelopes = [f"{root}/incoming/{s.entries[0].id}.json" for s in staged]
        synced_files = sorted(path for op, path in calls[:4] if op == "fsync")
        assert 4 == len(synced_files)
        assert bodies == synced_files[:2] and all(path.startswith(f"{root}/tmp/") for path in synced_files[2:])
        assert [("fsync", f"{root}/msg")] == calls[4:5]
        assert [("rename", envelopes[0]), ("rename", envelopes[1]), ("fsync", f"{root}/incoming")] == calls[5:]
        for commit in staged:
            commit.close()
        assert 4 * [("close", "")] == calls[8:]

    def test_concurrent_commits_all_land_once(self, tmp_path: Path) -> None:
        """Eight threads committing at once (shared directory fsyncs) each find their message, exactly once."""
        spool = Spool(tmp_path / "spool")  # fsync on: the group commit is what is under test
        spool.setup()
        start = threading.Barrier(8)

        def worker(n: int) -> list[str]:
            start.wait(5)
            return [spool.commit([outgoing(n * 10 + i)])[0].id for i in range(5)]

        with ThreadPoolExecutor(8) as pool:
            results = [f.result(10) for f in [pool.submit(worker, n) for n in range(8)]]  # re-raises

        committed = sorted(queue_id for ids in results for queue_id in ids)
        assert 40 == len(committed) == len(set(committed))
        assert committed == spool.ids("incoming")
        assert sorted(f"{queue_id}.eml" for queue_id in committed) == files(spool, "msg")
        expected = sorted(f"c{n * 10 + i}@example.com" for n in range(8) for i in range(5))
        assert expected == sorted(e.recipients[0] for e in spool.entries("incoming"))


class TestStateChanges:
    def test_claim_moves_to_active(self, spool: Spool) -> None:
        """A claimed entry is in active/ and nowhere else."""
        [entry] = spool.commit([outgoing()])

        claimed = spool.claim(entry.id, source="incoming")

        assert entry == claimed
        assert [entry.id] == spool.ids("active")
        assert [] == spool.ids("incoming")

    def test_claim_of_a_vanished_entry_is_none(self, spool: Spool) -> None:
        """An entry an admin tool deleted (or another worker took) cannot be claimed, without an error."""
        [entry] = spool.commit([outgoing()])
        assert spool.delete(entry.id)

        assert spool.claim(entry.id, source="incoming") is None
        assert spool.claim("0000000000000ABCDEF", source="deferred") is None
        assert [] == files(spool, "msg")

    @pytest.mark.parametrize("state", ["deferred", "failed"])
    def test_update_writes_the_new_envelope_into_its_state(self, spool: Spool, state: str) -> None:
        """An update replaces the envelope atomically and moves it out of active/."""
        [entry] = spool.commit([outgoing()])
        spool.claim(entry.id, source="incoming")
        changed = replace(entry, attempts=1, last_reply="451 4.7.500 try later", next_attempt_at=entry.received_at + 60)

        spool.update(changed, state=state)  # type: ignore[arg-type]

        assert (state, changed) == spool.find(entry.id)
        assert [] == spool.ids("active")
        assert [] == files(spool, "tmp")
        assert spool.body_path(entry.id).exists()

    def test_finish_removes_envelope_and_body(self, spool: Spool) -> None:
        """A delivered entry leaves no file behind."""
        [entry] = spool.commit([outgoing()])
        spool.claim(entry.id, source="incoming")

        spool.finish(entry)

        assert spool.find(entry.id) is None
        assert all([] == files(spool, name) for name in ("msg", "tmp", *STATES))
        assert [f"{entry.id}.json"] == files(spool, "free")  # kept for reuse (TestReuse); no body by default

    def test_move_between_states(self, spool: Spool) -> None:
        """A move is a rename; moving an entry that is not there reports False."""
        [entry] = spool.commit([outgoing()])

        assert spool.move(entry.id, source="incoming", target="hold")
        assert not spool.move(entry.id, source="incoming", target="hold")
        assert "hold" == spool.find(entry.id)[0]  # type: ignore[index]


class TestReuse:
    """A delivered message's files are reused for the next ones (spool.py, "Reusing files")."""

    def delivered(self, spool: Spool, n: int = 0, *, reuse_body: bool = True) -> tuple[QueueEntry, int, int]:
        [entry] = spool.commit([outgoing(n)])
        spool.claim(entry.id, source="incoming")
        inodes = os.stat(spool._entry_file("active", entry.id)).st_ino, spool.body_path(entry.id).stat().st_ino
        spool.finish(entry, reuse_body=reuse_body)
        return entry, *inodes

    def test_the_next_message_is_written_into_the_files_of_a_delivered_one(self, spool: Spool) -> None:
        """Same inodes, new content, nothing of the old message left, free/ used up."""
        old, envelope_inode, body_inode = self.delivered(spool)
        assert sorted([f"{old.id}.json", f"{old.id}.eml"]) == files(spool, "free")
        spool.refill_free()

        content = b"Subject: second\r\n\r\nshort\r\n"  # shorter than the first: truncated, not overlaid
        [entry] = spool.commit([outgoing(1, content=content)])

        assert {envelope_inode, body_inode} == {
            os.stat(spool._entry_file("incoming", entry.id)).st_ino, spool.body_path(entry.id).stat().st_ino
        }
        assert content == spool.read_body(entry.id)
        assert entry == spool.peek(entry.id, "incoming")
        assert [] == files(spool, "free")
        assert [] == files(spool, "tmp")

    def test_a_longer_message_in_reused_files_is_whole(self, spool: Spool) -> None:
        """The reused files are overwritten in place, not emptied first: a longer message grows them."""
        _, _, body_inode = self.delivered(spool)
        spool.refill_free()

        content = b"Subject: long\r\n\r\n" + b"y" * 70_000 + b"\r\n"
        [entry] = spool.commit([outgoing(1, content=content)])

        assert body_inode in {os.stat(spool._entry_file("incoming", entry.id)).st_ino,
                              spool.body_path(entry.id).stat().st_ino}  # fmt: skip
        assert content == spool.read_body(entry.id)
        assert entry == spool.peek(entry.id, "incoming")

    def test_nothing_is_reused_before_refill_syncs_the_directories_it_left(self, spool: Spool) -> None:
        """Files renamed into free/ wait for ``refill_free`` (which syncs msg/ and active/ first)."""
        _, envelope_inode, body_inode = self.delivered(spool)

        [entry] = spool.commit([outgoing(1)])

        assert {envelope_inode, body_inode}.isdisjoint(
            {os.stat(spool._entry_file("incoming", entry.id)).st_ino, spool.body_path(entry.id).stat().st_ino}
        )
        assert 2 == len(files(spool, "free"))

    def test_a_body_still_read_is_unlinked_not_reused(self, spool: Spool) -> None:
        """``reuse_body=False`` (a big body, streamed or mapped; an archive copy): an open reader keeps
        the whole message, and only the envelope goes to free/."""
        [entry] = spool.commit([outgoing(content=b"Subject: big\r\n\r\n" + b"x" * 100_000)])
        spool.claim(entry.id, source="incoming")
        with open(spool.body_path(entry.id), "rb") as reader:
            spool.finish(entry, reuse_body=False)
            assert b"Subject: big\r\n\r\n" + b"x" * 100_000 == reader.read()
        assert [f"{entry.id}.json"] == files(spool, "free")
        assert [] == files(spool, "msg")

    def test_free_files_are_bounded(self, spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
        """Past FREE_SLOTS (no mail coming in to use them) delivered files are unlinked."""
        monkeypatch.setattr("relay.queue.spool.FREE_SLOTS", 4)
        monkeypatch.setattr("relay.queue.spool.FREE_CHECK_EVERY", 1)

        for n in range(10):
            self.delivered(spool, n)

        assert 4 <= len(files(spool, "free")) <= 4 + 1
        assert [] == files(spool, "msg")
        assert all([] == spool.ids(state) for state in STATES)

    def test_start_unlinks_free_names_without_touching_what_they_may_link(self, spool: Spool) -> None:
        """After a power cut a name in free/ may be a second link to a live message's file (its removal
        from free/ was not on disk yet): recovery unlinks every name there, so the message stays whole."""
        [entry] = spool.commit([outgoing()])
        os.link(spool.body_path(entry.id), spool.root / "free" / "0000000000001ABCDEF.eml")
        self.delivered(spool, 1)

        spool.recover()

        assert [] == files(spool, "free")
        assert outgoing().content == spool.read_body(entry.id)
        assert ("incoming", entry) == spool.find(entry.id)

    def test_a_missing_free_directory_falls_back_to_unlinking(self, spool: Spool) -> None:
        """A spool whose free/ was removed by hand still finishes entries, leaving nothing behind."""
        os.rmdir(spool.root / "free")

        entry, _, _ = self.delivered(spool)

        assert spool.find(entry.id) is None
        assert all([] == files(spool, name) for name in ("msg", "tmp", *STATES))

    def test_what_else_sits_in_free_is_not_written_into(self, spool: Spool) -> None:
        """A directory or a symbolic link a person put in free/ is skipped: a new file is made."""
        target = spool.root / "elsewhere"
        target.write_bytes(b"not a queue file")
        os.symlink(target, spool.root / "free" / "link")
        os.mkdir(spool.root / "free" / "dir")
        spool.refill_free()

        [entry] = spool.commit([outgoing()])

        assert b"not a queue file" == target.read_bytes()
        assert outgoing().content == spool.read_body(entry.id)
        assert entry == spool.peek(entry.id, "incoming")
        spool.recover()  # and the start that empties free/ leaves the directory alone, without failing
        assert ["dir"] == files(spool, "free")


class TestRecover:
    def test_active_goes_back_to_incoming_with_a_crash_counted(self, spool: Spool) -> None:
        """An entry in flight at a crash is retried, its crash counted."""
        [entry] = spool.commit([outgoing()])
        spool.claim(entry.id, source="incoming")

        counts = spool.recover()

        assert {"requeued": 1, "held": 0, "orphans": 0, "damaged": 0} == counts
        assert ("incoming", replace(entry, crashes=1)) == spool.find(entry.id)
        assert [] == spool.ids("active")

    def test_entry_that_crashed_too_often_is_held(self, spool: Spool) -> None:
        """The MAX_CRASHES-th crash with the same entry in flight puts it on hold, not back in the queue."""
        [entry] = spool.commit([outgoing()])
        spool.claim(entry.id, source="incoming")
        spool.update(replace(entry, crashes=MAX_CRASHES - 1), state="active")

        counts = spool.recover()

        assert {"requeued": 0, "held": 1, "orphans": 0, "damaged": 0} == counts
        assert [entry.id] == spool.recovered_held  # named in the spool_recovered log line
        found = spool.find(entry.id)
        assert found is not None and "hold" == found[0]
        assert replace(entry, crashes=MAX_CRASHES, last_reply=found[1].last_reply) == found[1]
        assert "relay stopped during 3 deliveries" in found[1].last_reply

    def test_tmp_files_and_orphan_bodies_removed_committed_bodies_kept(self, spool: Spool) -> None:
        """Leftovers of interrupted commits go; a body whose envelope is in any state stays."""
        kept = []
        for state in STATES:
            [entry] = spool.commit([outgoing()])
            if state != "incoming":
                assert spool.move(entry.id, source="incoming", target=state)
            kept.append(entry.id)
        (spool.root / "tmp" / "half-written.eml.1a2b3c4d").write_bytes(b"Subject: x\r\n")
        (spool.root / "msg" / "0000000000001ORPHAN.eml").write_bytes(b"Subject: never acknowledged\r\n")

        counts = spool.recover()

        assert 1 == counts["orphans"]
        assert [] == files(spool, "tmp")
        assert sorted(f"{queue_id}.eml" for queue_id in kept) == files(spool, "msg")

    def test_recover_creates_a_missing_tree(self, tmp_path: Path) -> None:
        """A fresh spool_dir is created on start."""
        spool = Spool(tmp_path / "new" / "spool")

        assert {"requeued": 0, "held": 0, "orphans": 0, "damaged": 0} == spool.recover()
        assert all((spool.root / name).is_dir() for name in ("tmp", "msg", *STATES))


class TestQueueEntryJson:
    def test_round_trip(self) -> None:
        """Every field survives JSON, tuples included."""
        entry = QueueEntry(
            id="0006123456789ABCDEF", account="user:matti", mail_from="matti@rakennus.fi",
            recipients=("a@example.com", "b@example.com"), size=1234, received_at=1700000000.5, user="matti",
            kind="sms", client="::1", identified_by="listener", delivered=("a@example.com",),
            bounced=(("b@example.com", "550 5.1.1 User unknown"),), attempts=2, crashes=1,
            next_attempt_at=1700000100.0, last_reply="451 4.7.500 later", notes=("signature added",),
        )  # fmt: skip

        assert entry == QueueEntry.from_json(entry.to_json())

    def test_unknown_future_fields_are_ignored(self) -> None:
        """An envelope written by a newer relay (extra keys, newer version) still loads."""
        data = {
            "id": "0006123456789ABCDEF", "account": "o365", "mail_from": "a@rakennus.fi",
            "recipients": ["c@example.com"], "size": 10, "received_at": 1.0, "version": SCHEMA_VERSION + 1,
            "priority": "high", "dsn": {"notify": ["failure"]},
        }  # fmt: skip

        entry = QueueEntry.from_json(json.dumps(data).encode())

        assert ("c@example.com",) == entry.recipients
        assert SCHEMA_VERSION + 1 == entry.version
        assert ((), (), ()) == (entry.delivered, entry.bounced, entry.notes)


def test_damaged_envelope_goes_to_hold_on_recovery_and_keeps_its_body(tmp_path: Path) -> None:
    """A queue file someone broke must not stop the daemon from starting, nor be deleted."""
    spool = Spool(tmp_path)
    spool.setup()
    [entry] = spool.commit([Outgoing("a", "a@b.fi", ("x@y.fi",), b"Subject: x\r\n\r\nbody\r\n")])
    (tmp_path / "incoming" / f"{entry.id}.json").write_text("{not json")

    counts = spool.recover()

    assert 1 == counts["damaged"]
    assert [entry.id] == spool.ids("hold")
    assert spool.body_path(entry.id).exists()
    assert [] == list(spool.entries("incoming"))


def test_a_crash_inside_an_update_leaves_one_entry_the_newer_one(tmp_path: Path) -> None:
    """``update`` renames the new record into its state, then removes the active/ copy; a kill between
    the two leaves both. Recovery keeps the newer (with its delivered recipients), so the message is
    neither claimed twice nor sent again to whom it already reached."""
    spool = Spool(tmp_path)
    spool.setup()
    [entry] = spool.commit([Outgoing("a", "a@b.fi", ("x@y.fi", "z@y.fi"), b"Subject: x\r\n\r\nbody\r\n")])
    spool.claim(entry.id, source="incoming")
    older = (tmp_path / "active" / f"{entry.id}.json").read_bytes()
    spool.update(replace(entry, attempts=1, delivered=("x@y.fi",)), state="deferred")
    (tmp_path / "active" / f"{entry.id}.json").write_bytes(older)  # the unlink never happened

    spool.recover()

    assert ([], [entry.id], []) == (spool.ids("active"), spool.ids("deferred"), spool.ids("incoming"))
    [kept] = list(spool.entries("deferred"))
    assert (("x@y.fi",), 0) == (kept.delivered, kept.crashes)


def test_ids_from_a_command_line_never_reach_outside_the_spool(tmp_path: Path) -> None:
    """``relay queue --delete ../../x`` must not delete ``x``: only relay's own ids are names."""
    spool = Spool(tmp_path / "spool")
    spool.setup()
    victim = tmp_path / "other" / "important.json"
    victim.parent.mkdir()
    victim.write_text("{}")

    assert False is spool.delete("../../other/important")
    assert None is spool.admin_move("../../other/important", {"incoming": "hold"})
    assert victim.exists()


def test_census_counts_and_dates_from_names_alone(spool: Spool) -> None:
    """Metrics read count and oldest arrival per state without opening a queue file; stray files
    (tmp names, a hand-copied envelope with another name) are not entries."""
    first, second = spool.commit([outgoing(1), outgoing(2)])
    (spool.root / "incoming" / "notes.json").write_text("{}")
    (spool.root / "incoming" / f"{second.id}.json.tmp").write_text("{}")

    count, oldest = spool.census("incoming")

    assert 2 == count == spool.count("incoming")
    assert oldest is not None and abs(first.received_at - oldest) < 1.0
    assert (0, None) == spool.census("deferred")
