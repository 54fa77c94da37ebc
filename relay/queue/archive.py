"""Stage 7: an optional copy of each delivered message, as delivered, in a Maildir per user.

Mail an ERP sends by SMTP lands in no "Sent" folder (the Finnish seed: "archived nowhere"). With
``archive_days`` set (company-wide, or per user, the user's value winning as every other field),
each attempt that an upstream accepts leaves one copy in ``archive.dir/<user id>/new/``
(``archive.dir/_company/`` for mail sent with the company defaults), in the stdlib ``mailbox.Maildir``
format any mail client or Dovecot can open. The copy is the spooled body the provider received,
preceded by trace lines that the message itself does not carry: ``Return-Path`` (the envelope
sender), ``X-Relay-Queue-ID`` and one ``X-Relay-Delivered-To`` per recipient of that attempt (so Bcc
recipients are on record). A message delivered to its recipients in two attempts is archived twice,
each copy naming the recipients it went to. SMS entries are never archived: they are not mail and
may carry the gateway's password.

Archiving never fails or repeats a delivery: the copy is written after the provider's acceptance and
before the delivery is recorded (the record removes the spooled body), within ``STORE_TIMEOUT``; any
error or a timeout is logged (``archive_failed``) and the delivery is recorded as usual.

Retention: ``sweep`` removes copies older than the folder's ``archive_days`` (by the file's time, which
is the archiving time); the daemon runs it at start and every ``archive.sweep_interval`` seconds. A
folder whose archiving was turned off is left alone: relay deletes only under a retention someone
configured.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import mailbox
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import structlog

from relay.config.models import Config
from relay.config.types import ARCHIVE_FOLDER_RE
from relay.queue.spool import QueueEntry

log = structlog.get_logger("relay.archive")
T = TypeVar("T")
COMPANY_FOLDER = "_company"  # user ids start with a letter or digit (config/models.py), so none is named so
DAY = 86400.0
STALE_TMP = 36 * 3600.0  # the Maildir convention: a tmp/ file this old is an interrupted write
# A hung archive disk (a stale NFS mount) must not hold the delivery's record hostage: after this
# long the delivery is recorded anyway and the copy is logged as failed (the write may still finish).
STORE_TIMEOUT = 30.0
# The archive's own threads: a hung archive disk then blocks only these, never the shared default
# executor that the spool's commits and claims run in (so relay keeps accepting and delivering mail).
# While every one of them is stuck, further copies are skipped at once (and logged), not queued.
ARCHIVE_THREADS = 2
_executor = concurrent.futures.ThreadPoolExecutor(ARCHIVE_THREADS, thread_name_prefix="relay-archive")
_running = 0


def retention_days(config: Config, user: str | None) -> int:
    """Days a user's copies are kept; 0: that user's mail is not archived. The user's value wins."""
    own = config.users[user].archive_days if user is not None and user in config.users else None
    days = own if own is not None else config.company.archive_days
    return days or 0


def folder_for(user: str | None) -> str:
    return user if user is not None else COMPANY_FOLDER


# region #### storing a copy ####


def copies(config: Config, entry: QueueEntry) -> bool:
    """Whether a delivery of this entry is copied into the archive (its body is then read after the
    attempt, by a thread that may outlive a timed-out wait)."""
    return entry.kind != "sms" and bool(retention_days(config, entry.user))


async def store(config: Config, entry: QueueEntry, body: Path, delivered: list[str]) -> None:
    """Archive what one attempt delivered, if this user's mail is archived; never raises."""
    if not delivered or not copies(config, entry):
        return
    folder = folder_for(entry.user)
    if _running >= ARCHIVE_THREADS:  # earlier copies still hang on the archive disk: do not pile up
        log.error("archive_failed", queue_id=entry.id, user=entry.user, dir=str(config.archive.dir),
                  error="earlier copies are still being written (archive disk hung?): this one is skipped")  # fmt: skip
        return
    try:
        async with asyncio.timeout(STORE_TIMEOUT):
            key = await _in_archive_thread(_write, config.archive.dir, folder, entry, body, delivered)
    except Exception as exc:  # noqa: BLE001  (the delivery happened: an archive problem must not undo or repeat it)
        timed_out = isinstance(exc, TimeoutError)
        error = f"no answer within {STORE_TIMEOUT:g} s" if timed_out else f"{type(exc).__name__}: {exc}"
        log.error("archive_failed", queue_id=entry.id, user=entry.user, dir=str(config.archive.dir), error=error)
        return
    log.debug("archived", queue_id=entry.id, user=entry.user, folder=folder, key=key)


async def _in_archive_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in the archive's own threads, counting it as running until it really returns (a
    timed-out wait does not end the write)."""
    global _running
    _running += 1
    future = asyncio.get_running_loop().run_in_executor(_executor, fn, *args)

    def done(_: asyncio.Future[T]) -> None:
        global _running
        _running -= 1

    future.add_done_callback(done)
    return await asyncio.shield(future)


def _write(root: Path, folder: str, entry: QueueEntry, body: Path, delivered: list[str]) -> str:
    if not ARCHIVE_FOLDER_RE.fullmatch(folder) and folder != COMPANY_FOLDER:
        raise ValueError(f"user id {folder!r} cannot name an archive folder")  # the config refuses it first
    root.mkdir(parents=True, exist_ok=True, mode=0o700)  # archived mail is as private as queued mail
    box = mailbox.Maildir(root / folder, create=True)
    with open(body, "rb") as content:
        return box.add(_Traced(_trace(entry, delivered), content))


def _trace(entry: QueueEntry, delivered: list[str]) -> list[bytes]:
    """Envelope facts the headers may not show. The values came through SMTP commands (one line each);
    line breaks are still removed so that no value can start a header of its own."""
    lines = [f"Return-Path: <{entry.mail_from}>", f"X-Relay-Queue-ID: {entry.id}"]
    lines += [f"X-Relay-Delivered-To: {recipient}" for recipient in delivered]
    return [_one_line(line).encode("utf-8", "replace") + b"\n" for line in lines]


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


class _Traced:
    """The trace lines, then the message, read line by line: a 35 MB message is never held in memory.

    ``mailbox`` copies any object with ``read`` and ``readline`` this way, writing Maildir's LF line ends.
    """

    def __init__(self, trace: list[bytes], content: BinaryIO) -> None:
        self._trace = trace
        self._content = content

    def readline(self) -> bytes:
        return self._trace.pop(0) if self._trace else self._content.readline()

    def read(self, size: int = -1) -> bytes:
        head, self._trace = b"".join(self._trace), []
        return head + self._content.read(size)


# endregion

# region #### retention ####


def sweep(config: Config, *, now: float | None = None) -> int:
    """Remove copies older than their folder's retention; return how many. Blocking: use a thread."""
    root = config.archive.dir
    if not config.archiving or not root.is_dir():
        return 0
    now = time.time() if now is None else now
    removed = 0
    with os.scandir(root) as folders:
        for folder in folders:
            if not folder.is_dir(follow_symlinks=False):
                continue
            user = None if folder.name == COMPANY_FOLDER else folder.name
            days = retention_days(config, user)
            if days:
                removed += _expire(Path(folder.path), now - days * DAY, now - STALE_TMP)
    return removed


def _expire(maildir: Path, cutoff: float, stale_tmp: float) -> int:
    removed = 0
    for sub, older_than in (("new", cutoff), ("cur", cutoff), ("tmp", min(cutoff, stale_tmp))):
        try:
            found = list(os.scandir(maildir / sub))
        except FileNotFoundError:
            continue
        for item in found:
            if item.is_file(follow_symlinks=False) and item.stat(follow_symlinks=False).st_mtime < older_than:
                Path(item.path).unlink(missing_ok=True)
                removed += sub != "tmp"
    return removed


async def sweep_forever(current: Callable[[], Config]) -> None:
    """The daemon's retention task: sweep now, then every ``archive.sweep_interval`` (re-read at each
    round, so a reload applies). A failed sweep is logged and tried again next round."""
    while True:
        config = current()
        try:
            removed = await _in_archive_thread(sweep, config)
        except Exception as exc:  # noqa: BLE001  (disk trouble or a bug: retention must go on at the next round)
            log.error("archive_sweep_failed", dir=str(config.archive.dir), error=f"{type(exc).__name__}: {exc}")
        else:
            if removed:
                log.info("archive_swept", removed=removed, dir=str(config.archive.dir))
        await asyncio.sleep(config.archive.sweep_interval)


# endregion
