"""``relay oauth login ACCOUNT``: a person signs in once, and relay keeps the refresh token it gets.

For the accounts that send as a *person* (Outlook.com / Hotmail, Gmail on OAuth2, Microsoft delegated
``SMTP.Send``): the account's ``oauth2:`` block names the app (``client_id``, a client secret or a
certificate for a confidential app, none for a public one), the scope and ``refresh_token_file``. The
new refresh token is written there as the token cache writes a rotated one (temp file, fsync, rename,
0600, owner and group kept); the running daemon reads that file at its next token request, so no
restart or reload is needed.

Three ways to sign in:

- ``device`` (the default for ``microsoft``), RFC 8628: one line with the verification address and
  the user code; relay polls the token endpoint at the interval the provider gives (5 s more after each
  ``slow_down``) until the sign-in, a refusal, or ``expires_in``. Google refuses the mail scope in this
  flow, so it is refused here with a pointer to ``--flow browser``.
- ``browser`` (the default for ``google``), RFC 8252: a loopback redirect to ``127.0.0.1`` (a free port,
  or ``--port``), PKCE (S256) and a random ``state``. relay prints the authorization address and the
  ``ssh -L`` line an admin at another machine needs, waits for the redirect, checks ``state``, and
  exchanges the code with the verifier.
- ``paste``: the same address and redirect, but nothing listens: the admin signs in anywhere and pastes
  the address the browser ended on (its address bar shows it, though the page does not load).

Who signed in is read from the ``id_token`` (``preferred_username``, ``email``). When that is not the
account's ``username`` and the provider lets a person's token log in as their own mailbox only
(Outlook.com / Hotmail, Gmail, ``generic``), nothing is written unless ``--force``: a token that cannot
send would replace one that can. An Office 365 (work or school) sign-in of another person is saved
with a warning: a delegate with Full Access may send for a shared mailbox.

Exit codes (sysexits(3), as ``send-test``): 0 saved; 64 usage (no such account, a flow the provider
refuses, a port in use); 69 an endpoint unreachable or a TLS failure; 77 declined, the code expired,
``state`` or PKCE did not match, no redirect address pasted, or another person signed in (nothing
written, the old file untouched); 78 the config must change (no ``refresh_token_file``, a token source
that cannot be written, a user who would overwrite the company's sign-in, the provider refused the app).
No token, code or verifier is ever printed or logged: the output names files and identities only.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import http.server
import os
import pwd
import queue
import secrets
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass
from os import EX_CONFIG, EX_NOPERM, EX_UNAVAILABLE, EX_USAGE  # sysexits(3)
from pathlib import Path
from typing import Any, Literal, TextIO
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt

from relay.config.accounts import account_for
from relay.config.credentials import write_secret_file
from relay.config.models import Config, UpstreamOverride
from relay.envelope import USER_ACCOUNT_PREFIX, Account, OAuth2
from relay.errors import ConfigError, SecretError
from relay.transports.smtp import tls_context
from relay.transports.tokens import client_authentication, http_failure, json_body

Flow = Literal["device", "browser", "paste"]
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SLOW_DOWN_STEP = 5.0  # seconds added to the polling interval at each slow_down (RFC 8628 3.5)
REDIRECT_WAIT = 600.0  # seconds the browser flow waits for the redirect (an authorization code's lifetime)
GOOGLE_AUTHORIZE = "https://accounts.google.com/o/oauth2/v2/auth"
GOOGLE_DEVICE = "https://oauth2.googleapis.com/device/code"
_MICROSOFT_SUFFIX = "/token"
_DECLINED = {"access_denied", "authorization_declined", "consent_required", "interaction_required"}
_EXPIRED = {"expired_token", "bad_verification_code"}
PROG = "relay oauth login"
DEFAULT_CONFIG = "/etc/relay/relay.yaml"  # cli.py's: -c is left out of a command for this one
PASTE_TRIES = 3  # --flow paste: what is not a redirect address at all is asked again, this many times in all
MSA_TENANT = "9188040d-6c67-4c5b-b112-36a304b66dad"  # the ``tid`` of every personal Microsoft account


class LoginFailed(Exception):
    """The sign-in did not give a refresh token; ``code`` is the exit code, the message says what to do."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Endpoints:
    """Where the sign-in goes: the provider's authorization, device and token endpoints."""

    token: str
    authorize: str | None
    device: str | None


def endpoints(oauth: OAuth2) -> Endpoints:
    """Microsoft's come from the tenant (or from ``token_url``'s ``.../oauth2/v2.0/`` prefix: national
    clouds, tests); Google's are Google's; ``generic`` names them (``authorize_url``, ``device_url``)."""
    authorize, device = oauth.authorize_url, oauth.device_url
    if oauth.provider == "microsoft" and oauth.token_url.endswith(_MICROSOFT_SUFFIX):
        prefix = oauth.token_url.removesuffix(_MICROSOFT_SUFFIX)
        authorize, device = authorize or prefix + "/authorize", device or prefix + "/devicecode"
    elif oauth.provider == "google":
        authorize, device = authorize or GOOGLE_AUTHORIZE, device or GOOGLE_DEVICE
    return Endpoints(oauth.token_url, authorize, device)


@dataclass
class Output:
    """Where the command talks: ``out`` for what the admin must do and the result, ``err`` for refusals."""

    out: TextIO
    err: TextIO

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def warn(self, line: str) -> None:
        print(f"{PROG}: {line}", file=self.err, flush=True)


# region #### the account ####


def resolve(config: Config, name: str) -> Account:
    """The account ``name`` names: an upstream, or a user whose own account has the ``oauth2:`` block."""
    if name in config.upstreams:
        account = account_for(config, name)
        _not_anothers_sign_in(config, account)
        return account
    user = config.users.get(name)
    if user is None:
        known = ", ".join(sorted(config.upstreams)) or "none"
        raise LoginFailed(f"no upstream or user named {name!r} (upstreams: {known})", EX_USAGE)
    if not isinstance(user.upstream, UpstreamOverride):
        shared = user.upstream or config.company.upstream or "the company's"
        raise LoginFailed(f"user {name} sends through the shared upstream {shared!r}: to sign that account in, run "
                          f"{PROG} {shared}", EX_USAGE)  # fmt: skip
    try:
        account = account_for(config, USER_ACCOUNT_PREFIX + name)
    except (ConfigError, ValueError) as exc:
        raise LoginFailed(f"user {name}'s own account does not resolve: {exc}", EX_CONFIG) from None
    _not_the_company_sign_in(config, name, user.upstream, account)
    _not_anothers_sign_in(config, account)
    return account


def _not_anothers_sign_in(config: Config, account: Account) -> None:
    """Any other account that logs in as another mailbox with this account's ``refresh_token_file`` (a
    user's own ``oauth2:`` block that names the company's file): the sign-in would replace that one's
    token, and its mail would stop logging in. ``relay check`` reports the same files."""
    oauth = account.oauth2
    if oauth is None or oauth.refresh_token_file is None:
        return
    # accounts that name the file in a block of their own (one that only inherits it, as a user with just a
    # username does, is that user's mistake, which relay check reports: it must not block the owner's sign-in)
    names = [*config.upstreams, *(USER_ACCOUNT_PREFIX + uid for uid, user in config.users.items()
                                  if isinstance(user.upstream, UpstreamOverride) and user.upstream.oauth2 is not None)]
    for other_name in names:
        if other_name == account.name:
            continue
        try:
            other = account_for(config, other_name)
        except (ConfigError, ValueError):
            continue
        same_file = other.oauth2 is not None and other.oauth2.refresh_token_file == oauth.refresh_token_file
        if same_file and (other.username or "").lower() != (account.username or "").lower():
            raise LoginFailed(f"refresh_token_file {oauth.refresh_token_file} is also {other.own_user or other_name}'s, "
                              f"which logs in as {other.username}: a sign-in as {account.username} would replace "
                              f"that token and its mail would stop. Give each mailbox a refresh_token_file of its "
                              f"own (relay check names them), then run this again; nothing was written", EX_CONFIG)


def _not_the_company_sign_in(config: Config, name: str, own: UpstreamOverride, account: Account) -> None:
    """A user with only an own ``username`` over the company's delegated account inherits its
    ``refresh_token_file``: a sign-in for the user would replace the company's token there, and every
    message sent as the company would stop logging in. (As ``relay passwd`` refuses a user on a shared
    account: the company's secret is the admin's, not the user's.)"""
    company_name = config.company.upstream or ""
    if own.oauth2 is not None or account.oauth2 is None or account.oauth2.refresh_token_file is None:
        return
    try:
        company = account_for(config, company_name)
    except (ConfigError, ValueError):
        return
    inherited = company.oauth2 is not None and company.oauth2.refresh_token_file == account.oauth2.refresh_token_file
    if not inherited or (account.username or "").lower() == (company.username or "").lower():
        return  # the same mailbox: the same sign-in as relay oauth login COMPANY
    raise LoginFailed(f"users.{name}.upstream has no oauth2: block of its own: {name} ({account.username}) inherits "
                      f"upstream {company_name}'s sign-in, whose refresh_token_file "
                      f"{account.oauth2.refresh_token_file} holds {company.username}'s token; a sign-in here would "
                      f"replace it and the company's mail would stop. To give {name} a sign-in of their own, add "
                      f"users.{name}.upstream.oauth2 (provider, tenant, client_id as upstream {company_name}'s) with a "
                      f"refresh_token_file for {name} alone, then run this again; nothing was written",
                      EX_CONFIG)  # fmt: skip


def target(account: Account) -> tuple[OAuth2, Path]:
    """The account's token source and the file the refresh token goes to, or why there is none."""
    oauth = account.oauth2
    where = f"users.{account.own_user}.upstream" if account.own_user else f"upstreams.{account.name}"
    if oauth is None:
        raise LoginFailed(f"{account.name} logs in with a password, not OAuth2: nobody needs to sign in (set "
                          f"auth: oauth2 and an oauth2: block in {where} first)", EX_CONFIG)  # fmt: skip
    if oauth.refresh_token_env or oauth.refresh_token_credential:
        source = oauth.refresh_token_env or oauth.refresh_token_credential
        raise LoginFailed(f"{where}.oauth2 takes its refresh token from {source} (an environment variable or a "
                          "systemd credential), which relay cannot write: name a refresh_token_file instead",
                          EX_CONFIG)  # fmt: skip
    if oauth.refresh_token_file is None:
        how = ("a service account" if oauth.service_account_file else "a certificate" if oauth.certificate
               else "a client secret")  # fmt: skip
        raise LoginFailed(f"{account.name} signs in as the app itself ({how}, app-only): no person signs in and "
                          f"no sign-in is needed. To send as a signed-in person instead, add refresh_token_file "
                          f"to {where}.oauth2", EX_CONFIG)  # fmt: skip
    return oauth, oauth.refresh_token_file


def _writable(path: Path) -> None:
    """Refuse before the sign-in, not after it, when the token could not be saved."""
    folder = path.parent
    if not folder.is_dir():
        raise LoginFailed(f"the folder of refresh_token_file {path} does not exist: make it (install -d -m 0700 -o "
                          f"relay -g relay {folder})", EX_CONFIG)  # fmt: skip
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LoginFailed(f"{folder} is not writable by this user (uid {os.geteuid()}): run as root or as relay's "
                          "user", EX_CONFIG)  # fmt: skip


# endregion

# region #### talking to the provider ####


class Provider:
    """The token and device endpoints of one account, over its TLS settings (``ca_file``, ``verify``)."""

    def __init__(self, account: Account, oauth: OAuth2) -> None:
        self.account = account
        self.oauth = oauth
        self.endpoints = endpoints(oauth)
        try:
            context = tls_context(account)
        except OSError as exc:
            raise LoginFailed(f"ca_file {account.ca_file}: {exc.strerror or exc}", EX_CONFIG) from None
        self.client = httpx.Client(verify=context, timeout=account.timeout)

    def close(self) -> None:
        self.client.close()

    def client_form(self) -> dict[str, str]:
        """client_id, and the client secret or a fresh client assertion for a confidential app."""
        try:
            return client_authentication(self.oauth, self.endpoints.token)[0]
        except SecretError as exc:
            raise LoginFailed(str(exc), EX_CONFIG) from None

    def post(self, url: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """The provider's status and JSON answer; transport and server trouble end the login (69)."""
        host = urlsplit(url).hostname or url
        try:
            response = self.client.post(url, data=form, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:  # the words name the endpoint and the socket error, never the form
            raise LoginFailed(self._unreachable(url, exc), EX_UNAVAILABLE) from None
        if response.status_code >= 500 or response.status_code == 429:
            raise LoginFailed(f"{host} is failing (HTTP {response.status_code}): try again later", EX_UNAVAILABLE)
        return response.status_code, json_body(response)


    def _unreachable(self, url: str, exc: httpx.HTTPError) -> str:
        """Which endpoint failed (device or token; a bare "Connection refused" left the admin guessing),
        at which host:port, and what to check: the setting its address comes from, then the way there."""
        parts = urlsplit(url)
        where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        which = "device" if url == self.endpoints.device else "token"
        words = http_failure(exc)
        if "ca_file" in words:  # TLS: the endpoint answered; its certificate is the problem
            return f"the {which} endpoint {where} ({url}): {words}"
        setting = "oauth2.device_url (or token_url, tenant)" if which == "device" else "oauth2.token_url (or tenant)"
        return (f"cannot reach the {which} endpoint {where} ({url}): {words}; check {setting} and that this "
                f"machine reaches {where} (DNS, firewall, proxy)")  # fmt: skip


def _error_words(body: dict[str, Any]) -> str:
    """``invalid_grant: AADSTS501481: The Code_Verifier does not match...`` (first line only)."""
    code = str(body.get("error") or "no error code")
    description = str(body.get("error_description") or "").splitlines()[0].strip() if body.get("error_description") else ""
    return f"{code}: {description}" if description else code


def refused(body: dict[str, Any], status: int) -> LoginFailed:
    """A refusal of the sign-in itself (77) or of the app's settings (78), with what to do."""
    code = str(body.get("error") or f"HTTP {status}")
    words = _error_words(body)
    if code in _DECLINED:
        return LoginFailed(f"the sign-in was declined ({words}); nothing was written", EX_NOPERM)
    if code in _EXPIRED:
        return LoginFailed(f"the code expired before the sign-in was done ({words}); nothing was written: run "
                           "the command again", EX_NOPERM)  # fmt: skip
    if code == "invalid_grant":
        return LoginFailed(f"the provider refused the authorization code ({words}): the code expired or was used, "
                           "or the PKCE verifier does not match; nothing was written: run the command again",
                           EX_NOPERM)  # fmt: skip
    hint = ""
    if "AADSTS7000218" in words:
        hint = " (allow public client flows in the app registration -> Authentication, or give the client secret)"
    elif "AADSTS50011" in words or code == "redirect_uri_mismatch":
        hint = " (add the redirect URI to the app registration: Mobile and desktop applications, http://localhost)"
    elif code in ("invalid_client", "unauthorized_client"):
        hint = " (check client_id, tenant and the client secret or certificate)"
    return LoginFailed(f"the provider refused the app's request ({words}){hint}", EX_CONFIG)


def _login_scope(oauth: OAuth2) -> str:
    """The account's scope, plus OpenID's so the answer says who signed in (preferred_username, email)."""
    scope = oauth.scope.split()
    extra = {"microsoft": ["openid", "profile"], "google": ["openid", "email"]}.get(oauth.provider, [])
    return " ".join(scope + [word for word in extra if word not in scope])


# endregion

# region #### device flow (RFC 8628) ####


def device_flow(provider: Provider, output: Output, who: str) -> dict[str, Any]:
    oauth = provider.oauth
    if oauth.provider == "google":
        raise LoginFailed("Google refuses the mail scope (https://mail.google.com/) in the device flow: use "
                          "--flow browser (or --flow paste on a machine without a browser)", EX_USAGE)  # fmt: skip
    url = provider.endpoints.device
    if url is None:
        raise LoginFailed("the device flow needs the provider's device endpoint: set oauth2.device_url", EX_CONFIG)
    status, body = provider.post(url, {**_public(provider.client_form()), "scope": _login_scope(oauth)})
    if status != 200:
        raise refused(body, status)
    device_code, user_code = body.get("device_code"), body.get("user_code")
    verification = body.get("verification_uri") or body.get("verification_url")  # Google spells it _url
    if not (isinstance(device_code, str) and isinstance(user_code, str) and isinstance(verification, str)):
        raise LoginFailed(f"{urlsplit(url).hostname} answered without a device code", EX_UNAVAILABLE)
    lifetime = _number(body.get("expires_in"), 900.0)
    interval = _number(body.get("interval"), 5.0)
    output.say(f"To sign in{who}, open {verification} and enter the code {user_code} "
               f"(within {max(int(lifetime // 60), 1)} minutes).")  # fmt: skip
    return _poll(provider, device_code, interval, time.monotonic() + lifetime)


def _public(form: dict[str, str]) -> dict[str, str]:
    """The device request carries no assertion (RFC 8628 3.1: client authentication is at the token request)."""
    return {key: value for key, value in form.items() if key in ("client_id", "client_secret")}


def _number(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if number > 0 else default


def _poll(provider: Provider, device_code: str, interval: float, deadline: float) -> dict[str, Any]:
    """Ask the token endpoint every ``interval`` seconds until the sign-in is done or refused."""
    while True:
        if time.monotonic() + interval >= deadline:
            raise LoginFailed("the code expired before the sign-in was done; nothing was written: run the "
                              "command again", EX_NOPERM)  # fmt: skip
        time.sleep(interval)
        form = {**provider.client_form(), "grant_type": DEVICE_GRANT, "device_code": device_code}
        status, body = provider.post(provider.endpoints.token, form)
        if status == 200:
            return body
        error = body.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += SLOW_DOWN_STEP
            continue
        raise refused(body, status)


# endregion

# region #### browser and paste flows (RFC 8252, PKCE RFC 7636) ####


@dataclass(frozen=True)
class Authorization:
    """One authorization request: its address, and what the answer must match."""

    url: str
    redirect_uri: str
    state: str
    verifier: str


def authorization(provider: Provider, port: int, login_hint: str | None) -> Authorization:
    oauth = provider.oauth
    if provider.endpoints.authorize is None:
        raise LoginFailed("the browser flow needs the provider's authorization endpoint: set oauth2.authorize_url",
                          EX_CONFIG)  # fmt: skip
    # Entra registers loopback redirects as http://localhost (any port); Google's desktop clients take 127.0.0.1
    host = "localhost" if oauth.provider == "microsoft" else "127.0.0.1"
    redirect_uri = f"http://{host}:{port}/"
    verifier = secrets.token_urlsafe(64)  # 86 characters of [A-Za-z0-9_-] (RFC 7636: 43 to 128)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(24)
    query = {"client_id": oauth.client_id, "response_type": "code", "redirect_uri": redirect_uri,
             "scope": _login_scope(oauth), "state": state, "code_challenge": challenge,
             "code_challenge_method": "S256"}  # fmt: skip
    if oauth.provider == "microsoft":
        query.update(response_mode="query", prompt="select_account")
    elif oauth.provider == "google":
        query.update(access_type="offline", prompt="consent")  # a refresh token every time, not only the first
    if login_hint:
        query["login_hint"] = login_hint
    return Authorization(f"{provider.endpoints.authorize}?{urlencode(query)}", redirect_uri, state, verifier)


def _answer(query: str, expected_state: str) -> str:
    """The authorization code of a redirect's query, once its ``state`` is ours; else ``LoginFailed``."""
    params = {key: values[0] for key, values in parse_qs(query).items()}
    if params.get("state") != expected_state:
        raise LoginFailed("the answer's state does not match the sign-in relay started (an old or forged "
                          "address); nothing was written: run the command again", EX_NOPERM)  # fmt: skip
    if "error" in params:
        raise refused(params, 400)
    code = params.get("code")
    if not code:
        raise LoginFailed("the address has no authorization code: paste the whole address the browser ended on",
                          EX_NOPERM)  # fmt: skip
    return code


def exchange(provider: Provider, request: Authorization, code: str) -> dict[str, Any]:
    form = {**provider.client_form(), "grant_type": "authorization_code", "code": code,
            "redirect_uri": request.redirect_uri, "code_verifier": request.verifier,
            "scope": _login_scope(provider.oauth)}  # fmt: skip
    status, body = provider.post(provider.endpoints.token, form)
    if status != 200:
        raise refused(body, status)
    return body


class _Redirect(http.server.BaseHTTPRequestHandler):
    """The browser's one request after the sign-in: its query goes to the waiting command."""

    server: _LoopbackServer

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path != "/" or not query:
            self._reply(404, "relay: nothing here.")
            return
        try:
            _answer(query, self.server.state)
            self._reply(200, "relay: signed in. You can close this window; the terminal says where the token went.")
        except LoginFailed as exc:
            self._reply(400, f"relay: sign-in refused: {exc}")
        self.server.answers.put(query)

    def _reply(self, status: int, text: str) -> None:
        data = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _LoopbackServer(http.server.HTTPServer):
    def __init__(self, port: int, state: str) -> None:
        self.state = state
        self.answers: queue.Queue[str] = queue.Queue()
        super().__init__(("127.0.0.1", port), _Redirect)


def listen(port: int) -> _LoopbackServer:
    try:
        return _LoopbackServer(port, "")
    except OSError as exc:
        raise LoginFailed(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}: choose another --port",
                          EX_USAGE) from None  # fmt: skip


def browser_flow(provider: Provider, output: Output, server: _LoopbackServer, login_hint: str | None) -> dict[str, Any]:
    port = server.server_address[1]
    request = authorization(provider, port, login_hint)
    server.state = request.state
    output.say("Open this address in a browser and sign in" + (f" as {login_hint}" if login_hint else "") + ":")
    output.say(request.url)
    output.say(f"relay waits for the browser at 127.0.0.1:{port}. From a browser on another machine, first run "
               f"there: ssh -L {port}:127.0.0.1:{port} {socket.gethostname()}")  # fmt: skip
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        query = server.answers.get(timeout=REDIRECT_WAIT)
    except queue.Empty:
        raise LoginFailed(f"no sign-in came back within {int(REDIRECT_WAIT // 60)} minutes; nothing was written",
                          EX_NOPERM) from None  # fmt: skip
    finally:
        server.shutdown()
        thread.join(5)
    return exchange(provider, request, _answer(query, request.state))


def paste_flow(provider: Provider, output: Output, port: int, stdin: TextIO, login_hint: str | None) -> dict[str, Any]:
    request = authorization(provider, port, login_hint)
    output.say("Open this address in a browser and sign in" + (f" as {login_hint}" if login_hint else "") + ":")
    output.say(request.url)
    output.say(f"The browser then goes to {request.redirect_uri}?code=... and shows an error (nothing listens "
               "there): copy that whole address from the address bar and paste it here, then press Enter:")  # fmt: skip
    for attempt in range(1, PASTE_TRIES + 1):
        line = stdin.readline()
        if not line:  # end of input: nobody is there to paste again
            raise LoginFailed("nothing was pasted; nothing was written", EX_NOPERM)
        query = urlsplit(line.strip()).query or line.strip().lstrip("?")
        problem = _not_a_redirect(line.strip(), query, request)
        if problem is None:
            return exchange(provider, request, _answer(query, request.state))
        if attempt < PASTE_TRIES:
            output.warn(f"{problem}: paste it again ({PASTE_TRIES - attempt} more tries), then press Enter:")
    raise LoginFailed(f"{problem}; no redirect address after {PASTE_TRIES} tries; nothing was written: run the "
                      "command again", EX_NOPERM)  # fmt: skip


def _not_a_redirect(line: str, query: str, request: Authorization) -> str | None:
    """Why a pasted line is not the address the browser ended on at all (ask again), or ``None``: then
    ``_answer`` judges it (a ``state`` of another sign-in, a refusal, the code). A stray line, the code
    alone or the sign-in address itself is a slip of the clipboard, not an old or forged answer."""
    params = parse_qs(query)
    state = params.get("state", [None])[0]
    if not line:
        return "nothing was pasted"
    if "code_challenge" in params or "response_type" in params:
        return (f"that is the sign-in address relay printed: open it in a browser, sign in, and paste the address "
                f"the browser ends on ({request.redirect_uri}?code=...)")  # fmt: skip
    if state is None and "code" in params:
        return "the address has no state=: copy the whole address from the browser's address bar"
    if state is None:
        return (f"that is not the address the browser ended on (it starts with {request.redirect_uri}?code=...; "
                "the code alone is not enough)")  # fmt: skip
    if state == request.state and "code" not in params and "error" not in params:
        return "the address has no authorization code: paste the whole address the browser ended on"
    return None


# endregion

# region #### the command ####


def _claims(body: dict[str, Any]) -> dict[str, Any]:
    """The ``id_token``'s claims, from the token endpoint over TLS (OpenID Connect 3.1.3.7: the TLS server
    check stands for the signature check when the token comes straight from there); ``{}`` without one."""
    id_token = body.get("id_token")
    if not isinstance(id_token, str):
        return {}
    try:
        claims = jwt.decode(id_token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return {}
    return claims if isinstance(claims, dict) else {}


def _identity(claims: dict[str, Any]) -> str | None:
    """Who signed in: ``preferred_username`` (Microsoft), ``email`` (Google) or ``upn``."""
    for name in ("preferred_username", "email", "upn"):
        if isinstance(claims.get(name), str) and claims[name]:
            return str(claims[name])
    return None


def _mailbox(address: str) -> str:
    """An address as the provider compares it: case does not count, nor Gmail's dots and googlemail.com."""
    local, _, domain = address.strip().lower().rpartition("@")
    if domain in ("gmail.com", "googlemail.com"):
        return local.split("+", 1)[0].replace(".", "") + "@gmail.com"
    return f"{local}@{domain}"


def _delegates(oauth: OAuth2, claims: dict[str, Any]) -> bool:
    """Whether a person's token may log in as another mailbox: Office 365 (work or school accounts) lets a
    delegate with Full Access send for a shared mailbox; a personal Microsoft account (``consumers``,
    ``tid`` of the personal-account tenant), Gmail and an unknown provider log in as their own only."""
    if oauth.provider != "microsoft":
        return False
    return claims.get("tid") != MSA_TENANT and "/consumers/" not in oauth.token_url.lower()


def _owner(path: Path) -> str:
    info = path.stat()
    try:
        user = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        user = str(info.st_uid)
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return f"mode {info.st_mode & 0o777:04o}, owner {user}:{group}"


def _default_flow(oauth: OAuth2) -> Flow:
    return "browser" if oauth.provider == "google" else "device"


def run(config: Config, name: str, *, flow: Flow | None = None, port: int | None = None, force: bool = False,
        out: TextIO = sys.stdout, err: TextIO = sys.stderr, stdin: TextIO = sys.stdin) -> int:  # fmt: skip
    """The command; returns its exit code. Prints the steps to ``out`` and refusals to ``err``. ``force``:
    save the token even when another person than the account's ``username`` signed in."""
    output = Output(out, err)
    try:
        return _run(config, name, flow, port, output, stdin, force)
    except LoginFailed as exc:
        output.warn(str(exc))
        return exc.code
    except KeyboardInterrupt:
        output.warn("interrupted; nothing was written")
        return 130


def _run(config: Config, name: str, flow: Flow | None, port: int | None, output: Output, stdin: TextIO,
         force: bool) -> int:  # fmt: skip
    account = resolve(config, name)
    oauth, path = target(account)
    _writable(path)
    chosen = flow or _default_flow(oauth)
    who = f" as {account.username}" if account.username else ""
    server = listen(port or 0) if chosen == "browser" else None
    provider: Provider | None = None
    try:
        provider = Provider(account, oauth)
        if chosen == "device":
            body = device_flow(provider, output, who)
        elif chosen == "browser":
            assert server is not None
            body = browser_flow(provider, output, server, account.username)
        else:
            body = paste_flow(provider, output, port or _free_port(), stdin, account.username)
    finally:
        if provider is not None:
            provider.close()
        if server is not None:
            server.server_close()
    refresh = body.get("refresh_token")
    if not isinstance(refresh, str) or not refresh:
        hint = "offline_access" if oauth.provider == "microsoft" else "access_type=offline"
        raise LoginFailed(f"the provider signed in but sent no refresh token (the scope needs {hint}); nothing "
                          "was written", EX_CONFIG)  # fmt: skip
    claims = _claims(body)
    signed_in = _identity(claims)
    if signed_in:
        output.say(f"Signed in as {signed_in}.")
    other = signed_in is not None and account.username is not None and _mailbox(signed_in) != _mailbox(account.username)
    if other and not force and not _delegates(oauth, claims):
        kept = f"the old token in {path} is kept" if path.exists() else f"{path} was not made"
        raise LoginFailed(f"signed in as {signed_in}, but {account.name} sends as {account.username}, and "
                          f"{_provider_words(oauth)} lets a person's token log in as their own mailbox only: the "
                          f"provider would refuse it; nothing was written ({kept}). Run the command again and sign "
                          f"in as {account.username}, or correct username; --force saves the token anyway",
                          EX_NOPERM)  # fmt: skip
    try:
        write_secret_file(path, refresh, new_owner_like=path.parent)
    except OSError as exc:
        raise LoginFailed(f"cannot write {path}: {exc.strerror or exc}; nothing was written", EX_CONFIG) from None
    if other:
        may = (f"unless {signed_in} has Full Access to {account.username}'s mailbox (a shared mailbox)"
               if _delegates(oauth, claims) else "(saved because of --force)")  # fmt: skip
        output.warn(f"warning: signed in as {signed_in}, but {account.name} sends as {account.username}: the provider "
                    f"will refuse to send as {account.username} {may}; to undo, run again and sign in as "
                    f"{account.username}, or change username")  # fmt: skip
    user = _sender(config, account)
    output.say(f"Refresh token saved to {path} ({_owner(path)}); relay uses it at its next token request, no "
               f"restart needed. Try: relay send-test {user}{_config_option(config)}")  # fmt: skip
    return 0


def _provider_words(oauth: OAuth2) -> str:
    if oauth.provider == "google":
        return "Google (Gmail, Workspace)"
    if oauth.provider == "microsoft":
        return "a personal Microsoft account (Outlook.com, Hotmail)"
    return "this provider"


def _config_option(config: Config) -> str:
    """`` -c CONFIG`` for the command to try next, unless the config is the default one."""
    if not config.source or os.path.abspath(config.source) == DEFAULT_CONFIG:
        return ""
    return f" -c {shlex.quote(os.path.abspath(config.source))}"


def _sender(config: Config, account: Account) -> str:
    """Whom ``relay send-test`` sends as to try this account: its own user, a user of it, or the company."""
    if account.own_user:
        return account.own_user
    if config.company.upstream == account.name or (not config.company.upstream and len(config.upstreams) == 1):
        return "company"
    return next((uid for uid, user in config.users.items() if user.upstream == account.name), "company")


def _free_port() -> int:
    """A port for the paste flow's redirect address: nothing will listen there, but it must be a port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# endregion
