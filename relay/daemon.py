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
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import structlog

from relay import __version__, logs, maildrop
from relay.config.accounts import every_account
from relay.config.load import load_config
from relay.config.models import Config, ListenerConfig
from relay.config.warnings import check_errors, check_warnings
from relay.envelope import Account
from relay.errors import CertificateError, ConfigError
from relay.intake.serve import DRAIN_TIMEOUT, Intake, TrackedSMTP, tls_contexts
from relay.queue import archive
from relay.queue.metrics import Metrics
from relay.queue.scheduler import Scheduler
from relay.queue.spool import QueueEntry, Spool
from relay.systemd import Notifier
from relay.transports.assertions import watch_expiries
from relay.transports.graph import GraphTransport
from relay.transports.tokens import TokenCache

log = structlog.get_logger("relay.daemon")
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


def log_config_problems(config: Config, path: str | Path) -> None:
    """What ``relay check`` fails or warns on but the daemon runs with anyway (a secret file missing: mail
    waits queued until it is there), logged alike at start and at every reload: an admin who reloads
    must hear of it as one who restarts does, not only ``config_reloaded``."""
    config_log = structlog.get_logger("relay.config")
    try:
        text: str | None = Path(path).read_text(encoding="utf-8")  # for the line numbers only
    except (OSError, UnicodeDecodeError):
        text = None
    for error in check_errors(config, text):
        config_log.error("config_error", problem=str(error))
    for warning in check_warnings(config, text):
        config_log.warning("config_warning", problem=str(warning))


class Daemon:
    """One relay process: listeners, spool and scheduler sharing one ``Config``."""

    def __init__(
        self, config: Config, *, config_path: str | Path | None = None, fsync: bool = True,
        notifier: Notifier | None = None, intake_process: bool = False,
    ) -> None:  # fmt: skip
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.spool = Spool(config.spool_dir, fsync=fsync)
        self.metrics = Metrics(self.spool)
        self.metrics.watch_credentials(self._accounts)
        self.scheduler = Scheduler(config, self.spool, metrics=self.metrics)
        self.intake = Intake(config, self.spool, self.scheduler.submit, graph=self.scheduler.transports.graph)
        # the listeners in a process of their own (``IntakeProcess``): needs the config's path to give it
        self.child: IntakeProcess | None = None
        self._intake_process = intake_process and config_path is not None
        self.failure: str | None = None  # why the daemon stopped on its own (the intake process kept dying)
        self._sweeper: asyncio.Task[None] | None = None
        self._expiry_watch: asyncio.Task[None] | None = None
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
        the spool, bind every listener (a port in use stops us before any delivery), then start delivering.
        With an intake process, it loads the certificates again for itself (and at every reload)."""
        await self.intake.load_certificates()
        await asyncio.to_thread(self.spool.setup)
        await asyncio.to_thread(self.spool.lock)
        await asyncio.to_thread(setup_maildrop, self.config.maildrop)
        await self.scheduler.recover()
        if self._intake_process:
            # bound here, so a port in use stops relay before any delivery, and kept open (never served
            # here) so that a restarted intake process gets the same sockets
            await self.intake.bind(start_serving=False)
            self.child = IntakeProcess(self)
            await self.child.start()
        else:
            await self.intake.bind()
        self.metrics_address = await asyncio.to_thread(self.metrics.serve, self.config.metrics)
        await self.scheduler.start()
        if self.child is None:  # else the intake process picks up (serve_intake)
            self.intake.start_pickup()
        self._sweeper = asyncio.create_task(archive.sweep_forever(lambda: self.config), name="archive-sweeper")
        self._expiry_watch = asyncio.create_task(watch_expiries(self._accounts), name="credential-expiry")
        log.info(
            "relay_started", version=__version__, listeners=[f"{h}:{p}" for h, p in self.addresses],
            spool=str(self.config.spool_dir), upstreams=sorted(self.config.upstreams), users=len(self.config.users),
        )  # fmt: skip
        self.started.set()

    # endregion

    # region #### serve, reload, stop ####

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self.intake.addresses

    @property
    def sessions(self) -> set[TrackedSMTP]:
        """The open SMTP sessions (in this process: none here when an intake process serves them)."""
        return self.intake.sessions

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
            contexts = await asyncio.to_thread(tls_contexts, config.listeners, quiet=True)  # all good, or none used
        except CertificateError as exc:
            log.error("reload_refused", errors=[str(exc)], kept="previous configuration and certificates")
            return False
        self.intake.renew_certificates(config.listeners, contexts)
        self.config = config
        logging.getLogger().setLevel(logs.LEVELS[config.logging.level])
        self.scheduler.reconfigure(config)
        self.intake.reconfigure(config)
        if self.child is not None:
            await self.child.reload()  # it re-reads the same file (already found valid here)
        await asyncio.to_thread(log_config_problems, config, self.config_path)
        log.info("config_reloaded", path=str(self.config_path))
        return True

    async def shutdown(self) -> None:
        for task in (self._sweeper, self._expiry_watch):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(self.metrics.close)
        if not self.started.is_set():  # startup failed (port in use, spool busy): nothing ran, say less
            self.intake.stop_accepting()
            if self.child is not None:
                await self.child.stop(0)
            await self.scheduler.stop(0)
            self.spool.unlock()
            log.error("relay_start_failed", error=self._start_error)
            return
        # the intake process counts its own sessions (and logs sessions_cut); this one knows only the deliveries
        sessions = {"open_sessions": len(self.intake.sessions)} if self.child is None else {}
        log.info("relay_stopping", in_flight=self.scheduler.in_flight, **sessions)
        self.intake.stop_accepting()
        if self.child is not None:  # it drains its sessions (DRAIN_TIMEOUT) while deliveries go on here
            await self.child.stop(DRAIN_TIMEOUT + 5)
        else:
            await self.intake.drain()
        cut = await self.scheduler.stop(DELIVERY_STOP_TIMEOUT)
        await self.intake.wait_closed()
        self.spool.unlock()
        log.info("relay_stopped", deliveries_interrupted=cut)

    # endregion


def setup_maildrop(directory: Path) -> None:
    """Make the drop directory (``relay/maildrop.py``: mode 3733) for ``relay-sendmail`` to leave mail in
    while relay is down. Relay runs without it if it cannot be made (SMTP is not affected): said once."""
    try:
        others = maildrop.setup(directory)
    except OSError as exc:
        log.warning("maildrop_unavailable", directory=str(directory), error=f"{type(exc).__name__}: {exc}",
                    effect="relay-sendmail cannot leave mail there while relay is down (exit 75 then)")  # fmt: skip
        return
    log.info("maildrop_ready", directory=str(directory), other_users=others,
             **({} if others else {"note": "a parent directory is closed to other users: only relay's own user "
                                   "and root can leave mail there"}))  # fmt: skip


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


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
    if old.maildrop != new.maildrop:
        changed.append("maildrop_dir")
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


INTAKE_READY_TIMEOUT = 60.0  # seconds for a new intake process to import, read the config and serve
INTAKE_RESTARTS = 5  # intake process deaths within INTAKE_RESTART_WINDOW before the daemon gives up
INTAKE_RESTART_WINDOW = 60.0
READY = b"READY\n"
RELOADED = b"RELOADED\n"  # the intake process has handled a SIGHUP (applied, or kept its config)
INTAKE_RELOAD_TIMEOUT = 30.0


class DaemonFailure(Exception):
    """The daemon stopped on its own for a reason an admin must look at (``relay serve`` exits 1)."""


class IntakeProcess:
    """The listeners in a second process, so that accepting mail and delivering it use both cores.

    The daemon (this process) binds the sockets and keeps them; the child (``relay intake-process``,
    ``run_intake``) serves them: SMTP sessions, prepare, the durable commit and the 250. Then it writes
    each new entry as a JSON line to a pipe, and the scheduler here takes it at once. That line is only a
    hint: the spool files are the truth, and an entry whose line was lost (a child killed between its
    commit and the write) is found by the scheduler's rescan of ``incoming/`` and on every start.

    One daemon for the admin: systemd hears only from this process, SIGHUP and SIGTERM are passed on,
    a child that dies is restarted (``INTAKE_RESTARTS`` times a minute, then the daemon stops with an
    error), and the child dies with this process even on kill -9 (``PR_SET_PDEATHSIG``, and the end of
    a pipe only this process holds), so no orphan keeps taking mail that nobody delivers.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.proc: asyncio.subprocess.Process | None = None
        self._life: int | None = None
        self._pump: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._deaths: list[float] = []
        self._stopping = False
        self._reloaded = asyncio.Event()

    async def start(self) -> None:
        """Start the child and wait until it serves (``READY``); raise ``DaemonFailure`` if it does not."""
        assert self.daemon.config_path is not None
        hints_r, hints_w = os.pipe()
        life_r, life_w = os.pipe()
        listen = [f"--listen={index}:{fd}" for index, fd in self.daemon.intake.bound]
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay", "intake-process", "--config", str(self.daemon.config_path),
                f"--hints={hints_w}", f"--life={life_r}", f"--parent={os.getpid()}", *listen,
                stdin=asyncio.subprocess.DEVNULL, pass_fds=(hints_w, life_r, *(fd for _, fd in self.daemon.intake.bound)),
            )  # fmt: skip
        finally:
            os.close(hints_w)
            os.close(life_r)
        self._life = life_w
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=64 * 1024 * 1024, loop=loop)  # one line holds one envelope
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(hints_r, "rb", 0))
        try:
            async with asyncio.timeout(INTAKE_READY_TIMEOUT):
                ready = await reader.readline()
        except TimeoutError:
            ready = b""
        if ready != READY:
            await self._kill()
            raise DaemonFailure("the intake process did not start (see its log lines above)")
        self._pump = asyncio.create_task(self._take(reader), name="intake-hints")
        self._watch = asyncio.create_task(self._supervise(self.proc), name="intake-watch")

    async def _take(self, reader: asyncio.StreamReader) -> None:
        """Each line is an entry the child has just committed: schedule it now (a hint; see the class)."""
        while line := await reader.readline():
            if line == RELOADED:
                self._reloaded.set()
                continue
            try:
                entry = QueueEntry.from_json(line)
            except (ValueError, TypeError):  # a torn line: the rescan of incoming/ finds the entry anyway
                continue
            self.daemon.scheduler.submit([entry])

    async def _supervise(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self._stopping:
            return
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < INTAKE_RESTART_WINDOW] + [now]
        log.error("intake_process_died", returncode=code, restarts_left=INTAKE_RESTARTS - len(self._deaths))
        self._close_life()
        if len(self._deaths) >= INTAKE_RESTARTS:
            self.daemon.failure = f"the intake process died {len(self._deaths)} times within a minute"
            self.daemon.request_stop()
            return
        await asyncio.sleep(1.0)
        if self._stopping:
            return
        try:
            await self.start()
        except (DaemonFailure, OSError) as exc:
            self.daemon.failure = f"the intake process could not be restarted: {exc}"
            self.daemon.request_stop()

    def signal(self, number: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(number)

    async def reload(self) -> None:
        """SIGHUP, and wait until the child has re-read the config: a reload is complete (logged, READY=1
        to systemd) only when the listeners use the new config and certificates too."""
        self._reloaded.clear()
        self.signal(signal.SIGHUP)
        try:
            async with asyncio.timeout(INTAKE_RELOAD_TIMEOUT):
                await self._reloaded.wait()
        except TimeoutError:
            log.warning("intake_reload_unconfirmed", waited=INTAKE_RELOAD_TIMEOUT)

    async def stop(self, timeout: float) -> None:
        """SIGTERM: the child stops accepting and drains its sessions; killed after ``timeout``."""
        self._stopping = True
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                await self._kill()
        if self._pump is not None:  # the last hints of the drained sessions are read before it ends
            await asyncio.gather(self._pump, return_exceptions=True)
        await _cancel(self._watch)
        self._close_life()

    async def _kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._close_life()

    def _close_life(self) -> None:
        if self._life is not None:
            os.close(self._life)
            self._life = None


async def serve_intake(config_path: str, listen: list[tuple[int, int]], hints: int, life: int) -> None:
    """The intake process's life (see ``IntakeProcess``): serve the inherited sockets until SIGTERM, then
    drain; re-read the config on SIGHUP; exit at once when the daemon is gone (``life`` reads EOF)."""
    config = load_config(config_path)
    loop = asyncio.get_running_loop()
    hints_out, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(hints, "wb", 0))

    def queued(entries: list[QueueEntry]) -> None:
        if not hints_out.is_closing():
            hints_out.write(b"".join(entry.to_json() + b"\n" for entry in entries))

    class Orphaned(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            os._exit(1)  # the daemon is gone: take no more mail (what is committed waits in the spool)

    await loop.connect_read_pipe(Orphaned, os.fdopen(life, "rb", 0))
    # its own Graph transport: whether a mailbox's token carries Mail.ReadWrite decides at DATA whether a
    # message over sendMail's limit is taken (the delivery process learns the same for its own sends)
    graph = GraphTransport(TokenCache())
    intake = Intake(config, Spool(config.spool_dir), queued, graph=graph)
    await intake.load_certificates(quiet=True)
    await intake.serve_sockets([(index, socket.socket(fileno=fd)) for index, fd in listen])
    intake.start_pickup()
    stop, reload = asyncio.Event(), asyncio.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    hints_out.write(READY)
    while not stop.is_set():
        waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(reload.wait())}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        if reload.is_set() and not stop.is_set():
            reload.clear()
            try:
                config = await asyncio.to_thread(load_config, config_path)
                contexts = await asyncio.to_thread(tls_contexts, config.listeners, quiet=True)
            except (ConfigError, CertificateError):  # the daemon has logged why and kept the old: so do we
                hints_out.write(RELOADED)
                continue
            logging.getLogger().setLevel(logs.LEVELS[config.logging.level])
            intake.renew_certificates(config.listeners, contexts, quiet=True)
            intake.reconfigure(config)
            hints_out.write(RELOADED)
    intake.stop_accepting()
    await intake.drain()
    await intake.wait_closed()
    await graph.tokens.http.aclose()
    hints_out.close()


def die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``); exit now if the
    parent is already gone. Elsewhere the life pipe alone does it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


async def run(
    config: Config, *, config_path: str | Path | None = None, on_started: Callable[[], None] | None = None
) -> None:
    """Serve with SIGTERM/SIGINT = stop and SIGHUP = reload; ``on_started`` once the listeners are bound.
    Tells systemd how it goes when it started relay (``$NOTIFY_SOCKET``)."""
    notifier = Notifier.from_environ()
    separate = os.environ.get("RELAY_INTAKE", "").lower() != "inline"  # inline: one process (to tell whose bug)
    daemon = Daemon(config, config_path=config_path, notifier=notifier, intake_process=separate)
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
    if daemon.failure is not None:
        log.error("relay_failed", error=daemon.failure)
        raise DaemonFailure(daemon.failure)
