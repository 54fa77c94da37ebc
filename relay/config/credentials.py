"""Secrets (upstream passwords, the SMS service password), read only when they are needed.

A secret lives in a file only the daemon can read, an environment variable, or a systemd credential
(``LoadCredential=name:/path`` in the unit, read from ``$CREDENTIALS_DIRECTORY/name``). It is read at
each delivery, not at start, so a password the user (or admin) changes is used without a restart.
``Secret`` never shows its value in ``repr``/``str``, so it cannot leak through a log or traceback.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from relay.envelope import Account
from relay.errors import SecretError


class HasSecretSource(Protocol):
    """Anything that names where a password lives (``UpstreamConfig``, ``Account``, ``SmsConfig``)."""

    @property
    def password_file(self) -> Path | None: ...
    @property
    def password_env(self) -> str | None: ...
    @property
    def password_credential(self) -> str | None: ...


class Secret:
    """A password that refuses to be printed."""

    __slots__ = ("_value",)

    def __init__(self, value: str, /) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('...')"

    __str__ = __repr__


def fingerprint(secret: Secret | None) -> int:
    """Tells two secrets apart in this process without keeping either (a kept connection's login, a
    refused login's hold): a changed password file gives another fingerprint."""
    return hash(secret.reveal()) if secret is not None else 0


@dataclass(frozen=True)
class SecretRef:
    """A source named by other keys than ``password_*`` (an OAuth2 client secret, a refresh token), in
    the shape ``read_secret`` takes, so every secret is read, and fails, the same way."""

    password_file: Path | None = None
    password_env: str | None = None
    password_credential: str | None = None

    @property
    def given(self) -> bool:
        return bool(self.password_file or self.password_env or self.password_credential)


def write_secret_file(path: Path, value: str, *, new_owner_like: Path | None = None) -> None:
    """Replace a secret file atomically with mode 0600 (temp file, fsync, rename, fsync the directory).

    A crash leaves the old value or the new one, never half of one: used for refresh tokens that the
    provider rotates, where losing the new one would lock relay out of the mailbox, and for the
    passwords ``relay passwd`` stores. The new file keeps the old one's owner and group: ``sudo relay
    check --connect`` rotates the daemon's token too, and a root-owned 0600 file would lock the daemon
    out instead. A file that did not exist yet is owned like ``new_owner_like`` when given (the
    secret store's directory, which belongs to the daemon's user), else by whoever writes it.
    """
    try:
        owner: os.stat_result | None = path.stat()
    except FileNotFoundError:
        owner = new_owner_like.stat() if new_owner_like is not None else None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        if owner is not None and (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, owner.st_uid, owner.st_gid)  # EPERM (not root): not written, rather than unreadable
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(value + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


_SETTLED_NS = 2_000_000_000  # a file unchanged this long is remembered with its status (see ``_read_file``)

# path -> (the file's identity, size and times when read, its text): a file read again only when one changed
_READ: dict[str, tuple[tuple[int, int, int, int, int], str]] = {}


def _read_file(path: Path | str, what: str, *, missing_ok: bool = False) -> str | None:
    """The file's text without its final line end; ``None`` for a missing file when ``missing_ok``.

    Asked for at every delivery attempt, so that a changed password works at once. The file is read
    again only when its inode, size, mtime or ctime changed: one ``stat`` instead of open, read and
    close (under load that was a twentieth of the delivery process's time). Any write, rename over it or
    chmod changes the ctime; the text is remembered only once the file is older than ``_SETTLED_NS``,
    so a write within the same clock tick as the one before cannot hide behind an unchanged status
    (git's "racy" index check). Line ends are read as ``read_text`` reads them (universal newlines)."""
    name = os.fspath(path)
    known = _READ.pop(name, None)  # put back below only while it still holds: a failure forgets it
    try:
        status = os.stat(name)
        key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
        if known is not None and known[0] == key:
            _READ[name] = known
            return known[1]
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = b"".join(iter(lambda: os.read(fd, 1 << 16), b""))
        finally:
            os.close(fd)
        text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
    except FileNotFoundError:
        if missing_ok:
            return None
        raise SecretError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise SecretError(f"{what} {path} cannot be read by the relay daemon (user {os.geteuid()})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError(f"{what} {path} cannot be read: {type(exc).__name__}") from None
    if time.time_ns() - max(status.st_mtime_ns, status.st_ctime_ns) > _SETTLED_NS:
        _READ[name] = (key, text)
    return text


def read_secret(source: HasSecretSource, *, kind: str = "password") -> Secret | None:
    """The secret ``source`` names, or ``None`` when it names none; ``kind`` names it in errors.

    Raises:
        SecretError: the source is named but cannot be read (message names the source only).
    """
    value = _read_source(source, kind)
    return None if value is None else _cleaned(value, kind)


def _cleaned(value: str, kind: str) -> Secret:
    value = value.removeprefix("\ufeff")  # a BOM from a Windows editor is never part of a secret
    if kind != "password":  # client secrets and tokens hold no spaces: a pasted one often ends with some
        value = value.strip()
    return Secret(value)


def _read_source(source: HasSecretSource, kind: str) -> str | None:
    if source.password_file is not None:
        return _read_file(source.password_file, f"{kind} file")
    if source.password_env is not None:
        value = os.environ.get(source.password_env)
        if value is None:
            raise SecretError(f"environment variable {source.password_env} is not set")
        return value
    if source.password_credential is not None:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise SecretError(
                f"systemd credential {source.password_credential!r} named, but CREDENTIALS_DIRECTORY is not set "
                f"(systemd gives it to relay.service only, with LoadCredential={source.password_credential}:FILE "
                "in the unit)"
            )
        return _read_file(Path(directory) / source.password_credential, "systemd credential")
    return None


def read_password(account: Account) -> Secret | None:
    """The password an SMTP account logs in with, read now (at each delivery); ``None`` when it has none.

    A user's own login that names no password source of its own has a ``password_store`` file (set
    with ``relay passwd``): that file wins over a source inherited from the company's account, which
    is used only while the file does not exist. A source the user's own account names itself leaves
    ``password_store`` unset (accounts.py), so the admin's explicit choice always wins.

    Raises:
        SecretError: the source cannot be read, or the store file is missing and nothing else is named.
    """
    store = account.password_store
    if store is None:
        return read_secret(account)
    value = _read_file(store, "password file", missing_ok=True)
    if value is not None:
        return _cleaned(value, "password")
    fallback = read_secret(account)
    if fallback is None:
        user = account.own_user or account.name
        raise SecretError(f"no password stored for user {user}: {store} does not exist "
                          f"(set it with: relay passwd {user})")  # fmt: skip
    return fallback


def password_source(account: Account) -> str:
    """Where ``account``'s login secret comes from, in words for ``relay check`` (never the secret)."""
    if account.oauth2 is not None:
        oauth = account.oauth2
        if oauth.service_account_file is not None:
            return f"OAuth2 token (Google service account {oauth.service_account_file}, for {oauth.subject})"
        ref = (oauth.refresh_token_file or oauth.refresh_token_env or oauth.refresh_token_credential
               or oauth.client_secret_file or oauth.client_secret_env or oauth.client_secret_credential)  # fmt: skip
        what = "refresh token" if oauth.delegated else "client secret"
        if oauth.client_certificate_file is not None:
            app = f"certificate {oauth.client_certificate_file}"
            return f"OAuth2 token (refresh token from {ref}, app {app})" if oauth.delegated else f"OAuth2 token ({app})"
        return f"OAuth2 token ({what} from {ref})"
    named = _named_source(account)
    store = account.password_store
    if store is None:
        return named or "no password source"
    try:
        store.stat()
    except FileNotFoundError:
        if named:
            return f"{named}, inherited from the company's account ({store} not set)"
        return f"MISSING: {store} (set it with: relay passwd {account.own_user})"
    except OSError as exc:
        return f"secret store {store} (cannot look: {exc.strerror}; run as root or relay's user)"
    return f"secret store {store} (relay passwd)"


def _named_source(source: HasSecretSource) -> str | None:
    if source.password_file is not None:
        return f"password_file {source.password_file}"
    if source.password_env is not None:
        return f"password_env {source.password_env}"
    if source.password_credential is not None:
        return f"systemd credential {source.password_credential}"
    return None
