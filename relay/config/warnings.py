"""What ``relay check`` warns about: combinations that load fine but are probably mistakes.

``ssl`` on port 587, TLS verification off, a secret file others can read, or things missing on this
machine that the admin may still create (a password, a ``ca_file``, a writable ``spool_dir``). Unlike
the rest of ``relay.config`` this module looks at the filesystem."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import yaml

from relay.config import listener_tls
from relay.config.credentials import HasSecretSource, SecretRef, read_secret
from relay.config.load import _dotted, _line_for, _yaml_lines
from relay.config.models import Config, OAuth2Config, SmsConfig, UpstreamConfig, UpstreamOverride
from relay.config.spoolaccess import MAX_SHOWN, nearest_existing, unusable_files, user_name
from relay.config.types import SECRET_KEYS, LinePath
from relay.config.yamlread import comment_warnings
from relay.errors import ConfigError, ConfigProblem, SecretError

_PORT_HINTS = {
    ("ssl", 587): "port 587 normally speaks STARTTLS; with security: ssl the TLS handshake will hang or fail",
    ("starttls", 465): "port 465 normally speaks implicit TLS; use security: ssl",
    ("none", 465): "port 465 expects implicit TLS (security: ssl); without it the password would be refused",
    ("none", 587): "port 587 expects STARTTLS; security: none sends the password in clear text",
}

def _upstream_warnings(path: LinePath, up: UpstreamConfig | UpstreamOverride) -> list[tuple[LinePath, str]]:
    out: list[tuple[LinePath, str]] = []
    port = up.port
    if port == 995:
        out.append(((*path, "port"), "port 995 is POP3S (reading mail), not SMTP; use 465 or 587"))
    elif port == 993:
        out.append(((*path, "port"), "port 993 is IMAPS (reading mail), not SMTP; use 465 or 587"))
    if up.security and port and (up.security, port) in _PORT_HINTS:
        out.append(((*path, "security"), _PORT_HINTS[(up.security, port)]))
    if up.verify is False:
        out.append(((*path, "verify"), "TLS certificate verification is off: anyone on the path can read the password"))
    if up.security == "none" and up.has_secret:
        out.append(((*path, "security"), "security: none sends the password unencrypted"))
    if up.password_file is not None:
        out += _secret_file_warnings((*path, "password_file"), up.password_file)
    out += _secret_read_warnings(path, up)
    if up.ca_file is not None:
        out += _ca_file_warnings((*path, "ca_file"), up.ca_file)
    if isinstance(up, UpstreamConfig) and up.type == "smtp" and up.auth == "password":
        out += _basic_auth_end_warnings(path, up.host)
        if up.username and not up.has_secret:
            out.append(((*path, "username"), NO_PASSWORD))
    if up.oauth2 is not None:
        out += _oauth2_warnings((*path, "oauth2"), up.oauth2)
    return out

# A named upstream that logs in and names no password: every delivery of the company's mail through it
# fails (a user's own login may still have one: relay passwd's store). relay check said OK.
NO_PASSWORD = (
    "is set but no password is: mail sent with this account cannot be delivered; add password_file, "
    "password_env or password_credential (or remove username for a server that takes mail without a login)"
)

BASIC_AUTH_END = "the end of December 2026"

def _basic_auth_end_warnings(path: LinePath, host: str) -> list[tuple[LinePath, str]]:
    """Office 365 turns password SMTP AUTH off: an account still on it will stop delivering."""
    if not host.lower().rstrip(".").endswith(("office365.com", "outlook.com")):
        return []
    return [((*path, "host"), (f"Office 365 turns password (Basic) SMTP AUTH off by default at {BASIC_AUTH_END} "
                              "(tenants created after that never have it): switch this account to auth: oauth2 or "
                              "type: graph (README: Office 365 after December 2026)"))]  # fmt: skip

def _own_login_warnings(config: Config, user_id: str) -> list[tuple[LinePath, str]]:
    """A user's own password laid over the company's Office 365 account (or an own Office 365 server) is
    Basic AUTH too, though the override names no host and no ``auth``: judged on the resolved account."""
    from relay.config.accounts import account_for
    from relay.envelope import USER_ACCOUNT_PREFIX

    try:
        account = account_for(config, USER_ACCOUNT_PREFIX + user_id)
    except (ConfigError, ValueError):  # an override that does not resolve is reported as an error
        return []
    if account.transport != "smtp" or account.oauth2 is not None or account.username is None:
        return []
    return _basic_auth_end_warnings(("users", user_id, "upstream"), account.host)

def secret_refs(oauth: OAuth2Config) -> tuple[SecretRef, SecretRef]:
    """The client secret's and the refresh token's sources, in the shape ``read_secret`` reads."""
    client = SecretRef(oauth.client_secret_file, oauth.client_secret_env, oauth.client_secret_credential)
    refresh = SecretRef(oauth.refresh_token_file, oauth.refresh_token_env, oauth.refresh_token_credential)
    return client, refresh

def _oauth2_warnings(path: LinePath, oauth: OAuth2Config) -> list[tuple[LinePath, str]]:
    out: list[tuple[LinePath, str]] = []
    for ref, kind in zip(secret_refs(oauth), ("client secret", "refresh token")):
        if ref.password_file is not None:
            out += _secret_file_warnings(path, ref.password_file)
        read = _secret_read_warnings(path, ref, kind=kind)
        if read and kind == "refresh token" and oauth.refresh_token_file is not None:  # not signed in yet
            name = path[1] if len(path) > 1 else "ACCOUNT"  # upstreams.NAME or users.USER: what the command takes
            read = [(where, f"{words}: sign in with relay oauth login {name}") for where, words in read]
        out += read
    key_files = (oauth.client_key_file or oauth.client_certificate_file, oauth.service_account_file,
                 oauth.client_key_password_file)  # fmt: skip
    for key_file in key_files:
        if key_file is not None:
            out += _secret_file_warnings(path, key_file)
    folder = oauth.refresh_token_file.parent if oauth.refresh_token_file is not None else None
    if folder is not None and folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        out.append((path, (f"{folder} is not writable by this user (uid {os.geteuid()}): a refresh token the "
                          "provider rotates cannot be saved there (relay writes a new file and renames it)")))  # fmt: skip
    if oauth.refresh_token_env or oauth.refresh_token_credential:
        out.append((path, ("a refresh token the provider rotates (Microsoft does) cannot be written back to an "
                          "environment variable or a systemd credential: relay keeps the new one in memory only, "
                          "so after a restart the old one may be refused; use refresh_token_file")))  # fmt: skip
    return out

def _shared_sign_ins(config: Config) -> list[tuple[LinePath, str, bool]]:
    """Accounts that log in as different mailboxes with one refresh token file: (key path, words, error).

    A delegated refresh token logs in as the person who signed in. Most often a user with only an own
    ``username`` under the company's signed-in account (no ``oauth2:`` of their own) inherits its
    ``refresh_token_file``; ``relay oauth login USER`` refuses to overwrite it. For a personal Microsoft
    account or Google that can never work for both mailboxes (an error); an Office 365 delegate with Full
    Access to both may (a warning)."""
    from relay.config.accounts import account_for
    from relay.envelope import USER_ACCOUNT_PREFIX

    names: list[tuple[str, LinePath, bool]] = [(name, ("upstreams", name, "oauth2", "refresh_token_file"), False)
                                               for name in config.upstreams]  # fmt: skip
    names += [(USER_ACCOUNT_PREFIX + uid, ("users", uid, "upstream"), user.upstream.oauth2 is None)
              for uid, user in config.users.items() if isinstance(user.upstream, UpstreamOverride)]  # fmt: skip
    first: dict[Path, tuple[str, str]] = {}  # refresh token file -> (the account that names it first, its mailbox)
    found: list[tuple[LinePath, str, bool]] = []
    for name, path, inherits in names:
        try:
            account = account_for(config, name)
        except (ConfigError, ValueError):
            continue
        oauth = account.oauth2
        if oauth is None or oauth.refresh_token_file is None or oauth.service_account_file is not None:
            continue
        who = account.own_user or name
        owner, mailbox = first.setdefault(oauth.refresh_token_file, (who, account.username or ""))
        if owner == who or mailbox.lower() == (account.username or "").lower():
            continue
        personal = oauth.provider != "microsoft" or "/consumers/" in oauth.token_url.lower()
        fix = (f"give {who} a sign-in of their own: users.{who}.upstream.oauth2 with the app (as upstream {owner}'s) "
               f"and a refresh_token_file of {who}'s own, then relay oauth login {who}" if inherits else
               "give each mailbox its own refresh_token_file and sign each in with relay oauth login")  # fmt: skip
        how = (f"with upstream {owner}'s sign-in (no oauth2: block of its own), whose refresh_token_file "
               f"{oauth.refresh_token_file} logs in as {mailbox}" if inherits else
               f"with refresh_token_file {oauth.refresh_token_file}, which {owner} also logs in with as {mailbox}")
        why = ("a person's refresh token logs in as their own mailbox only, so one of the two is always refused" if
               personal else "a refresh token logs in as the person who signed in: unless that person has Full "
               "Access to both mailboxes (an Office 365 delegate), one of the two is refused")  # fmt: skip
        found.append((path, f"{who} logs in as {account.username} {how}: {why}; {fix}", personal))
    return found


def _inherited_pair_warnings(
    path: LinePath, own: UpstreamOverride, base: UpstreamConfig | None
) -> list[tuple[LinePath, str]]:
    """A user's own port with the company account's security (same host) can be a bad pair too.

    (An own security without a port gets that security's port; an own host inherits nothing: config/accounts.py.)
    """
    if base is None or own.port is None or own.security is not None:
        return []
    if own.host is not None and own.host.lower() != base.host.lower():
        return []
    pair = (base.security, own.port)
    if pair not in _PORT_HINTS:
        return []
    return [((*path, "port"), f"{_PORT_HINTS[pair]} (security {base.security} is the company upstream's)")]

def _secret_file_warnings(path: LinePath, file: Path) -> list[tuple[LinePath, str]]:
    """A password file others can read. (One that cannot be read at all: ``_secret_read_warnings``; a
    directory: ``_unusable_secret_files``, its mode says nothing about a secret.)"""
    try:
        mode = file.stat().st_mode
    except OSError:
        return []
    if stat.S_ISDIR(mode):
        return []
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return [(path, f"secret file {file} can be read by others (mode {stat.S_IMODE(mode):04o}); chmod 600 it")]
    return []

def _secret_read_warnings(
    path: LinePath, source: HasSecretSource, *, kind: str | None = None
) -> list[tuple[LinePath, str]]:
    """A password that cannot be read now: a warning, since the admin may create it before the first delivery.

    Read as the user running the check (the daemon at start-up, the admin for ``relay check``), with the
    environment of that process. ``SecretError`` messages name the source, never the value.
    """
    key = next((k for k in SECRET_KEYS if getattr(source, k) is not None), None)
    if key is None or (source.password_file is not None and _unusable(Path(source.password_file))):
        return []  # an error: check_errors
    try:
        secret = read_secret(source, kind=kind or "password")
    except SecretError as exc:
        return [(path if kind else (*path, key), str(exc))]
    where, text = (path if kind else (*path, key)), (secret.reveal() if secret is not None else None)
    if text is not None and not text.strip():  # install -m 600 /dev/null FILE, and the password never written
        return [(where, (f"the {kind or 'password'} it names is empty: relay would log in with an empty one, "
                         "and a provider counts each such failure towards locking the account; write it in"))]  # fmt: skip
    if text is not None and "\n" in text:
        return [(where, (f"the {kind or 'password'} it names has {text.count(chr(10)) + 1} lines: relay would "
                         "send them all, line ends included, as one; keep only the first line"))]  # fmt: skip
    return []

def _ca_file_warnings(path: LinePath, file: Path) -> list[tuple[LinePath, str]]:
    """A ``ca_file`` that cannot be opened makes every TLS connection of that account fail."""
    try:
        with open(file, "rb"):
            pass
    except FileNotFoundError:
        return [(path, f"ca_file {file} does not exist")]
    except IsADirectoryError:
        return [(path, f"ca_file {file} is a directory, not a PEM file")]
    except PermissionError:
        return [(path, f"ca_file {file} cannot be read by this user (uid {os.geteuid()})")]
    except OSError as exc:
        return [(path, f"ca_file {file} cannot be read: {exc.strerror}")]
    return []


def _unwritable(directory: Path) -> str | None:
    """Why relay could not create or write ``directory`` (the closest existing one must let it), or None."""
    try:
        existing = nearest_existing(directory)
        if not existing.is_dir():
            return _not_a_directory(directory, existing)
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"{existing} is not writable by this user (uid {os.geteuid()})"
    except OSError as exc:
        return f"cannot look at {exc.filename or directory}: {exc.strerror}"
    return None

def _not_a_directory(directory: Path, existing: Path) -> str:
    return "exists and is not a directory" if existing == directory else f"{existing} is not a directory"

def _file_in_the_way(directory: Path) -> str | None:
    """``directory``, or the closest of its parents that exists, is a file: no user can make the directory
    there, the daemon's included (unlike a permission, which depends on who runs the check)."""
    try:
        existing = nearest_existing(directory)
        return None if existing.is_dir() else _not_a_directory(directory, existing)
    except OSError:
        return None  # a directory this user cannot look into: _unwritable's warning

def _spool_warnings(spool: Path) -> list[tuple[LinePath, str]]:
    """The daemon creates ``spool_dir`` (and its parents) at start: the closest existing one must let it.

    Checked as the user running the check; the daemon runs the same check at start-up as its own user.
    (A file in the way is an error: ``_spool_errors``.)
    """
    reason = None if _file_in_the_way(spool) else _unwritable(spool)
    if reason is None:
        return []
    return [(("spool_dir",), f"spool_dir {spool}: {reason}: relay will not be able to store mail")]

def _spool_errors(spool: Path) -> list[tuple[LinePath, str]]:
    """A ``spool_dir`` that is a file, or below one: the daemon cannot start, whoever runs it."""
    reason = _file_in_the_way(spool)
    if reason is None:
        return []
    return [(("spool_dir",), f"spool_dir {spool}: {reason}: relay cannot store mail there and will not start")]

def _foreign_spool_files(spool: Path, *, at_start: bool) -> list[tuple[LinePath, str]]:
    """Files in the spool that its owner, the user the daemon runs as, cannot read or write: what a ``relay
    serve`` run as root leaves. Those the daemon opens at start (``at_start``) stop it (an error, also for
    ``check --startup``); the others only their own messages (a warning). Checked as that user or as root
    (``spoolaccess.daemon_uid``); the directory itself is ``_spool_warnings``' business."""
    uid, found = unusable_files(spool, at_start=at_start)
    if uid is None or not found:
        return []
    name = user_name(uid)
    shown = ", ".join(map(str, found)) + (" and maybe more" if len(found) >= MAX_SHOWN else "")
    effect = ("relay opens these at start and will not start" if at_start else
              "relay starts, but cannot deliver or show the messages they belong to")  # fmt: skip
    message = (f"spool_dir {spool}: {name} (its owner, the user relay runs as) cannot read or write {shown}: "
               f"{effect}; a relay serve run as root leaves such files: chown -R {name}: {spool}")  # fmt: skip
    return [(("spool_dir",), message)]

RESERVED_USER = "company"  # relay send-test company: the company's defaults (commands/sendtest.py)


def _open_relay_warnings(config: Config) -> list[tuple[LinePath, str]]:
    """Mail is taken without a login from ``allowed_networks``: one that holds the whole Internet (or any
    public addresses) lets whoever reaches the port send through the company's accounts."""
    out: list[tuple[LinePath, str]] = []
    for index, listener in enumerate(config.listeners):
        for network in listener.allowed_networks or ():
            if network.prefixlen == 0:
                who = f"{network} is every address: anyone who can reach {listener.address} port {listener.port}"
            elif not (network.is_private or network.is_loopback):
                who = f"{network} holds public addresses: anyone there"
            else:
                continue
            out.append((("listeners", index, "allowed_networks"), (
                f"{who} can send mail through your accounts without a login (an open relay, soon a spammers' "
                "one); list only the networks of the machines your programs run on")))  # fmt: skip
    return out


def _reserved_user_warnings(config: Config) -> list[tuple[LinePath, str]]:
    """A user named ``company`` shadows the name ``relay send-test`` gives the company's defaults: they can
    no longer be tried. A warning, not an error: the mail of such a user goes out as it should, and an
    error would stop a daemon that ran with this file before."""
    if RESERVED_USER not in config.users:
        return []
    return [(("users", RESERVED_USER), (f"the user id {RESERVED_USER} is the name relay send-test gives the company's "
              f"defaults: relay send-test {RESERVED_USER} would test this user instead; rename the user "
              "(e.g. office)"))]  # fmt: skip


def _os_user_warnings(config: Config) -> list[tuple[LinePath, str]]:
    """The ``os_user`` rule needs Linux's socket tables; a name must exist on this machine to match."""
    import pwd

    from relay import osuser

    found: list[tuple[LinePath, str]] = []
    in_order = "os_user" in config.identify.order
    if in_order and not osuser.available():
        found.append((("identify", "order"), ("os_user needs Linux's /proc/net/tcp, which this system does not "
                      "have: the rule will match nobody")))  # fmt: skip
    for user_id, user in config.users.items():
        if user.os_users and not in_order:
            found.append((("users", user_id, "os_users"), ("is set, but identify.order has no os_user: "
                          "nobody is identified by it")))  # fmt: skip
        for name in (item for item in user.os_users if isinstance(item, str)):
            try:
                pwd.getpwnam(name)
            except KeyError:
                found.append((("users", user_id, "os_users"), f"OS user {name!r} does not exist on this machine"))
    return found

def _archive_warnings(config: Config) -> list[tuple[LinePath, str]]:
    """Mail is archived but ``archive.dir`` cannot be made: the copies would only be ``archive_failed`` logs."""
    reason = _unwritable(config.archive.dir) if config.archiving else None
    if reason is None:
        return []
    return [(("archive", "dir"), (f"archive.dir {config.archive.dir}: {reason}: no copies will be archived "
                                 "(mail is still delivered)"))]  # fmt: skip

def _secret_store_warnings(config: Config, user_id: str) -> list[tuple[LinePath, str]]:
    """A user's own login that would read their ``relay passwd`` file, when that file is not there yet."""
    from relay.config.accounts import account_for
    from relay.envelope import USER_ACCOUNT_PREFIX

    try:
        account = account_for(config, USER_ACCOUNT_PREFIX + user_id)
    except (ConfigError, ValueError):  # reported as an error
        return []
    store, path = account.password_store, ("users", user_id, "upstream")
    if store is None:
        return []
    try:
        store.stat()
        return []
    except PermissionError:
        return [(path, (f"cannot look into secret_store {store.parent} as this user (uid {os.geteuid()}): run relay "
                       "check as root or as relay's user"))]  # fmt: skip
    except OSError:
        pass
    if not any(getattr(account, key) for key in SECRET_KEYS):
        return [(path, (f"no password stored for {user_id}'s login {account.username} yet ({store}): set it with "
                       f"relay passwd {user_id}; until then this user's mail waits in the queue"))]  # fmt: skip
    company = config.upstreams.get(config.company.upstream or "")
    if company is not None and company.username != account.username:
        return [(path, (f"{user_id} logs in as {account.username} with the password of the company's account "
                       f"({company.username}): if that mailbox has a password of its own, set it with relay passwd "
                       f"{user_id}"))]  # fmt: skip
    return []

def _missing(file: Path) -> bool:
    """The file surely does not exist: its directory says so. (A directory this user cannot look into
    tells nothing: the daemon's user may well find the file there.)"""
    try:
        file.stat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def _secret_files(config: Config) -> list[tuple[LinePath, Path, str]]:
    """Every secret file the config names itself (key path, file, what it holds); inherited ones are
    named at the company's upstream."""
    sections: list[tuple[LinePath, UpstreamConfig | UpstreamOverride | SmsConfig]] = [
        (("upstreams", name), up) for name, up in config.upstreams.items()
    ]
    sections += [(("users", uid, "upstream"), user.upstream) for uid, user in config.users.items()
                 if isinstance(user.upstream, UpstreamOverride)]  # fmt: skip
    if config.sms is not None:
        sections.append((("sms",), config.sms))
    found: list[tuple[LinePath, Path, str]] = []
    for path, section in sections:
        if section.password_file is not None:
            found.append(((*path, "password_file"), section.password_file, "password file"))
        oauth = getattr(section, "oauth2", None)
        if isinstance(oauth, OAuth2Config):
            for key, kind in (("client_secret_file", "client secret file"), ("refresh_token_file", "refresh token file")):
                if getattr(oauth, key) is not None:
                    found.append(((*path, "oauth2", key), getattr(oauth, key), kind))
    return found


def _unusable_secret_files(config: Config) -> list[tuple[LinePath, str]]:
    """A secret file that does not exist, or is a directory: no user (the daemon's included) can read it,
    and every delivery through that account would fail. (One that exists but that this user cannot read
    stays a warning: check may run as another user than the daemon; so does a secret from the environment
    or systemd, which only the service has.)"""
    found: list[tuple[LinePath, str]] = []
    seen: set[Path] = set()
    for path, file, kind in _secret_files(config):
        why = None if file in seen else _why_unusable(path, file, kind)  # once: a YAML alias names one file twice
        if why is not None:
            found.append((path, why))
        seen.add(file)
    return found


def _why_unusable(path: LinePath, file: Path, kind: str) -> str | None:
    if _missing(file):
        return f"{kind} {file} does not exist: {_how_to_make(path, kind)}"
    if _directory(file):
        return f"{kind} {file} is a directory: give the path of the file in it that holds the secret"
    return None


def _directory(file: Path) -> bool:
    try:
        return file.is_dir()
    except OSError:
        return False


def _unusable(file: Path) -> bool:
    """No user can read ``file`` as a secret: an error of ``check_errors``, not a warning too."""
    return _missing(file) or _directory(file)


def _how_to_make(path: LinePath, kind: str) -> str:
    if kind == "refresh token file":  # relay oauth login writes it; NAME: upstreams.NAME or users.USER
        return f"sign in with relay oauth login {path[1]}"
    return "create it (mode 0600, owned by relay's user) or correct the path"


def check_warnings(config: Config, text: str | None = None) -> list[ConfigProblem]:
    """Combinations that load fine but are likely mistakes; ``relay check`` prints them."""
    found: list[tuple[LinePath, str]] = []
    for name, up in config.upstreams.items():
        found += _upstream_warnings(("upstreams", name), up)
    company_upstream = config.upstreams.get(config.company.upstream or "")
    for user_id, user in config.users.items():
        if isinstance(user.upstream, UpstreamOverride):
            found += _upstream_warnings(("users", user_id, "upstream"), user.upstream)
            found += _inherited_pair_warnings(("users", user_id, "upstream"), user.upstream, company_upstream)
            found += _own_login_warnings(config, user_id)
            found += _secret_store_warnings(config, user_id)
    found += [(path, words) for path, words, error in _shared_sign_ins(config) if not error]
    if config.sms is not None and config.sms.password_file is not None:
        found += _secret_file_warnings(("sms", "password_file"), config.sms.password_file)
    if config.sms is not None:
        found += _secret_read_warnings(("sms",), config.sms)
    found += _spool_warnings(config.spool_dir) + _foreign_spool_files(config.spool_dir, at_start=False)
    found += _reserved_user_warnings(config) + _open_relay_warnings(config)
    found += _archive_warnings(config)
    found += _os_user_warnings(config)
    if config.rewrite.redirect_all:
        found.append((("rewrite", "redirect_all"), f"all mail goes to {config.rewrite.redirect_all} (test installation)"))
    if config.delivery.delay_warning >= config.delivery.max_queue_lifetime:
        found.append((("delivery", "delay_warning"), ("is not shorter than max_queue_lifetime: no delay warning would "
                      "ever be sent (the failure notice comes first)")))  # fmt: skip
    found += [(path, finding.message) for path, finding in _listener_tls_findings(config) if not finding.error]
    found += comment_warnings(text) if text else []
    return _placed(config, found, text)


def check_errors(config: Config, text: str | None = None) -> list[ConfigProblem]:
    """What loads but cannot work on this machine, so ``relay check`` exits 1: a secret file that does not
    exist or is a directory (``_unusable_secret_files``), a spool_dir that is a file (``_spool_errors``), a
    listener's TLS certificate or key that cannot be loaded (missing, unreadable by this user, not PEM, not
    a pair), spool files the daemon opens at start but its user cannot (``_foreign_spool_files``), one
    refresh token file for two mailboxes where that cannot work (``_shared_sign_ins``). Not part of
    ``load_config``: other users (``relay-sendmail``) read the config but not the secrets or the key."""
    found = _unusable_secret_files(config) + _spool_errors(config.spool_dir) + _listener_tls_errors(config)
    found += [(path, words) for path, words, error in _shared_sign_ins(config) if error]
    found += _foreign_spool_files(config.spool_dir, at_start=True)
    return _placed(config, found, text)


def startup_errors(config: Config, text: str | None = None) -> list[ConfigProblem]:
    """Of ``check_errors``, those that stop the daemon anyway (a spool_dir that is a file, a listener's key
    it cannot load, a spool file it opens at start but cannot read), for ``relay check --startup`` in the unit's ExecStartPre=. A missing secret file is
    not one: the daemon
    takes mail and keeps it queued until the file is there (a user not signed in yet with ``relay oauth
    login`` must not keep everybody's mail out)."""
    found = _spool_errors(config.spool_dir) + _listener_tls_errors(config)
    return _placed(config, found + _foreign_spool_files(config.spool_dir, at_start=True), text)


def _listener_tls_errors(config: Config) -> list[tuple[LinePath, str]]:
    return [(path, f.message) for path, f in _listener_tls_findings(config) if f.error]


def _listener_tls_findings(config: Config) -> list[tuple[LinePath, listener_tls.Finding]]:
    """``listener_tls.check`` for every listener with a certificate, each finding at its key."""
    found: list[tuple[LinePath, listener_tls.Finding]] = []
    for index, listener in enumerate(config.listeners):
        if listener.tls_cert_file is not None:
            name = listener.hostname or config.hostname or socket.getfqdn()
            found += [(("listeners", index, f.key), f) for f in listener_tls.check(listener, name)]
    return found


def _placed(config: Config, found: list[tuple[LinePath, str]], text: str | None) -> list[ConfigProblem]:
    """Problems found on a loaded config, each with its line in ``text`` (the file's content) when given."""
    lines: dict[LinePath, int] = {}
    if text:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _yaml_lines(node, (), lines, [])
    return [ConfigProblem(_dotted(p), m, _line_for(p, lines) if lines else None, config.source) for p, m in found]
