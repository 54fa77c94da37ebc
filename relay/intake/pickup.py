"""The drop directory's pickup: mail ``relay-sendmail`` left while relay could not be reached.

Postfix's ``pickup``, kept small (see ``relay/maildrop.py`` for the directory and the file format). The
intake (the process with the prepare pipeline and the spool commit) looks at the directory when it
starts and then every ``INTERVAL`` seconds, and takes each file, oldest first, through the listener's own
path (``RelayHandler.take``: identify, resolve, rewrite, the per-user rate, the durable commit, a
``received`` event with ``via: maildrop``). The submitting OS user is the file's owner, which the kernel
set when the user created it: the ``os_user`` rule matches it as it matches the owner of a local
socket. What the file's envelope says about its writer is only logged.

- Taken (250): the file is removed, and only then. A crash between the commit and the removal leaves
  the file, and the next start queues it again: the message may be delivered twice, never lost
  (Postfix's pickup has the same window).
- Refused for now (4xx: a sending rate reached, the spool's disk full, no upstream): the file stays and
  is tried again, later each time (``RETRY_MAX`` at most).
- Refused for good (5xx), or not a file relay-sendmail wrote (not JSON, cut short, a symlink, a
  directory, a file with more than one link, over the size limit): moved to ``bad/`` inside the drop
  directory (0700: relay's alone) with a ``maildrop_bad`` error event naming it and why; never deleted.
  A recipient the listener would have refused at RCPT is left out, with a ``maildrop_recipient_refused``
  error event; the message goes to the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from relay import maildrop, osuser
from relay.config.models import Config
from relay.envelope import OsUser, Submission
from relay.errors import RefusedError
from relay.intake.listener import (
    RelayHandler,
    check_graph_recipients,
    check_recipient,
    parse_rcpt,
    this_host,
    through_graph,
)
from relay.prepare.rewrite import split_recipients

log = structlog.get_logger("relay.pickup")
INTERVAL = 3.0  # seconds between two looks at the directory
RETRY_FIRST = 5.0  # seconds before a file refused for now is tried again; doubled each time up to RETRY_MAX
RETRY_MAX = 300.0
TMP_MAX_AGE = 24 * 3600.0  # a .tmp. file this old is a relay-sendmail that died while writing: removed
CLIENT = "maildrop"  # the submission's client (no address: the client_address rule matches nothing)


@dataclass
class _Waiting:
    at: float
    delay: float


class Pickup:
    """Takes the drop directory's files through ``handler`` (whose ``config`` a reload replaces)."""

    def __init__(self, handler: RelayHandler, *, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.handler = handler
        self.interval = interval
        self.clock = clock
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._waiting: dict[str, _Waiting] = {}  # refused for now: when to try again
        self._parts_taken: dict[str, int] = {}  # a file over limits.max_recipients: its parts already queued
        self._unmovable: set[str] = set()  # bad entries that could not be moved to bad/: said once
        self._missing_said = False

    @property
    def directory(self) -> Path:
        return self.handler.config.maildrop

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="maildrop-pickup")

    def stop(self) -> None:
        """No new file is begun; the one being taken is finished (see ``wait_stopped``)."""
        self._stop.set()

    async def wait_stopped(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.round()
            except Exception as exc:  # a bug here must not end the pickup for good
                log.error("maildrop_pickup_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            try:
                async with asyncio.timeout(self.interval):
                    await self._stop.wait()
            except TimeoutError:
                pass

    async def round(self) -> int:
        """Take what the directories hold now; how many files were queued."""
        taken, seen = 0, set()
        for directory in await asyncio.to_thread(self._directories):  # (stats: off the loop, as the listings)
            names = await self._names(directory, say_missing=directory == self.directory)
            seen.update(names)
            taken += await self._take_all(directory, names)
        self._waiting = {name: w for name, w in self._waiting.items() if name in seen}
        return taken

    def _directories(self) -> list[Path]:
        """The config's drop directory, and the package's too when this daemon owns it and uses another.

        relay-sendmail run by a user who cannot read relay.yaml (PHP as www-data) cannot know a
        ``spool_dir`` or ``maildrop_dir`` the admin set, so it leaves the mail in the package's
        /var/spool/relay/maildrop: a daemon that looked only in its own directory never sent it."""
        directories = [self.directory]
        packaged = maildrop.PACKAGED_MAILDROP
        try:
            info = packaged.stat()
            ours = stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
        except OSError:
            ours = False
        if ours and packaged != self.directory:
            directories.append(packaged)
        return directories

    async def _names(self, directory: Path, *, say_missing: bool) -> list[str]:
        try:
            names = sorted(await asyncio.to_thread(os.listdir, directory))
        except OSError as exc:
            if say_missing and not self._missing_said:
                log.warning("maildrop_unreadable", directory=str(directory), error=f"{type(exc).__name__}: {exc}")
                self._missing_said = True
            return []
        if say_missing:
            self._missing_said = False
        return names

    async def _take_all(self, directory: Path, names: list[str]) -> int:
        taken = 0
        now = self.clock()
        for name in names:
            if self._stop.is_set():
                break
            if name == maildrop.BAD or name in self._unmovable:
                continue
            if name.startswith(maildrop.TMP_PREFIX):
                await asyncio.to_thread(_remove_stale, directory / name)
                continue
            waiting = self._waiting.get(name)
            if waiting is not None and waiting.at > now:
                continue
            taken += await self._take(directory, name)
        return taken

    async def _take(self, directory: Path, name: str) -> int:
        config = self.handler.config  # one config for the whole file, even if a reload swaps it
        structlog.contextvars.clear_contextvars()
        try:
            drop, owner = await asyncio.to_thread(_read, directory / name, config.limits.max_message_size)
        except FileNotFoundError:
            return 0  # gone meanwhile
        except (maildrop.BadDrop, OSError) as exc:
            reason = str(exc) if isinstance(exc, maildrop.BadDrop) else f"cannot be read: {exc.strerror or exc}"
            await self._bad(directory, name, reason, None)
            return 0
        sub = Submission(mail_from=drop.sender, rcpt_tos=(), content=drop.message, client=CLIENT, listener=-1,
                         os_user=owner, server=config.hostname or this_host())  # fmt: skip
        recipients = self._recipients(config, sub, drop.recipients, name)
        if not recipients:
            await self._bad(directory, name, "no recipient left (each one refused)", owner)
            return 0
        dropped = {"via": "maildrop", "maildrop_file": name, "dropped_at": drop.time}
        # limits.max_recipients bounds one transaction, and an SMTP client over it sends the rest in another
        # (RFC 5321 4.5.3.1.10): so does pickup (refused whole, the file reached nobody). The parts taken
        # are remembered, so a 4xx for a later part does not queue the earlier ones again.
        limit = config.limits.max_recipients
        parts = [tuple(recipients[start:start + limit]) for start in range(0, len(recipients), limit)]
        reply, done = "", self._parts_taken.get(name, 0)
        while done < len(parts):
            reply = await self.handler.take(dataclasses.replace(sub, rcpt_tos=parts[done]), config, **dropped)
            if not reply.startswith("2"):
                break
            done += 1
            self._parts_taken[name] = done
        if reply.startswith("2"):
            await asyncio.to_thread(_remove, directory / name)
            self._waiting.pop(name, None)
            self._parts_taken.pop(name, None)
            return 1
        if reply.startswith("4"):
            previous = self._waiting.get(name)
            delay = min(previous.delay * 2, RETRY_MAX) if previous is not None else RETRY_FIRST
            self._waiting[name] = _Waiting(self.clock() + delay, delay)
            log.warning("maildrop_deferred", file=name, reply=reply, retry_in=delay,
                        **({"os_user": str(owner)} if owner else {}))  # fmt: skip
            return 0
        taken = self._parts_taken.pop(name, 0)
        queued = f" (its first {taken * limit} recipients were queued)" if taken else ""
        await self._bad(directory, name, f"refused: {reply}{queued}", owner)
        return 0

    def _recipients(self, config: Config, sub: Submission, given: tuple[str, ...], name: str) -> list[str]:
        """The envelope's recipients less those the listener would refuse at RCPT (each logged)."""
        graph = through_graph(config, dataclasses.replace(sub, content=b""))  # as at RCPT: before the message
        owner = sub.os_user
        kept: list[str] = []
        for typed in given:
            # as an RCPT TO reads it: a phone number typed with spaces or brackets is compacted (a drop file
            # keeps "040 123 4567@sms" as typed; checked as it was, its SMS was refused, after exit 0)
            rcpt = parse_rcpt(f"<{typed}>")[0] or typed
            try:
                members = check_recipient(rcpt, config)
                if graph:
                    check_graph_recipients(members)
            except RefusedError as exc:
                log.error("maildrop_recipient_refused", file=name, recipient=typed, reply=exc.reply,
                          **({"os_user": str(owner)} if owner else {}))  # fmt: skip
                continue
            kept.append(rcpt)
        return kept if sum(len(split_recipients([r])) for r in kept) else []

    async def _bad(self, directory: Path, name: str, reason: str, owner: OsUser | None) -> None:
        """Move ``name`` to ``bad/`` with an error event: a person decides (never deleted here)."""
        fields = {"os_user": str(owner)} if owner else {}
        try:
            await asyncio.to_thread(_move_to_bad, directory, name)
        except OSError as exc:
            self._unmovable.add(name)
            log.error("maildrop_bad", file=name, directory=str(directory), reason=reason, moved_to=None,
                      error=f"cannot be moved to {maildrop.BAD}/: {exc.strerror or exc}; left where it is",
                      **fields)  # fmt: skip
            return
        self._waiting.pop(name, None)
        log.error("maildrop_bad", file=name, directory=str(directory), reason=reason,
                  moved_to=str(directory / maildrop.BAD), **fields)  # fmt: skip


def _read(path: Path, size_limit: int) -> tuple[maildrop.Drop, OsUser | None]:
    """The file's drop and its owner. Never follows a symlink nor blocks on a FIFO; refuses anything
    but a regular file with one link (a hard link to another user's file would pass its owner off as
    the sender), and a file over the size limit (``BadDrop``)."""
    if not maildrop.is_drop_name(path.name):
        raise maildrop.BadDrop("not a file relay-sendmail wrote (its name)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise maildrop.BadDrop("a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise maildrop.BadDrop("not a regular file")
        if info.st_nlink != 1:
            raise maildrop.BadDrop(f"a file with {info.st_nlink} links (a hard link to another file?)")
        if info.st_size > size_limit + maildrop.HEADER_MAX:
            raise maildrop.BadDrop(f"{info.st_size} octets: over limits.max_message_size ({size_limit})")
        with os.fdopen(os.dup(fd), "rb") as stream:
            data = stream.read(size_limit + maildrop.HEADER_MAX + 1)
    finally:
        os.close(fd)
    drop = maildrop.decode(data)
    if len(drop.message) > size_limit:
        raise maildrop.BadDrop(f"the message is {len(drop.message)} octets: over limits.max_message_size ({size_limit})")
    return drop, osuser.named(info.st_uid)


def _remove(path: Path) -> None:
    """The file is queued: remove it, and sync the directory so that a power cut does not bring it back
    (which would queue it a second time)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    _sync(path.parent)


def _move_to_bad(directory: Path, name: str) -> None:
    bad = directory / maildrop.BAD
    bad.mkdir(mode=0o700, exist_ok=True)
    target = bad / name
    if target.exists() or target.is_symlink():  # a second "junk": the first one stays too
        target = bad / f"{name}.{maildrop.new_name()}"
    os.rename(directory / name, target)
    _sync(directory / maildrop.BAD)
    _sync(directory)


def _remove_stale(path: Path) -> None:
    try:
        if time.time() - os.lstat(path).st_mtime > TMP_MAX_AGE:
            os.unlink(path)
    except OSError:
        pass


def _sync(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
