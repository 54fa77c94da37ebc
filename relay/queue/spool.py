"""Stage 4: the durable queue. The ONLY module that writes queue files.

Layout under ``spool_dir`` (Postfix's queue directories, Mailman's switchboard discipline)::

    tmp/       files being written; never read, emptied on start
    free/      files of delivered messages, for the intake to write its next ones into
    msg/       message bodies, ``<id>.eml``: raw RFC 5322 bytes, written once, never changed
    incoming/  ``<id>.json`` envelopes waiting for their first attempt
    active/    envelopes in a delivery attempt (claimed by one worker, only once a connection is free)
    deferred/  envelopes waiting for their next retry time
    hold/      envelopes an admin must look at (relay stopped during 3 of their attempts in a row)
    failed/    envelopes that bounced permanently, with the reason; the body is kept beside them
    drafts/    ``<id>.json``: a Microsoft Graph draft an attempt made for the entry (graph_large.py), so
               that after a crash the next attempt deletes it, or finds it was sent, before it tries again
    state/     the scheduler's small state files (``limits.json``, ``logins.json``) and ``reserve``
               (see "The reserve"); no queue entry is ever here, and nothing lists this directory

Commit protocol, so that "250" means "on disk": write the body into ``msg/`` and the envelope into
``tmp/`` (``stage``); fsync both, fsync ``msg/``, rename the envelope into ``incoming/``, fsync
``incoming/`` (``seal``, which takes many staged commits at once: see ``queue/committer.py``).
The envelope's arrival in a state directory is the commit: a body without an envelope is the
leftover of an interrupted commit (the client never got 250) and is removed on start.
A state change is a rename. An envelope update (attempts, remaining recipients) is written to
``tmp/`` and renamed over the old name, so a crash leaves either the old or the new envelope.

Reusing files: a delivered message's envelope and (small) body are not unlinked but renamed into
``free/`` (``finish``), and the intake takes them from there for the next message's files (``_reused_tmp``),
overwritten in place and cut to the new length only if that is shorter. Creating and deleting two files per message was the biggest kernel cost left: on
ext4 without a journal (this project's machines) a new inode is looked for past every inode deleted in
the last seconds (``recently_deleted``): 15% of the intake's CPU under the shared bench's load, and the
unlinks 11% of the delivery process's (``perf``). With reuse, relay spends 2.0-2.1 instead of
2.3-2.7 ms of CPU per 2 KB message (paired runs). Emptying the files (a truncate in ``finish``, then
``O_TRUNC``) freed their blocks only to allocate them again: on a filesystem mounted with ``discard``
each free is a synchronous discard request, and each allocation more metadata for the fsync to write
(``perf``: the truncate 5.6% of the delivery process, the open 4.5% of the intake). So a delivered
message's text waits in free/ (private to relay, as msg/ is) until its file is reused or relay
restarts. The files are synced with ``fdatasync``: their data and size, all a reader needs, without an
inode write for a new time stamp. Three rules keep reuse as safe as unlinking:

- a name in free/ is used only after the directories it left (``msg/``, ``active/``) were synced
  (``refill_free``, in the intake's committing thread), so a power cut cannot bring back an old name
  pointing at a file that now holds another message (the case the kernel's own delay guards against);
- free/ is emptied by unlinking at start (``recover``): a name there that a power cut left behind may
  be a second link to a live message, and an unlink only drops the name;
- a body is reused only when nothing may still read it: small bodies, read whole before the attempt, and
  never one an archive copy is made from (a timed-out copy may still be reading). Big bodies (streamed,
  or mapped by the Graph transport) are unlinked as before, so a reader's open file stays whole.

And should a power cut on a filesystem without a journal bring back a delivered entry (its removals not
yet on disk), its body comes back whole, as it was never reused (first rule), and is delivered once
more: the in-flight window every queue has. A body that is not the size its envelope recorded (disk
trouble) is held for a person (``QueueFileDamagedError``): a damaged copy is never sent.

The reserve: ``state/reserve``, ``RESERVE_SIZE`` bytes that mean nothing, made when the daemon opens the spool.
An attempt that delivered to some recipients must record that before anything else, or a restart sends
to them again; but that record is a new file, and a full filesystem refuses it (Postfix marks a recipient
done by overwriting a byte of its queue file in place; relay's JSON envelope cannot be). So when such a
write fails for want of space, the scheduler removes the reserve and writes once more
(``release_reserve``), and makes the reserve again once the filesystem has room for it twice over
(``make_reserve``). The listener stops taking mail long before that (``free_space``, at MAIL): the space
the reserve frees is the delivery side's alone, however full the disk was made by something else.

Every function here blocks on disk I/O. Those that fsync (``commit``, ``update``, ``move``, the drafts
and state files) or read a big body go through ``asyncio.to_thread``; a rename, an unlink or the read
of a small file (``claim``, ``peek``, ``finish``, a body up to the scheduler's ``INLINE_BODY_LIMIT``)
is made on the event loop: from the page cache each takes microseconds, while the trip to a worker
thread and back cost the delivery process some 150 futex calls per message, the GIL passing between
the loop and the worker at every system call (measured with ``strace -c -f`` under the shared
bench's load: 150 per message before, under 1 after).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import functools
import itertools
import json
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from relay.envelope import Content, Joined, Outgoing
from relay.errors import SpoolBusyError

SCHEMA_VERSION = 1
MAX_CRASHES = 3
MAX_HEADER_BLOCK = 256 * 1024  # the listener refuses bigger header blocks: more is not headers
State = Literal["incoming", "active", "deferred", "hold", "failed"]
STATES: tuple[State, ...] = ("incoming", "active", "deferred", "hold", "failed")


@dataclass(frozen=True)
class QueueEntry:
    """A queued message's envelope and delivery history (the JSON file)."""

    id: str
    account: str
    mail_from: str
    recipients: tuple[str, ...]
    size: int
    received_at: float
    user: str | None = None
    kind: str = "mail"
    client: str = ""
    identified_by: str = ""
    delivered: tuple[str, ...] = ()
    bounced: tuple[tuple[str, str], ...] = ()
    attempts: int = 0
    crashes: int = 0
    next_attempt_at: float = 0.0
    last_reply: str = ""
    eightbit: bool = True  # has 8-bit bytes: MAIL FROM says BODY=8BITMIME
    notes: tuple[str, ...] = field(default=())
    notices: tuple[str, ...] = ()  # notices sent about this entry: "failed <notice id>", "delayed <id>"
    waiting_for: str = ""  # deferred for "retry" (a failure) or "limit" (the account's sending limits)
    version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        return self._json

    @functools.cached_property
    def _json(self) -> bytes:
        """Made once per entry (it is frozen): the intake writes it to the envelope file and then to the
        delivery process's pipe."""
        # the fields one level deep (what asdict gives for these plain values, without its deep copy)
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> QueueEntry:
        data: dict[str, Any] = json.loads(raw)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("recipients", "delivered", "notes", "notices"):
            known[key] = tuple(known.get(key, ()))
        known["bounced"] = tuple(tuple(pair) for pair in known.get("bounced", ()))
        return cls(**known)


_QUEUE_ID = re.compile(r"[0-9A-F]{13,32}")


def valid_queue_id(queue_id: str) -> bool:
    """Only names relay makes: an id from a command line never becomes a path outside the spool."""
    return _QUEUE_ID.fullmatch(queue_id) is not None


def arrival_time(queue_id: str) -> float:
    """When an entry arrived, read from its id (see ``new_queue_id``)."""
    return int(queue_id[:13], 16) / 1e6


def new_queue_id() -> str:
    """Sortable by arrival (microseconds, hex) and unique (random suffix): FIFO by name."""
    return f"{time.time_ns() // 1000:013X}{secrets.token_hex(3).upper()}"


class _DirSync:
    """Group commit for one directory: concurrent callers share a single ``fsync`` of it.

    A caller's rename is durable once an fsync of the directory has *started* after the rename.
    If one is already running, the caller waits for the next; whoever finds none running does it
    for everyone waiting. Under load from many sessions this turns N directory fsyncs into a few.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._started = 0
        self._done = 0
        self._running = False
        self._fd: int | None = None  # the directory, opened at the first sync and kept open

    def sync(self) -> None:
        with self._cond:
            target = self._started + 1
            while self._done < target:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                generation = self._started
                self._cond.release()
                try:
                    self._fsync()
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self._done = generation

    def _fsync(self) -> None:
        """fsync through a descriptor kept open for the spool's life: opening and closing the directory
        for each sync were two more system calls per commit batch, and each one a pass of the GIL between
        the committing thread and the event loop (``strace -c -f`` under the shared bench's load: 29 ->
        24 futex calls per message in the intake). Called by one thread at a time (``_running``)."""
        if self._fd is None:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            weakref.finalize(self, os.close, fd)
            self._fd = fd
        os.fsync(self._fd)


FREE_SLOTS = 512  # at most about this many delivered files wait in free/ (more are unlinked)
FREE_CHECK_EVERY = 64  # finishes between two counts of free/
FREE_REFILL_INTERVAL = 0.02  # seconds between two listings of free/ by the intake

_TMP_COUNTER = itertools.count()  # with the pid, a name unique in tmp/ (and no random bytes to ask the kernel for)

RESERVE = "reserve"  # in state/: space held back for the delivery side's records (see "The reserve")
# an envelope update is a new file until its rename frees the old one: room for hundreds at once
RESERVE_SIZE = 1024 * 1024


def free_space(path: str | Path) -> int:
    """Bytes a process that is not root may still write on ``path``'s filesystem (``f_bavail``: the
    blocks ext4 keeps for root do not count, as relay runs as its own user)."""
    found = os.statvfs(path)
    return found.f_bavail * found.f_frsize


def out_of_space(exc: OSError) -> bool:
    """Whether a write failed for want of space: the filesystem is full (``ENOSPC``) or the relay user's
    quota is (``EDQUOT``); either way, removing a file of ours makes room."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass
class StagedFile:
    """A file written, still open for its fsync, and where it goes once synced: ``tmp`` is where it was
    written (in ``tmp/``; a body is written in its final place, ``final`` itself: see ``Spool.stage``)."""

    fd: int | None
    tmp: str  # strings, not ``Path``: pathlib was 6% of the intake's Python time when it built these
    final: str


@dataclass
class Staged:
    """One commit's files written but not yet durable (``Spool.stage``), until ``Spool.seal``."""

    entries: list[QueueEntry] = field(default_factory=list)
    bodies: list[StagedFile] = field(default_factory=list)
    envelopes: list[StagedFile] = field(default_factory=list)

    def sync(self, fsync: bool) -> None:
        """fdatasync every file: its data and what reading it needs (the size), not the times. The files
        stay open (``close``): the committing thread makes no more system calls than it must (each one a
        pass of the GIL between it and the event loop; see committer.py)."""
        if fsync:
            for file in (*self.bodies, *self.envelopes):
                if file.fd is not None:
                    os.fdatasync(file.fd)

    def close(self) -> None:
        for file in (*self.bodies, *self.envelopes):
            if file.fd is not None:
                fd, file.fd = file.fd, None
                try:
                    os.close(fd)
                except OSError:  # the descriptor is released all the same (Linux); what was synced stays synced
                    pass

    def commit_envelopes(self) -> None:
        """Rename the envelopes into place: the commit (the bodies were written where they stay)."""
        for file in self.envelopes:
            os.rename(file.tmp, file.final)

    def discard(self) -> None:
        """Undo a commit that failed: the client hears 451, so nothing of it may stay. An envelope
        already renamed into place stays, with its body (the message is delivered; a resend by the
        client is a duplicate, never a loss)."""
        self.close()
        committed = [os.path.exists(envelope.final) for envelope in self.envelopes]
        for envelope, done in zip(self.envelopes, committed, strict=True):
            if not done:
                _unlink(envelope.tmp)
        for index, body in enumerate(self.bodies):  # (written in place: ``tmp`` is ``final``)
            if index >= len(committed) or not committed[index]:
                _unlink(body.final)


def _read_file(path: str) -> bytes:
    """A whole file, in as few system calls as it takes (``Path.read_bytes`` makes seven: it builds a
    buffered file object, asks whether the file is a terminal, seeks and stats)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = [os.read(fd, 1 << 16)]
        while chunk := os.read(fd, 1 << 20 if len(chunks[-1]) == 1 << 16 else 1 << 16):
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove(path: str, keep_as: str | None) -> None:
    """Take ``path`` out of the queue: renamed to ``keep_as`` (in free/) if given and possible, else unlinked."""
    if keep_as is not None:
        try:
            os.rename(path, keep_as)
            return
        except OSError:  # the file is gone already, or free/ is (the unlink below then decides)
            pass
    _unlink(path)


class Spool:
    """A queue directory tree. Safe for one daemon plus admin tools working by rename."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._syncers = {name: _DirSync(self.root / name) for name in ("msg", "drafts", *STATES)}
        self._roots = {name: f"{self.root / name}{os.sep}" for name in ("tmp", "msg", *STATES)}
        self._lock_fd: int | None = None
        self.recovered_held: list[str] = []  # the ids the last ``recover`` put on hold (its log line names them)
        self._free = f"{self.root / 'free'}{os.sep}"
        self._reusable: collections.deque[str] = collections.deque()  # free/ names safe to take (refill_free)
        self._refilled_at = -FREE_REFILL_INTERVAL
        self._finished = 0
        self._free_full = False

    # region #### low-level safe writes ####

    def lock(self) -> None:
        """Take the spool for this process (held until it exits), or raise ``SpoolBusyError``.

        Only the daemon locks: admin tools work by rename and may run beside it. A second daemon on
        the same spool would recover (requeue) entries the first one is delivering.
        """
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusyError(f"another relay process is using the spool {self.root}") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def setup(self) -> None:
        """Create the directories (mode 0700: queued mail is private)."""
        for name in ("tmp", "free", "msg", "state", "drafts", *STATES):
            (self.root / name).mkdir(parents=True, exist_ok=True, mode=0o700)

    def _dir(self, state: State) -> Path:
        return self.root / state

    def _sync_dir(self, path: Path) -> None:
        if self.fsync:
            self._syncers[path.name].sync()

    def _write_tmp(self, name: str, data: Content) -> str:
        """A file in ``tmp/`` with ``data``, synced and closed, for the caller to rename into place."""
        file = self._open_tmp(name, data, "")
        staged = Staged(envelopes=[file])
        try:
            staged.sync(self.fsync)
            staged.close()
        except BaseException:
            staged.discard()
            raise
        return file.tmp

    def _open_tmp(self, name: str, data: Content, final: str, *, in_place: bool = False) -> StagedFile:
        """``data`` written into a file of free/ or a new one, in ``tmp/``; ``in_place``: at ``final``."""
        fd, tmp = self._reused_tmp(name, final if in_place else None)
        old_size = -1 if fd is None else os.fstat(fd).st_size
        if fd is None:
            tmp = final if in_place else self._tmp_name(name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            written = 0
            for piece in data.pieces if isinstance(data, Joined) else (data,):
                view = memoryview(piece)
                written += len(view)
                while view:
                    view = view[os.write(fd, view) :]
            if written < old_size:  # the old message's tail (a size set, even unchanged, costs fdatasync an inode write)
                os.ftruncate(fd, written)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        return StagedFile(fd, tmp, final)

    def _tmp_name(self, name: str) -> str:
        return f"{self._roots['tmp']}{name}.{os.getpid()}.{next(_TMP_COUNTER)}"

    def _reused_tmp(self, name: str, place: str | None = None) -> tuple[int | None, str]:
        """A file from free/ renamed into ``tmp/`` (or to ``place``) and opened; no fd when none is ready."""
        while self._reusable:
            try:
                free = self._reusable.popleft()
            except IndexError:  # taken meanwhile by another thread of this process
                break
            tmp = place or self._tmp_name(name)
            try:
                os.rename(self._free + free, tmp)
            except FileNotFoundError:  # gone meanwhile (removed by hand)
                continue
            try:
                # O_NOFOLLOW, O_NONBLOCK: whatever else a person may have put in free/ is refused, never waited on.
                # No O_TRUNC: the new content overwrites the old in place and ``_open_tmp`` cuts what is left
                # (see "Reusing files": freeing the blocks only to allocate them again was most of the cost)
                return os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK), tmp
            except OSError:
                _unlink(tmp)
        return None, ""

    def refill_free(self) -> None:
        """Offer what free/ holds for reuse by this process, once the directories its files left are
        synced (see "Reusing files" above). Called by the intake's committing thread after a seal; it
        looks again only when the last offer is used up, and at most every ``FREE_REFILL_INTERVAL``."""
        now = time.monotonic()
        if self._reusable or now - self._refilled_at < FREE_REFILL_INTERVAL:
            return
        self._refilled_at = now
        try:
            with os.scandir(self._free) as found:  # regular files only: what else a person put there stays
                names = [item.name for item in found if item.is_file(follow_symlinks=False)]
        except FileNotFoundError:
            return
        if names:
            self._sync_dir(self.root / "msg")  # synced after the listing: every listed rename is in it
            self._sync_dir(self._dir("active"))
            self._reusable.extend(names)

    def state_path(self, name: str) -> Path:
        """Where a small state file lives (``state/limits.json``): in a directory of its own, because a
        file renamed into the spool root would change the root's time stamp, which is ``nudge``'s signal."""
        return self.root / "state" / name

    def write_state(self, name: str, data: bytes) -> None:
        """Replace a small state file atomically: old or new, never half."""
        path = self.state_path(name)
        path.parent.mkdir(exist_ok=True, mode=0o700)
        tmp = self._write_tmp(name, data)
        try:
            os.rename(tmp, path)
        except OSError:
            _unlink(tmp)
            raise

    def make_reserve(self) -> bool:
        """Hold ``RESERVE_SIZE`` bytes back in ``state/reserve`` (see "The reserve"), unless they are held
        already or the filesystem has less than twice that free: taking the last of a full disk would
        only make the next record fail. Returns whether the reserve is there now.

        The bytes are random, not zeros: a compressing filesystem (btrfs, ZFS) stores zeros in no space,
        and removing them would then free none.
        """
        path = self.state_path(RESERVE)
        try:
            if os.stat(path).st_size >= RESERVE_SIZE:
                return True
        except FileNotFoundError:
            pass
        if free_space(self.root) < 2 * RESERVE_SIZE:
            return False
        try:
            self.write_state(RESERVE, os.urandom(RESERVE_SIZE))
        except OSError as exc:  # filled meanwhile: tried again later
            if out_of_space(exc):
                return False
            raise
        return True

    def release_reserve(self) -> bool:
        """Give the reserve's space back to the filesystem, for a record a full disk refused; returns
        whether there was a reserve to give."""
        try:
            os.unlink(self.state_path(RESERVE))
        except FileNotFoundError:
            return False
        return True

    def read_state(self, name: str) -> bytes | None:
        try:
            return self.state_path(name).read_bytes()
        except FileNotFoundError:
            return None

    def write_draft(self, queue_id: str, data: bytes) -> None:
        """Record what an attempt is doing with a Graph draft, durably (fsynced file and directory) before
        the step it announces: a crash after it leaves a record the next attempt acts on."""
        path = self.root / "drafts" / f"{queue_id}.json"
        path.parent.mkdir(exist_ok=True, mode=0o700)
        os.rename(self._write_tmp(queue_id + ".draft", data), path)
        self._sync_dir(path.parent)

    def read_draft(self, queue_id: str) -> bytes | None:
        try:
            return (self.root / "drafts" / f"{queue_id}.json").read_bytes()
        except FileNotFoundError:
            return None

    def clear_draft(self, queue_id: str) -> None:
        """The draft is gone (sent or deleted): nothing is left to clean up after a crash."""
        (self.root / "drafts" / f"{queue_id}.json").unlink(missing_ok=True)

    # endregion

    # region #### the commit: only after this returns may the client hear 250 ####

    def commit(self, messages: list[Outgoing], *, client: str = "", identified_by: str = "") -> list[QueueEntry]:
        """Store every message durably; return their entries (all or nothing is promised to the client)."""
        staged = self.stage(messages, client=client, identified_by=identified_by)
        error = self.seal([staged])[0]
        if error is not None:
            raise error
        staged.close()
        return staged.entries

    def stage(self, messages: list[Outgoing], *, client: str = "", identified_by: str = "") -> Staged:
        """Write the messages' files, not yet synced: the first half of ``commit``. An envelope is
        written into ``tmp/``; a body straight into ``msg/``, where until its envelope arrives it is what
        ``recover`` removes after a crash (a body without an envelope), so it needs no rename of its own.

        Nothing here waits for the disk, so the intake makes it on its event loop for a small message
        (``queue/committer.py``) and leaves only ``seal`` to its committing thread.
        """
        now = time.time()
        staged = Staged()
        try:
            for out in messages:
                entry = QueueEntry(
                    id=new_queue_id(), account=out.account, mail_from=out.mail_from, recipients=out.recipients,
                    size=len(out.content), received_at=now, user=out.user, kind=out.kind, client=client,
                    identified_by=identified_by, notes=out.notes, next_attempt_at=now, eightbit=not out.content.isascii(),
                )  # fmt: skip
                staged.entries.append(entry)
                body, envelope = self._body_file(entry.id), self._entry_file("incoming", entry.id)
                staged.bodies.append(self._open_tmp(entry.id + ".eml", out.content, body, in_place=True))
                staged.envelopes.append(self._open_tmp(entry.id + ".json", entry.to_json(), envelope))
        except BaseException:
            staged.discard()
            raise
        return staged

    def seal(self, batch: list[Staged]) -> list[OSError | None]:
        """Make staged commits durable together, the second half of ``commit``: each file's fsync, then
        ``msg/`` synced once (the bodies' names), then the envelopes renamed into ``incoming/`` (the
        commit) and that directory synced once. One error per staged commit (``None``: durable, the
        client may hear 250); a failed one leaves nothing behind. The files of a sealed commit stay
        open for the caller to ``close``."""
        errors: list[OSError | None] = []
        for staged in batch:
            try:
                staged.sync(self.fsync)
                errors.append(None)
            except OSError as exc:
                errors.append(exc)
        live = [staged for staged, error in zip(batch, errors, strict=True) if error is None]
        try:
            self._sync_dir(self.root / "msg")
            for staged in live:
                staged.commit_envelopes()
            self._sync_dir(self._dir("incoming"))
        except OSError as exc:
            errors = [exc if error is None else error for error in errors]
        for staged, error in zip(batch, errors, strict=True):
            if error is not None:
                staged.discard()
        return errors

    # endregion

    # region #### state changes ####

    def body_path(self, queue_id: str) -> Path:
        return self.root / "msg" / f"{queue_id}.eml"

    def _body_file(self, queue_id: str) -> str:
        """``body_path`` as a string, for the hot path (see ``_entry_file``)."""
        return f"{self._roots['msg']}{queue_id}.eml"

    def _entry_file(self, state: State, queue_id: str) -> str:
        """An envelope's path as a string: the delivery path names a few files per message, and
        building them with ``pathlib`` was a tenth of the delivery process's time (py-spy)."""
        return f"{self._roots[state]}{queue_id}.json"

    def read_body(self, queue_id: str) -> bytes:
        return _read_file(self._body_file(queue_id))

    def find(self, queue_id: str) -> tuple[State, QueueEntry] | None:
        if not valid_queue_id(queue_id):
            return None
        for state in STATES:
            entry = self.peek(queue_id, state)
            if entry is not None:
                return state, entry
        return None

    def peek(self, queue_id: str, state: State) -> QueueEntry | None:
        """Read an entry where it is, without claiming it; ``None`` if it is not there. A damaged
        envelope raises ``ValueError`` or ``TypeError``."""
        try:
            return QueueEntry.from_json(_read_file(self._entry_file(state, queue_id)))
        except FileNotFoundError:
            return None

    def claim(self, queue_id: str, *, source: State, known: QueueEntry | None = None) -> QueueEntry | None:
        """Move an entry to ``active/`` for one worker; ``None`` if someone else moved it first. ``known``:
        the envelope as the intake wrote it, never attempted since (its first claim), so it is not read
        again: nothing but an attempt rewrites an envelope, and admin tools move files without changing them."""
        target = self._entry_file("active", queue_id)
        try:
            os.rename(self._entry_file(source, queue_id), target)
        except FileNotFoundError:
            return None
        return known if known is not None else QueueEntry.from_json(_read_file(target))

    def update(self, entry: QueueEntry, *, state: State, source: State = "active") -> QueueEntry:
        """Write ``entry`` into ``state`` and remove it from ``source`` (atomic per file)."""
        tmp = self._write_tmp(entry.id + ".json", entry.to_json())
        try:
            os.rename(tmp, self._dir(state) / f"{entry.id}.json")
        except OSError:  # (a full disk refuses a directory a new block): no copy left in tmp/ to fill it more
            _unlink(tmp)
            raise
        if source != state:
            (self._dir(source) / f"{entry.id}.json").unlink(missing_ok=True)
        self._sync_dir(self._dir(state))
        return entry

    def move(self, queue_id: str, *, source: State, target: State) -> bool:
        try:
            os.rename(self._dir(source) / f"{queue_id}.json", self._dir(target) / f"{queue_id}.json")
        except FileNotFoundError:
            return False
        self._sync_dir(self._dir(target))
        return True

    def finish(self, entry: QueueEntry, *, source: State = "active", reuse_body: bool = False) -> None:
        """Delivery is complete: the envelope goes first, so a crash leaves an orphan body, not a resend.

        Both files go to free/ for reuse when there is room (the body only if ``reuse_body``: the caller
        knows nothing reads it any more), else they are unlinked. Neither is emptied here: the intake
        overwrites them (see "Reusing files").
        No directory fsync here (Postfix does none on delete either): if a crash undoes the removal, the
        message is delivered once more, the documented in-flight window; nothing can be lost by it.
        """
        room = source == "active" and self._free_room()
        _remove(self._entry_file(source, entry.id), f"{self._free}{entry.id}.json" if room else None)
        body = self._body_file(entry.id)
        _remove(body, f"{self._free}{entry.id}.eml" if room and reuse_body else None)

    def _free_room(self) -> bool:
        """Whether free/ takes more files: counted every ``FREE_CHECK_EVERY`` finishes, as the intake
        empties it at its own pace (and not at all while no mail comes in)."""
        if self._finished % FREE_CHECK_EVERY == 0:
            try:
                self._free_full = len(os.listdir(self._free)) >= FREE_SLOTS
            except FileNotFoundError:
                self._free_full = True
        self._finished += 1
        return not self._free_full

    def delete(self, queue_id: str) -> bool:
        """Remove a waiting, held or failed entry. Never one in active/: the daemon is delivering it.

        The unlink is the decision: if the daemon claimed the entry a moment ago, it fails, and
        nothing is deleted (no test-then-act race with the daemon).
        """
        if not valid_queue_id(queue_id):
            return False
        for state in STATES:
            if state == "active":
                continue
            try:
                (self._dir(state) / f"{queue_id}.json").unlink()
            except FileNotFoundError:
                continue
            self.body_path(queue_id).unlink(missing_ok=True)
            return True
        return False

    def admin_move(self, queue_id: str, targets: dict[State, State]) -> tuple[State, State] | None:
        """Move an entry for an admin tool (``{source: target}``), by rename only, so it is safe while
        the daemon runs: the daemon picks up incoming/ within seconds. Returns the move done, if any."""
        if not valid_queue_id(queue_id):
            return None
        for source, target in targets.items():
            if self.move(queue_id, source=source, target=target):
                return source, target
        return None

    # endregion

    # region #### waking the daemon (admin tools) ####

    def nudge(self) -> None:
        """Tell a running daemon to look at incoming/ now: an admin tool just moved entries there.

        The signal is the spool directory's own modification time, which nothing else changes while
        relay runs (queue files live in the state directories below it). The daemon checks it every
        second (``nudged_at``); no pid file, no signal, and nothing to clean up.
        """
        os.utime(self.root)

    def nudged_at(self) -> int:
        """The spool directory's modification time in nanoseconds (see ``nudge``); 0 if it cannot be
        read, which only leaves the daemon to its 10-second rescan."""
        try:
            return os.stat(self.root).st_mtime_ns
        except OSError:
            return 0

    # endregion

    # region #### listing and recovery ####

    def ids(self, state: State) -> list[str]:
        """Entry ids in arrival order; anything not ``*.json`` (a tmp file) is ignored."""
        try:
            names = os.listdir(self._dir(state))
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json"))

    def matching(self, given: str) -> list[str]:
        """The ids of every state that ``given`` names: the id itself or its start, in any case (an admin
        types a prefix, as with postqueue). Several when a prefix is ambiguous; none for anything that is
        not hex digits, so a name from a command line never becomes a path."""
        wanted = given.strip().upper()
        if not wanted or not all(c in "0123456789ABCDEF" for c in wanted):
            return []
        if valid_queue_id(wanted) and any((self._dir(state) / f"{wanted}.json").exists() for state in STATES):
            return [wanted]  # a whole id: no listing needed
        return sorted({queue_id for state in STATES for queue_id in self.ids(state) if queue_id.startswith(wanted)})

    def count(self, state: State) -> int:
        """How many entries ``state`` holds (names only, no file opened)."""
        return self.census(state)[0]

    def census(self, state: State) -> tuple[int, float | None]:
        """How many entries ``state`` holds and when the oldest arrived, from the names alone (an id
        starts with its arrival time): no file opened, nothing sorted, cheap enough for every scrape."""
        count, oldest = 0, None
        try:
            with os.scandir(self._dir(state)) as found:
                for item in found:
                    queue_id = item.name[:-5]
                    if item.name.endswith(".json") and valid_queue_id(queue_id):
                        count += 1
                        oldest = min(oldest or queue_id, queue_id)
        except FileNotFoundError:
            pass
        return count, arrival_time(oldest) if oldest else None

    def read_headers(self, queue_id: str, *, limit: int = MAX_HEADER_BLOCK) -> bytes:
        """The header block of a queued message (up to its blank line, at most ``limit`` bytes)."""
        with open(self.body_path(queue_id), "rb") as body:
            head = body.read(limit)
        ends = [i for i in (head.find(b"\r\n\r\n"), head.find(b"\n\n")) if i >= 0]
        return head[: min(ends)] if ends else head

    def _read(self, state: State, queue_id: str) -> QueueEntry | None | Exception:
        """The entry; ``None`` if it moved away meanwhile; the error if its envelope is damaged."""
        try:
            return self.peek(queue_id, state)
        except (ValueError, TypeError) as exc:
            return exc

    def entries(self, state: State) -> Iterator[QueueEntry]:
        """The readable entries of one state; a damaged envelope is skipped (``damaged`` names them)."""
        for queue_id in self.ids(state):
            entry = self._read(state, queue_id)
            if isinstance(entry, QueueEntry):
                yield entry

    def damaged(self, state: State) -> list[str]:
        """Ids in ``state`` whose envelope cannot be read (edited by hand, disk trouble)."""
        return [queue_id for queue_id in self.ids(state) if isinstance(self._read(state, queue_id), Exception)]

    def recover(self) -> dict[str, int]:
        """Start-up repair: active -> incoming (crash counted, on hold at 3); drop tmp and orphan bodies.

        Only an attempt puts an entry in active/ (an entry waiting for a connection or a sending limit
        waits in incoming/ or deferred/), and every recorded attempt sets ``crashes`` back to 0: so the
        count is of attempts in a row that the process did not survive.

        Damaged envelopes anywhere but hold/ are moved to hold/ as they are, for a person to look at.
        """
        self.setup()
        counts = {"requeued": 0, "held": 0, "orphans": 0, "damaged": 0}
        self.recovered_held = []
        for state in ("incoming", "active", "deferred"):
            for queue_id in self.damaged(state):
                counts["damaged"] += self.move(queue_id, source=state, target="hold")
        for entry in list(self.entries("active")):
            if any((self._dir(state) / f"{entry.id}.json").exists() for state in STATES if state != "active"):
                # a crash between ``update``'s rename and its unlink: the other copy is the newer record
                (self._dir("active") / f"{entry.id}.json").unlink(missing_ok=True)
                counts["stale"] = counts.get("stale", 0) + 1
                continue
            crashed = replace(entry, crashes=entry.crashes + 1)
            target: State = "hold" if crashed.crashes >= MAX_CRASHES else "incoming"
            if target == "hold":
                crashed = replace(crashed, last_reply=(
                    f"held: relay stopped during {crashed.crashes} deliveries of this message in a row "
                    "(crash or kill); look at it, then relay queue --retry or --delete"
                ))  # fmt: skip
            self.update(crashed, state=target)
            counts["held" if target == "hold" else "requeued"] += 1
            if target == "hold":
                self.recovered_held.append(entry.id)
        for folder in ("tmp", "free"):  # free/: a name a power cut left may link a live file (see above)
            with os.scandir(self.root / folder) as found:
                for item in found:
                    if not item.is_dir(follow_symlinks=False):
                        _unlink(item.path)
        known = {queue_id for state in STATES for queue_id in self.ids(state)}
        for name in os.listdir(self.root / "msg"):
            if name.endswith(".eml") and name[:-4] not in known:
                (self.root / "msg" / name).unlink(missing_ok=True)
                counts["orphans"] += 1
        return counts
