"""The drop directory: where ``relay-sendmail`` leaves mail while relay cannot be reached.

Postfix's sendmail never depends on its daemon: it writes the message into the ``maildrop`` queue
(through the setgid ``postdrop``) and ``pickup`` takes it when Postfix runs. relay does the same, kept
small: when ``relay-sendmail`` cannot reach relay's listener at all (nothing listening, a timeout, the
connection lost before relay answered the message), it writes the message with its envelope into this
directory and exits 0. The daemon's intake takes each file at start and every few seconds
(``relay/intake/pickup.py``), submits it as an SMTP submission is, and only then removes it.

Where (``Config.maildrop``): ``maildrop_dir`` if set; else ``<spool_dir>/maildrop``, except for the
default spool ``/var/lib/relay/spool``: the package makes ``/var/lib/relay`` 0750 relay:relay, so no
other user could reach a directory inside it, and users outside the relay group cannot read
``/etc/relay/relay.yaml`` either (0640) to learn another place. So the packaged layout's drop directory
is the fixed ``/var/spool/relay/maildrop``, made by the package's postinst, and it is what
``relay-sendmail`` uses when it cannot read the config.

Mode 3733 (``setup``): sticky, setgid, ``rwx-wx-wx``. Anyone may create a file in it, nobody but its
owner (relay) may list it, and the sticky bit lets nobody rename or remove another user's file (as in
``/tmp`` or ``/var/spool/cron/crontabs``). A world-writable drop adds no trust: any local user can
already submit to relay over localhost SMTP, and the pickup identifies the submitting OS user by the
file's owner, which the kernel sets and a user cannot forge (the ``os_user`` rule), as the listener
asks the kernel who owns a socket. Postfix closes the directory to a setgid ``postdrop`` group instead;
relay has no setgid helper to install. The setgid bit gives each new file the directory's group
(relay's), so the writer makes its file 0640: relay reads it through its group, other users cannot
even open it (without the setgid bit, e.g. where the service may not set it, a file is 0644 under a
name of 128 random bits in a directory nobody else can list).

File format: one JSON line (the envelope: ``sender``, ``recipients``, the writer's ``uid`` and
``user``, ``time``, ``size``), then the message's raw bytes (CRLF line ends), ``size`` of them.
Written atomically: a ``.tmp.`` file in the directory, fsynced, renamed to its final name; then the
directory is fsynced where the writer may open it (its owner, root: others cannot read a 3733
directory, the same limit Postfix's postdrop has with its 1730 maildrop).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_SPOOL = Path("/var/lib/relay/spool")  # relay.config.types.DEFAULT_SPOOL (imported there, not here: no pydantic)
PACKAGED_MAILDROP = Path("/var/spool/relay/maildrop")
MODE = 0o3733  # setgid + sticky, rwx for relay, wx for everyone else
FALLBACK_MODE = 0o1733  # where setting the setgid bit is refused (systemd's RestrictSUIDSGID=)
BAD = "bad"  # maildrop/bad/: files the pickup could not take (unreadable, refused), kept for a person
TMP_PREFIX = ".tmp."
HEADER_MAX = 1 << 20  # octets of the envelope line: a list of addresses, never more than this
VERSION = 1
_NAME = re.compile(r"[0-9a-f]{16}\.[0-9a-f]{32}")


def directory_for(spool_dir: Path, maildrop_dir: Path | None) -> Path:
    """The drop directory a config names (see the module's text); ``relay-sendmail`` and the daemon
    both decide it here."""
    if maildrop_dir is not None:
        return Path(maildrop_dir)
    if Path(spool_dir) == DEFAULT_SPOOL:
        return PACKAGED_MAILDROP
    return Path(spool_dir) / "maildrop"


def new_name() -> str:
    """Sortable by time (nanoseconds, hex), unguessable (128 random bits): nobody can open another
    user's file by guessing its name."""
    return f"{time.time_ns():016x}.{secrets.token_hex(16)}"


def is_drop_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


class BadDrop(ValueError):
    """A drop file that is not one relay-sendmail wrote: why, in words."""


@dataclass(frozen=True)
class Drop:
    """A drop file's envelope and message."""

    sender: str
    recipients: tuple[str, ...]
    message: bytes
    uid: int | None = None  # who the writer said it was (the file's owner is what counts)
    user: str | None = None
    time: float = 0.0


def encode(drop: Drop) -> bytes:
    header = {"version": VERSION, "sender": drop.sender, "recipients": list(drop.recipients), "uid": drop.uid,
              "user": drop.user, "time": drop.time, "size": len(drop.message)}  # fmt: skip
    return json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode() + b"\n" + drop.message


def decode(data: bytes) -> Drop:
    """The inverse of ``encode``; ``BadDrop`` saying what is wrong."""
    line, newline, message = data.partition(b"\n")
    if not newline or len(line) > HEADER_MAX:
        raise BadDrop("no envelope line (not a file relay-sendmail wrote)")
    try:
        header: Any = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise BadDrop("the envelope line is not JSON") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        raise BadDrop(f"unknown format (version {header.get('version') if isinstance(header, dict) else None!r})")
    sender, recipients, size = header.get("sender"), header.get("recipients"), header.get("size")
    if not isinstance(sender, str) or "\n" in sender or "\r" in sender:
        raise BadDrop("the envelope has no sender")
    if not isinstance(recipients, list) or not recipients or not all(
        isinstance(r, str) and r and "\n" not in r and "\r" not in r for r in recipients
    ):
        raise BadDrop("the envelope has no list of recipients")
    if not isinstance(size, int) or size != len(message):
        raise BadDrop(f"the message is {len(message)} octets, the envelope says {size!r} (cut short?)")
    uid, user, when = header.get("uid"), header.get("user"), header.get("time")
    return Drop(sender, tuple(recipients), message, uid=uid if isinstance(uid, int) else None,
                user=user if isinstance(user, str) else None,
                time=float(when) if isinstance(when, (int, float)) else 0.0)  # fmt: skip


def write(directory: Path, drop: Drop) -> Path:
    """Leave ``drop`` in ``directory`` atomically; ``OSError`` if it cannot be (nothing is left then)."""
    name = new_name()
    tmp, final = directory / f"{TMP_PREFIX}{name}", directory / name
    setgid = bool(os.stat(directory).st_mode & stat.S_ISGID)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(encode(drop))
            while view:
                view = view[os.write(fd, view) :]
            # the daemon's user reads it: through the directory's group (setgid), else as anyone may
            os.fchmod(fd, 0o640 if setgid else 0o644)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:  # 3733: only its owner (and root) may open it for reading; the file itself is synced
        return final
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def setup(directory: Path) -> bool:
    """Make the drop directory (and ``bad/`` in it, 0700) with ``MODE`` (``FALLBACK_MODE`` where the
    setgid bit is refused); whether every other user can reach it (each parent searchable by others).
    ``OSError`` if it cannot be made or is not relay's."""
    directory.mkdir(parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.geteuid():
        raise PermissionError(f"{directory} belongs to uid {info.st_uid}, not to relay's user (uid {os.geteuid()})")
    if stat.S_IMODE(info.st_mode) != MODE:
        try:
            os.chmod(directory, MODE)
        except PermissionError:
            os.chmod(directory, FALLBACK_MODE)
    (directory / BAD).mkdir(mode=0o700, exist_ok=True)
    return all(os.stat(parent).st_mode & stat.S_IXOTH for parent in directory.parents)
