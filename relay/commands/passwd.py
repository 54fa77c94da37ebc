"""``relay passwd USER``: a user sets their own mail password (or local login), and nobody else sees it.

The seeds' "password the user enters and never shares": it goes to the secret store (secretstore.py),
not into the YAML the admin edits. Asked twice without echo on a terminal (getpass); read as one line
from stdin otherwise, for scripts (``printf '%s\\n' "$pw" | relay passwd alice``). The daemon reads it at
the next delivery: no restart, no reload.

- ``relay passwd USER``: the password of the user's own upstream login (``users.USER.upstream`` with a
  ``username``, password AUTH, and no password source of its own in the YAML).
- ``relay passwd USER --login``: a local SMTP AUTH password (stored as a scrypt hash) that identifies
  the user when a program logs in to relay as USER (identify rule ``auth``).
- ``--delete``: remove either.

Exit codes: 0 done, 1 the password was refused (empty, or the two differ) or there was nothing to
delete, 67 (EX_NOUSER) unknown user, 78 (EX_CONFIG) the user's account takes no stored password, or
the store cannot be written.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import TextIO

from relay.commands.sendtest import EX_CONFIG, EX_NOUSER
from relay.config.accounts import account_for
from relay.config.models import Config, UpstreamOverride
from relay.config.secretstore import hash_login, login_path, password_path, store_secret
from relay.envelope import USER_ACCOUNT_PREFIX
from relay.errors import ConfigError


class Refused(Exception):
    """The command cannot do what was asked; ``code`` is the exit code, the message says why."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def upstream_password_path(config: Config, user_id: str) -> Path:
    """Where ``user_id``'s own upstream password goes, or ``Refused`` saying why it would not be used."""
    user = config.users[user_id]
    if not isinstance(user.upstream, UpstreamOverride):
        shared = user.upstream or config.company.upstream or "the company's"
        upstream = config.upstreams.get(shared)
        if upstream is not None and (upstream.auth == "oauth2" or upstream.type == "graph"):  # no password at all
            raise Refused(f"user {user_id} sends through the shared account {shared!r}, which signs in with OAuth2 "
                          f"(an app's secret, not a password): there is no password to set; to have {user_id} "
                          f"sign in as their own mailbox, give users.{user_id}.upstream its own username and "
                          f"oauth2 block, then run relay oauth login {user_id}", EX_CONFIG)  # fmt: skip
        raise Refused(f"user {user_id} sends through the shared account {shared!r}, whose password is the admin's "
                      f"(its password_file): to give {user_id} an own login, set users.{user_id}.upstream.username "
                      "in the config, then run this again", EX_CONFIG)  # fmt: skip
    try:
        account = account_for(config, USER_ACCOUNT_PREFIX + user_id)
    except (ConfigError, ValueError) as exc:
        raise Refused(f"user {user_id}'s own account does not resolve: {exc}", EX_CONFIG) from None
    if account.oauth2 is not None or account.transport != "smtp":
        raise Refused(f"user {user_id}'s account logs in with OAuth2 ({account.label}): there is no password "
                      "to set", EX_CONFIG)  # fmt: skip
    if user.upstream.username is None:
        raise _no_own_username(user_id, account.username)
    if account.password_store is None:
        named = user.upstream.password_file or user.upstream.password_env or user.upstream.password_credential
        if named is not None:
            raise Refused(f"users.{user_id}.upstream names its own password source ({named}), which wins over "
                          f"a stored one: remove it from the config to let {user_id} set their own", EX_CONFIG)
        raise _unusable_id(user_id)
    return account.password_store


def read_new_password(stdin: TextIO, prompt: str) -> str:
    """Twice without echo on a terminal; one line from a pipe. Refuses an empty password or a mismatch."""
    if stdin.isatty():
        first = getpass.getpass(prompt)
        if getpass.getpass("Again: ") != first:
            raise Refused("the two passwords differ: nothing was changed", 1)
    else:
        first = stdin.readline().rstrip("\r\n")
    if not first:
        raise Refused("an empty password: nothing was changed", 1)
    return first


def run(config: Config, user_id: str, *, login: bool = False, delete: bool = False, stdin: TextIO = sys.stdin) -> int:
    """The command itself; prints one line to stdout on success, to stderr otherwise."""
    try:
        path = _target(config, user_id, login=login)
        if delete:
            return _delete(path, user_id)
        what = "local login password" if login else f"mail password ({_login_name(config, user_id)})"
        value = read_new_password(stdin, f"New {what} for {user_id}: ")
        store_secret(path, hash_login(value) if login else value)
    except Refused as exc:
        print(f"relay passwd: {exc}", file=sys.stderr)
        return exc.code
    except OSError as exc:
        state = config.secret_store.parent
        if isinstance(exc, FileNotFoundError) and not state.exists():  # before relay's first start
            print(f"relay passwd: {state} does not exist yet (relay.service makes it at its first start): run "
                  f"systemctl start relay, or make it: install -d -m 0750 -o relay -g relay {state}",
                  file=sys.stderr)  # fmt: skip
            return EX_CONFIG
        print(f"relay passwd: cannot write {exc.filename or config.secret_store}: {exc.strerror} "
              "(run as root or as relay's user)", file=sys.stderr)  # fmt: skip
        return EX_CONFIG
    print(f"relay passwd: {'local login' if login else 'password'} of {user_id} stored in {path}; "
          + ("a program logging in as this user is identified by it" if login else
             f"used from the next delivery, no restart needed (try: relay send-test {user_id})"))  # fmt: skip
    if login and "auth" not in config.identify.order:
        print("relay passwd: note: identify.order has no 'auth': the login is checked but does not identify the "
              "user", file=sys.stderr)  # fmt: skip
    return 0


def _target(config: Config, user_id: str, *, login: bool) -> Path:
    if user_id not in config.users:
        known = ", ".join(sorted(config.users)) or "none"
        raise Refused(f"no user {user_id!r} in the config (users: {known})", EX_NOUSER)
    if not login:
        return upstream_password_path(config, user_id)
    path = login_path(config.secret_store, user_id)
    if path is None:
        raise _unusable_id(user_id)
    return path


def _no_own_username(user_id: str, inherited: str | None) -> Refused:
    """A user section without its own ``username`` logs in as the company's mailbox: a stored password
    would replace the company's password for that mailbox (for this user's mail only), which is the
    admin's secret, not the user's."""
    if inherited is None:
        return Refused(f"user {user_id}'s own account has no username, so it logs in with no password: set "
                       f"users.{user_id}.upstream.username in the config first", EX_CONFIG)  # fmt: skip
    return Refused(f"users.{user_id}.upstream gives no username of its own: {user_id} logs in as the company's "
                   f"mailbox {inherited}, whose password is the admin's (its password_file): to give {user_id} an "
                   f"own login, set users.{user_id}.upstream.username in the config, then run this again",
                   EX_CONFIG)  # fmt: skip


def _unusable_id(user_id: str) -> Refused:
    return Refused(f"user id {user_id!r} cannot name a file (use letters, digits, . _ @ + -)", EX_CONFIG)


def _login_name(config: Config, user_id: str) -> str:
    account = account_for(config, USER_ACCOUNT_PREFIX + user_id)
    return f"{account.username} at {account.host}"


def _delete(path: Path, user_id: str) -> int:
    try:
        path.unlink()
    except FileNotFoundError:
        print(f"relay passwd: nothing stored for {user_id} ({path} does not exist)", file=sys.stderr)
        return 1
    print(f"relay passwd: {path} removed")
    return 0


__all__ = ["password_path", "run", "upstream_password_path"]
