"""Whose the spool is: the daemon's files belong to its own user, and a run as another user leaves files
the daemon cannot open.

The package runs relay as the ``relay`` user (``relay.service``: ``User=relay``; ``/var/lib/relay`` is
``relay:relay``). One ``relay serve`` started by hand as root leaves every message it deferred as
``-rw------- root`` in ``deferred/`` and ``msg/``; the next start as ``relay`` then fails on the first one
("Permission denied", exit 3), and under systemd again every 5 seconds, while ``relay check`` said OK.
So: ``relay serve`` as root refuses a spool that belongs to another user (``root_refusal``); a start that
fails on a spool file says how to give the files back (``permission_advice``); and ``relay check`` looks
at the entries, not only the directory (``unusable_files``), in a scan that stops at the first few.
Unlike the rest of ``relay.config`` this module looks at the filesystem.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

MAX_SHOWN = 3  # files named in a finding; the scan stops there
# What the daemon opens at start (queue/spool.py ``lock`` and ``recover``, the scheduler's ``start``): a
# file there it cannot read stops it. "" is the spool directory itself (its ``lock`` file). tmp/ and free/
# are not looked into: their files are only unlinked at start, which takes the directory alone.
READ_AT_START = frozenset({"", "state", "incoming", "active", "deferred"})
EMPTIED_AT_START = frozenset({"tmp", "free"})
# what relay itself makes at the spool's top: anything else there (an ext4 lost+found, an admin's notes)
# is none of the daemon's business, and was taken for a file a root run of relay serve had left
# (maildrop/ is left out too: other users' files are what it holds)
RELAYS_OWN = frozenset({"lock", "tmp", "free", "msg", "state", "drafts", "incoming", "active", "deferred", "hold",
                        "failed"})  # fmt: skip


@dataclass(frozen=True)
class Unusable:
    """A file or directory of the spool that the daemon's user cannot use."""

    name: str  # relative to the spool: deferred/6620F16DC747EA1FA56.json, or "." for the spool itself
    owner: str
    mode: int
    at_start: bool  # the daemon opens it when it starts, so it will not start

    def __str__(self) -> str:
        return f"{self.name} ({self.owner}, {stat.filemode(self.mode)})"


def user_name(uid: int) -> str:
    """The login name of ``uid``, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (what creating ``path`` depends on)."""
    while True:
        try:
            path.stat()
            return path
        except (FileNotFoundError, NotADirectoryError):
            if path.parent == path:
                return path
            path = path.parent


def owner_of(spool: Path) -> tuple[Path, int] | None:
    """The spool (or, before the first start, the directory it will be made in) and its owner's uid."""
    try:
        where = nearest_existing(spool)
        return where, where.stat().st_uid
    except OSError:
        return None


def run_as(uid: int) -> str:
    """The command prefix that runs a command as ``uid`` (``runuser`` needs a login name)."""
    name = user_name(uid)
    if name != str(uid):
        return f"runuser -u {name} --"
    return f"setpriv --reuid={uid} --regid={uid} --clear-groups --"


def root_refusal(spool: Path, config_path: str) -> str | None:
    """Why ``relay serve`` must not start as root on this spool, or ``None``.

    Why refuse rather than warn: every file a run as root writes there (each deferred message) stops the
    daemon's own user from starting later, and that happens hours later, under systemd, in a restart loop.
    A spool that is root's own (a test, a container run as root) is not refused."""
    found = owner_of(spool)
    if os.geteuid() != 0 or found is None or found[1] == 0:
        return None
    where, uid = found
    name = user_name(uid)
    what = f"the spool {spool}" if where == spool else f"{where} (where relay makes the spool {spool})"
    return (f"not starting as root: {what} belongs to {name}, and the files relay would leave there as root "
            f"stop it from starting as {name}. Start it as the service does: systemctl start relay; or by hand "
            f"as that user: {run_as(uid)} relay serve -c {os.path.abspath(config_path)}")  # fmt: skip


def permission_advice(exc: OSError, spool: Path, config_path: str) -> str:
    """What to do about a start that failed on a spool file this user may not open ("" for other errors):
    give the files back to this user, or run relay as the spool's owner if it is someone else's."""
    if not isinstance(exc, PermissionError) or not exc.filename or not _inside(str(exc.filename), spool):
        return ""
    found = owner_of(spool)
    me = os.geteuid()
    if found is not None and found[1] not in (0, me):
        uid = found[1]
        return (f" (the spool belongs to {user_name(uid)}: run relay as that user, as the service does: "
                f"systemctl start relay, or {run_as(uid)} relay serve -c {os.path.abspath(config_path)})")  # fmt: skip
    return (f" (a file in the spool belongs to another user, as a relay serve run as root leaves them: give "
            f"them back to relay's user: chown -R {user_name(me)}: {spool})")  # fmt: skip


def _inside(filename: str, spool: Path) -> bool:
    root = os.path.abspath(spool)
    return os.path.commonpath([os.path.abspath(filename), root]) == root


def daemon_uid(spool: Path) -> int | None:
    """The user whose access counts: the spool's owner, which the daemon runs as. ``None`` when this
    check cannot speak for it: a user who is not the owner (``relay check`` is run as the daemon's user,
    as the unit's ExecStartPre= does, or as root; the spool_dir warning covers anyone else), root's own
    spool, or no spool yet."""
    try:
        owner = spool.stat().st_uid
    except OSError:
        return None
    me = os.geteuid()
    return owner if owner != 0 and me in (0, owner) else None


def unusable_files(spool: Path, *, at_start: bool) -> tuple[int | None, list[Unusable]]:
    """The daemon's user (``daemon_uid``) and up to ``MAX_SHOWN`` files or directories of the spool it
    cannot use: those the daemon opens at start (``at_start``: it will not start), or the others (a
    message that cannot be sent or listed)."""
    uid = daemon_uid(spool)
    found: list[Unusable] = []
    if uid is None:
        return None, found
    groups = _groups(uid)
    for name, item in _items(spool):
        if _opened_at_start(name) == at_start and not _usable(item, uid, groups):
            found.append(Unusable(name, user_name(item.st_uid), item.st_mode, at_start))
            if len(found) >= MAX_SHOWN:
                break
    return uid, found


def _opened_at_start(name: str) -> bool:
    folder, _, rest = name.partition("/")
    return name == "." or not rest or folder in READ_AT_START


def _items(spool: Path) -> list[tuple[str, os.stat_result]]:
    """The spool, the files and directories in it and the files in those (one level, as relay writes
    them), with their status; gone or unlistable ones are passed over."""
    out: list[tuple[str, os.stat_result]] = []
    try:
        out.append((".", spool.stat()))
        top = sorted(os.scandir(spool), key=lambda item: item.name)
    except OSError:
        return out
    for entry in top:
        if entry.name not in RELAYS_OWN:
            continue
        try:
            out.append((entry.name, entry.stat(follow_symlinks=False)))
            if entry.is_dir(follow_symlinks=False) and entry.name not in EMPTIED_AT_START:
                out += [(f"{entry.name}/{inner.name}", inner.stat(follow_symlinks=False))
                        for inner in sorted(os.scandir(entry.path), key=lambda item: item.name)]  # fmt: skip
        except OSError:
            continue
    return out


def _usable(item: os.stat_result, uid: int, groups: frozenset[int]) -> bool:
    """Readable and writable by ``uid`` (and searchable, for a directory), by the mode bits as the
    kernel reads them for that user: the owner's, else the group's, else the others'."""
    wanted = 0o7 if stat.S_ISDIR(item.st_mode) else 0o6
    shift = 6 if item.st_uid == uid else 3 if item.st_gid in groups else 0
    return (item.st_mode >> shift) & wanted == wanted


def _groups(uid: int) -> frozenset[int]:
    """The groups ``uid`` runs with: this process's own, or as its login gets them."""
    if uid == os.geteuid():
        return frozenset({os.getegid(), *os.getgroups()})
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    return frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
