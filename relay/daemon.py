"""The daemon's lifecycle, and nothing else: startup -> serve -> drain -> shutdown.

``startup`` recovers the spool, starts the delivery workers and binds every listener. ``serve`` waits
for a stop request (SIGTERM, SIGINT) and reloads the configuration on SIGHUP. Under systemd
(``Type=notify``) each step is told to it (``systemd.py``): ready once listening, reloading and ready
again around a reload, stopping; and watchdog pings from this event loop. ``shutdown`` stops
accepting connections, gives open SMTP sessions ``DRAIN_TIMEOUT`` seconds to finish, then lets
in-flight deliveries end (or cancels them, moving their entries back to ``incoming/``), and logs what
it cut. Signal handlers only set events (uvicorn's ``Server``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import cast

import structlog

from relay import logs, replies
from relay.config import listener_tls
from relay.config.accounts import every_account
from relay.config.load import load_config
from relay.config.models import Config, ListenerConfig
from relay.envelope import Account
from relay.errors import CertificateError, ConfigError
from relay.intake.admission import Admission
from relay.intake.listener import RelayHandler, RelaySMTP, accept_any_login
from relay.queue import archive
from relay.queue.metrics import Metrics
from relay.queue.scheduler import Scheduler
from relay.queue.spool import Spool
from relay.systemd import Notifier
from relay.transports.assertions import watch_expiries

log = structlog.get_logger("relay.daemon")
DRAIN_TIMEOUT = 30.0
DELIVERY_STOP_TIMEOUT = 10.0
STARTUP_FAILURE = 3
STATUS_INTERVAL = float(os.environ.get("RELAY_STATUS_INTERVAL", "30"))  # seconds between STATUS= updates


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """The daemon's event loop: uvloop (libuv; the same asyncio API at a fraction of the CPU per
    connection and per read) when it is installed, else asyncio's own. ``RELAY_EVENT_LOOP=asyncio``
    chooses asyncio's loop anyway (to tell whether a problem is uvloop's)."""
    if os.environ.get("RELAY_EVENT_LOOP", "").lower() == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)


class Daemon:
    """One relay process: listeners, spool and scheduler sharing one ``Config``."""

    def __init__(
        self, config: Config, *, config_path: str | Path | None = None, fsync: bool = True,
        notifier: Notifier | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.spool = Spool(config.spool_dir, fsync=fsync)
        self.metrics = Metrics(self.spool)
        self.metrics.watch_credentials(self._accounts)
        self.scheduler = Scheduler(config, self.spool, metrics=self.metrics)
        self.admission = Admission(config.limits)  # connections and rates, across all listeners
        self._sweeper: asyncio.Task[None] | None = None
        self._expiry_watch: asyncio.Task[None] | None = None
        self.handlers: list[RelayHandler] = []
        self.servers: list[asyncio.Server] = []
        self.certificates: list[listener_tls.ServerCertificate | None] = []  # per listener; a reload replaces them
        self.sessions: set[_TrackedSMTP] = set()
        self.addresses: list[tuple[str, int]] = []
        self.metrics_address: tuple[str, int] | None = None
        self.started = asyncio.Event()
        self.should_stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._start_error: str | None = None
        self._status_note = ""  # the last reload's outcome, kept in every STATUS= line

    def _accounts(self) -> list[Account]:
        """Every account of the config in use (the credential expiry watch and metric look at them)."""
        return every_account(self.config)

    # region #### startup ####

    async def startup(self) -> None:
        """Load the listeners' certificates (a key relay cannot read stops it before anything else), recover
        the spool, bind every listener (a port in use stops us before any delivery), then start delivering."""
        self.certificates = [
            None if context is None else listener_tls.ServerCertificate(context)
            for context in await asyncio.to_thread(_tls_contexts, self.config.listeners)
        ]
        await asyncio.to_thread(self.spool.setup)
        await asyncio.to_thread(self.spool.lock)
        await self.scheduler.recover()
        for index, listener in enumerate(self.config.listeners):
            handler = RelayHandler(
                self.config, self.spool, self.scheduler.submit, listener=index, admission=self.admission,
                graph=self.scheduler.transports.graph,
            )
            certificate = self.certificates[index]
            context = certificate.context if certificate is not None else None
            server = await asyncio.get_running_loop().create_server(
                functools.partial(self._session, handler, listener, context), host=listener.address,
                port=listener.port, ssl=context if listener.tls_mode == "implicit" else None,
            )  # fmt: skip
            self.handlers.append(handler)
            self.servers.append(server)
            self.addresses.extend(s.getsockname()[:2] for s in server.sockets)
        self.metrics_address = await asyncio.to_thread(self.metrics.serve, self.config.metrics)
        await self.scheduler.start()
        self._sweeper = asyncio.create_task(archive.sweep_forever(lambda: self.config), name="archive-sweeper")
        self._expiry_watch = asyncio.create_task(watch_expiries(self._accounts), name="credential-expiry")
        log.info(
            "relay_started", listeners=[f"{h}:{p}" for h, p in self.addresses], spool=str(self.config.spool_dir),
            upstreams=sorted(self.config.upstreams), users=len(self.config.users),
        )  # fmt: skip
        self.started.set()

    def _session(
        self, handler: RelayHandler, listener: ListenerConfig, context: ssl.SSLContext | None
    ) -> _TrackedSMTP:
        starttls = listener.tls_mode == "starttls"
        session = _TrackedSMTP(
            handler,
            data_size_limit=self.config.limits.max_message_size,
            enable_SMTPUTF8=True,
            hostname=listener.hostname or self.config.hostname or _fqdn(),
            ident="relay",
            timeout=300,
            # A program set up with its old ISP relay's login sends AUTH whether or not EHLO offers it, over
            # plain text: let it in. Mail is taken only from allowed_networks anyway, login or not; the
            # provider's credentials are relay's own (a login here proves nothing and gives no rights).
            # With require_tls, AUTH (like MAIL) waits for STARTTLS, and EHLO offers it only then.
            authenticator=accept_any_login,
            tls_context=context if starttls else None,  # implicit TLS: the server socket already speaks it
            require_starttls=starttls and listener.require_tls,
            auth_require_tls=starttls and listener.require_tls,
        )
        session.tracker = self.sessions  # it joins once connected (see _TrackedSMTP.connection_made)
        return session

    # endregion

    # region #### serve, reload, stop ####

    def request_stop(self) -> None:
        if not self.should_stop.is_set():
            self.notifier.stopping()
        self.should_stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    async def serve(self) -> None:
        """Run until asked to stop; the caller installs signal handlers (see ``run``)."""
        watchdog = self._start_watchdog()
        updates: asyncio.Task[None] | None = None
        try:
            try:
                await self.startup()
            except Exception as exc:  # logged with its reason by shutdown (relay_start_failed), then raised
                self._start_error = f"{type(exc).__name__}: {exc}"
                raise
            if not self.should_stop.is_set():  # a SIGTERM during startup already said STOPPING=1
                self.notifier.ready(await self.status())
            updates = self._start_status_updates()
            while not self.should_stop.is_set():
                stop = asyncio.ensure_future(self.should_stop.wait())
                reload = asyncio.ensure_future(self._reload.wait())
                await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                reload.cancel()
                if self._reload.is_set() and not self.should_stop.is_set():
                    self._reload.clear()
                    self.notifier.reloading()
                    applied = await self.reload()
                    self._status_note = (
                        "configuration reloaded" if applied else "reload refused, previous configuration kept"
                    )
                    self.notifier.ready(await self.status(self._status_note))
        finally:
            await _cancel(updates)
            await self.shutdown()
            await _cancel(watchdog)  # pings go on while sessions drain and deliveries end

    def _start_status_updates(self) -> asyncio.Task[None] | None:
        """``STATUS=`` every ``STATUS_INTERVAL`` under systemd, so ``systemctl status relay`` shows how much
        mail waits now, not at the last start or reload."""
        if not self.notifier.enabled:
            return None

        async def update_forever() -> None:
            while True:
                await asyncio.sleep(STATUS_INTERVAL)
                if self.should_stop.is_set():
                    return
                self.notifier.status(await self.status(self._status_note))  # the last reload's outcome stays

        return asyncio.create_task(update_forever(), name="systemd-status")

    def _start_watchdog(self) -> asyncio.Task[None] | None:
        """``WATCHDOG=1`` every half ``WatchdogSec``, sent by a task on this loop: if the loop stalls (a
        blocking call, a busy loop), the pings stop and systemd restarts relay."""
        interval = self.notifier.watchdog_interval
        if interval is None:
            return None

        async def ping_forever() -> None:
            while True:
                self.notifier.ping()
                await asyncio.sleep(interval)

        return asyncio.create_task(ping_forever(), name="systemd-watchdog")

    async def status(self, note: str = "") -> str:
        """One line for ``systemctl status``: where relay listens and how much mail waits."""
        try:
            queued = f"{await asyncio.to_thread(self._queued)} queued"
        except OSError as exc:  # the spool is checked elsewhere; a status line must not stop relay
            queued = f"queue unreadable ({exc.strerror})"
        listening = ", ".join(f"{host}:{port}" for host, port in self.addresses)
        return f"accepting on {listening}, {queued}" + (f"; {note}" if note else "")

    def _queued(self) -> int:
        """Entries still to be delivered (an entry moving on between two listings is counted once)."""
        return len({queue_id for state in ("incoming", "active", "deferred") for queue_id in self.spool.ids(state)})

    async def reload(self) -> bool:
        """Re-read the config; keep the old one if the new one is invalid (``False``). Listeners are not
        rebound."""
        if self.config_path is None:
            log.warning("reload_ignored", reason="the daemon runs on a built-in config")
            return False
        try:
            config = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            log.error("reload_refused", errors=[str(p) for p in exc.problems], kept="previous configuration")
            return False
        needs_restart = _restart_only_changes(self.config, config)
        if needs_restart:
            log.error(
                "reload_refused", errors=[f"{key} changed: restart relay to apply it" for key in needs_restart],
                kept="previous configuration",
            )  # fmt: skip
            return False
        try:
            contexts = await asyncio.to_thread(_tls_contexts, config.listeners, quiet=True)  # all good, or none used
        except CertificateError as exc:
            log.error("reload_refused", errors=[str(exc)], kept="previous configuration and certificates")
            return False
        self._renew_certificates(config.listeners, contexts)
        self.config = config
        logging.getLogger().setLevel(logs.LEVELS[config.logging.level])
        self.scheduler.reconfigure(config)
        for handler in self.handlers:
            handler.config = config
        self.admission.limits = config.limits
        log.info("config_reloaded", path=str(self.config_path))
        return True

    def _renew_certificates(
        self, listeners: tuple[ListenerConfig, ...], contexts: list[ssl.SSLContext | None]
    ) -> None:
        """New connections get the certificates just read (the files may have been renewed); connections
        already open keep the one they began with."""
        for listener, certificate, context in zip(listeners, self.certificates, contexts, strict=True):
            if certificate is not None and context is not None and listener.tls_cert_file is not None:
                certificate.replace(context)
                log.info("tls_certificate_loaded", listener=_where(listener), **listener_tls.summary(listener.tls_cert_file))

    async def shutdown(self) -> None:
        for task in (self._sweeper, self._expiry_watch):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(self.metrics.close)
        if not self.started.is_set():  # startup failed (port in use, spool busy): nothing ran, say less
            for server in self.servers:
                server.close()
            await self.scheduler.stop(0)
            self.spool.unlock()
            log.error("relay_start_failed", error=self._start_error)
            return
        log.info("relay_stopping", open_sessions=len(self.sessions), in_flight=self.scheduler.in_flight)
        for server in self.servers:
            server.close()
        await self._drain_sessions()
        cut = await self.scheduler.stop(DELIVERY_STOP_TIMEOUT)
        for server in self.servers:
            await server.wait_closed()
        self.spool.unlock()
        log.info("relay_stopped", deliveries_interrupted=cut)

    async def _drain_sessions(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT
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

    # endregion


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _tls_contexts(listeners: tuple[ListenerConfig, ...], *, quiet: bool = False) -> list[ssl.SSLContext | None]:
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
            raise CertificateError(f"listener {_where(listener)}: {exc}", key=exc.key) from None
        if not quiet:
            log.info(
                "tls_certificate_loaded", listener=_where(listener), tls=listener.tls_mode,
                require_tls=listener.require_tls, **listener_tls.summary(listener.tls_cert_file),
            )  # fmt: skip
    return contexts


def _where(listener: ListenerConfig) -> str:
    return f"{listener.address}:{listener.port}"


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    """Keys a reload cannot apply: bound sockets, the open spool, the running workers, the log renderer.

    Applying the rest while listeners keep their old sockets would pair a port with another
    listener's settings (its user, its allowed networks), so such a reload is refused whole. A
    listener's certificate and key files may move (and are re-read anyway): the context stays.
    """
    changed = []
    if [_shape(listener) for listener in old.listeners] != [_shape(listener) for listener in new.listeners]:
        changed.append("listeners")
    if old.spool_dir != new.spool_dir:
        changed.append("spool_dir")
    if old.delivery.workers != new.delivery.workers:
        changed.append("delivery.workers")
    if old.logging.format != new.logging.format:
        changed.append("logging.format")
    if old.metrics != new.metrics:
        changed.append("metrics")
    return changed


def _shape(listener: ListenerConfig) -> ListenerConfig:
    """A listener less what a reload may change: where its certificate and key files are."""
    return listener.model_copy(update={"tls_cert_file": None, "tls_key_file": None, "tls": listener.tls_mode})


@functools.cache
def _fqdn() -> str:
    """The greeting's default name, looked up once: aiosmtpd would call ``socket.getfqdn`` for every
    connection, on the event loop (a name lookup; seconds when DNS is broken)."""
    return socket.getfqdn()


class _TrackedSMTP(RelaySMTP):
    """A session that the daemon can find (to drain) and that knows when it is mid-transaction."""

    tracker: set[_TrackedSMTP]

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


async def run(
    config: Config, *, config_path: str | Path | None = None, on_started: Callable[[], None] | None = None
) -> None:
    """Serve with SIGTERM/SIGINT = stop and SIGHUP = reload; ``on_started`` once the listeners are bound.
    Tells systemd how it goes when it started relay (``$NOTIFY_SOCKET``)."""
    notifier = Notifier.from_environ()
    daemon = Daemon(config, config_path=config_path, notifier=notifier)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, daemon.request_stop)
    loop.add_signal_handler(signal.SIGINT, daemon.request_stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
    announce = None
    if on_started is not None:
        callback = on_started

        async def wait_and_announce() -> None:
            await daemon.started.wait()
            callback()

        announce = asyncio.create_task(wait_and_announce())
    try:
        await daemon.serve()
    finally:
        if announce is not None:
            announce.cancel()
        notifier.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
