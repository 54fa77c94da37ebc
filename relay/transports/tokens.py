"""OAuth2 access tokens for upstream accounts: fetched, cached, refreshed before they expire.

Input: an ``Account`` with an ``oauth2`` token source. Output: an access token (a ``Secret``) that is
valid now, or a ``TokenError`` that says which step failed and carries the provider's error code
(``AADSTS7000215``, ``invalid_grant``...), never a secret.

- One token per token source (endpoint, client, scope, secret sources), kept in memory and reused
  until 5 minutes (a quarter of its lifetime, for a short-lived token) before it expires: a stream of 1,000 messages costs a
  handful of token requests, not 1,000.
- One request in flight per source: deliveries that need a token while it is being fetched wait for
  that request instead of sending their own, and get its token or its ``TokenError`` (a hung endpoint
  costs the waiters one timeout, not one each in turn). Two sources that share one refresh token (an
  SMTP and a Graph account of the same delegated sign-in) take turns, so a provider that rotates it
  strictly never sees the old one twice.
- A failed request is remembered: the retries of a queue full of mail get its error without asking
  again, for 1 s after the first failure, doubling to 5 minutes while it keeps failing (a 429's
  Retry-After is honoured), so a wrong secret costs Entra a few requests an hour, not thousands. The
  moment a secret's source holds something new (the admin's fix), the next attempt asks at once.
- A failure to renew a token that has not yet expired (the endpoint blips in the last 5 minutes of a
  token's hour) keeps using that token: no mail waits for it.
- The client secret and the refresh token are read from their source at each request, so a secret
  the admin fixes is used by the next attempt, without a restart.
- A refresh token the provider rotates is written back to its file atomically (0600, same owner); a
  source that cannot be written (environment, systemd credential, a read-only file) keeps the new
  token in memory and is warned about once, until the source holds another token than it did then:
  that is the admin's new sign-in, and it is used.

HTTP is httpx (async, on the daemon's event loop), TLS verified with the account's ``ca_file``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog

from relay.config.credentials import Secret, SecretRef, read_secret, write_secret_file
from relay.envelope import Account, OAuth2
from relay.errors import SecretError, TokenError
from relay.transports.assertions import (
    CLIENT_ASSERTION_TYPE,
    JWT_BEARER_GRANT,
    client_assertion,
    service_account_assertion,
)
from relay.transports.httpclients import HttpClients

log = structlog.get_logger("relay.tokens")
_AADSTS_RE = re.compile(r"AADSTS\d+")
REFRESH_MARGIN = 300.0  # seconds before expiry a token is replaced (capped at a quarter of its lifetime)
FIRST_HOLD = 1.0  # seconds a failed token request is answered from memory; doubles while it keeps failing
MAX_HOLD = 300.0
_SIGNED = ("client_assertion", "assertion")  # form fields signed anew at each request
EXPIRY_SLACK = 30.0  # a token this close to its expiry is not used when its renewal fails


@dataclass(frozen=True)
class _Failure:
    """A token request that failed, and the secrets it was sent with (a digest, never the values)."""

    error: TokenError
    secrets: str
    until: float  # time.monotonic(): until then the same secrets get this error without a request
    hold: float  # how long this hold was: the next failure in a row holds twice as long


@dataclass(frozen=True)
class _Kept:
    """A rotated refresh token that could not be written back, and what its source held then.

    When the source holds something else later, the admin has put a new token there (after a
    revocation, say) and that one wins: the kept token must not shadow it until a restart.
    """

    token: Secret
    source: str | None


@dataclass(frozen=True)
class Token:
    """An access token and when to stop using it (``time.monotonic`` seconds)."""

    value: Secret
    expires_at: float
    refresh_at: float

    @property
    def usable(self) -> bool:
        return time.monotonic() < self.refresh_at


def _sources(oauth: OAuth2) -> tuple[SecretRef, SecretRef]:
    client = SecretRef(oauth.client_secret_file, oauth.client_secret_env, oauth.client_secret_credential)
    refresh = SecretRef(oauth.refresh_token_file, oauth.refresh_token_env, oauth.refresh_token_credential)
    return client, refresh


def claims(token: Secret) -> dict[str, Any]:
    """The claims of a JWT access token, unverified (for a diagnosis only); ``{}`` when it is not a JWT.

    Microsoft's tokens are JWTs: ``roles`` lists application permissions (``Mail.Send``,
    ``SMTP.SendAsApp``), ``scp`` delegated ones. Google's are opaque.
    """
    parts = token.reveal().split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def permissions(token: Secret) -> set[str]:
    """Application (``roles``) and delegated (``scp``) permissions a token carries."""
    data = claims(token)
    roles = data.get("roles")
    granted = {str(role) for role in roles} if isinstance(roles, list) else set()
    return granted | set(str(data.get("scp", "")).split())


class TokenCache:
    """Access tokens per token source, for every account of one daemon (or one ``relay check``)."""

    def __init__(self, *, on_failure: Callable[[str], None] | None = None, http: HttpClients | None = None) -> None:
        self.http = http if http is not None else HttpClients()  # shared with Graph: one pool per TLS setting
        self._on_failure = on_failure  # told the account name of every failed token request (metrics)
        self._tokens: dict[OAuth2, Token] = {}
        self._fetching: dict[OAuth2, asyncio.Task[Token]] = {}  # the one request in flight per source
        self._rotated: dict[OAuth2, _Kept] = {}  # refresh tokens that could not be written back
        self._warned: set[OAuth2] = set()
        self._failed: dict[OAuth2, _Failure] = {}
        self._turns: dict[tuple[asyncio.AbstractEventLoop, str], asyncio.Lock] = {}  # per refresh token source
        self.requests = 0  # token requests sent (the 1,000-message stream test counts them)

    async def token(self, account: Account) -> tuple[Secret, bool]:
        """A usable access token and whether it was fetched just now (``False``: from the cache).

        Raises:
            TokenError: the secret, the endpoint or the provider's answer failed.
        """
        oauth = _oauth(account)
        cached = self._tokens.get(oauth)
        if cached is not None and cached.usable:
            return cached.value, False
        fetching = self._fetching.get(oauth)
        if fetching is None or fetching.get_loop() is not asyncio.get_running_loop():
            fetching = asyncio.get_running_loop().create_task(self._fetch_and_keep(account, oauth))
            self._fetching[oauth] = fetching
            fetching.add_done_callback(lambda done: self._fetched(oauth, done))
        # Everyone waiting gets this request's token or its TokenError: after a failure (a hung endpoint,
        # a wrong secret) the waiters must not each send their own request, one timeout after another.
        # shield: a delivery that gives up (its deadline) does not cancel the request the others wait for.
        try:
            token = await asyncio.shield(fetching)
        except TokenError:
            cached = self._tokens.get(oauth)
            if cached is not None and time.monotonic() < cached.expires_at - EXPIRY_SLACK:
                return cached.value, False  # renewal failed, but this one is still good for a while
            raise
        return token.value, True

    async def _fetch_and_keep(self, account: Account, oauth: OAuth2) -> Token:
        async with self._turn(oauth):
            try:
                token = await self._fetch(account, oauth)
            except _Remembered as remembered:  # a copy: the held error's traceback must not grow per raise
                held = remembered.error
                raise TokenError(str(held), step=held.step, code=held.code, description=held.description) from None
            except TokenError as exc:
                if self._on_failure is not None:
                    self._on_failure(account.name)
                self._remember(account, oauth, exc)
                raise
        self._failed.pop(oauth, None)
        self._tokens[oauth] = token
        return token

    def _turn(self, oauth: OAuth2) -> asyncio.Lock:
        """The lock of the refresh token's source (a fresh one when there is none: client credentials)."""
        _, refresh = _sources(oauth)
        source = str(refresh.password_file or "") or refresh.password_env or refresh.password_credential
        if not source:
            return asyncio.Lock()
        return self._turns.setdefault((asyncio.get_running_loop(), source), asyncio.Lock())

    def _remember(self, account: Account, oauth: OAuth2, exc: TokenError) -> None:
        if exc.step == "secret" or exc.secrets is None:  # nothing was asked: the file is fixed, not the provider
            return
        before = self._failed.get(oauth)
        hold = min(before.hold * 2, MAX_HOLD) if before is not None else FIRST_HOLD
        hold = max(hold, min(exc.retry_after or 0.0, MAX_HOLD))
        self._failed[oauth] = _Failure(exc, exc.secrets, time.monotonic() + hold, hold)
        log.debug("token_request_held", upstream=account.name, seconds=hold)

    def _fetched(self, oauth: OAuth2, done: asyncio.Task[Token]) -> None:
        """The request ended: the next caller after a failure asks again (and nobody is left unretrieved)."""
        if self._fetching.get(oauth) is done:
            del self._fetching[oauth]
        if not done.cancelled():
            done.exception()  # retrieved, also when every waiter gave up before the answer

    def drop(self, account: Account, value: Secret) -> None:
        """The upstream refused ``value``: forget it, so the next caller fetches a fresh one."""
        oauth = _oauth(account)
        cached = self._tokens.get(oauth)
        if cached is not None and cached.value is value:
            del self._tokens[oauth]

    async def _fetch(self, account: Account, oauth: OAuth2) -> Token:
        form, refresh, source, material = await asyncio.to_thread(self._form, oauth)
        stable = {key: value for key, value in form.items() if key not in _SIGNED}  # an assertion differs each time
        digest = hashlib.sha256(json.dumps([stable, material], sort_keys=True).encode()).hexdigest()
        failed = self._failed.get(oauth)
        if failed is not None and failed.secrets == digest and time.monotonic() < failed.until:
            raise _Remembered(failed.error)
        try:
            body = await self._post(account, oauth, form)
        except TokenError as exc:
            exc.secrets = digest
            raise
        access = body.get("access_token")
        if not isinstance(access, str) or not access:
            raise TokenError("the token endpoint answered without an access_token", step="token refused")
        rotated = body.get("refresh_token")
        if isinstance(rotated, str) and rotated and (refresh is None or rotated != refresh.reveal()):
            await asyncio.to_thread(self._keep_rotated, account, oauth, _Kept(Secret(rotated), source))
        lifetime = _lifetime(body.get("expires_in"))
        now = time.monotonic()
        return Token(Secret(access), now + lifetime, now + lifetime - min(REFRESH_MARGIN, lifetime / 4))

    def _form(self, oauth: OAuth2) -> tuple[dict[str, str], Secret | None, str | None, str]:
        """The token request (client credentials, refresh token or JWT-bearer grant), secrets read just now,
        what the refresh token's source holds (a rotation not saved is kept while the source holds that),
        and a digest of the key material an assertion was signed with."""
        _, refresh_ref = _sources(oauth)
        try:
            stored = read_secret(refresh_ref, kind="refresh token")
            if oauth.service_account_file is not None:  # Google: the grant is the assertion, no client
                signed = service_account_assertion(oauth, oauth.token_url)
                form = {"grant_type": JWT_BEARER_GRANT, "assertion": signed.value.reveal()}
                return form, None, None, signed.material
            form, material = client_authentication(oauth, oauth.token_url)
        except SecretError as exc:
            raise TokenError(str(exc), step="secret") from None
        source = stored.reveal() if stored is not None else None
        kept = self._rotated.get(oauth)
        if kept is not None and kept.source != source:  # the admin replaced it: theirs is newer than ours
            del self._rotated[oauth]
            self._warned.discard(oauth)  # if its next rotation cannot be saved either, say so again
            kept = None
        refresh = kept.token if kept is not None else stored
        if oauth.scope:
            form["scope"] = oauth.scope
        if refresh is not None:
            form.update(grant_type="refresh_token", refresh_token=refresh.reveal())
        else:
            form["grant_type"] = "client_credentials"
        return form, refresh, source, material

    async def _post(self, account: Account, oauth: OAuth2, form: dict[str, str]) -> dict[str, Any]:
        host = urlsplit(oauth.token_url).hostname or oauth.token_url
        try:
            client = self.http.get(account)
            self.requests += 1
            response = await client.post(oauth.token_url, data=form, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:  # the message names the host or the socket error, never the form
            failure = http_failure(exc)
            if "TLS" in failure:
                words = f"token endpoint {host}: {failure}"
            elif isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
                words = f"token endpoint {host} took the request and did not answer in time ({failure})"
            else:
                words = f"token endpoint {host} unreachable: {failure}"
            raise TokenError(words, step="token endpoint") from None
        except OSError as exc:  # the ca_file named by the account
            words = f"token endpoint {host}: {exc.strerror or exc} (check ca_file)"
            raise TokenError(words, step="token endpoint") from None
        body = json_body(response)
        if not body and not _is_json(response):
            raise TokenError(_not_oauth_words(host, response), step="token endpoint")
        if response.status_code == 200:
            return body
        code = str(body.get("error") or f"HTTP {response.status_code}")
        description = str(body.get("error_description") or "").split("\r\n")[0].split("\n")[0].strip()
        if response.status_code >= 500 or response.status_code == 429:
            step, words = "token endpoint", f"token endpoint {host} is failing (HTTP {response.status_code})"
        else:
            aadsts = _AADSTS_RE.search(description)
            codes = f"{code}, {aadsts[0]}" if aadsts else code
            step, words = "token refused", f"{host} refused the token request ({codes})"
        error = TokenError(words, step=step, code=code, description=description)
        error.retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        raise error

    def _keep_rotated(self, account: Account, oauth: OAuth2, new: _Kept) -> None:
        """The provider sent a new refresh token: the old one may stop working, so keep this one."""
        if oauth.refresh_token_file is not None:
            try:
                write_secret_file(oauth.refresh_token_file, new.token.reveal())
                self._rotated.pop(oauth, None)
                log.info("refresh_token_rotated", upstream=account.name, result="saved",
                         file=str(oauth.refresh_token_file))  # fmt: skip
                return
            except OSError as exc:
                reason = f"cannot write {oauth.refresh_token_file}: {exc.strerror or exc}"
        else:
            reason = "its source (environment variable or systemd credential) cannot be written"
        self._rotated[oauth] = new
        if oauth not in self._warned:
            self._warned.add(oauth)
            log.warning("refresh_token_not_saved", upstream=account.name, reason=reason,
                        advice="relay uses the new refresh token until it stops; use a refresh_token_file "
                               "the relay user can write so that a restart keeps it")  # fmt: skip


def client_authentication(oauth: OAuth2, token_url: str) -> tuple[dict[str, str], str]:
    """How the app proves itself in a token request to ``token_url``: its id, with its client secret or a
    client assertion signed with its certificate (nothing more for a public client); and a digest of
    the certificate and key ("" without one). Used by the token cache and by ``relay oauth login``.

    Raises:
        SecretError: the client secret, the certificate or its key cannot be read.
    """
    client_ref, _ = _sources(oauth)
    form = {"client_id": oauth.client_id}
    if oauth.client_certificate_file is not None:
        signed = client_assertion(oauth, token_url)
        form.update(client_assertion_type=CLIENT_ASSERTION_TYPE, client_assertion=signed.value.reveal())
        return form, signed.material
    client_secret = read_secret(client_ref, kind="client secret")
    if client_secret is not None:
        form["client_secret"] = client_secret.reveal()
    return form, ""


def _oauth(account: Account) -> OAuth2:
    if account.oauth2 is None:
        raise TokenError(f"account {account.name} has no oauth2 settings", step="config")
    return account.oauth2


class _Remembered(Exception):
    """A failure still held for the same secrets: raised again without a request (and not counted)."""

    def __init__(self, error: TokenError) -> None:
        self.error = error
        super().__init__(str(error))


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` given in seconds (at least 0); ``None`` when absent, a date, ``inf``/``nan`` or
    nonsense: the caller's own pause applies (a doubling hold, Graph's default)."""
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _lifetime(value: Any) -> float:
    """``expires_in`` seconds (a number or a numeric string); one hour when missing or odd."""
    try:
        lifetime = float(value)
    except (TypeError, ValueError):
        return 3600.0
    return lifetime if lifetime > 0 else 3600.0


def _is_json(response: httpx.Response) -> bool:
    try:
        response.json()
    except ValueError:
        return False
    return True


_TITLE_RE = re.compile(rb"<title[^>]*>([^<]{1,200})", re.IGNORECASE)


def _not_oauth_words(host: str, response: httpx.Response) -> str:
    """An answer that is no OAuth2 JSON at all: a web filter's or proxy's page, or a token_url that names
    a web page. Named as such, with its title (the admin recognises "Access Denied"), and where to look;
    it was "refused the token request" or "answered without an access_token", which sent admins to the
    app's registration. Temporary: the mail waits while the admin fixes the way to the endpoint."""
    kind = response.headers.get("Content-Type", "").split(";")[0].strip() or "no content type"
    title = _TITLE_RE.search(response.content[:65536])
    shown = ""
    if title is not None:
        words = re.sub(r"[^\x20-\x7e]+", " ", title.group(1).decode("utf-8", "replace")).strip()[:80]
        shown = f" ({words!r})" if words else ""
    return (f"token endpoint {host} answered HTTP {response.status_code} with {kind}{shown}, not OAuth2 JSON: "
            f"check token_url and any proxy or web filter between relay and {host}")


def json_body(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def http_failure(exc: httpx.HTTPError) -> str:
    """What went wrong on the wire, in words; TLS trouble is named as such."""
    cause: BaseException | None = exc.__cause__ or exc.__context__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    text = str(cause or exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS certificate not trusted (check ca_file)"
    return text
