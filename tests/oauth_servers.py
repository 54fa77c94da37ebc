"""Real HTTPS servers for OAuth2 tests: Microsoft's and Google's token endpoints, and Graph sendMail.

All are ``http.server`` threading servers wrapped in TLS (trustme certificates), bound to 127.0.0.1
port 0, each in its own thread. They speak the protocols the way the providers document them, as far
as relay can tell:

- the Microsoft identity platform v2.0 endpoints of one tenant: ``token`` (``client_credentials``,
  ``refresh_token``, ``authorization_code`` with PKCE, the device code grant; a client secret or a
  certificate's client assertion, checked with the certificate's public key; ``expires_in``,
  refresh-token rotation, AADSTS error bodies), ``devicecode`` (RFC 8628: ``authorization_pending``,
  ``slow_down``, ``authorization_declined``, ``expired_token``) and ``authorize`` (a person who signs
  in, or declines: a redirect to the loopback ``redirect_uri`` with ``code`` and ``state``);
- Google's token endpoint (the same grants, and the JWT-bearer grant of a service account with
  domain-wide delegation, checked with its public key), its authorization endpoint, and its device
  endpoint, which refuses the mail scope;
- ``POST /v1.0/users/{mailbox}/sendMail`` with a base64 MIME body (202, 429 + Retry-After, 503, 400
  ErrorInvalidRecipients, at most 4 requests at once per mailbox).

Access tokens are unsigned JWTs whose claims (``roles``, ``scp``) a diagnosis can read; each is
remembered with its expiry and the person it was issued to, so an XOAUTH2 server takes only the
tokens the emulator issued, for the mailbox they were issued for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import getaddresses
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes

TENANT = "yritys.onmicrosoft.com"
TENANT_ID = "0b1e2c3d-4e5f-4061-8273-8495a6b7c8d9"  # the tid of the work or school accounts it signs in
PERSONAL_TENANT_ID = "9188040d-6c67-4c5b-b112-36a304b66dad"  # Microsoft's tid of every personal account


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: Any

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that refuses our certificate or hangs up is expected in these tests; anything else is shown."""
        if not isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        """The TLS handshake runs here, in this request's thread, so one slow client cannot stall the others."""
        self.request.settimeout(10)
        self.request.do_handshake()
        self.server.owner.connections += 1
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, status: int, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def reply_raw(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_POST(self) -> None:
        self.server.owner.handle(self)

    def do_GET(self) -> None:
        self.server.owner.handle_get(self)

    def do_PUT(self) -> None:
        self.server.owner.handle(self)

    def do_DELETE(self) -> None:
        self.server.owner.handle(self)

    def do_PATCH(self) -> None:
        self.server.owner.handle(self)


class HTTPSServer:
    """A threading HTTPS server whose requests go to ``self.handle``."""

    def __init__(self, server_context: ssl.SSLContext, port: int = 0) -> None:
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.owner = self
        self.connections = 0  # TLS connections made: kept-alive clients make few
        self._httpd.socket = server_context.wrap_socket(
            self._httpd.socket, server_side=True, do_handshake_on_connect=False
        )
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def handle(self, request: _Handler) -> None:
        raise NotImplementedError

    def handle_get(self, request: _Handler) -> None:
        request.reply(404, {"error": "not_found"})

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _aad(status: int, error: str, number: int, text: str) -> tuple[int, dict[str, Any]]:
    trace = "Trace ID: 0d1e2f30-0000-4000-8000-000000000000\r\nCorrelation ID: 00000000-1111-2222-3333-444444444444"
    return status, {"error": error, "error_description": f"AADSTS{number}: {text}\r\n{trace}",
                    "error_codes": [number], "timestamp": "2026-12-02 12:00:00Z"}  # fmt: skip


CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


@dataclass
class _Code:
    """An authorization code: what the token request must repeat (RFC 6749 4.1.3, RFC 7636 4.6)."""

    client: str
    redirect_uri: str
    challenge: str
    scope: str
    person: str
    expires: float


@dataclass
class _Device:
    """A device code and what its polls get, in order (the last one repeats)."""

    client: str
    scope: str
    script: list[str]
    expires: float
    interval: float
    last_poll: float = 0.0


def _unsigned_jwt(claims: dict[str, Any]) -> str:
    return ".".join((_b64url(b'{"alg":"none","typ":"JWT"}'), _b64url(json.dumps(claims).encode()), "sig"))


def _s256(verifier: str) -> str:
    return _b64url(hashlib.sha256(verifier.encode()).digest())


def _loopback_redirect(uri: str) -> bool:
    parts = urlsplit(uri)
    return parts.scheme == "http" and parts.hostname in ("localhost", "127.0.0.1", "::1")


class TokenServer(HTTPSServer):
    """The Microsoft identity platform v2.0 endpoints for one tenant.

    ``clients`` maps client ids to their secrets ("" for a public client); ``certificates`` client ids
    to the certificate uploaded to the app registration (its assertion is checked with its public
    key); ``refresh_tokens`` the refresh tokens it will take to their client. ``person`` is who signs
    in at ``authorize`` or for a device code (``consent = False``: they decline); ``device_script`` is
    what the polls of the next device code get: ``pending``, ``slow_down``, ``declined``, ``expired``,
    ``ok``. Every access token it issues is remembered with its expiry, so other test servers ask
    ``valid()`` whether a token is good right now.
    """

    def __init__(self, server_context: ssl.SSLContext, *, lifetime: float = 3600, roles: tuple[str, ...] = (),
                 port: int = 0) -> None:  # fmt: skip
        self.clients: dict[str, str] = {}
        self.certificates: dict[str, x509.Certificate] = {}
        self.refresh_tokens: dict[str, str] = {}
        self.lifetime = lifetime
        self.roles = roles
        self.rotate = False
        self.rotated: list[str] = []  # every refresh token handed out by rotation
        self.issued: dict[str, tuple[float, tuple[str, ...]]] = {}  # token -> expiry, the roles it carries
        self.issued_to: dict[str, str] = {}  # delegated access and refresh tokens -> the person who signed in
        self.grants: list[str] = []  # grant_type of every successful request
        self.refused: list[str] = []  # the error code of every refused request
        self.outage: tuple[int, dict[str, str]] | None = None  # (status, headers) to answer every request with
        self.web_page: tuple[int, bytes] | None = None  # (status, HTML): a web filter's page instead of the endpoint
        self.silence = 0.0  # seconds to read a request and say nothing (then the usual answer)
        self.person = "someone@example.com"
        self.tenant_id = TENANT_ID  # the id_token's tid: PERSONAL_TENANT_ID for an Outlook.com sign-in
        self.consent = True
        self.device_script = ["ok"]
        self.device_interval = 0.1  # seconds; Microsoft says 5
        self.device_lifetime = 900.0
        self.slow_down_step = 5.0  # RFC 8628: each slow_down adds 5 s to the interval the client must keep
        self.device_polls: list[tuple[float, str]] = []  # (time.monotonic(), what the poll got)
        self.codes: dict[str, _Code] = {}
        self.all_codes: list[str] = []  # every authorization code handed out
        self.devices: dict[str, _Device] = {}
        self.device_codes: list[str] = []  # every device code handed out (a secret-grep looks for them)
        self.assertions: list[tuple[dict[str, Any], dict[str, Any]]] = []  # verified (header, claims)
        self._jtis: set[str] = set()
        self._lock = threading.Lock()
        super().__init__(server_context, port)

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}/{TENANT}/oauth2/v2.0"

    @property
    def url(self) -> str:
        return f"{self.base}/token"

    def valid(self, token: str, role: str | None = None) -> bool:
        with self._lock:
            expires, roles = self.issued.get(token, (0.0, ()))
        if expires <= time.time():
            return False
        return role is None or role in roles  # a token carries the permissions granted when it was issued

    def valid_for(self, person: str, token: str) -> bool:
        """A delegated access token, valid now, issued to ``person`` (what an XOAUTH2 server checks)."""
        return self.valid(token) and self.issued_to.get(token, "").lower() == person.lower()

    def handle(self, request: _Handler) -> None:
        form = {k: v[0] for k, v in parse_qs(request.body().decode()).items()}
        time.sleep(self.silence)
        if self.web_page is not None:
            request.reply_raw(self.web_page[0], self.web_page[1], "text/html; charset=utf-8")
            return
        if self.outage is not None:
            status, headers = self.outage
            with self._lock:
                self.refused.append(f"HTTP {status}")
            request.reply(status, {"error": "temporarily_unavailable", "error_description": "AADSTS90033: busy"},
                          headers)  # fmt: skip
            return
        status, body = self._answer(request.path, form)
        with self._lock:
            if status == 200 and "access_token" in body:
                self.grants.append(form.get("grant_type", ""))
            elif status != 200:
                self.refused.append(str(body.get("error_description", body.get("error", ""))).split(":")[0])
        request.reply(status, body)

    def handle_get(self, request: _Handler) -> None:
        """``GET .../authorize``: the person signs in (or declines) and the browser is sent to redirect_uri."""
        path, _, query = request.path.partition("?")
        if path != urlsplit(self.base).path + "/authorize":
            request.reply(404, {"error": "not_found"})
            return
        status, location, page = self._authorize({k: v[0] for k, v in parse_qs(query).items()})
        request.reply(status, page, {"Location": location} if location else None)

    def _tenant_error(self, path: str) -> tuple[int, dict[str, Any]] | None:
        match = re.fullmatch(r"/([^/]+)/oauth2/v2\.0/(token|devicecode)", path)
        if match is None or unquote(match[1]) != TENANT:
            tenant = match[1] if match else path
            return _aad(400, "invalid_request", 90002, f"Tenant '{tenant}' not found. Check to make sure you have "
                                                       "the correct tenant ID and are signing into the correct cloud.")  # fmt: skip
        return None

    def _answer(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        wrong = self._tenant_error(path)
        if wrong is not None:
            return wrong
        client = form.get("client_id", "")
        if client not in self.clients and client not in self.certificates:
            return _aad(400, "unauthorized_client", 700016, f"Application with identifier '{client}' was not found "
                                                             f"in the directory '{TENANT}'.")  # fmt: skip
        if path.endswith("/devicecode"):
            return self._device_code(client, form)
        refused = self._client_refused(client, form)
        if refused is not None:
            return refused
        grant = form.get("grant_type")
        if grant == "refresh_token":
            return self._refresh(client, form.get("refresh_token", ""))
        if grant == "client_credentials":
            return 200, self._issue()
        if grant == "authorization_code":
            return self._redeem(client, form)
        if grant == DEVICE_GRANT:
            return self._poll(client, form.get("device_code", ""))
        return _aad(400, "unsupported_grant_type", 70003, f"The app requested an unsupported grant type '{grant}'.")

    # region client authentication

    def _client_refused(self, client: str, form: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        if client in self.certificates:
            return self._assertion_refused(client, form)
        expected = self.clients[client]
        if expected and form.get("client_secret") != expected:
            return _aad(401, "invalid_client", 7000215, "Invalid client secret provided. Ensure the secret being "
                                                        "sent in the request is the client secret value, not the "
                                                        "client secret ID.")  # fmt: skip
        return None

    def _assertion_refused(self, client: str, form: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
        """Entra's checks of a certificate credential: the thumbprint names the uploaded certificate, which
        must not have expired, and whose public key verifies the signature; aud, iss, sub, exp, a new jti."""
        assertion = form.get("client_assertion", "")
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE or not assertion:
            return _aad(401, "invalid_client", 7000218, "The request body must contain the following parameter: "
                                                        "'client_assertion' or 'client_secret'.")  # fmt: skip
        certificate = self.certificates[client]
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.InvalidTokenError:
            return _aad(401, "invalid_client", 50027, "JWT token is invalid or malformed.")
        sha1 = _b64url(certificate.fingerprint(hashes.SHA1()))
        sha256 = _b64url(certificate.fingerprint(hashes.SHA256()))
        if header.get("x5t#S256") != sha256 and header.get("x5t") != sha1:
            return _aad(401, "invalid_client", 700027, "Client assertion failed signature validation. [Reason - The "
                                                       "key was not found.]")  # fmt: skip
        if certificate.not_valid_after_utc.timestamp() < time.time():
            return _aad(401, "invalid_client", 700027, "Client assertion contains an invalid signature. [Reason - "
                                                       "The key used is expired.]")  # fmt: skip
        try:
            claims = jwt.decode(assertion, certificate.public_key(), algorithms=["PS256", "RS256"],  # type: ignore[arg-type]
                                audience=self.url, issuer=client, options={"require": ["exp", "nbf", "jti", "sub"]})  # fmt: skip
        except jwt.InvalidTokenError as exc:
            return _aad(401, "invalid_client", 700027, f"Client assertion failed signature validation. [{exc}]")
        with self._lock:
            replayed = claims["jti"] in self._jtis
            self._jtis.add(claims["jti"])
        if claims["sub"] != client or replayed:
            return _aad(401, "invalid_client", 700023, "Client assertion audience, subject or jti is invalid.")
        with self._lock:
            self.assertions.append((header, claims))
        return None

    # endregion

    # region the sign-in: authorize, code redemption, device codes

    def _authorize(self, query: dict[str, str]) -> tuple[int, str | None, dict[str, Any] | None]:
        """Like login.microsoftonline.com: an unknown app or redirect is an error page; otherwise the person
        signs in and the browser goes to redirect_uri with code and state (or error=access_denied)."""
        client, redirect = query.get("client_id", ""), query.get("redirect_uri", "")
        if client not in self.clients and client not in self.certificates:
            return 400, None, _aad(400, "unauthorized_client", 700016, f"Application with identifier '{client}' was "
                                                                        f"not found in the directory '{TENANT}'.")[1]  # fmt: skip
        if not _loopback_redirect(redirect):
            return 400, None, _aad(400, "invalid_request", 50011, f"The redirect URI '{redirect}' specified in the "
                                                                  "request does not match the redirect URIs "
                                                                  "configured for the application.")[1]  # fmt: skip
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return 400, None, {"error": "invalid_request", "error_description": "AADSTS9002325: Proof Key for Code "
                                                                                 "Exchange is required."}  # fmt: skip
        back = {"state": query.get("state", "")}
        if not self.consent:
            back.update(error="access_denied", error_description="AADSTS65004: User declined to consent to access "
                                                                 "the app.")  # fmt: skip
        else:
            code = "code-" + secrets.token_hex(24)
            with self._lock:
                self.all_codes.append(code)
                self.codes[code] = _Code(client, redirect, query["code_challenge"], query.get("scope", ""),
                                         self.person, time.time() + 600)  # fmt: skip
            back = {"code": code, **back, "session_state": secrets.token_hex(8)}
        return 302, f"{redirect}?{urlencode(back)}", None

    def _redeem(self, client: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            code = self.codes.pop(form.get("code", ""), None)  # a code is redeemed once
        if code is None or code.client != client or code.expires < time.time():
            return _aad(400, "invalid_grant", 70008, "The provided authorization code or refresh token has expired "
                                                     "due to inactivity.")  # fmt: skip
        if form.get("redirect_uri") != code.redirect_uri:
            return _aad(400, "invalid_grant", 70000, "The request was denied because one or more scopes requested "
                                                     "are unauthorized or expired: redirect_uri mismatch.")  # fmt: skip
        if _s256(form.get("code_verifier", "")) != code.challenge:
            return _aad(400, "invalid_grant", 501481, "The Code_Verifier does not match the code_challenge supplied "
                                                      "in the authorization request.")  # fmt: skip
        return 200, self._signed_in(client, code.scope, code.person)

    def _device_code(self, client: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        device = "dc-" + secrets.token_hex(24)
        user_code = "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(9))
        with self._lock:
            self.device_codes.append(device)
            self.devices[device] = _Device(client, form.get("scope", ""), list(self.device_script),
                                           time.time() + self.device_lifetime, self.device_interval)  # fmt: skip
        verification = f"https://127.0.0.1:{self.port}/devicelogin"
        return 200, {"device_code": device, "user_code": user_code, "verification_uri": verification,
                     "expires_in": self.device_lifetime, "interval": self.device_interval,
                     "message": f"To sign in, use a web browser to open the page {verification} and enter the code "
                                f"{user_code} to authenticate."}  # fmt: skip

    def _poll(self, client: str, device_code: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            device = self.devices.get(device_code)
            now = time.monotonic()
            if device is None or device.client != client:
                step = "bad"
            elif device.expires < time.time():
                step = "expired"
            elif device.last_poll and now - device.last_poll < device.interval * 0.9:
                step = "slow_down"  # polled faster than asked (RFC 8628 3.5)
            else:
                step = device.script.pop(0) if len(device.script) > 1 else device.script[0]
            if device is not None:
                device.last_poll = now
                if step == "slow_down":
                    device.interval += self.slow_down_step
            self.device_polls.append((now, step))
        if step == "ok" and device is not None:
            with self._lock:
                del self.devices[device_code]
            return 200, self._signed_in(client, device.scope, self.person)
        answers = {
            "pending": (400, "authorization_pending", 70016, ("OAuth 2.0 device flow error. Authorization is pending. "
                                                            "Continue polling.")),
            "slow_down": (400, "slow_down", 70016, "Polling too fast: slow down."),
            "declined": (400, "authorization_declined", 70000, "The end user denied the authorization request."),
            "expired": (400, "expired_token", 70020, ("The provided value for the input parameter 'device_code' is not "
                                                     "valid. This device code has expired.")),
            "bad": (400, "bad_verification_code", 70019, "Verification code is not valid."),
        }  # fmt: skip
        return _aad(*answers[step])

    def _signed_in(self, client: str, scope: str, person: str) -> dict[str, Any]:
        """Tokens for a person: an access token for them, a refresh token (offline_access), an id_token (openid)."""
        body = self._issue(person=person, scopes=tuple(w for w in scope.split() if "/" in w))
        if "offline_access" in scope.split():
            refresh = "rt-" + secrets.token_hex(16)
            with self._lock:
                self.refresh_tokens[refresh] = client
                self.issued_to[refresh] = person
            body["refresh_token"] = refresh
        if "openid" in scope.split():
            body["id_token"] = _unsigned_jwt({"aud": client, "iss": f"https://login.microsoftonline.com/{TENANT}/v2.0",
                                              "preferred_username": person, "name": person.split("@")[0],
                                              "tid": self.tenant_id, "exp": int(time.time()) + 3600})  # fmt: skip
        return body

    # endregion

    def _refresh(self, client: str, token: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            known = self.refresh_tokens.get(token) == client
            person = self.issued_to.get(token)
            if known and self.rotate:
                del self.refresh_tokens[token]
                token = "rt-" + secrets.token_hex(16)
                self.refresh_tokens[token] = client
                self.rotated.append(token)
                if person is not None:
                    self.issued_to[token] = person
        if not known:
            return _aad(400, "invalid_grant", 70008, "The provided authorization code or refresh token has expired "
                                                     "due to inactivity.")  # fmt: skip
        return 200, {**self._issue(person=person), "refresh_token": token}

    def _issue(self, *, person: str | None = None, scopes: tuple[str, ...] = ()) -> dict[str, Any]:
        expires = time.time() + self.lifetime
        claims: dict[str, Any] = {"aud": "https://outlook.office365.com", "tid": TENANT, "roles": list(self.roles),
                                  "exp": int(expires), "jti": secrets.token_hex(16)}  # fmt: skip
        if person is not None:
            claims.update(upn=person, scp=" ".join(s.rsplit("/", 1)[-1] for s in scopes) or "SMTP.Send")
        token = ".".join((_b64url(b'{"alg":"none"}'), _b64url(json.dumps(claims).encode()), "sig"))
        with self._lock:
            self.issued[token] = (expires, self.roles)
            if person is not None:
                self.issued_to[token] = person
        return {"token_type": "Bearer", "expires_in": self.lifetime, "ext_expires_in": self.lifetime,
                "access_token": token}  # fmt: skip


def _google(status: int, error: str, description: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": error, "error_description": description}


class GoogleTokenServer(TokenServer):
    """Google's OAuth 2.0 endpoints: ``/token``, ``/o/oauth2/v2/auth`` and ``/device/code``.

    Desktop-app clients (``clients``: id -> secret; Google wants the secret though it is not secret) sign
    in with PKCE; the device endpoint refuses the mail scope (Google allows it only for a few APIs).
    ``service_accounts`` maps a service account's e-mail to its public key; ``delegation`` lists the
    scopes the Workspace Admin console granted it (domain-wide delegation) and ``domain_users`` the
    mailboxes it may act for (``sub``).
    """

    def __init__(self, server_context: ssl.SSLContext, **options: Any) -> None:
        self.service_accounts: dict[str, Any] = {}
        self.delegation: dict[str, set[str]] = {}
        self.domain_users: set[str] = set()
        super().__init__(server_context, **options)

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/token"

    @property
    def authorize_url(self) -> str:
        return f"{self.base}/o/oauth2/v2/auth"

    @property
    def device_url(self) -> str:
        return f"{self.base}/device/code"

    def handle_get(self, request: _Handler) -> None:
        path, _, query = request.path.partition("?")
        if path != "/o/oauth2/v2/auth":
            request.reply(404, {"error": "not_found"})
            return
        status, location, page = self._authorize({k: v[0] for k, v in parse_qs(query).items()})
        request.reply(status, page, {"Location": location} if location else None)

    def _answer(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if path == "/device/code":
            scopes = form.get("scope", "").split()
            if "https://mail.google.com/" in scopes:
                return _google(400, "invalid_scope", "Invalid device flow scope: https://mail.google.com/")
            return _google(400, "invalid_client", "not used in these tests")
        if path != "/token":
            return _google(404, "not_found", path)
        if form.get("grant_type") == JWT_BEARER:
            return self._service_account(form.get("assertion", ""))
        client = form.get("client_id", "")
        if client not in self.clients:
            return _google(401, "invalid_client", "The OAuth client was not found.")
        if form.get("client_secret") != self.clients[client]:
            return _google(401, "invalid_client", "Unauthorized")
        grant = form.get("grant_type")
        if grant == "refresh_token":
            status, body = self._refresh(client, form.get("refresh_token", ""))
            return (status, body) if status == 200 else _google(400, "invalid_grant", "Token has been expired or revoked.")
        if grant == "authorization_code":
            status, body = self._redeem(client, form)
            if status == 200:
                return status, body
            return _google(400, "invalid_grant", "Invalid code verifier." if "501481" in str(body) else "Bad Request")
        return _google(400, "unsupported_grant_type", "Invalid grant_type: " + str(grant))

    def _signed_in(self, client: str, scope: str, person: str) -> dict[str, Any]:
        """Google gives a refresh token for access_type=offline (relay always asks), and an id_token for openid."""
        words = scope.split()
        body = self._issue(person=person, scopes=tuple(w for w in words if "/" in w))
        refresh = "1//rt-" + secrets.token_hex(16)
        with self._lock:
            self.refresh_tokens[refresh] = client
            self.issued_to[refresh] = person
        body["refresh_token"] = refresh
        if "openid" in words:
            body["id_token"] = _unsigned_jwt({"aud": client, "iss": "https://accounts.google.com", "email": person,
                                              "email_verified": True, "exp": int(time.time()) + 3600})  # fmt: skip
        return body

    def _service_account(self, assertion: str) -> tuple[int, dict[str, Any]]:
        """RFC 7523 with Google's rules: signed by a key of the service account named in iss, aud this
        endpoint, at most an hour long; the scope granted to it in the Admin console; sub a domain user."""
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            return _google(400, "invalid_grant", "Invalid JWT: malformed")
        key = self.service_accounts.get(str(unverified.get("iss")))
        if key is None:
            return _google(400, "invalid_grant", "Invalid JWT Signature.")
        try:
            claims = jwt.decode(assertion, key, algorithms=["RS256"], audience=self.url,
                                options={"require": ["iss", "aud", "exp", "iat", "scope"]})  # fmt: skip
        except jwt.InvalidSignatureError:
            return _google(400, "invalid_grant", "Invalid JWT Signature.")
        except jwt.InvalidTokenError as exc:
            return _google(400, "invalid_grant", f"Invalid JWT: {exc}")
        if claims["exp"] - claims["iat"] > 3600:
            return _google(400, "invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes)")
        granted = self.delegation.get(claims["iss"], set())
        if "sub" in claims and not set(claims["scope"].split()) <= granted:
            return _google(401, "unauthorized_client", "Client is unauthorized to retrieve access tokens using this "
                                                       "method, or client not authorized for any of the scopes "
                                                       "requested.")  # fmt: skip
        if "sub" in claims and claims["sub"] not in self.domain_users:
            return _google(400, "invalid_grant", "Invalid email or User ID")
        with self._lock:
            self.assertions.append((jwt.get_unverified_header(assertion), claims))
        person = claims.get("sub", claims["iss"])
        return 200, self._issue(person=person, scopes=tuple(claims["scope"].split()))


@dataclass
class File:
    """An attachment as a recipient sees it: its name, type, bytes, and for an inline image its cid."""

    name: str
    content_type: str
    data: bytes
    inline: bool = False
    content_id: str | None = None


@dataclass
class GraphMail:
    """One message Graph sent: its MIME, and the attachments added to its draft (the draft route)."""

    mailbox: str
    content: bytes
    attached: list[File] = field(default_factory=list)
    message_id: str = ""

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.content, policy=policy.default)

    def files(self) -> list[File]:
        """Every attachment: those in the MIME and those added to the draft, as Outlook would list them."""
        found = []
        for part in self.message.walk():
            if part.is_multipart() or part.get_content_maintype() == "text" and part.get_filename() is None:
                continue
            cid = str(part.get("Content-ID", "")).strip("<> ") or None
            found.append(File(part.get_filename() or "", part.get_content_type(), part.get_payload(decode=True),
                              part.get_content_disposition() == "inline", cid))  # fmt: skip
        return found + self.attached


@dataclass
class GraphFaults:
    """Replies to give instead of accepting, per mailbox, one per request, in order."""

    script: dict[str, deque[tuple[int, dict[str, Any] | None, dict[str, str]]]] = field(default_factory=dict)

    def add(self, mailbox: str, status: int, body: dict[str, Any] | None = None, **headers: str) -> None:
        self.script.setdefault(mailbox, deque()).append((status, body, headers))


@dataclass
class Draft:
    """A message in the Drafts folder (``POST /users/{mailbox}/messages``) and what was attached to it."""

    id: str
    mailbox: str
    content: bytes
    message_id: str
    created: str
    attached: list[File] = field(default_factory=list)


@dataclass
class Upload:
    """An upload session: the attachment it builds and how far it got."""

    draft: str
    item: dict[str, Any]
    data: bytearray = field(default_factory=bytearray)


MAX_REQUEST = 4 * 1024 * 1024  # Graph refuses a bigger request body with 413
FRAGMENT_UNIT = 320 * 1024  # every range but the last is a multiple of this
_GRAPH_RULE = re.compile(r"[^@.\s\"]+(?:\.[^@.\s\"]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


class GraphServer(HTTPSServer):
    """Microsoft Graph's mail API as relay uses it, checked as Graph checks it.

    ``POST /v1.0/users/{mailbox}/sendMail`` (base64 MIME, Mail.Send); the draft route (Mail.ReadWrite):
    ``POST .../messages`` (base64 MIME: a draft), ``GET``/``DELETE .../messages/{id}``, ``POST
    .../messages/{id}/attachments`` (a fileAttachment), ``POST .../attachments/createUploadSession`` (an
    ``uploadUrl``), ``PUT uploadUrl`` (``Content-Range``; every range but the last a multiple of 320 KiB;
    an ``Authorization`` header refused with 401, as Graph does: the URL is pre-authenticated), ``GET
    uploadUrl`` (``nextExpectedRanges``), ``POST .../messages/{id}/send``, and a folder's messages by
    ``internetMessageId`` (``GET .../mailFolders/{drafts|sentitems}/messages?$filter=...``). A request body
    over 4 MB gets 413. A recipient that is not a plain address gets 400 ``ErrorInvalidRecipients`` at send,
    naming it; so do the addresses in ``invalid``.

    ``on_step(step)`` is called at ``create`` (draft stored, before the answer), ``upload`` (a range
    stored), ``send`` (a send asked for, before it is done; a true return value stops it there) and
    ``sent`` (done, before the answer): a test kills relay there. ``put_faults``: the answer to give to the Nth ``PUT`` (1-based) instead.
    ``unanswered``: how many sendMail requests to carry out and then answer by closing the connection.
    """

    LIMIT = 4  # concurrent requests per mailbox

    def __init__(self, server_context: ssl.SSLContext, *, valid: Callable[[str, str | None], bool], delay: float = 0.0) -> None:
        self.valid = valid
        self.delay = delay
        self.faults = GraphFaults()
        self.received: list[GraphMail] = []
        self.requests: list[tuple[float, str, int]] = []  # (time, mailbox, status)
        self.calls: list[tuple[str, str, int]] = []  # (method, what, status) of every request, in order
        self.active: dict[str, int] = {}
        self.max_active: dict[str, int] = {}
        self.drafts: dict[str, Draft] = {}
        self.sent_items: list[Draft] = []
        self.uploads: dict[str, Upload] = {}
        self.invalid: set[str] = set()
        self.on_step: Callable[[str], bool | None] | None = None
        self.put_faults: dict[int, tuple[int, dict[str, str]]] = {}
        self.puts = 0
        self.unanswered = 0  # this many sendMail requests are taken (the mail goes) and their connection dropped
        self._lock = threading.Lock()
        super().__init__(server_context)

    def handle_get(self, request: _Handler) -> None:
        self.handle(request)

    def handle(self, request: _Handler) -> None:
        payload = request.body()
        if request.path.startswith("/upload/"):
            status, body, headers = self._upload(request, payload)
            with self._lock:
                self.calls.append((request.command, "upload", status))
            request.reply(status, body, headers)
            return
        match = re.match(r"/v1\.0/users/([^/?]+)(/[^?]*)?", request.path)
        mailbox = unquote(match[1]).lower() if match else ""
        with self._lock:
            self.active[mailbox] = self.active.get(mailbox, 0) + 1
            self.max_active[mailbox] = max(self.max_active.get(mailbox, 0), self.active[mailbox])
            crowded = self.active[mailbox] > self.LIMIT
            sending = request.command == "POST" and re.search(r"/(sendMail|send)$", request.path) is not None
            script = self.faults.script.get(mailbox) if sending else None
            scripted = script.popleft() if script else None  # taken on arrival: one request gets it
        status = 500
        try:
            time.sleep(0 if scripted else self.delay)  # a scripted refusal comes at once, before slow deliveries
            status, body, headers = self._answer(request, mailbox, payload, crowded, scripted)
        finally:
            with self._lock:
                self.active[mailbox] -= 1
                self.requests.append((time.monotonic(), mailbox, status))
                self.calls.append((request.command, re.sub(r"/messages/[^/?]+", "/messages/{id}",
                                                           request.path.split("?")[0]).rsplit("/", 1)[-1], status))
                drop = sending and status == 202 and self.unanswered > 0
                self.unanswered -= drop
        if drop:  # sent, but the answer is lost: the connection ends without one
            request.close_connection = True
            return
        request.reply(status, body, headers)

    def _answer(
        self, request: _Handler, mailbox: str, payload: bytes, crowded: bool,
        scripted: tuple[int, dict[str, Any] | None, dict[str, str]] | None,
    ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:  # fmt: skip
        if not mailbox:
            return 404, _graph_error("ResourceNotFound", "Resource not found"), {}
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not self.valid(token, None):
            return 401, _graph_error("InvalidAuthenticationToken", "Access token has expired or is not yet valid."), {}
        path = request.path.split("?")[0]
        sendmail = path.endswith("/sendMail")
        if not self.valid(token, "Mail.Send" if sendmail else "Mail.ReadWrite"):
            return 403, _graph_error("ErrorAccessDenied", "Access is denied. Check credentials and try again."), {}
        if crowded:
            return 429, _graph_error("ApplicationThrottled", "Application is over its MailboxConcurrency limit."), {
                "Retry-After": "1"}  # fmt: skip
        if len(payload) > MAX_REQUEST:
            return 413, _graph_error("ErrorRequestEntityTooLarge", "The request is larger than 4 MB."), {}
        if scripted is not None:
            return scripted
        if sendmail:
            return self._send_mail(request, mailbox, payload)
        return self._mailbox(request, mailbox, path, payload)

    def _mime(self, request: _Handler, payload: bytes) -> bytes | tuple[int, dict[str, Any], dict[str, str]]:
        if request.headers.get("Content-Type") != "text/plain":
            return 400, _graph_error("ErrorMimeContentInvalid", "Content-Type must be text/plain"), {}
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error:
            return 400, _graph_error("ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content."), {}

    def _refused_recipient(self, content: bytes) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        message = message_from_bytes(content, policy=policy.compat32)
        for _, address in getaddresses([str(v) for name in ("To", "Cc", "Bcc") for v in message.get_all(name, [])]):
            if address.lower() in self.invalid or not _GRAPH_RULE.fullmatch(address):
                return 400, _graph_error("ErrorInvalidRecipients", f"At least one recipient is not valid., Recipient "
                                         f"'{address}' is not resolved. All recipients must be resolved before a "
                                         "message can be submitted."), {}  # fmt: skip
        return None

    def _send_mail(self, request: _Handler, mailbox: str, payload: bytes) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        content = self._mime(request, payload)
        if isinstance(content, tuple):
            return content
        refused = self._refused_recipient(content)
        if refused is not None:
            return refused
        with self._lock:
            self.received.append(GraphMail(mailbox, content, message_id=_message_id(content)))
            self.sent_items.append(Draft(secrets.token_hex(8), mailbox, content, _message_id(content), _now()))
        return 202, None, {}

    def _mailbox(self, request: _Handler, mailbox: str, path: str, payload: bytes) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        rest = path.split(f"/users/{path.split('/')[3]}", 1)[1]
        method = request.command
        if method == "POST" and rest == "/messages":
            return self._create(request, mailbox, payload)
        folder = re.fullmatch(r"/mailFolders/(\w+)/messages", rest)
        if method == "GET" and folder:
            return self._find(mailbox, folder[1].lower(), parse_qs(request.path.partition("?")[2]).get("$filter", [""])[0])
        item = re.fullmatch(r"/messages/([^/]+)(/.*)?", rest)
        if item is None:
            return 400, _graph_error("BadRequest", f"Unsupported request {method} {rest}"), {}
        draft = self.drafts.get(unquote(item[1]))
        if draft is None or draft.mailbox != mailbox:
            return 404, _graph_error("ErrorItemNotFound", "The specified object was not found in the store."), {}
        action = item[2] or ""
        if method == "GET" and not action:
            return 200, _resource(draft), {}
        if method == "DELETE" and not action:
            with self._lock:
                self.drafts.pop(draft.id, None)
            return 204, None, {}
        if method == "POST" and action == "/attachments":
            return self._attach(draft, payload)
        if method == "POST" and action == "/attachments/createUploadSession":
            return self._session(request, draft, payload)
        if method == "POST" and action == "/send":
            return self._send(draft)
        return 400, _graph_error("BadRequest", f"Unsupported request {method} {rest}"), {}

    def _create(self, request: _Handler, mailbox: str, payload: bytes) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        content = self._mime(request, payload)
        if isinstance(content, tuple):
            return content
        draft = Draft("AAMk" + secrets.token_hex(12), mailbox, content, _message_id(content), _now())
        with self._lock:
            self.drafts[draft.id] = draft
        self._step("create")
        return 201, _resource(draft), {}

    def _find(self, mailbox: str, folder: str, query: str) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        wanted = re.fullmatch(r"internetMessageId eq '(.*)'", query)
        if wanted is None or folder not in ("drafts", "sentitems"):
            return 400, _graph_error("ErrorInvalidUrlQueryFilter", f"unsupported filter {query!r}"), {}
        message_id = wanted[1].replace("''", "'")
        items = list(self.drafts.values()) if folder == "drafts" else self.sent_items
        found = [_resource(d) for d in items if d.mailbox == mailbox and d.message_id == message_id]
        return 200, {"value": found}, {}

    def _attach(self, draft: Draft, payload: bytes) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        item = json.loads(payload)
        if item.get("@odata.type") != "#microsoft.graph.fileAttachment":
            return 400, _graph_error("ErrorInvalidRequest", "expected a fileAttachment"), {}
        data = base64.b64decode(item["contentBytes"], validate=True)
        with self._lock:
            draft.attached.append(File(item["name"], item.get("contentType", ""), data, bool(item.get("isInline")),
                                       item.get("contentId")))  # fmt: skip
        return 201, {"id": secrets.token_hex(8), "name": item["name"], "size": len(data)}, {}

    def _session(self, request: _Handler, draft: Draft, payload: bytes) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        item = json.loads(payload).get("AttachmentItem") or {}
        if item.get("attachmentType") != "file" or not item.get("name") or not isinstance(item.get("size"), int):
            return 400, _graph_error("ErrorInvalidRequest", "AttachmentItem needs attachmentType file, name, size"), {}
        key = secrets.token_hex(16)
        with self._lock:
            self.uploads[key] = Upload(draft.id, item)
        url = f"https://127.0.0.1:{self.port}/upload/{key}"
        return 201, {"uploadUrl": url, "expirationDateTime": "2026-12-31T00:00:00Z", "nextExpectedRanges": ["0-"]}, {}

    def _upload(self, request: _Handler, payload: bytes) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        upload = self.uploads.get(request.path.removeprefix("/upload/"))
        if upload is None:
            return 404, _graph_error("ErrorItemNotFound", "The upload session does not exist."), {}
        if request.command == "GET":
            return 200, {"expirationDateTime": "2026-12-31T00:00:00Z", "nextExpectedRanges": [str(len(upload.data))]}, {}
        if request.command == "DELETE":
            self.uploads.pop(request.path.removeprefix("/upload/"), None)
            return 204, None, {}
        if "Authorization" in request.headers:  # the URL carries its own authorization
            return 401, _graph_error("InvalidAuthenticationToken", "An Authorization header is not accepted on an "
                                     "upload URL."), {}  # fmt: skip
        with self._lock:
            self.puts += 1
            fault = self.put_faults.pop(self.puts, None)
        if fault is not None:
            status, headers = fault
            return status, _graph_error("ApplicationThrottled" if status == 429 else "ServiceUnavailable", "busy"), headers
        if len(payload) > MAX_REQUEST:
            return 413, _graph_error("ErrorRequestEntityTooLarge", "A range over 4 MB."), {}
        size = upload.item["size"]
        ranged = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", request.headers.get("Content-Range", ""))
        if ranged is None or int(ranged[3]) != size:
            return 400, _graph_error("ErrorInvalidRequest", "Content-Range must be bytes start-end/size"), {}
        start, end = int(ranged[1]), int(ranged[2])
        if start != len(upload.data) or end - start + 1 != len(payload) or end >= size:
            return 416, _graph_error("ErrorInvalidRange", f"expected a range from {len(upload.data)}"), {}
        if end + 1 < size and len(payload) % FRAGMENT_UNIT:
            return 400, _graph_error("ErrorInvalidRange", "a range but the last must be a multiple of 320 KiB"), {}
        upload.data += payload
        self._step("upload")
        if len(upload.data) < size:
            return 200, {"expirationDateTime": "2026-12-31T00:00:00Z", "nextExpectedRanges": [str(len(upload.data))]}, {}
        with self._lock:
            self.uploads.pop(request.path.removeprefix("/upload/"), None)
            draft = self.drafts.get(upload.draft)
            if draft is not None:
                item = upload.item
                draft.attached.append(File(item["name"], item.get("contentType", ""), bytes(upload.data),
                                           bool(item.get("isInline")), item.get("contentId")))  # fmt: skip
        return 201, None, {"Location": f"https://127.0.0.1:{self.port}/v1.0/attachments/{secrets.token_hex(8)}"}

    def _send(self, draft: Draft) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        if self._step("send"):  # the caller died before Graph sent it: Graph does not send it
            return 503, _graph_error("ServiceUnavailable", "the request was cut off"), {}
        refused = self._refused_recipient(draft.content)
        if refused is not None:
            return refused
        with self._lock:
            if self.drafts.pop(draft.id, None) is None:
                return 404, _graph_error("ErrorItemNotFound", "The specified object was not found in the store."), {}
            self.received.append(GraphMail(draft.mailbox, draft.content, list(draft.attached), draft.message_id))
            self.sent_items.append(draft)
        self._step("sent")
        return 202, None, {}

    def _step(self, step: str) -> bool:
        """Tell ``on_step``; ``True``: it asks that the request go no further."""
        return self.on_step is not None and bool(self.on_step(step))

    def wait_for(self, count: int, timeout: float = 15.0) -> list[GraphMail]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert count <= len(self.received), f"Graph got {len(self.received)} of {count} messages"
        return self.received


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _message_id(content: bytes) -> str:
    return str(message_from_bytes(content, policy=policy.compat32).get("Message-ID", "")).strip()


def _resource(draft: Draft) -> dict[str, Any]:
    return {"id": draft.id, "internetMessageId": draft.message_id, "isDraft": True, "createdDateTime": draft.created}


def _graph_error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "innerError": {"request-id": "0000", "date": "2026-12-02"}}}


def graph_error(code: str, message: str) -> dict[str, Any]:
    """A Graph error body, for scripted faults."""
    return _graph_error(code, message)


T = TypeVar("T")

if TYPE_CHECKING:
    from relay.transports.tokens import TokenCache


def run_closing(cache: TokenCache, coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, then close the HTTPS connections ``cache`` kept alive on that loop (as the daemon's stop
    does): a kept connection whose loop is gone would be an unclosed socket."""
    import asyncio

    from tests.servers import settle

    async def main() -> T:
        try:
            return await coro
        finally:
            await cache.http.aclose()
            await settle()

    return asyncio.run(main())
