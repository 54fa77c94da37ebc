"""Stage 6: one delivery attempt of one queued message through its upstream account (aiosmtplib).

Input: an ``Account``, its secret, the envelope and the body bytes. Output: an ``Outcome`` that says,
per recipient, delivered / deferred / bounced, with the upstream's reply. This module is the only
place that knows aiosmtplib's exceptions; it turns them into outcomes a scheduler can act on:

- cannot connect, TLS handshake or certificate failure, timeout, disconnect: everyone deferred;
- AUTH refused: everyone deferred (like Postfix's ``smtp_sasl_auth_soft_bounce``): the admin fixes
  the password or the account and the queued mail then goes out, nothing is lost. A password login
  uses one mechanism per attempt (``password_login``): a wrong password costs one failed login;
- OAuth2 accounts log in with XOAUTH2 and a token from ``tokens``; a refused cached token is dropped
  and the login tried once more with a fresh one; no token at all (``TokenError``) defers everyone;
- AUTH answered with a 4xx (``LoginUnavailableError``): the login service failed, not the secret: deferred,
  no login hold;
- greeting, EHLO or STARTTLS refused, even with a 5xx: deferred, for the same reason;
- a reply relay cannot read (``UnreadableReplyError``: no reply code, or 32 KB without an end): deferred,
  named with the step and what came; after the whole message, as a lost reply (it may arrive twice). A
  well-formed reply line longer than aiosmtplib reads counts by its code;
- MAIL FROM refused: 5xx bounces everyone (the provider will not let this sender send), 4xx defers;
- RCPT refused: per recipient, 5xx bounced and 4xx deferred; the others still go;
- DATA refused: 5xx bounces, 4xx defers the recipients that were accepted;
- a reply about the session, not the message (421, 500, 502, 503: see ``SESSION_CODES``), or a code
  that is no answer to the command (354 to RCPT): the connection is dropped and the open recipients
  deferred, never bounced. Except a 5xx to the final dot (``500 5.5.2 Line too long``): that reply is
  the server's verdict on the data it has just read, so on a fresh connection it bounces like any
  5xx there (on a reused one a fresh connection is asked first, as for MAIL).

A connection goes back to the pool only when it is known to be idle: after a 2xx to the final dot, or
after a 250 to the RSET sent when a transaction ended any other way (as Postfix does before reusing a
cached connection); and it is taken out again only if the server sent nothing unasked meanwhile. A MAIL refusal on a reused connection is not believed: the message is tried once
more on a fresh connection, whose answer decides. So is a reused connection that ends before the
message was sent, but not one that ends after it and before the reply (``ReplyLostError``): the
upstream may have taken it, so it is deferred and the log says it may arrive twice, as it says when the
reply to a whole message does not come in time (``ReplyTimeoutError``).

STARTTLS is required when configured, never opportunistic: a server that does not offer it is a
deferral with a clear reason, not a plain-text send. The whole attempt has its own deadline, because
aiosmtplib's timeout applies per operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiosmtplib

from relay.config.credentials import Secret, fingerprint, password_source
from relay.envelope import Account
from relay.errors import TokenError
from relay.idn import ascii_domain
from relay.replies import R553_NO_SMTPUTF8, R553_NOT_IDN
from relay.transports import aiosmtplib_private as private

Reply = tuple[int | None, str]


@dataclass
class Outcome:
    """What one attempt achieved, per recipient. ``error`` describes an attempt-wide failure."""

    delivered: list[str] = field(default_factory=list)
    deferred: dict[str, Reply] = field(default_factory=dict)
    bounced: dict[str, Reply] = field(default_factory=dict)
    error: str | None = None
    reply: Reply = (None, "")
    duration: float = 0.0
    session_failed: bool = False  # no transaction happened: connect, TLS, AUTH or the session failed
    advice: str | None = None  # what to do, when the transport knows better than the reply's words
    retry_after: float | None = None  # the provider said when to try again (Graph's Retry-After), in seconds
    login_refused: bool = False  # the provider refused the login (AUTH): the account's secret is wrong

    @property
    def result(self) -> str:
        if self.deferred:
            return "deferred" if not self.delivered and not self.bounced else "partial"
        if self.bounced:
            return "bounced" if not self.delivered else "partial"
        return "delivered"


SEND_AS_ADVICE = (
    "the provider refuses this sender: the account may send only as its own mailbox or an address it has Send As "
    "rights for: set from_address to it, or give the user an own login (relay passwd)"
)
# A 4xx to AUTH (RFC 4954: 454 4.7.0 Temporary authentication failure) is the provider's login service
# failing, not a wrong password; ``LoginUnavailableError`` marks its reply with ``AUTH_MARK``
AUTH_MARK = " (the reply to AUTH)"
LOGIN_UNAVAILABLE_ADVICE = (
    "the provider's login service is failing for now (a temporary 4xx reply to AUTH), the password was not "
    "refused: nothing to change, the mail waits and relay tries again at the next retry"
)

# Provider replies an admin meets when a provider changes its rules, and what to do about each.
_ADVICE: tuple[tuple[str, str], ...] = (
    (AUTH_MARK, LOGIN_UNAVAILABLE_ADVICE),
    ("5.7.30", "Office 365 turned password (Basic) SMTP AUTH off: switch this upstream to OAuth2 (XOAUTH2 or Graph)"),
    ("5.7.139", ("Office 365 refuses password SMTP AUTH for this mailbox or tenant (the default from the end of "
                "December 2026): switch this upstream to auth: oauth2 or type: graph (README: Office 365 after "
                "December 2026); until then an Exchange admin can enable authenticated SMTP for the mailbox")),
    ("SendAsDenied", SEND_AS_ADVICE),  # Office 365, after the data
    ("5.7.60", SEND_AS_ADVICE),  # Office 365 at MAIL FROM: "Client does not have permissions to send as this sender"
    ("5.2.25", "Office 365 throttles this mailbox after repeated errors: fix the cause, relay does not retry 5xx"),
    ("4.3.2 Concurrent connections", "Office 365 allows 3 connections per mailbox: lower delivery.workers"),
    ("5.7.9", "Gmail requires an App Password (or OAuth2) for this account"),
    ("5.7.8", "the provider did not accept the username and password: check them"),
    ("5.7.3", "wrong password, or the tenant's security defaults block password AUTH (needs OAuth2)"),
    # OAuth2 token endpoint errors (Microsoft identity platform AADSTS codes, OAuth error names)
    ("AADSTS7000215", ("the client secret is wrong: copy the secret's Value (not its ID) from the app registration "
                      "(Certificates & secrets) into the client_secret_file")),
    ("AADSTS7000222", ("the client secret has expired: create a new one in the app registration and put it in the "
                      "client_secret_file")),
    ("AADSTS700016", ("no app with this client_id in the tenant: check oauth2.client_id and oauth2.tenant, and "
                     "that the app registration was not deleted")),
    ("AADSTS90002", "the tenant was not found: check oauth2.tenant (yritys.onmicrosoft.com or the tenant id)"),
    ("AADSTS65001", ("admin consent is missing: grant admin consent for the app's permission (SMTP.SendAsApp "
                    "or Mail.Send) in Entra ID -> App registrations -> API permissions")),
    ("AADSTS70011", "the scope is not valid for this flow: remove oauth2.scope to use the provider's default"),
    ("AADSTS700027", ("Entra refused the certificate's client assertion: upload this certificate (relay check "
                     "prints its thumbprint) to the app registration's Certificates & secrets, or renew it if it "
                     "expired")),
    ("AADSTS7000218", ("the app is a public client for Entra: allow public client flows in the app registration "
                      "(Authentication), or give it a client secret or certificate")),
    ("Invalid email or User ID", ("Google does not know this username in the Workspace domain: set username to a "
                                 "mailbox of the domain the service account is delegated for")),
    ("Invalid JWT Signature", ("Google does not know the service account's key (deleted, or another project's): "
                              "create a new JSON key for the service account and put it in service_account_file")),
    ("unauthorized_client", ("the provider does not let this client use this grant or scope: for a Google service "
                            "account, add its client ID with the scope https://mail.google.com/ in the Admin "
                            "console (Security -> API controls -> Domain-wide delegation)")),
    ("invalid_grant", ("the refresh token was revoked or has expired: sign in again with relay oauth login ACCOUNT "
                      "(it writes the refresh_token_file; no restart needed) (if the daemon logged "
                      "refresh_token_not_saved, it holds a newer token in memory than the file: make the file "
                      "writable for relay's user)")),
    ("invalid_client", ("the provider refused the client: check oauth2.client_id and the client secret or "
                       "certificate")),
)


def advice(code: int | None, text: str, *, signin: str | None = None) -> str | None:
    """A plain instruction for a known provider reply, or ``None``. ``signin``: the name ``relay oauth
    login`` takes for the account (an upstream, or a user id), put in the command the advice names."""
    for marker, hint in _ADVICE:
        if marker in text:
            return hint.replace("oauth login ACCOUNT", f"oauth login {signin}") if signin else hint
    if code == 535:
        return "the upstream refused the login: check the username and the password source"
    return None


def token_advice(account: Account, exc: TokenError) -> str | None:
    """What to do when no token could be had: the provider's error in words (``advice``), or, before the
    first sign-in (no refresh token file yet), the command that makes one. That case had no advice in
    ``delivery_attempt`` and ``upstream_down``: only the start-up's ``config_error`` said it, once."""
    signin = account.own_user or account.name
    if exc.step == "secret" and str(exc).startswith("refresh token ") and str(exc).endswith("does not exist"):
        return f"nobody has signed in for this account yet: relay oauth login {signin} (no restart needed)"
    return advice(None, exc.reply_text, signin=signin)


def inherited_password_hint(account: Account) -> str | None:
    """A user's own login refused while it still uses the company's password (no ``relay passwd`` yet)."""
    store = account.password_store
    if store is None or store.exists():
        return None
    user = account.own_user or account.name
    return (f"{user}'s login uses the company account's password, since {user} has none of their own yet: "
            f"set it with: relay passwd {user}")  # fmt: skip


def login_advice(account: Account, code: int | None, text: str) -> str:
    """What to do when the provider refused ``account``'s login (AUTH).

    The one advice for it: the daemon's ``delivery_attempt`` and ``upstream_down`` log events,
    ``relay send-test`` and ``relay check --connect`` all take it from here, so they cannot disagree
    (the daemon said "check the password file" where send-test rightly said ``relay passwd USER``). A
    user's own login still on the company's password is told to set its own; otherwise the provider's
    reply in words (``advice``), and where the password comes from, which is what the admin edits.
    """
    if account.oauth2 is not None:
        return xoauth2_advice(account)
    inherited = inherited_password_hint(account)
    if inherited is not None:
        return inherited
    hint = advice(code, text) or "the upstream refused the login: check the username and the password"
    return f"{hint} (the password comes from {password_source(account)})"


def tls_context(account: Account) -> ssl.SSLContext:
    """Verification on by default; ``ca_file`` for private CAs; ``verify: false`` only when asked.

    Shared per (``ca_file`` as it is now, ``verify``): loading the CA store costs milliseconds of the
    event loop per connection or Graph request, and a ``ca_file`` the admin replaces (a new mtime) is
    still read at the next attempt. A missing or unreadable ``ca_file`` raises ``OSError`` as before.
    """
    ca_file = str(account.ca_file) if account.ca_file else None
    stamp = os.stat(ca_file).st_mtime_ns if ca_file else None
    return _tls_context(ca_file, stamp, account.verify)


@functools.lru_cache(maxsize=32)
def _tls_context(ca_file: str | None, stamp: int | None, verify: bool) -> ssl.SSLContext:  # stamp: only a key
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _client(account: Account) -> aiosmtplib.SMTP:
    secure = account.security != "none"
    return aiosmtplib.SMTP(
        hostname=account.host,
        port=account.port,
        use_tls=account.security == "ssl",
        start_tls=False,  # done explicitly below, so a missing STARTTLS is refused, not skipped
        tls_context=tls_context(account) if secure else None,
        timeout=account.timeout,
        local_hostname=account.local_hostname,
    )


def _defer_all(outcome: Outcome, recipients: list[str], reply: Reply, error: str) -> Outcome:
    """The attempt failed as a whole (connection, TLS, AUTH, timeout): everyone still open waits."""
    outcome.deferred.update({r: reply for r in recipients})
    outcome.error, outcome.reply = error, reply
    outcome.session_failed = True
    return outcome


def _fail_all(outcome: Outcome, recipients: list[str], reply: Reply, error: str) -> Outcome:
    """The upstream answered the transaction (MAIL or DATA) for everyone: 5xx bounces, 4xx defers."""
    code = reply[0]
    target = outcome.bounced if code is not None and 500 <= code < 600 else outcome.deferred
    target.update({r: reply for r in recipients})
    outcome.error, outcome.reply = error, reply
    return outcome


def describe_failure(exc: BaseException) -> str:
    """A one-line reason an admin can act on, without any secret."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message}"
    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError) and isinstance(exc.__cause__, aiosmtplib.SMTPTimeoutError):
        # the connection was made: not the network's fault, as "timed out connecting" made an admin look there
        return "connected, but the upstream sent no greeting (220) in time: the server is overloaded or hangs"
    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError):
        return "timed out connecting to the upstream"
    if isinstance(exc, aiosmtplib.SMTPConnectError):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted: {cause.verify_message}"
        return f"cannot connect: {exc}"
    if isinstance(exc, (ReplyLostError, ReplyTimeoutError)):
        what = "stopped answering (timeout)" if isinstance(exc, ReplyTimeoutError) else f"closed the connection ({exc})"
        return (f"the upstream {what} after the whole message was sent, before its reply: if it took the message, "
                "the next attempt sends it twice")  # fmt: skip
    if isinstance(exc, aiosmtplib.SMTPTimeoutError):
        return "the upstream stopped answering (timeout)"
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return f"the upstream closed the connection: {exc}"
    if isinstance(exc, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(exc):
        return (
            "the server did not start TLS at once: this port probably expects security: starttls "
            "(usually 587), not ssl (465)"
        )
    if isinstance(exc, OSError) and exc.filename:  # the CA file named by ca_file
        return f"cannot read {exc.filename}: {exc.strerror} (check ca_file)"
    if isinstance(exc, (ssl.SSLError, OSError)):
        return f"connection or TLS failure: {exc}"
    return f"{type(exc).__name__}: {exc}"


OAUTH_ONLY = (
    "the upstream takes no password any more (it offers only OAuth2 XOAUTH2): switch this account to "
    "auth: oauth2 (README: Office 365 after December 2026, Gmail)"
)


class Tokens(Protocol):
    """Where OAuth2 accounts get their access tokens (``tokens.TokenCache``)."""

    async def token(self, account: Account) -> tuple[Secret, bool]: ...  # (token, fetched just now)
    def drop(self, account: Account, value: Secret) -> None: ...


_REFUSED_TOKEN = "the provider refused a fresh OAuth2 token for {mailbox}: "
_APP_ONLY_ADVICE = {  # by provider: who must grant what, where
    "microsoft": "the app needs the SMTP.SendAsApp permission with admin consent, an Exchange service principal "
                 "(New-ServicePrincipal) and rights on the mailbox (Add-MailboxPermission), and the mailbox needs "
                 "authenticated SMTP enabled",
    "google": "the service account needs domain-wide delegation for the scope https://mail.google.com/ "
              "(Workspace admin console, Security, API controls), and subject must be a mailbox of that domain",
    "generic": "check that the app may send as this mailbox and that the scope is the one the provider's SMTP "
               "server asks for",
}  # fmt: skip


def xoauth2_advice(account: Account) -> str:
    """What to do when the provider refused a fresh token: it depends on who the token speaks for.

    A delegated token (``relay oauth login``) is a person's: refused, it is most often someone else's
    sign-in, or a sign-in without the mail scope, and the fix is to sign in again as the mailbox. An
    app-only token is refused for what the app was not granted, and where that is granted differs by
    provider (Office 365's Exchange PowerShell has no meaning for Gmail or Outlook.com)."""
    oauth = account.oauth2
    assert oauth is not None
    lead = _REFUSED_TOKEN.format(mailbox=account.username or "this mailbox")
    if oauth.delegated:
        enabled = ", and an Office 365 mailbox needs authenticated SMTP enabled" if oauth.provider == "microsoft" else ""
        return (f"{lead}the refresh token must come from a sign-in as {account.username} with the mail scope "
                f"({oauth.scope}){enabled}: sign in again with relay oauth login {account.own_user or account.name}")
    return lead + _APP_ONLY_ADVICE[oauth.provider]


async def _xoauth2(smtp: aiosmtplib.SMTP, account: Account, tokens: Tokens) -> None:
    """Log in with XOAUTH2; a refused *cached* token is dropped and a fresh one tried once."""
    assert account.username is not None  # the config models require a username for OAuth2 accounts
    token, fresh = await tokens.token(account)
    try:
        await smtp.auth_xoauth2(account.username, token.reveal())
    except aiosmtplib.SMTPAuthenticationError as exc:
        if fresh or 400 <= exc.code < 500:  # a 4xx is the login service's failure, not the token's
            raise
        tokens.drop(account, token)
        token, _ = await tokens.token(account)
        await smtp.auth_xoauth2(account.username, token.reveal())


async def _open(smtp: aiosmtplib.SMTP, account: Account, secret: Secret | None, tokens: Tokens | None = None) -> None:
    """Connect, EHLO, STARTTLS when configured (required), AUTH when a username is set."""
    with _reading("the greeting"):
        await smtp.connect()
    if account.security == "starttls":
        with _reading("EHLO"):
            await smtp.ehlo()
        if not smtp.supports_extension("starttls"):
            raise aiosmtplib.SMTPException("the upstream does not offer STARTTLS, which this account requires")
        with _reading("STARTTLS"):
            await smtp.starttls()
    if account.oauth2 is not None:
        if tokens is None:
            raise aiosmtplib.SMTPException("an OAuth2 account was given no token source")
        with _reading("AUTH"), _temporary_login_failure():
            await _xoauth2(smtp, account, tokens)
    elif account.username is not None:
        if secret is None:
            raise aiosmtplib.SMTPException("a username is set but no password source is configured")
        if smtp.is_ehlo_or_helo_needed:
            with _reading("EHLO"):
                await smtp.ehlo()
        with _reading("AUTH"), _temporary_login_failure():
            await password_login(smtp, account, secret)


@contextlib.contextmanager
def _reading(step: str) -> Iterator[None]:
    """A step whose reply aiosmtplib reads: what it cannot read (its code -1, no SMTP code) becomes
    ``UnreadableReplyError`` naming the step, as at the steps relay reads itself."""
    try:
        yield
    except aiosmtplib.SMTPResponseException as exc:
        if exc.code != aiosmtplib.SMTPStatus.invalid_response:
            raise
        unreadable = private.UnreadableReplyError(exc.message.removeprefix("Malformed SMTP response line: ").encode())
        unreadable.step = step
        raise unreadable from exc


def unreadable(exc: private.UnreadableReplyError) -> str:
    """The log's words for a reply relay could not read, with what came (printable, cut short)."""
    said = f"unreadable reply from the provider at {exc.step or 'a step of the session'}: {exc.received}"
    if exc.message_sent:  # RFC 1047, as when the reply is lost (``describe_failure``)
        said += " (after the whole message was sent: if it took the message, the next attempt sends it twice)"
    return said


# Password SASL mechanisms, best first. PLAIN and LOGIN send the same secret and every provider offers
# both; CRAM-MD5 only where neither is offered.
AUTH_PREFERENCE = ("plain", "login", "cram-md5")


def auth_mechanism(smtp: aiosmtplib.SMTP, account: Account) -> str:
    """The one mechanism this login uses: the account's ``auth_mechanism``, else the best offered.

    Raises ``SMTPException`` with what to change when the server offers no AUTH, only XOAUTH2, or not
    the configured mechanism.
    """
    offered = smtp.server_auth_methods
    if not smtp.supports_extension("auth"):
        clear = smtp.get_transport_info("sslcontext") is None
        raise aiosmtplib.SMTPException(
            "the upstream offers no login (no AUTH in its EHLO reply)"
            + (": most servers offer it only over TLS, set security: starttls or ssl" if clear else "")
        )
    if account.auth_mechanism is not None:
        if account.auth_mechanism not in offered:
            raise aiosmtplib.SMTPException(
                f"the upstream does not offer AUTH {account.auth_mechanism.upper()} (auth_mechanism); it offers "
                f"{' '.join(m.upper() for m in offered) or 'none'}: remove auth_mechanism or set one of those"
            )
        return account.auth_mechanism
    usable = [m for m in AUTH_PREFERENCE if m in offered]
    if usable:
        return usable[0]
    if "xoauth2" in offered:
        raise aiosmtplib.SMTPException(OAUTH_ONLY)
    raise aiosmtplib.SMTPException(
        f"the upstream offers no password login relay can use (it offers AUTH {' '.join(offered).upper()})"
    )


async def password_login(smtp: aiosmtplib.SMTP, account: Account, secret: Secret) -> None:
    """Log in with ONE mechanism (``auth_mechanism``), once.

    aiosmtplib's ``login()`` tries every mechanism the server offers, one after the other, when one
    is refused: with a wrong password, that is two failed logins per attempt (PLAIN, then LOGIN) in the
    provider's log, and Office 365's smart lockout and Gmail count each. A refusal raises
    ``SMTPAuthenticationError`` and the caller defers: the same secret is never tried a second way.
    """
    assert account.username is not None
    if smtp.is_ehlo_or_helo_needed:
        await smtp.ehlo()
    mechanism = auth_mechanism(smtp, account)
    login = {"plain": smtp.auth_plain, "login": smtp.auth_login, "cram-md5": smtp.auth_crammd5}[mechanism]
    await login(account.username, secret.reveal())


# The wait for the reply to a whole message (after the final dot, or BDAT ... LAST): RFC 5321 4.5.3.2.6 asks
# for 10 minutes there, and Postfix waits as long (smtp_data_done_timeout), because a provider may scan the
# message before it answers. Given up on after the account's per-command ``timeout`` instead, a provider
# that takes 75 s got the message again at every retry. The account's ``timeout`` wins when longer.
FINAL_REPLY_TIMEOUT = 600.0

# the running attempt's deadline (``deliver``), which the wait for the final reply may move later
_ATTEMPT_DEADLINE: ContextVar[asyncio.Timeout | None] = ContextVar("relay_attempt_deadline", default=None)


def _final_reply_wait(smtp: aiosmtplib.SMTP) -> float:
    """How long to wait for the reply to a whole message just sent; the attempt's deadline is moved to
    leave that much room, since giving up earlier is what sends the message twice."""
    wait = max(FINAL_REPLY_TIMEOUT, smtp.timeout or 0.0)
    deadline = _ATTEMPT_DEADLINE.get()
    when = deadline.when() if deadline is not None else None
    if deadline is not None and when is not None:
        deadline.reschedule(max(when, asyncio.get_running_loop().time() + wait + 1.0))  # the wait's own timeout first
    return wait


CHUNK = 64 * 1024  # the file read, its dot-stuffed copy and the TLS write buffer each hold about this much


async def _chunks(body: bytes | Path) -> AsyncIterator[bytes]:
    """The message in ``CHUNK`` pieces: from memory, or read from the spool file a piece at a time.

    The reads are made on the loop: a 64 KiB read from the page cache takes microseconds, less than
    the trip to a worker thread would, and between two of them the loop serves everyone else while
    the previous piece drains into the connection.
    """
    if isinstance(body, bytes):
        view = memoryview(body)
        for start in range(0, len(view), CHUNK):
            yield bytes(view[start : start + CHUNK])
        return
    fd = os.open(body, os.O_RDONLY)
    try:
        while chunk := os.read(fd, CHUNK):
            yield chunk
    finally:
        os.close(fd)


def _end_marker(tail: bytes) -> bytes:
    """The final dot, after a line end of its own unless the message ended with one (``tail``)."""
    return b".\r\n" if tail == b"\r\n" else b"\r\n.\r\n"


def _stuffed(chunk: bytes, tail: bytes) -> bytes:
    """One piece of the message dot-stuffed; ``tail`` is what the piece before it ended with."""
    if b"." not in chunk:  # most of a big message (base64 has no dot): one byte looked for, 60x faster
        return chunk
    stuffed = chunk.replace(b"\n.", b"\n..")
    if tail.endswith(b"\n") and chunk.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed


async def _send_data(smtp: aiosmtplib.SMTP, body: bytes | Path) -> aiosmtplib.SMTPResponse:
    """DATA, streamed: the message is dot-stuffed and written a chunk at a time with flow control.

    aiosmtplib's ``data()`` takes the whole message and makes three more copies of it (line-end
    regex, dot-stuffing regex, terminator), so a 25 MB message cost over 100 MB. This sends the same
    bytes from a file without holding more than a chunk, through the client's connection
    (``aiosmtplib_private.exchange``: command lock, flow control, relay's own reply reader); the spool's
    bodies already have CRLF line ends (the rewrite stage guarantees it).
    """
    start = await _ask(smtp, b"DATA\r\n", "DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    return await _send_body(smtp, body)


async def _ask(smtp: aiosmtplib.SMTP, command: bytes, step: str) -> aiosmtplib.SMTPResponse:
    """One command and its reply, read by relay's reader (which reads an over-long reply line by its
    code, and names what it cannot read: ``UnreadableReplyError``); a connection that ends or times out
    is dropped."""
    try:
        replies = await private.pipeline(smtp, [command], timeout=smtp.timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, ConnectionError):
        drop(smtp)
        raise
    except private.UnreadableReplyError as exc:
        exc.step = step
        raise
    if not replies:
        drop(smtp)
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    return replies[0]


async def _write_body(connection: private.Exchange, body: bytes | Path) -> None:
    """The message after a 354, dot-stuffed, and the final dot. A connection lost before the final dot
    was written is a plain disconnection: the server cannot have taken a message it never saw end."""
    tail = b"\r\n"
    if isinstance(body, bytes) and len(body) <= CHUNK:  # a small message: one write, end marker included
        stuffed = _stuffed(body, tail)
        tail = (tail + body[-2:])[-2:]
        connection.write(stuffed + _end_marker(tail))
        return
    try:
        async for chunk in _chunks(body):
            connection.write(_stuffed(chunk, tail))
            await connection.drain()
            tail = (tail + chunk[-2:])[-2:]
        connection.write(_end_marker(tail))
    except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
        raise aiosmtplib.SMTPServerDisconnected("connection lost while sending the message") from exc


async def _send_body(smtp: aiosmtplib.SMTP, body: bytes | Path) -> aiosmtplib.SMTPResponse:
    """The message after a 354, and the final dot; the reply to the dot (``EndOfDataError`` unless 250).
    Once the whole message is written, a reply that is lost, late or unreadable may hide that the
    provider took it (``ReplyLostError``, ``ReplyTimeoutError``, ``UnreadableReplyError.message_sent``)."""
    sent = False  # the whole message and its end marker are written
    try:
        async with private.exchange(smtp) as connection:
            await _write_body(connection, body)
            sent = True
            async with asyncio.timeout(_final_reply_wait(smtp)):
                response = await connection.next_reply()
            if response is None:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    except (aiosmtplib.SMTPServerDisconnected, TimeoutError, ConnectionError) as exc:
        drop(smtp)
        if sent:
            lost = ReplyTimeoutError if isinstance(exc, TimeoutError) else ReplyLostError
            raise lost(str(exc) or "Timed out waiting for server response") from exc
        raise
    except private.UnreadableReplyError as exc:
        exc.step, exc.message_sent = "the end of DATA", True
        raise
    if response.code != 250:
        raise EndOfDataError(response.code, response.message)
    return response


class LoginUnavailableError(aiosmtplib.SMTPResponseException):
    """AUTH answered with a 4xx (RFC 4954: 454 temporary authentication failure): the provider's login
    service failed, the password was not refused. Not an ``SMTPAuthenticationError``, so nothing takes it
    for a wrong password: no login hold for the account's mail, and ``relay send-test`` / ``check
    --connect`` report a temporary refusal (their advice comes from ``advice``, which ``AUTH_MARK`` in the
    message leads to ``LOGIN_UNAVAILABLE_ADVICE``). ``text`` is the provider's reply as it came."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(code, text + AUTH_MARK)
        self.text = text


@contextlib.contextmanager
def _temporary_login_failure() -> Iterator[None]:
    """A 4xx to AUTH becomes ``LoginUnavailableError``."""
    try:
        yield
    except aiosmtplib.SMTPAuthenticationError as exc:
        if not 400 <= exc.code < 500:
            raise
        raise LoginUnavailableError(exc.code, exc.message) from exc


class ReplyLostError(aiosmtplib.SMTPServerDisconnected):
    """The connection ended after the whole message was sent and before the reply to it (RFC 1047).

    The upstream may have taken the message: it is deferred like any lost connection, never sent again
    at once on a fresh connection as a kept connection that failed earlier is, and the log says that it
    may arrive twice (Postfix: "message may be sent more than once")."""


class ReplyTimeoutError(aiosmtplib.SMTPReadTimeoutError):
    """No reply, within ``FINAL_REPLY_TIMEOUT``, to a whole message the server had (RFC 1047): deferred like
    any timeout, and the log says that it may arrive twice (Postfix: "timed out while sending end of data
    -- message may be sent more than once")."""


class EndOfDataError(aiosmtplib.SMTPDataError):
    """The reply to the final dot was not 250 (``SMTPDataError`` alone: the DATA command was refused)."""


class BdatRefusedError(aiosmtplib.SMTPDataError):
    """BDAT answered with a session code (``SESSION_CODES``): about the session, as a refused DATA is."""


NO_SMTPUTF8 = (553, R553_NO_SMTPUTF8.removeprefix("553 "))  # (a notice tells these apart: notices.py)
NOT_IDN = (553, R553_NOT_IDN.removeprefix("553 "))


def _ascii_form(address: str) -> str | Reply:
    """``address`` as an upstream without SMTPUTF8 can take it, or the reply that refuses it.

    An ASCII local part with an internationalised domain goes with the domain as its A-label
    (``info@yhtiö.fi`` as ``info@xn--yhti-8qa.fi``: IDNA2008 with the UTS #46 mapping, non-transitional,
    as Postfix sends it), which every server takes and which reaches the same mailbox. A non-ASCII local
    part has no ASCII form (``NO_SMTPUTF8``), nor has a domain IDNA refuses (``NOT_IDN``).
    """
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return NO_SMTPUTF8
    ascii_ = ascii_domain(domain)
    return NOT_IDN if ascii_ is None else f"{local}@{ascii_}"


def _ascii_forms(outcome: Outcome, mail_from: str, recipients: list[str]) -> dict[str, str]:
    """For an upstream without SMTPUTF8: each address (sender and recipients) -> its ``_ascii_form``.
    What cannot be sent is bounced (every recipient, when it is the sender) and left out of the map."""
    sender = _ascii_form(mail_from)
    if not isinstance(sender, str):
        outcome.bounced.update({r: sender for r in recipients})
        outcome.reply = sender
        return {}
    wire = {mail_from: sender}
    for rcpt in recipients:
        form = _ascii_form(rcpt)
        if isinstance(form, str):
            wire[rcpt] = form
        else:
            outcome.bounced[rcpt] = outcome.reply = form
    return wire


# Replies about the SMTP session rather than the message: a server closing (421), a command it does not
# know (500, 502), or one it did not expect (503 bad sequence, e.g. Postfix's "nested MAIL command" when
# a failed transaction was never reset). Retrying on a fresh connection can succeed; bouncing would lose
# mail over a protocol hiccup. Not so for a 5xx to the final dot on a fresh connection: the server has
# just read this message's data and refuses *it* (aiosmtpd says "500 Line too long");
# sending the same bytes again gets the same answer, and counting it as the upstream being down retried
# it for max_queue_lifetime with upstream_down logged for a healthy account. 421 there still closes the
# session; on a reused connection, which may be out of step, a fresh connection decides (as for MAIL).
SESSION_CODES = frozenset({421, 500, 502, 503})


def _about_session(code: int) -> bool:
    """A refusal that says nothing about the message: a session code, or no refusal code at all (a
    354 to RCPT, a 250 to DATA: the server is out of step with us, or broken)."""
    return code in SESSION_CODES or not 400 <= code < 600


class SessionReplyError(aiosmtplib.SMTPResponseException):
    """The upstream's reply was about the session (see ``SESSION_CODES``), not this message: the
    connection is discarded and the recipients still open are retried, never bounced."""

    def __init__(self, code: int, message: str, step: str) -> None:
        super().__init__(code, message)
        self.step = step


async def _transaction(
    smtp: aiosmtplib.SMTP, mail_from: str, recipients: list[str], body: bytes | Path, outcome: Outcome,
    *, eightbit: bool, reused: bool = False,
) -> bool:  # fmt: skip
    """MAIL, RCPT, DATA; record per-recipient results in ``outcome``.

    Returns whether the transaction ended with a 2xx to the final dot, i.e. whether the connection
    is known to be idle; otherwise the caller resets it (RSET) before it may carry another message.
    A refusal of MAIL on a reused connection is not believed (``SessionReplyError``): a connection
    that came out of the pool may hold state the server did not forget, and only a fresh one can
    tell whether the provider really refuses this sender.

    Where the upstream offers PIPELINING (RFC 2920), MAIL, every RCPT and DATA go in one write and
    their replies are read in order (``_pipelined``): two round trips a message instead of three or
    more, with the same outcome per recipient. Where it also offers CHUNKING (RFC 3030: Office 365,
    Gmail, Postfix), a message of up to ``CHUNK`` octets goes in that same write as ``BDAT <size>
    LAST`` instead of DATA: one round trip a message (Exim sends BDAT by default too).
    """
    if smtp.is_ehlo_or_helo_needed:  # no STARTTLS and no AUTH: the extensions are not known yet
        await _greet(smtp)
    options = ["BODY=8BITMIME"] if eightbit and smtp.supports_extension("8bitmime") else []
    if smtp.supports_extension("size"):  # RFC 1870, as Postfix sends it: too big is refused at MAIL, before the body
        options.append(f"SIZE={len(body) if isinstance(body, bytes) else body.stat().st_size}")
    utf8 = not (mail_from + "".join(recipients)).isascii()
    wire: dict[str, str] = {}  # an address -> as it is sent, where that differs; outcomes name the address
    if utf8 and smtp.supports_extension("smtputf8"):
        options.append("SMTPUTF8")
    elif utf8:  # RFC 6531: a non-ASCII address needs SMTPUTF8; without it only an IDN domain can go (A-label)
        wire = _ascii_forms(outcome, mail_from, recipients)
        recipients = [r for r in recipients if r in wire]
        if not recipients:
            return True
    encoding = "utf-8" if utf8 else "ascii"
    if smtp.supports_extension("pipelining"):
        return await _pipelined(smtp, mail_from, recipients, body, outcome, options, encoding, wire, reused=reused)
    command = private.command(b"MAIL FROM:", wire.get(mail_from, mail_from), options, encoding=encoding)
    mail = await _ask(smtp, command, "MAIL")
    if mail.code != 250:
        _mail_refused(outcome, mail_from, recipients, (mail.code, mail.message), reused=reused)
        return False
    accepted = []
    for rcpt in recipients:
        reply = await _ask(smtp, private.command(b"RCPT TO:", wire.get(rcpt, rcpt), encoding=encoding), "RCPT")
        if reply.code in (250, 251):
            accepted.append(rcpt)
        else:
            _rcpt_refused(outcome, rcpt, (reply.code, reply.message))
    if not accepted:
        outcome.reply = next(iter({**outcome.bounced, **outcome.deferred}.values()), (None, ""))
        return False
    return await _body_reply(_send_data(smtp, body), outcome, accepted, reused=reused)


async def _pipelined(
    smtp: aiosmtplib.SMTP, mail_from: str, recipients: list[str], body: bytes | Path, outcome: Outcome,
    options: list[str], encoding: str, wire: dict[str, str], *, reused: bool,
) -> bool:  # fmt: skip
    """``_transaction`` with MAIL, RCPT... and DATA sent together; each reply is judged as one by one.

    Every reply of the group is read before any is judged, so a connection whose MAIL was refused is
    still in step (the server answered the RCPTs and DATA too, with refusals) and can be RSET and
    reused. A server that answers DATA with 354 when no recipient was accepted is out of step with
    us (RFC 2920 says it must refuse): that connection is dropped rather than sent an empty message.
    """
    server = (smtp.hostname, smtp.port)
    offered = smtp.supports_extension("chunking") and server not in _NO_BDAT
    chunk = body if isinstance(body, bytes) and len(body) <= CHUNK and offered else None  # sent with BDAT
    commands = [
        private.command(b"MAIL FROM:", wire.get(mail_from, mail_from), options, encoding=encoding),
        *(private.command(b"RCPT TO:", wire.get(rcpt, rcpt), encoding=encoding) for rcpt in recipients),
        # RFC 3030: the message itself in the same write, as it is (no dot-stuffing): one round trip
        b"DATA\r\n" if chunk is None else b"BDAT %d LAST\r\n%b" % (len(chunk), chunk),
    ]
    try:
        last_timeout = functools.partial(_final_reply_wait, smtp) if chunk is not None else None  # BDAT LAST's reply
        replies = await private.pipeline(smtp, commands, timeout=smtp.timeout, last_timeout=last_timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, ConnectionError) as exc:
        drop(smtp)
        if isinstance(exc, private.PipelineTimeoutError) and _took_up(chunk, exc.replies, recipients):
            raise ReplyTimeoutError(str(exc)) from exc  # only BDAT's reply is missing
        raise
    except private.UnreadableReplyError as exc:
        # the server is out of step; with BDAT it had the whole message, whichever reply it garbled
        steps = ["MAIL", *["RCPT"] * len(recipients), "DATA" if chunk is None else "BDAT ... LAST"]
        exc.step, exc.message_sent = steps[min(len(exc.replies), len(steps) - 1)], chunk is not None
        raise
    answers = iter(replies)
    data_started = len(replies) == len(commands) and replies[-1].code == 354
    try:
        mail = _next_reply(answers)
        if mail.code != 250:
            _mail_refused(outcome, mail_from, recipients, (mail.code, mail.message), reused=reused)
            return False
        accepted = []
        for rcpt in recipients:
            reply = _next_reply(answers)
            if reply.code in (250, 251):
                accepted.append(rcpt)
            else:
                _rcpt_refused(outcome, rcpt, (reply.code, reply.message))
        data = _next_reply(answers, message_sent=_took_up(chunk, replies, recipients))
        if not accepted:
            outcome.reply = next(iter({**outcome.bounced, **outcome.deferred}.values()), (None, ""))
            return False
        if chunk is not None:  # the server read the whole chunk, whatever it answered: still in step
            if data.code in (500, 502):  # it offers BDAT but does not know it: DATA from now on
                _NO_BDAT.add(server)
            return await _body_reply(_chunk_reply(data), outcome, accepted, reused=reused)
        if data.code != 354:
            _data_refused(outcome, accepted, aiosmtplib.SMTPDataError(data.code, data.message), reused=reused)
            return False
        data_started = False  # the body follows: the connection stays in step
    finally:
        if data_started:
            drop(smtp)
    return await _body_reply(_send_body(smtp, body), outcome, accepted, reused=reused)


def _took_up(chunk: bytes | None, replies: list[aiosmtplib.SMTPResponse], recipients: list[str]) -> bool:
    """Whether the server may have taken a message sent with BDAT whose reply is the one missing: MAIL
    accepted and every RCPT answered, one at least accepted (the server lost or silent after that is
    ``ReplyLostError`` or ``ReplyTimeoutError``)."""
    answered = chunk is not None and len(replies) == len(recipients) + 1 and replies[0].code == 250
    return answered and any(reply.code in (250, 251) for reply in replies[1:])


_NO_BDAT: set[tuple[str | None, int | None]] = set()  # servers that refused BDAT as a command (500, 502)


async def _chunk_reply(reply: aiosmtplib.SMTPResponse) -> aiosmtplib.SMTPResponse:
    """The reply to ``BDAT ... LAST``: 250, or a refusal of the message as after the final dot
    (``EndOfDataError``), except a session code (``SESSION_CODES``: BDAT itself refused, or the server
    out of step), which is about the session, as a refusal of the DATA command is: never a bounce."""
    if reply.code in SESSION_CODES:
        raise BdatRefusedError(reply.code, reply.message)
    if reply.code != 250:
        raise EndOfDataError(reply.code, reply.message)
    return reply


async def _body_reply(
    sending: Awaitable[aiosmtplib.SMTPResponse], outcome: Outcome, accepted: list[str], *, reused: bool
) -> bool:
    """The reply to the final dot decides for every accepted recipient, pipelined or not."""
    try:
        response = await sending
    except aiosmtplib.SMTPDataError as exc:
        _data_refused(outcome, accepted, exc, reused=reused)
        return False
    outcome.delivered.extend(accepted)
    outcome.reply = (response.code, response.message)
    return True


def _next_reply(answers: Iterator[aiosmtplib.SMTPResponse], *, message_sent: bool = False) -> aiosmtplib.SMTPResponse:
    """The next reply of a pipelined group; the server closing before it is a disconnection
    (``ReplyLostError`` if it is the reply to a message the server had: BDAT with accepted recipients)."""
    reply = next(answers, None)
    if reply is None:
        lost = ReplyLostError if message_sent else aiosmtplib.SMTPServerDisconnected
        raise lost("the upstream closed the connection before answering every command")
    return reply


async def _greet(smtp: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO from a server that refuses it (what aiosmtplib's ``mail()`` does on its own)."""
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not smtp.is_connected:
            raise
        await smtp.helo()


def _mail_refused(outcome: Outcome, mail_from: str, recipients: list[str], reply: Reply, *, reused: bool) -> None:
    """MAIL refused: 5xx bounces everyone, 4xx defers; a session code, or any refusal on a reused
    connection, raises ``SessionReplyError`` (a fresh connection decides)."""
    code = reply[0] or 0
    if _about_session(code) or reused:
        raise SessionReplyError(code, reply[1], "MAIL") from None
    verdict = "refused" if 500 <= code < 600 else "deferred (temporary)"
    _fail_all(outcome, recipients, reply, f"sender {mail_from} {verdict} by the upstream")


def _rcpt_refused(outcome: Outcome, rcpt: str, reply: Reply) -> None:
    """One recipient refused: 5xx bounces it, 4xx defers it; a session code ends the attempt."""
    code = reply[0] or 0
    if _about_session(code):
        raise SessionReplyError(code, reply[1], "RCPT") from None
    target = outcome.bounced if 500 <= code < 600 else outcome.deferred
    target[rcpt] = reply


def _data_refused(outcome: Outcome, accepted: list[str], exc: aiosmtplib.SMTPDataError, *, reused: bool) -> None:
    """DATA or the final dot refused for the accepted recipients (see ``SESSION_CODES`` for the
    exception: a 5xx to the dot on a fresh connection is the server's verdict on this message)."""
    after_dot = isinstance(exc, EndOfDataError)
    if _about_session(exc.code) and not (after_dot and 500 <= exc.code < 600 and not reused):
        step = "the end of DATA" if after_dot else "BDAT" if isinstance(exc, BdatRefusedError) else "DATA"
        raise SessionReplyError(exc.code, exc.message, step) from None
    _fail_all(outcome, accepted, (exc.code, exc.message), "message refused after DATA")


async def _reset(smtp: aiosmtplib.SMTP) -> bool:
    """RSET after a transaction that did not end cleanly (Postfix does the same before reusing a
    cached connection); ``False`` (and the connection closed) unless the server confirms with 250."""
    try:
        await smtp.rset()
    except (aiosmtplib.SMTPException, OSError):
        drop(smtp)
        return False
    return True


class ConnectionPool:
    """Authenticated connections kept open per account and reused for the next message.

    Opening a connection costs a TCP and TLS handshake plus AUTH: several round trips, and most of
    the time of a small message. Like Postfix's connection cache, a connection that finished a
    transaction cleanly is parked here; the next message for the same account (and the same secret:
    a changed password never rides an old login) takes it. Parked connections older than
    ``idle_timeout`` or used ``max_messages`` times are closed instead of reused.

    An OAuth2 account has no password: its key is the account itself, whose ``oauth2`` names the
    client-secret or refresh-token source, not each access token, so connections outlive token
    refreshes (an SMTP session is authenticated once, at login).
    """

    def __init__(self, *, idle_timeout: float = 30.0, max_messages: int = 100) -> None:
        self.idle_timeout = idle_timeout
        self.max_messages = max_messages
        self._idle: dict[tuple[Account, int], list[tuple[float, int, aiosmtplib.SMTP]]] = {}
        self._swept = 0.0

    def _sweep(self, now: float) -> None:
        """Close what has idled too long under any key: after a reload that changed an account, or a
        new password, the old key is never asked for again, and its logins would stay open for good."""
        self._swept = now
        for key, parked in list(self._idle.items()):
            keep = []
            for item in parked:
                if now - item[0] < self.idle_timeout:
                    keep.append(item)
                else:
                    item[2].close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    @staticmethod
    def _key(account: Account, secret: Secret | None) -> tuple[Account, int]:
        return account, fingerprint(secret)

    def take(self, account: Account, secret: Secret | None) -> tuple[aiosmtplib.SMTP, int] | None:
        now = time.monotonic()
        if now - self._swept >= 1.0:
            self._sweep(now)
        parked = self._idle.get(self._key(account, secret), [])
        while parked:
            since, used, smtp = parked.pop()
            if now - since < self.idle_timeout and smtp.is_connected and not _unread(smtp):
                return smtp, used
            smtp.close()
        return None

    def give_back(self, account: Account, secret: Secret | None, smtp: aiosmtplib.SMTP, used: int) -> None:
        if used >= self.max_messages or not smtp.is_connected:
            smtp.close()
            return
        self._idle.setdefault(self._key(account, secret), []).append((time.monotonic(), used, smtp))

    async def close_all(self) -> None:
        parked = [smtp for entries in self._idle.values() for _, _, smtp in entries]
        self._idle.clear()
        await asyncio.gather(*(close_politely(smtp) for smtp in parked), return_exceptions=True)
        if parked:
            await asyncio.sleep(0.1)  # a TLS transport closes asynchronously (close_notify): let it finish


def _unread(smtp: aiosmtplib.SMTP) -> bool:
    """Did the server send something nobody asked for (a second reply to the final dot)? Then the next
    command would read it as its own reply: the connection is out of step and must not be reused."""
    return private.has_unread(smtp)


async def connect(account: Account, secret: Secret | None, *, tokens: Tokens | None = None) -> aiosmtplib.SMTP:
    """An open, TLS-protected (as configured) and logged-in connection; raises aiosmtplib errors
    (and ``TokenError`` when an OAuth2 account cannot get a token)."""
    smtp = _client(account)
    try:
        await _open(smtp, account, secret, tokens)
    except BaseException:
        drop(smtp)
        raise
    return smtp


async def deliver(
    account: Account, secret: Secret | None, mail_from: str, recipients: list[str], body: bytes | Path,
    *, pool: ConnectionPool | None = None, deadline: float | None = None, eightbit: bool | None = None,
    tokens: Tokens | None = None, logged_in: Callable[[], None] | None = None,
) -> Outcome:  # fmt: skip
    """One attempt; never raises for a delivery problem (they are in the ``Outcome``). ``logged_in`` is
    called once the session is logged in (or taken from the pool, logged in), before the transaction.

    ``body`` is the message (CRLF line ends), or the spool file holding it; ``eightbit`` says whether
    it has 8-bit bytes (computed from ``body`` when it is given as bytes).
    """
    if eightbit is None:
        eightbit = not body.isascii() if isinstance(body, bytes) else True
    outcome = Outcome()
    started = time.monotonic()
    smtp: aiosmtplib.SMTP | None = None
    used, clean, abandon = 0, False, False
    token = None
    try:
        async with asyncio.timeout(deadline or account.timeout * 4) as attempt_deadline:
            token = _ATTEMPT_DEADLINE.set(attempt_deadline)
            reused = pool.take(account, secret) if pool is not None else None
            smtp, used = reused if reused is not None else (await connect(account, secret, tokens=tokens), 0)
            if logged_in is not None:  # (a pooled connection logged in when it was made)
                logged_in()
            try:
                idle = await _transaction(smtp, mail_from, recipients, body, outcome, eightbit=eightbit,
                                          reused=reused is not None)  # fmt: skip
            except (SessionReplyError, aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
                drop(smtp)
                decided = outcome.delivered or outcome.deferred or outcome.bounced
                if reused is None or decided or isinstance(exc, ReplyLostError):  # that one may have been taken
                    raise
                # the parked connection was closed by the provider meanwhile, or holds a state the
                # provider did not forget: whatever it said, one fresh connection decides
                smtp, used = await connect(account, secret, tokens=tokens), 0
                idle = await _transaction(smtp, mail_from, recipients, body, outcome, eightbit=eightbit)
            clean = idle or await _reset(smtp)
    except aiosmtplib.SMTPAuthenticationError as exc:
        how = "XOAUTH2 login" if account.oauth2 is not None else "login"
        _defer_all(outcome, recipients, (exc.code, exc.message), f"upstream refused the {how} (AUTH)")
        outcome.advice = login_advice(account, exc.code, exc.message)
        outcome.login_refused = True
    except LoginUnavailableError as exc:  # the provider's login service, not the secret: no login hold
        _defer_all(outcome, recipients, (exc.code, exc.text), f"the upstream's login service failed for now "
                   f"(AUTH answered {exc.code}), will retry")  # fmt: skip
        outcome.advice = advice(exc.code, exc.message)
    except TokenError as exc:  # no token, no login: the mail waits until the admin fixes the app or secret
        _defer_all(outcome, recipients, (None, exc.reply_text), f"OAuth2 token: {exc}")
        outcome.advice = token_advice(account, exc)
    except private.UnreadableReplyError as exc:  # the server is out of step: what it did is not known
        abandon = True
        _defer_all(outcome, _undecided(outcome, recipients), (None, exc.received), unreadable(exc))
    except SessionReplyError as exc:  # about the connection, not the message: retried, never bounced
        abandon = True
        error = f"the upstream answered {exc.step} with a session error; the connection was dropped, will retry"
        _defer_all(outcome, _undecided(outcome, recipients), (exc.code, exc.message), error)
    except aiosmtplib.SMTPResponseException as exc:
        # greeting, EHLO or STARTTLS refused: a server problem or ours, never the message's; keep it
        _defer_all(outcome, _undecided(outcome, recipients), (exc.code, exc.message), "upstream refused the session")
    except TimeoutError as exc:  # the attempt's deadline, or one operation's timeout (SMTPTimeoutError)
        abandon = True  # the upstream stopped answering: a polite QUIT would wait for it too
        per_operation = isinstance(exc, aiosmtplib.SMTPTimeoutError)
        error = describe_failure(exc) if per_operation else "delivery attempt exceeded its deadline"
        _defer_all(outcome, _undecided(outcome, recipients), (None, ""), error)
    except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
        _defer_all(outcome, _undecided(outcome, recipients), (None, ""), describe_failure(exc))
    except asyncio.CancelledError:  # the daemon is stopping: no polite QUIT to a server that may hang
        abandon, clean = True, False
        raise
    finally:
        if token is not None:
            _ATTEMPT_DEADLINE.reset(token)
        outcome.duration = time.monotonic() - started
        if smtp is not None and clean and pool is not None:
            pool.give_back(account, secret, smtp, used + 1)
        elif smtp is not None and abandon:
            drop(smtp)
        elif smtp is not None:
            await close_politely(smtp)
    return outcome


def _undecided(outcome: Outcome, recipients: list[str]) -> list[str]:
    decided = set(outcome.delivered) | set(outcome.bounced) | set(outcome.deferred)
    return [r for r in recipients if r not in decided]


def drop(smtp: aiosmtplib.SMTP) -> None:
    """Give a connection up at once: broken, out of step, timed out, or the daemon is stopping.

    ``close()`` on a TLS connection sends close_notify and keeps the socket open until the server
    answers it (up to 30 s), which a server that stopped answering never does; a connection given up on
    owes the server nothing, so its socket is closed now (``abort``).
    """
    abort = getattr(smtp.transport, "abort", None)  # asyncio's and uvloop's transports (not asyncio subclasses)
    if abort is not None:
        abort()
    smtp.close()


async def close_politely(smtp: aiosmtplib.SMTP) -> None:
    """QUIT politely, but never wait long for a provider that stopped answering."""
    if not smtp.is_connected:
        return
    try:
        async with asyncio.timeout(5):
            await smtp.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        drop(smtp)
