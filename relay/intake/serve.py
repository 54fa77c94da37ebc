"""The SMTP face as one unit: every listener's server, the open sessions, and their drain at a stop.

The daemon runs it in its own process (``relay.intake.process``: the listeners take one core, the
delivery engine the other) or, for tests and ``RELAY_INTAKE=inline``, in the daemon's own event loop.
Either way it only ever hands on entries that are already durably in the spool (``on_queued``).
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable
from typing import cast

import structlog

from relay import replies
from relay.config.models import Config
from relay.intake.admission import Admission
from relay.intake.listener import RelayHandler, RelaySMTP, accept_any_login
from relay.queue.spool import QueueEntry, Spool

log = structlog.get_logger("relay.daemon")
DRAIN_TIMEOUT = 30.0


class Intake:
    """Listeners, sessions and drain for one ``Config`` (``reconfigure`` on a reload)."""

    def __init__(self, config: Config, spool: Spool, on_queued: Callable[[list[QueueEntry]], None]) -> None:
        self.config = config
        self.spool = spool
        self.on_queued = on_queued
        self.admission = Admission(config.limits)  # connections and rates, across all listeners
        self.handlers: list[RelayHandler] = []
        self.servers: list[asyncio.Server] = []
        self.sessions: set[TrackedSMTP] = set()
        self.addresses: list[tuple[str, int]] = []
        self.bound: list[tuple[int, int]] = []  # (listener index, file descriptor) of every listening socket

    def _handler(self, index: int) -> RelayHandler:
        handler = RelayHandler(self.config, self.spool, self.on_queued, listener=index, admission=self.admission)
        self.handlers.append(handler)
        return handler

    async def bind(self, *, start_serving: bool = True) -> None:
        """Bind every configured listener (a port in use raises ``OSError`` before anything else runs)."""
        loop = asyncio.get_running_loop()
        for index, listener in enumerate(self.config.listeners):
            factory = functools.partial(self._session, self._handler(index), listener.hostname)
            server = await loop.create_server(
                factory, host=listener.address, port=listener.port, start_serving=start_serving
            )
            self.servers.append(server)
            self.addresses.extend(s.getsockname()[:2] for s in server.sockets)
            self.bound.extend((index, s.fileno()) for s in server.sockets)

    async def serve_sockets(self, sockets: list[tuple[int, socket.socket]]) -> None:
        """Serve sockets bound by another process: (listener index, listening socket) pairs."""
        loop = asyncio.get_running_loop()
        handlers = {index: self._handler(index) for index in sorted({index for index, _ in sockets})}
        for index, sock in sockets:
            hostname = self.config.listeners[index].hostname
            server = await loop.create_server(functools.partial(self._session, handlers[index], hostname), sock=sock)
            self.servers.append(server)
            self.addresses.append(sock.getsockname()[:2])

    def reconfigure(self, config: Config) -> None:
        self.config = config
        for handler in self.handlers:
            handler.config = config
        self.admission.limits = config.limits

    def _session(self, handler: RelayHandler, hostname: str | None) -> TrackedSMTP:
        session = TrackedSMTP(
            handler,
            data_size_limit=self.config.limits.max_message_size,
            enable_SMTPUTF8=True,
            hostname=hostname or self.config.hostname or _fqdn(),
            ident="relay",
            timeout=300,
            # A program set up with its old ISP relay's login sends AUTH whether or not EHLO offers it, over
            # plain text: let it in. Mail is taken only from allowed_networks anyway, login or not; the
            # provider's credentials are relay's own (a login here proves nothing and gives no rights).
            authenticator=accept_any_login,
            auth_require_tls=False,
        )
        session.tracker = self.sessions
        self.sessions.add(session)
        return session

    def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()

    async def drain(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Close idle sessions with a 421 as they become idle; cut what is still open after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.sessions and loop.time() < deadline:
            for session in list(self.sessions):
                transport = cast(asyncio.Transport | None, session.transport)
                if session.idle and transport is not None and not transport.is_closing():
                    # idle between transactions: nothing to lose; tell the client why (RFC 5321 3.8)
                    transport.write(replies.R421_SHUTTING_DOWN.encode() + b"\r\n")
                    transport.close()
            await asyncio.sleep(0.05)
        if self.sessions:
            log.warning("sessions_cut", count=len(self.sessions))
            for session in list(self.sessions):
                transport = cast(asyncio.Transport | None, session.transport)
                if transport is not None:
                    transport.abort()

    async def wait_closed(self) -> None:
        for server in self.servers:
            await server.wait_closed()


@functools.cache
def _fqdn() -> str:
    """The greeting's default name, looked up once: aiosmtpd would call ``socket.getfqdn`` for every
    connection, on the event loop (a name lookup; seconds when DNS is broken)."""
    return socket.getfqdn()


class TrackedSMTP(RelaySMTP):
    """A session that the daemon can find (to drain) and that knows when it is mid-transaction."""

    tracker: set[TrackedSMTP]

    @property
    def idle(self) -> bool:
        envelope = self.envelope
        return envelope is None or (envelope.mail_from is None and not self._in_data)

    _in_data = False

    async def smtp_DATA(self, arg: str) -> None:
        self._in_data = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self._in_data = False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.tracker.discard(self)
