"""``relay check --connect``: can each configured account reach its provider and log in?

For every named upstream and every user's own account: resolve the password, connect, do TLS as
configured, log in, and quit, without sending anything. An OAuth2 account first gets a token (the
step named on failure, with the provider's AADSTS code in words); then SMTP logs in with XOAUTH2,
and Graph is judged from the token's claims (``Mail.Send``; ``Mail.ReadWrite`` for messages over 3 MB),
since calling it would send mail.
Each result names the step that failed (password source, connect, TLS, AUTH) and, for the provider
replies admins meet when a provider changes its rules (Office 365 turning Basic AUTH off, Gmail
wanting an App Password), what to do.
"""

from __future__ import annotations

import asyncio
import errno
import os
import pwd
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import aiosmtplib

from relay.config.accounts import every_account
from relay.config.credentials import Secret, read_password
from relay.config.models import Config
from relay.envelope import Account
from relay.errors import SecretError, TokenError
from relay.transports.graph import UPLOAD_PERMISSION
from relay.transports.smtp import (
    advice,
    close_politely,
    connect,
    describe_failure,
    login_advice,
    tls_context,
)
from relay.transports.tokens import TokenCache, permissions


@dataclass(frozen=True)
class Probe:
    """The result for one account."""

    account: Account
    ok: bool
    message: str
    hint: str | None = None
    # the step that failed: password | ca_file | token | permission | connect | tls | timeout | login | session,
    # or that was not tried: unsaved (a refresh token this user could not save if the provider replaced it)
    step: str = ""
    skipped: bool = False

    def __str__(self) -> str:
        who = f" as {self.account.username}" if self.account.username else ""
        state = "SKIPPED" if self.skipped else "ok    " if self.ok else "FAILED"
        line = f"{state} {self.account.label}{who}: {self.message}"
        return line + (f"\n         -> {self.hint}" if self.hint else "")


WRONG_SECURITY_HINT = (
    "the server did not start TLS at once: this port probably expects security: starttls (usually 587), not ssl (465)"
)
CERT_HINT = ("the server's certificate does not check out: if the provider uses a private CA, set ca_file to "
             "that CA's PEM file; if host is an IP address or an alias, use the name the certificate is for")


def ca_file_problem(account: Account) -> str | None:
    """Why the account's ``ca_file`` cannot be used, or ``None``.

    Checked before connecting because the ssl module's errors do not name the file ("[Errno 2] No such
    file or directory"), so the admin would not know which path to fix.
    """
    if account.ca_file is None or account.security == "none":
        return None
    where = f"ca_file {account.ca_file}"
    try:
        tls_context(account)
    except FileNotFoundError:
        return f"{where}: does not exist"
    except IsADirectoryError:
        return f"{where}: is a directory, not a PEM file"
    except PermissionError:
        return f"{where}: cannot be read (permission denied)"
    except ssl.SSLError as exc:
        return f"{where}: no usable CA certificate in it ({exc.reason or exc})"
    except OSError as exc:
        return f"{where}: cannot be read ({exc.strerror or exc})"
    return None


_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH}


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it, in turn (aiosmtplib wraps socket and ssl errors in its own)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def tls_hint(exc: BaseException) -> str | None:
    """What a TLS failure most likely means for the configuration, or ``None``.

    ``WRONG_VERSION_NUMBER`` is what OpenSSL says when the first bytes back are not TLS: with
    ``security: ssl`` that is the plain-text greeting of a STARTTLS (or plain) port. aiosmtplib wraps the
    ssl error, so the cause chain is searched.
    """
    for current in _causes(exc):
        if isinstance(current, ssl.SSLError) and "WRONG_VERSION_NUMBER" in f"{current.reason} {current}":
            return WRONG_SECURITY_HINT
        if isinstance(current, ssl.SSLCertVerificationError):  # (relay check --connect said no more than the reason)
            return CERT_HINT
    return None


def _failure_step(exc: BaseException) -> str:
    """``tls`` when an ssl error is in the cause chain, ``connect`` when no session was opened, else
    ``session`` (the server closed it, offers no STARTTLS, takes no password...)."""
    if any(isinstance(cause, ssl.SSLError) for cause in _causes(exc)):
        return "tls"
    if isinstance(exc, aiosmtplib.SMTPConnectError) or (isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError)):
        return "connect"
    return "session"


def connect_hint(exc: BaseException, account: Account) -> str | None:
    """What to check when no connection was made: a name that does not resolve, or nothing listening.

    aiosmtplib wraps the socket error (``SMTPConnectError`` from ``OSError``): the cause chain is searched.
    """
    for current in _causes(exc):
        if isinstance(current, socket.gaierror):
            return (f"the name {account.host} does not resolve: check the upstream's host (spelling) and this "
                    "machine's DNS")  # fmt: skip
        if isinstance(current, ConnectionRefusedError):
            usual = {"ssl": "465", "starttls": "587"}.get(account.security, "25")
            return (f"nothing accepts connections on {account.host}:{account.port}: check the port (security: "
                    f"{account.security} is usually {usual}) and that a firewall lets relay out to it")  # fmt: skip
        if isinstance(current, (ConnectionResetError, TimeoutError)) or getattr(current, "errno", None) in _UNREACHABLE:
            return f"check the host, the port and the firewall on the way to {account.host}:{account.port}"
    return None


def service_secret_hint(account: Account, command: str) -> str | None:
    """The password is given to the service only (``password_env``, ``password_credential``) and the
    admin runs ``command`` from a shell: how to run it with the service's secret, or ``None``.

    A systemd credential exists inside relay.service only, and its environment variables too: telling
    an admin whose unit has ``LoadCredential=`` to add it would send them in circles.
    """
    if account.password_credential is not None and not os.environ.get("CREDENTIALS_DIRECTORY"):
        return (f"the systemd credential {account.password_credential} exists only inside relay.service; to use "
                f"it here, run: sudo systemd-run --pipe --wait --quiet -p LoadCredential="
                f"{account.password_credential}:FILE {command} (FILE: the path after "
                f"LoadCredential={account.password_credential}: in relay.service)")  # fmt: skip
    if account.password_env is not None and account.password_env not in os.environ:
        return (f"{account.password_env} is set only in relay.service's environment; to use it here, run: sudo "
                f"systemd-run --pipe --wait --quiet -p EnvironmentFile=FILE {command} (FILE: relay.service's "
                "EnvironmentFile=, or give Environment= the same way)")  # fmt: skip
    return None


def _silence_hint(account: Account) -> str:
    """Why a server would say nothing: usually a security setting that does not match the port."""
    if account.security == "starttls":
        return ("the server may expect TLS from the first byte (implicit TLS, usually port 465): "
                "try security: ssl; otherwise check the host, port and firewall")  # fmt: skip
    if account.security == "ssl":
        return "check the host, port and firewall; a STARTTLS port (587) answers ssl with an error, not silence"
    return "check the host, port and firewall"


def unsaved_refresh(account: Account, command: str) -> Probe | None:
    """A one-shot command (``check --connect``, ``send-test``) run by a user who cannot write the refresh
    token's folder must not use the token: a provider that replaces it at each use (Microsoft does; a
    strict one also revokes the old one, RFC 9700 4.14.2) would leave a used-up token in the file, the
    new one lost when the command ends, and the daemon's next request refused (``invalid_grant``)."""
    oauth = account.oauth2
    if oauth is None or oauth.refresh_token_file is None:
        return None
    folder = oauth.refresh_token_file.parent
    try:
        if not oauth.refresh_token_file.is_file() or os.access(folder, os.W_OK | os.X_OK):
            return None  # a missing or unreadable file: the token step says so, and nothing is used up
        uid = folder.stat().st_uid
    except OSError:
        return None
    try:
        owner = pwd.getpwuid(uid).pw_name
    except KeyError:
        owner = f"'#{uid}'"  # sudo -u takes a uid so
    run_as = "sudo " if uid == 0 else f"sudo -u {owner} "
    return Probe(account, False, (f"token: not tried: {folder} is not writable by this user (uid {os.geteuid()}), so a "
                                  "refresh token the provider replaces at this request could not be saved, and the "
                                  f"one in {oauth.refresh_token_file} could be used up for the daemon"),
                 f"run it as the daemon's user, who can write {folder}: {run_as}{command}", "unsaved", skipped=True)  # fmt: skip


async def _token_step(account: Account, tokens: TokenCache, timeout: float) -> Secret | Probe:
    """The OAuth2 account's access token, or the failed ``Probe`` naming the step and what to do."""
    try:
        async with asyncio.timeout(timeout):
            token, _ = await tokens.token(account)
    except TimeoutError:
        return Probe(account, False, f"token endpoint: no answer within {timeout:g} s", "check the network path to it",
                     "timeout")
    except TokenError as exc:
        said = f": {exc.description}" if exc.description else ""  # the codes are in str(exc) already
        hint = advice(None, exc.reply_text, signin=account.own_user or account.name) if exc.reply_text else None
        if hint is None and exc.step == "token endpoint":
            hint = ("check ca_file (the CA that signed the endpoint's certificate)" if "TLS" in str(exc) else
                    "check token_url / tenant, DNS and the firewall: relay needs HTTPS (443) out to the endpoint")
        return Probe(account, False, f"{exc.step}: {exc}{said}", hint, "token")
    return token


def _graph_probe(account: Account, token: Secret, max_size: int) -> Probe:
    """Graph is not called (that would send mail): the token's claims say whether it may send, and whether it
    may take the draft route that messages over sendMail's 4 MB need (``Mail.ReadWrite``)."""
    granted = permissions(token)
    if not granted:
        return Probe(account, True, "token received (its permissions cannot be read: not a JWT)")
    if "Mail.Send" not in granted:
        return Probe(
            account, False, f"token received, but without Mail.Send (it has: {', '.join(sorted(granted)) or 'none'})",
            "add the Microsoft Graph application permission Mail.Send to the app registration and grant admin consent",
            "permission",
        )
    sends = f"token received, carries Mail.Send for mailbox {account.username}"
    if UPLOAD_PERMISSION in granted:
        return Probe(account, True, f"{sends} and Mail.ReadWrite: messages up to {max_size // 2**20} MB "
                                    "(max_message_size) go as a draft with attachments")  # fmt: skip
    return Probe(
        account, True, f"{sends}, without Mail.ReadWrite: messages over about 3 MB are refused (552)",
        "to send bigger ones (up to max_message_size), add the Microsoft Graph application permission "
        "Mail.ReadWrite to the app registration and grant admin consent",
    )


def config_argument(config: Config) -> str:
    """The config's path in a command printed to be pasted: absolute, as systemd-run starts it in /."""
    return os.path.abspath(config.source) if config.source else "CONFIG"


async def probe(
    account: Account, *, timeout: float = 30, tokens: TokenCache | None = None, max_size: int = 35 * 2**20,
    config_path: str = "CONFIG",
) -> Probe:  # fmt: skip
    """Try one account: password or token, ca_file, connect, TLS, login; the first step that fails is named.
    ``max_size``: the configured ``limits.max_message_size`` (what a Graph account may send with Mail.ReadWrite);
    ``config_path``: the config named in the command a failed password step suggests."""
    if tokens is not None:
        return await _probe(account, timeout, tokens, max_size, config_path)
    own = TokenCache()
    try:
        return await _probe(account, timeout, own, max_size, config_path)
    finally:
        await own.http.aclose()


async def _probe(account: Account, timeout: float, tokens: TokenCache, max_size: int, config_path: str) -> Probe:
    secret: Secret | None = None
    if account.oauth2 is None:
        try:
            secret = await asyncio.to_thread(read_password, account)
        except SecretError as exc:
            hint = service_secret_hint(account, f"relay check --connect {config_path}")
            return Probe(account, False, f"password: {exc}", hint, "password")
        if secret is None and account.username is not None:  # relay check warns of it: nothing to log in with
            return Probe(account, False, f"password: none is configured for the login {account.username}",
                         "add password_file, password_env or password_credential to the account", "password")  # fmt: skip
    problem = ca_file_problem(account)
    if problem is not None:
        return Probe(account, False, problem, step="ca_file")
    if account.oauth2 is not None:
        unsaved = unsaved_refresh(account, f"relay check --connect {config_path}")
        if unsaved is not None:
            return unsaved
        token = await _token_step(account, tokens, timeout)
        if isinstance(token, Probe):
            return token
        if account.transport == "graph":
            return _graph_probe(account, token, max_size)
    try:
        async with asyncio.timeout(timeout):
            smtp = await connect(account, secret, tokens=tokens)
    except aiosmtplib.SMTPAuthenticationError as exc:
        how = "XOAUTH2 login" if account.oauth2 is not None else "login"
        hint = login_advice(account, exc.code, exc.message)
        return Probe(account, False, f"{how} refused: {exc.code} {exc.message}", hint, "login")
    except aiosmtplib.SMTPResponseException as exc:
        return Probe(account, False, f"refused: {exc.code} {exc.message}", advice(exc.code, exc.message), "session")
    except TimeoutError:  # ours, or aiosmtplib's per-step timeout (the account's own ``timeout``)
        waited = min(timeout, account.timeout)
        return Probe(account, False, f"no answer within {waited:g} s", _silence_hint(account), "timeout")
    except TokenError as exc:  # the token worked for the step above, then a fresh one was refused
        return Probe(account, False, f"{exc.step}: {exc}", None, "token")
    except (aiosmtplib.SMTPException, OSError) as exc:
        step = _failure_step(exc)
        hint = tls_hint(exc) or (connect_hint(exc, account) if step == "connect" else None)
        return Probe(account, False, describe_failure(exc), hint, step)
    await close_politely(smtp)
    done = "login accepted" if account.username else "connected (no login configured)"
    done = "XOAUTH2 login accepted" if account.oauth2 is not None else done
    return Probe(account, True, f"{done} over {account.security}")


async def probe_all(config: Config) -> list[Probe]:
    tokens = TokenCache()
    size = config.limits.max_message_size
    path = config_argument(config)
    checks = (probe(a, tokens=tokens, max_size=size, config_path=path) for a in every_account(config))
    results = list(await asyncio.gather(*checks))
    await tokens.http.aclose()
    await asyncio.sleep(0.1)  # TLS transports close asynchronously (close_notify): let them finish
    return results
