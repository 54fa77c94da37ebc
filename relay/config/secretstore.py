"""The secret store: what users set with ``relay passwd`` and nobody else sees, not even in the YAML.

A directory (``secret_store:``, default ``/var/lib/relay/secrets``, mode 0700, owned by the daemon's
user, like the state directory it sits in) with at most two files per user, both 0600:

- ``<user>.password``: the password of the user's own upstream login (the seeds' "password the user
  enters and never shares"). Read at each delivery like any password file (credentials.read_password).
- ``<user>.login``: a salted scrypt hash of the user's *local* SMTP AUTH password (never the password):
  a program that can send a username proves who it sends for (identify rule ``auth``).

Files are replaced atomically (credentials.write_secret_file: temp file, fsync, rename, fsync the
directory), so the daemon reads the old password or the new one, never half of one. The file names are
the user ids, so only ids that are safe as file names (those an archive folder accepts) can have any.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from collections import OrderedDict
from pathlib import Path

from relay.config.credentials import write_secret_file
from relay.config.types import ARCHIVE_FOLDER_RE

PASSWORD_SUFFIX = ".password"
LOGIN_SUFFIX = ".login"

# scrypt as RFC 7914 recommends for interactive logins (N=2^14, r=8, p=1: 16 MiB, tens of milliseconds);
# the parameters are stored with each hash, so stronger ones can be chosen later without a migration.
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 2**14, 8, 1, 32


def safe_user_id(user_id: str) -> bool:
    """Can ``user_id`` name a file in the store (no ``/``, no leading dot, nothing else odd)?"""
    return bool(ARCHIVE_FOLDER_RE.fullmatch(user_id))


def password_path(store: Path, user_id: str) -> Path | None:
    """Where ``user_id``'s own upstream password lives; ``None`` for an id unusable as a file name."""
    return _path(store, user_id, PASSWORD_SUFFIX)


def login_path(store: Path, user_id: str) -> Path | None:
    """Where ``user_id``'s local-login hash lives; ``None`` for an id unusable as a file name."""
    return _path(store, user_id, LOGIN_SUFFIX)


def _path(store: Path, user_id: str, suffix: str) -> Path | None:
    return store / f"{user_id}{suffix}" if safe_user_id(user_id) else None


def ensure_store(store: Path) -> None:
    """Create the store (0700) if needed, owned like the directory it is in (the daemon's state
    directory): ``sudo relay passwd`` must not leave a root-owned store the daemon cannot read."""
    try:
        store.mkdir(mode=0o700)
    except FileExistsError:
        return
    parent = store.parent.stat()
    if (parent.st_uid, parent.st_gid) != (os.geteuid(), os.getegid()) and os.geteuid() == 0:
        os.chown(store, parent.st_uid, parent.st_gid)


def store_secret(path: Path, value: str) -> None:
    """Write one store file atomically, 0600, owned like the store (created if missing)."""
    ensure_store(path.parent)
    write_secret_file(path, value, new_owner_like=path.parent)


def hash_login(password: str) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64) for a local login password."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password.encode("utf-8"), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    encoded = [base64.b64encode(part).decode("ascii") for part in (salt, digest)]
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${encoded[0]}${encoded[1]}"


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=SCRYPT_LEN, maxmem=256 * 1024 * 1024)


def verify_login(store: Path, user_id: str, password: bytes) -> bool | None:
    """Does ``password`` match ``user_id``'s stored hash? ``None`` when the user has no local login.

    Blocking (a file read and tens of milliseconds of scrypt): the listener runs it in a thread. A
    damaged hash file answers ``False`` (refused), never "no login": that would let anyone in.
    """
    path = login_path(store, user_id)
    if path is None:
        return None
    try:
        stored = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest, validate=True)
        actual = _scrypt(password, base64.b64decode(salt, validate=True), int(n), int(r), int(p))
    except ValueError:  # a damaged file (wrong fields, bad base64, impossible parameters)
        return False
    return hmac.compare_digest(expected, actual)


class FailureThrottle:
    """Slows password guessing: each failed local login from a client waits ``delay`` seconds for each
    failure of that client in the last ``window`` seconds (capped at ``cap``) before its 535.

    Per client address, not per login, so one program cannot try many users quickly. A success does not
    clear the count (failures only age out of the window): on a terminal server every user connects
    from 127.0.0.1, and one user's good login must not reset another program's guessing. Only
    ``max_clients`` addresses are remembered (the oldest forgotten first), so a flood of addresses cannot
    grow it without bound. A delay, not a lock-out: a lock-out would let
    anyone on the network shut a real user out.
    """

    def __init__(self, *, delay: float = 1.0, cap: float = 10.0, window: float = 600.0, max_clients: int = 4096) -> None:
        self.delay, self.cap, self.window, self.max_clients = delay, cap, window, max_clients
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def failed(self, client: str) -> float:
        """Record a failure; return how long to wait before answering it."""
        now = time.monotonic()
        recent = [t for t in self._failures.pop(client, []) if now - t < self.window] + [now]
        self._failures[client] = recent
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)
        return min(self.delay * len(recent), self.cap)


__all__ = [
    "FailureThrottle", "ensure_store", "hash_login", "login_path", "password_path", "safe_user_id",
    "store_secret", "verify_login",
]  # fmt: skip
