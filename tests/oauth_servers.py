"""Real HTTPS servers for OAuth2 tests: a Microsoft identity platform token endpoint and Graph sendMail.

Both are ``http.server`` threading servers wrapped in TLS (trustme certificates), bound to 127.0.0.1
port 0, each in its own thread. They speak the protocols the way Microsoft does, as far as relay can
tell: the v2.0 token endpoint (``client_credentials`` and ``refresh_token`` grants, ``expires_in``,
refresh-token rotation, AADSTS error bodies) and ``POST /v1.0/users/{mailbox}/sendMail`` with a base64
MIME body (202, 429 + Retry-After, 503, 400 ErrorInvalidRecipients, at most 4 requests at once per
mailbox). Access tokens are unsigned JWTs whose claims (``roles``) a diagnosis can read.
"""

from __future__ import annotations

import base64
import binascii
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote

TENANT = "yritys.onmicrosoft.com"


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

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_POST(self) -> None:
        self.server.owner.handle(self)


class HTTPSServer:
    """A threading HTTPS server whose requests go to ``self.handle``."""

    def __init__(self, server_context: ssl.SSLContext) -> None:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
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


class TokenServer(HTTPSServer):
    """The Microsoft identity platform v2.0 token endpoint for one tenant.

    ``clients`` maps client ids to their secrets; ``refresh_tokens`` the refresh tokens it will take to
    their client. Every access token it issues is remembered with its expiry, so other test servers ask
    ``valid()`` whether a token is good right now.
    """

    def __init__(self, server_context: ssl.SSLContext, *, lifetime: float = 3600, roles: tuple[str, ...] = ()) -> None:
        self.clients: dict[str, str] = {}
        self.refresh_tokens: dict[str, str] = {}
        self.lifetime = lifetime
        self.roles = roles
        self.rotate = False
        self.rotated: list[str] = []  # every refresh token handed out by rotation
        self.issued: dict[str, tuple[float, tuple[str, ...]]] = {}  # token -> expiry, the roles it carries
        self.grants: list[str] = []  # grant_type of every successful request
        self.refused: list[str] = []  # the error code of every refused request
        self.outage: tuple[int, dict[str, str]] | None = None  # (status, headers) to answer every request with
        self._lock = threading.Lock()
        super().__init__(server_context)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/{TENANT}/oauth2/v2.0/token"

    def valid(self, token: str, role: str | None = None) -> bool:
        with self._lock:
            expires, roles = self.issued.get(token, (0.0, ()))
        if expires <= time.time():
            return False
        return role is None or role in roles  # a token carries the permissions granted when it was issued

    def handle(self, request: _Handler) -> None:
        form = {k: v[0] for k, v in parse_qs(request.body().decode()).items()}
        if self.outage is not None:
            status, headers = self.outage
            with self._lock:
                self.refused.append(f"HTTP {status}")
            request.reply(status, {"error": "temporarily_unavailable", "error_description": "AADSTS90033: busy"},
                          headers)  # fmt: skip
            return
        status, body = self._answer(request.path, form)
        with self._lock:
            if status == 200:
                self.grants.append(form.get("grant_type", ""))
            else:
                self.refused.append(body["error_description"].split(":")[0])
        request.reply(status, body)

    def _answer(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        match = re.fullmatch(r"/([^/]+)/oauth2/v2\.0/token", path)
        if match is None or unquote(match[1]) != TENANT:
            tenant = match[1] if match else path
            return _aad(400, "invalid_request", 90002, f"Tenant '{tenant}' not found. Check to make sure you have "
                                                       "the correct tenant ID and are signing into the correct cloud.")  # fmt: skip
        client = form.get("client_id", "")
        if client not in self.clients:
            return _aad(400, "unauthorized_client", 700016, f"Application with identifier '{client}' was not found "
                                                             f"in the directory '{TENANT}'.")  # fmt: skip
        expected = self.clients[client]
        if expected and form.get("client_secret") != expected:
            return _aad(401, "invalid_client", 7000215, "Invalid client secret provided. Ensure the secret being "
                                                        "sent in the request is the client secret value, not the "
                                                        "client secret ID.")  # fmt: skip
        grant = form.get("grant_type")
        if grant == "refresh_token":
            return self._refresh(client, form.get("refresh_token", ""))
        if grant == "client_credentials":
            return 200, self._issue()
        return _aad(400, "unsupported_grant_type", 70003, f"The app requested an unsupported grant type '{grant}'.")

    def _refresh(self, client: str, token: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            known = self.refresh_tokens.get(token) == client
            if known and self.rotate:
                del self.refresh_tokens[token]
                token = "rt-" + secrets.token_hex(16)
                self.refresh_tokens[token] = client
                self.rotated.append(token)
        if not known:
            return _aad(400, "invalid_grant", 70008, "The provided authorization code or refresh token has expired "
                                                     "due to inactivity.")  # fmt: skip
        return 200, {**self._issue(), "refresh_token": token}

    def _issue(self) -> dict[str, Any]:
        expires = time.time() + self.lifetime
        claims = {"aud": "https://outlook.office365.com", "tid": TENANT, "roles": list(self.roles),
                  "exp": int(expires), "jti": secrets.token_hex(16)}  # fmt: skip
        token = ".".join((_b64url(b'{"alg":"none"}'), _b64url(json.dumps(claims).encode()), "sig"))
        with self._lock:
            self.issued[token] = (expires, self.roles)
        return {"token_type": "Bearer", "expires_in": self.lifetime, "ext_expires_in": self.lifetime,
                "access_token": token}  # fmt: skip


@dataclass
class GraphMail:
    """One message Graph accepted."""

    mailbox: str
    content: bytes

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.content, policy=policy.default)


@dataclass
class GraphFaults:
    """Replies to give instead of accepting, per mailbox, one per request, in order."""

    script: dict[str, deque[tuple[int, dict[str, Any] | None, dict[str, str]]]] = field(default_factory=dict)

    def add(self, mailbox: str, status: int, body: dict[str, Any] | None = None, **headers: str) -> None:
        self.script.setdefault(mailbox, deque()).append((status, body, headers))


class GraphServer(HTTPSServer):
    """``POST /v1.0/users/{mailbox}/sendMail`` with a base64 MIME body and a bearer token (Mail.Send)."""

    LIMIT = 4  # concurrent requests per mailbox

    def __init__(self, server_context: ssl.SSLContext, *, valid: Callable[[str, str | None], bool], delay: float = 0.0) -> None:
        self.valid = valid
        self.delay = delay
        self.faults = GraphFaults()
        self.received: list[GraphMail] = []
        self.requests: list[tuple[float, str, int]] = []  # (time, mailbox, status)
        self.active: dict[str, int] = {}
        self.max_active: dict[str, int] = {}
        self._lock = threading.Lock()
        super().__init__(server_context)

    def handle(self, request: _Handler) -> None:
        payload = request.body()
        match = re.fullmatch(r"/v1\.0/users/([^/]+)/sendMail", request.path)
        mailbox = unquote(match[1]).lower() if match else ""
        with self._lock:
            self.active[mailbox] = self.active.get(mailbox, 0) + 1
            self.max_active[mailbox] = max(self.max_active.get(mailbox, 0), self.active[mailbox])
            crowded = self.active[mailbox] > self.LIMIT
            script = self.faults.script.get(mailbox)
            scripted = script.popleft() if script else None  # taken on arrival: one request gets it
        try:
            time.sleep(0 if scripted else self.delay)  # a scripted refusal comes at once, before slow deliveries
            status, body, headers = self._answer(request, mailbox, payload, crowded, scripted)
        finally:
            with self._lock:
                self.active[mailbox] -= 1
                self.requests.append((time.monotonic(), mailbox, status))
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
        if not self.valid(token, "Mail.Send"):
            return 403, _graph_error("ErrorAccessDenied", "Access is denied. Check credentials and try again."), {}
        if crowded:
            return 429, _graph_error("ApplicationThrottled", "Application is over its MailboxConcurrency limit."), {
                "Retry-After": "1"}  # fmt: skip
        if scripted is not None:
            return scripted
        if request.headers.get("Content-Type") != "text/plain":
            return 400, _graph_error("ErrorMimeContentInvalid", "Content-Type must be text/plain"), {}
        try:
            content = base64.b64decode(payload, validate=True)
        except binascii.Error:
            return 400, _graph_error("ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content."), {}
        with self._lock:
            self.received.append(GraphMail(mailbox, content))
        return 202, None, {}

    def wait_for(self, count: int, timeout: float = 15.0) -> list[GraphMail]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert count <= len(self.received), f"Graph got {len(self.received)} of {count} messages"
        return self.received


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
