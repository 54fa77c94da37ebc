"""Real servers for tests: a recording upstream (aiosmtpd, TLS, AUTH) and relay itself, each in a thread.

Both bind 127.0.0.1 port 0 (the OS picks), run their own event loop in a background thread, and are
driven from the test with blocking clients (smtplib), the way a legacy program would drive relay.
The upstream can be told to fail in the ways providers fail (per-command replies, dropping the
connection mid-DATA, hanging) and records who logged in and what arrived.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relay.config.models import Config
from relay.daemon import Daemon
from relay.envelope import Account


class LoopThread:
    """An asyncio loop in a daemon thread; ``call`` runs a coroutine there and waits for it."""

    def __init__(self, name: str, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> None:
        self.loop = (loop_factory or asyncio.new_event_loop)()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.thread.is_alive():
            self.call(_abort_leftover_transports(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _abort_leftover_transports() -> None:
    """Close what is still open on a loop about to be closed: a TLS connection closes asynchronously
    (close_notify, which the peer, maybe a server stopping too, answers or not) and one accepted in the
    middle of its TLS handshake as a server stops is known to nobody yet. Left open, either would be
    reported as an unclosed transport at some later garbage collection, in whichever test runs then.
    Selector loops keep their transports in ``_transports`` (fd -> transport)."""
    loop = asyncio.get_running_loop()
    for transport in list(getattr(loop, "_transports", {}).values()):
        if transport is not None and not transport.is_closing():
            transport.abort()
    for _ in range(3):  # connection_lost callbacks run on the next iterations
        await asyncio.sleep(0)


async def settle(delay: float = 0.05) -> None:
    """End of a test's own loop (``asyncio.run``): a moment for connections to close politely, then
    whatever has not finished closing is closed (see ``_abort_leftover_transports``)."""
    await asyncio.sleep(delay)
    await _abort_leftover_transports()


@dataclass
class Received:
    """One message as the upstream got it."""

    login: str | None
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    at: float = field(default_factory=time.monotonic)  # when it arrived: pacing is measured on this side

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.content, policy=policy.default)  # type: ignore[return-value]


@dataclass
class Faults:
    """What the upstream should do wrong; each reply is a full SMTP reply line."""

    mail: str | None = None
    rcpt: dict[str, str] = field(default_factory=dict)
    data: str | None = None
    drop_in_data: bool = False
    # takes the message, then the connection is lost before its 250 reaches the client (RFC 1047)
    reply_lost: bool = False
    hang_after_data: float = 0.0  # takes the message, then waits this long before its 250 (RFC 1047)
    hang: float = 0.0
    slow_rcpt: float = 0.0  # seconds before each RCPT's reply
    require_sender_is_login: bool = False
    data_command: str | None = None  # reply to the DATA command itself; the transaction stays open
    bdat: str | None = None  # reply to every BDAT (a server that offers CHUNKING and then refuses it)
    # like Postfix with smtpd_end_of_data_restrictions: a refused message leaves the transaction open
    # until RSET, so a MAIL on the same connection gets "503 5.5.1 Error: nested MAIL command"
    keep_failed_transaction: bool = False
    # like Gmail and Office 365: a message with a bare CR or LF, or a line over 998 octets, is refused
    # after the final dot (aiosmtpd itself refuses only lines over 1,001 octets counted up to a CRLF)
    strict_lines: bool = False


class RecordingHandler:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        faults = self.upstream.faults
        if faults.hang:
            await asyncio.sleep(faults.hang)
        if getattr(session, "unreset_failure", False):
            return "503 5.5.1 Error: nested MAIL command"
        if faults.mail:
            return faults.mail
        login = self.upstream.login_of(session)
        if faults.require_sender_is_login and address.lower() != (login or "").lower():
            return "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException; not allowed to send as " + address
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.upstream.faults.slow_rcpt:
            await asyncio.sleep(self.upstream.faults.slow_rcpt)
        reply = self.upstream.faults.rcpt.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        faults = self.upstream.faults
        if faults.drop_in_data:
            assert server.transport is not None
            server.transport.abort()
            return "421 dropped"
        if faults.data:
            session.unreset_failure = faults.keep_failed_transaction  # type: ignore[attr-defined]
            return faults.data
        content = envelope.original_content or b""
        if faults.strict_lines and not content.count(b"\n") == content.count(b"\r\n") == content.count(b"\r"):
            return "550 5.6.11 SMTPSEND.BareLinefeedsAreIllegal; message contains bare linefeeds"
        if faults.strict_lines and max(map(len, content.split(b"\r\n"))) > 998:
            return "500 5.5.2 Line too long"
        if server.transport is None or server.transport.is_closing():
            # dropped (drop_connections, stop) after the data was read, before this ran: a server that goes
            # down before taking the message keeps nothing (were it kept, its 250 would be lost: RFC 1047)
            return "421 4.4.2 connection dropped"
        self.upstream.received.append(
            Received(
                login=self.upstream.login_of(session),
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                content=envelope.original_content or b"",
                tls=session.ssl is not None or self.upstream.security == "ssl",
            )
        )
        if faults.reply_lost:
            server.transport.abort()
        if faults.hang_after_data:
            await asyncio.sleep(faults.hang_after_data)
        return "250 2.0.0 OK queued upstream"

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        """aiosmtpd offers no PIPELINING (it reads pipelined commands all the same): ``upstream.pipelining``
        offers it, as Postfix, Office 365 and Gmail do."""
        session.host_name = hostname
        if self.upstream.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        if self.upstream.chunking:
            responses.insert(len(responses) - 1, "250-CHUNKING")
        return responses

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        session.unreset_failure = False  # type: ignore[attr-defined]
        self.upstream.resets += 1
        return "250 2.0.0 OK"


class FaultySMTP(SMTP):
    """aiosmtpd with one more way to fail: a reply to the DATA command itself (before 354)."""

    def __init__(self, upstream: Upstream, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.upstream = upstream
        self.number = upstream.connections  # which connection this is, for ``auth_sessions``

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # registered here, not when the protocol is built: a connection accepted just as the upstream
        # stops or drops its connections has no transport yet, and would be forgotten open
        super().connection_made(transport)
        self.upstream._sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.upstream._sessions.discard(self)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        """Each read as it came (its first 512 octets): commands sent together arrive in one read."""
        self.upstream.reads.append(data[:512])
        super().data_received(data)

    async def smtp_AUTH(self, arg: str) -> None:
        """Count every AUTH command, as a provider's lockout counts failed logins (Office 365's smart
        lockout, Gmail): what a wrong password costs per session is measured on this side."""
        self.upstream.auth_commands.append((self.number, (arg.split() or [""])[0].upper()))
        await super().smtp_AUTH(arg)

    async def smtp_DATA(self, arg: str) -> None:
        reply = self.upstream.faults.data_command
        if reply and self.envelope is not None and self.envelope.rcpt_tos:
            await self.push(reply)
            return
        await super().smtp_DATA(arg)

    _chunks = b""  # the BDAT chunks of the message so far

    async def smtp_BDAT(self, arg: str) -> None:
        """RFC 3030 CHUNKING, where ``upstream.chunking`` offers it (aiosmtpd has none), as Postfix does
        it: the chunk is read whole whatever the answer, and the last one ends like the final dot (the
        handler's ``handle_DATA`` and its faults decide); ``faults.data_command`` and ``faults.bdat``
        answer every BDAT."""
        words = arg.split()
        if not self.upstream.chunking or not 1 <= len(words) <= 2 or not words[0].isdigit():
            await self.push("501 5.5.4 Syntax: BDAT count [LAST]")  # no count: the connection is lost
            return
        chunk = await self._reader.readexactly(int(words[0]))
        last = len(words) == 2 and words[1].upper() == "LAST"
        assert self.envelope is not None
        reply = None
        if self.envelope.mail_from is None:
            reply = "503 5.5.1 Error: need MAIL command"
        elif not self.envelope.rcpt_tos:
            reply = "554 5.5.1 Error: no valid recipients"
        elif self.upstream.faults.data_command or self.upstream.faults.bdat:
            reply = self.upstream.faults.data_command or self.upstream.faults.bdat
        if reply is not None:
            self._chunks = b""
            await self.push(reply)
            return
        self._chunks += chunk
        if not last:
            await self.push(f"250 2.0.0 Ok: {len(chunk)} bytes")
            return
        self.envelope.content = self.envelope.original_content = self._chunks
        self._chunks = b""
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)


class XOAuth2Handler(RecordingHandler):
    """A recording handler whose server takes AUTH XOAUTH2 only, with a token ``upstream.xoauth2`` accepts."""

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        check = self.upstream.xoauth2
        assert check is not None
        try:
            fields = dict(
                part.split("=", 1) for part in base64.b64decode(args[1]).decode().split("\x01") if "=" in part
            )
        except (IndexError, ValueError):
            return AuthResult(success=False, handled=False, message="501 5.5.2 Cannot decode XOAUTH2")
        user, token = fields.get("user", ""), fields.get("auth", "").removeprefix("Bearer ")
        if check(user, token):
            self.upstream.logins.append(user)
            return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))
        self.upstream.failed_logins.append(user)
        # like Office 365 and Gmail: an error challenge (base64 JSON), then 535 after the client's empty line
        error = base64.b64encode(b'{"status":"401","schemes":"bearer","scope":"https://outlook.office365.com/"}')
        await server.challenge_auth(error.decode(), encode_to_b64=False)
        return AuthResult(success=False, handled=False, message="535 5.7.3 Authentication unsuccessful")


class Upstream:
    """A provider-like SMTP server: ``security`` ssl (implicit TLS) or starttls, AUTH when ``accounts``;
    with ``xoauth2`` (a check of user and token), AUTH XOAUTH2 only."""

    def __init__(
        self, name: str, *, security: str, server_context: ssl.SSLContext | None, accounts: dict[str, str],
        xoauth2: Callable[[str, str], bool] | None = None,
    ) -> None:  # fmt: skip
        self.xoauth2 = xoauth2
        self.name = name
        self.security = security
        self.accounts = accounts
        self.server_context = server_context
        self.received: list[Received] = []
        self.faults = Faults()
        self.logins: list[str] = []
        self.resets = 0
        self.connections = 0
        self.pipelining = False  # offer PIPELINING (RFC 2920) in the EHLO reply
        self.chunking = False  # offer CHUNKING (RFC 3030, BDAT) in the EHLO reply
        self.smtputf8 = False  # offer SMTPUTF8 (RFC 6531), as Gmail does (aiosmtpd does not by default)
        self.reads: list[bytes] = []  # what the server read, one item per read (see FaultySMTP.data_received)
        self.failed_logins: list[str] = []
        self.auth_commands: list[tuple[int, str]] = []  # (connection number, mechanism) per AUTH command
        self.auth_exclude: list[str] = []  # AUTH mechanisms not offered (aiosmtpd offers LOGIN and PLAIN)
        self.size_limit = 2**25  # the SIZE the EHLO reply offers (aiosmtpd's default: 32 MiB)
        self._thread = LoopThread(f"upstream-{name}")
        self._server: asyncio.Server | None = None
        self._sessions: set[SMTP] = set()
        self.port = 0

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        if isinstance(data, LoginPassword):
            user, password = data.login.decode(), data.password.decode()
            if self.accounts.get(user) == password:
                self.logins.append(user)
                return AuthResult(success=True, auth_data=data)
            self.failed_logins.append(user)
        return AuthResult(success=False, handled=False, message="535 5.7.3 Authentication unsuccessful")

    def auth_sessions(self) -> list[list[str]]:
        """The AUTH mechanisms each connection that logged in (or tried to) used, in order."""
        sessions: dict[int, list[str]] = {}
        for number, mechanism in list(self.auth_commands):
            sessions.setdefault(number, []).append(mechanism)
        return list(sessions.values())

    def login_of(self, session: Session) -> str | None:
        data = session.auth_data
        return data.login.decode() if isinstance(data, LoginPassword) else None

    def _protocol(self) -> SMTP:
        starttls = self.security == "starttls"
        self.connections += 1
        protocol = FaultySMTP(
            self,
            XOAuth2Handler(self) if self.xoauth2 else RecordingHandler(self),
            hostname=f"{self.name}.upstream.test",
            tls_context=self.server_context if starttls else None,
            require_starttls=starttls,
            auth_required=bool(self.accounts) or self.xoauth2 is not None,
            auth_require_tls=starttls,
            authenticator=self._authenticate,
            auth_exclude_mechanism=["LOGIN", "PLAIN"] if self.xoauth2 else self.auth_exclude or None,
            data_size_limit=self.size_limit,
            enable_SMTPUTF8=self.smtputf8,
        )
        return protocol

    async def _start(self, port: int) -> None:
        if self._server is not None:  # already listening
            return
        ssl_context = self.server_context if self.security == "ssl" else None
        self._server = await asyncio.get_running_loop().create_server(
            self._protocol, host="127.0.0.1", port=port, ssl=ssl_context
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self._drop_connections()  # a provider that goes down drops its open connections too

    async def _drop_connections(self) -> None:
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.abort()
        self._sessions.clear()
        # and what no session holds: the socket under a STARTTLS that was still shaking hands, a
        # connection accepted but not yet made (every connection on this loop is this upstream's); left
        # open, it is reported unclosed at a later garbage collection, failing whichever test runs then
        await _abort_leftover_transports()

    def drop_connections(self) -> None:
        """Close every open connection, as a provider does with idle ones, and keep listening."""
        self._thread.call(self._drop_connections())

    def start(self, port: int = 0) -> Upstream:
        self._thread.call(self._start(port or self.port))
        return self

    def stop(self) -> None:
        self._thread.call(self._stop())

    async def _close(self) -> None:
        await self._stop()
        await asyncio.sleep(0.05)  # a connection accepted as the server closed registers itself now
        await self._drop_connections()
        await asyncio.sleep(0)  # and its transport closes before the loop stops

    def close(self) -> None:
        if self._thread.loop.is_closed():
            return
        self._thread.call(self._close())
        self._thread.close()

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        """Wait until ``count`` messages arrived (bounded); return them."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert count <= len(self.received), f"upstream {self.name} got {len(self.received)} of {count} messages"
        return self.received


class RelayRunner:
    """relay's ``Daemon`` in a background loop, as a test fixture drives it."""

    def __init__(
        self, config: Config, *, config_path: Path | None = None,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self.config_path = config_path  # what a reload (request_reload) re-reads
        self._thread = LoopThread("relay", loop_factory)  # the daemon's own choice: relay.daemon.event_loop_factory
        self.daemon: Daemon | None = None
        self._serving: Any = None

    @property
    def port(self) -> int:
        assert self.daemon is not None
        return self.daemon.addresses[0][1]

    def start(self) -> RelayRunner:
        async def boot() -> None:
            self.daemon = Daemon(self.config, config_path=self.config_path)
            self._serving = asyncio.ensure_future(self.daemon.serve())
            started = asyncio.ensure_future(self.daemon.started.wait())
            await asyncio.wait({self._serving, started}, return_when=asyncio.FIRST_COMPLETED)
            started.cancel()  # a failed start never sets it: no task left pending when the loop closes
            if self._serving.done():
                self._serving.result()  # re-raise the startup failure

        self._thread.call(boot())
        return self

    def stop(self) -> None:
        async def halt() -> None:
            if self.daemon is not None and self._serving is not None:
                self.daemon.request_stop()
                await self._serving

        self._thread.call(halt(), timeout=60)

    def close(self) -> None:
        if self._thread.loop.is_closed():
            return
        try:
            self.stop()
        finally:
            self._thread.close()

    def run(self, fn: Callable[[Daemon], Any]) -> Any:
        async def call() -> Any:
            assert self.daemon is not None
            return fn(self.daemon)

        return self._thread.call(call())


class RawUpstream:
    """A provider written byte by byte on asyncio streams over implicit TLS, for what aiosmtpd cannot be
    made to do (replies out of step, unreadable ones): a subclass writes ``_session``."""

    name = "raw"

    def __init__(self, server_context: ssl.SSLContext) -> None:
        self.server_context = server_context
        self._thread = LoopThread(self.name)
        self._server: asyncio.Server | None = None
        self.port = 0

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0, ssl=self.server_context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()

    def __enter__(self) -> Any:
        self._thread.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.call(self._stop())
        self._thread.close()

    def account(self, ca_file: Path, username: str) -> Account:
        return Account(name=self.name, host="127.0.0.1", port=self.port, security="ssl", username=username,
                       ca_file=ca_file, timeout=5)  # fmt: skip
