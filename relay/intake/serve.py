"""The SMTP face as one unit: every listener's server, the open sessions, and their drain at a stop.

The daemon runs it in its own process (``relay.intake.process``: the listeners take one core, the
delivery engine the other) or, for tests and ``RELAY_INTAKE=inline``, in the daemon's own event loop.
Either way it only ever hands on entries that are already durably in the spool (``on_queued``).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from collections.abc import Callable
from typing import cast

import structlog

from relay import replies
from relay.config import listener_tls
from relay.config.models import Config, ListenerConfig
from relay.errors import CertificateError
from relay.intake.admission import Admission
from relay.intake.listener import RelayHandler, RelaySMTP, accept_any_login, this_host
from relay.intake.pickup import Pickup
from relay.queue.committer import Committer
from relay.queue.spool import QueueEntry, Spool
from relay.transports.graph import GraphTransport

log = structlog.get_logger("relay.daemon")
DRAIN_TIMEOUT = 30.0
IDLE_TIMEOUT = 300.0  # seconds a session may send nothing (RFC 5321 4.5.3.2.7: at least 5 minutes)


class Intake:
    """Listeners, sessions and drain for one ``Config`` (``reconfigure`` on a reload)."""

    def __init__(
        self, config: Config, spool: Spool, on_queued: Callable[[list[QueueEntry]], None], *,
        graph: GraphTransport | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self.graph = graph  # whose tokens tell whether a Graph mailbox may take a message over sendMail's limit
        self.spool = spool
        self.committer = Committer(spool)  # one committing thread for every listener's sessions
        self.on_queued = on_queued
        # connections, rates and the spool's free space, across all listeners
        self.admission = Admission(config.limits, spool_dir=spool.root)
        self.handlers: list[RelayHandler] = []
        self.servers: list[asyncio.Server] = []
        self.sessions: set[TrackedSMTP] = set()
        self.addresses: list[tuple[str, int]] = []
        self.bound: list[tuple[int, int]] = []  # (listener index, file descriptor) of every listening socket
        self.certificates: list[listener_tls.ServerCertificate | None] = []  # per listener; a reload replaces them
        self.pickup: Pickup | None = None  # the drop directory's (``start_pickup``), where this serves the listeners

    async def load_certificates(self, *, quiet: bool = False) -> None:
        """The listeners' certificates (``CertificateError`` naming the listener and file: a key relay
        cannot read stops it before anything else)."""
        self.certificates = [
            None if context is None else listener_tls.ServerCertificate(context)
            for context in await asyncio.to_thread(tls_contexts, self.config.listeners, quiet=quiet)
        ]

    def _context(self, index: int) -> ssl.SSLContext | None:
        certificate = self.certificates[index] if index < len(self.certificates) else None
        return certificate.context if certificate is not None else None

    def _handler(self, index: int) -> RelayHandler:
        handler = RelayHandler(
            self.config, self.spool, self.on_queued, listener=index, admission=self.admission, graph=self.graph,
            committer=self.committer,
        )
        self.handlers.append(handler)
        return handler

    async def bind(self, *, start_serving: bool = True) -> None:
        """Bind every configured listener (a port in use raises ``OSError`` before anything else runs)."""
        loop = asyncio.get_running_loop()
        for index, listener in enumerate(self.config.listeners):
            context = self._context(index)
            factory = functools.partial(self._session, self._handler(index), listener, context)
            server = await loop.create_server(
                factory, host=listener.address, port=listener.port, start_serving=start_serving,
                ssl=context if listener.tls_mode == "implicit" else None,
            )  # fmt: skip
            self.servers.append(server)
            self.addresses.extend(s.getsockname()[:2] for s in server.sockets)
            self.bound.extend((index, s.fileno()) for s in server.sockets)

    async def serve_sockets(self, sockets: list[tuple[int, socket.socket]]) -> None:
        """Serve sockets bound by another process: (listener index, listening socket) pairs."""
        loop = asyncio.get_running_loop()
        handlers = {index: self._handler(index) for index in sorted({index for index, _ in sockets})}
        for index, sock in sockets:
            listener, context = self.config.listeners[index], self._context(index)
            server = await loop.create_server(
                functools.partial(self._session, handlers[index], listener, context), sock=sock,
                ssl=context if listener.tls_mode == "implicit" else None,
            )  # fmt: skip
            self.servers.append(server)
            self.addresses.append(sock.getsockname()[:2])

    def renew_certificates(
        self, listeners: tuple[ListenerConfig, ...], contexts: list[ssl.SSLContext | None], *, quiet: bool = False
    ) -> None:  # fmt: skip
        """New connections get the certificates just read (the files may have been renewed); connections
        already open keep the one they began with. (The intake process is ``quiet``: the daemon logs it.)"""
        for listener, certificate, context in zip(listeners, self.certificates, contexts, strict=True):
            if certificate is not None and context is not None and listener.tls_cert_file is not None:
                certificate.replace(context)
                if not quiet:
                    log.info("tls_certificate_loaded", listener=where(listener),
                             **listener_tls.summary(listener.tls_cert_file))  # fmt: skip

    def reconfigure(self, config: Config) -> None:
        self.config = config
        for handler in self.handlers:
            handler.config = config
        self.admission.limits = config.limits

    def _session(self, handler: RelayHandler, listener: ListenerConfig, context: ssl.SSLContext | None) -> TrackedSMTP:
        starttls = listener.tls_mode == "starttls"
        session = TrackedSMTP(
            handler,
            data_size_limit=self.config.limits.max_message_size,
            # given, not looked up: aiosmtpd's lookup swaps the process's warning filters at every connection
            loop=asyncio.get_running_loop(),
            enable_SMTPUTF8=True,
            hostname=listener.hostname or self.config.hostname or this_host(),
            ident="relay",
            timeout=IDLE_TIMEOUT,
            # A program set up with its old ISP relay's login sends AUTH whether or not EHLO offers it, over
            # plain text: let it in. Mail is taken only from allowed_networks anyway, login or not; the
            # provider's credentials are relay's own (a login here proves nothing and gives no rights).
            # With require_tls, AUTH (like MAIL) waits for STARTTLS, and EHLO offers it only then.
            authenticator=accept_any_login,
            tls_context=context if starttls else None,  # implicit TLS: the server socket already speaks it
            require_starttls=starttls and listener.require_tls,
            auth_require_tls=starttls and listener.require_tls,
        )
        session.tracker = self.sessions  # it joins once connected (see TrackedSMTP.connection_made)
        return session

    def start_pickup(self) -> None:
        """Take the drop directory's mail (``relay-sendmail`` left it while relay was down) now and every
        few seconds, through a handler of its own that belongs to no listener (``pickup.py``)."""
        self.pickup = Pickup(self._handler(-1))
        self.pickup.start()

    def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()
        if self.pickup is not None:
            self.pickup.stop()  # the file being taken is finished (wait_closed)

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
        if self.pickup is not None:
            await self.pickup.wait_stopped()


def tls_contexts(listeners: tuple[ListenerConfig, ...], *, quiet: bool = False) -> list[ssl.SSLContext | None]:
    """A server context per listener with a certificate (``None`` for a plain one); ``CertificateError``
    naming the listener and the file to fix if any cannot be loaded."""
    contexts: list[ssl.SSLContext | None] = []
    for listener in listeners:
        if listener.tls_cert_file is None or listener.tls_key_file is None:
            contexts.append(None)
            continue
        try:
            contexts.append(listener_tls.server_context(listener.tls_cert_file, listener.tls_key_file))
        except CertificateError as exc:
            raise CertificateError(f"listener {where(listener)}: {exc}", key=exc.key) from None
        if not quiet:
            log.info(
                "tls_certificate_loaded", listener=where(listener), tls=listener.tls_mode,
                require_tls=listener.require_tls, **listener_tls.summary(listener.tls_cert_file),
            )  # fmt: skip
    return contexts


def where(listener: ListenerConfig) -> str:
    return f"{listener.address}:{listener.port}"


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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Tracked from here, not from its creation: with implicit TLS the protocol is made when the socket
        is accepted, and a client that fails the handshake (a plain client on the TLS port) never reaches
        ``connection_made`` nor ``connection_lost``; tracked from creation, it would be waited for at
        every stop (30 s) and kept for ever."""
        super().connection_made(transport)
        self.tracker.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.tracker.discard(self)
