"""systemd's service notification protocol (sd_notify): ready, reloading, stopping, status, watchdog.

With ``Type=notify`` systemd sets ``$NOTIFY_SOCKET`` and waits for ``READY=1`` before it counts relay as
started (so ``systemctl start`` returns, and units ordered after relay start, only once the listeners
are bound and the spool recovered). With ``WatchdogSec=`` it also sets ``$WATCHDOG_USEC`` and restarts
relay when no ``WATCHDOG=1`` arrives in that time. Without ``$NOTIFY_SOCKET`` every call here does
nothing, so the same daemon runs under ``Type=simple``, in a terminal and in tests.

The protocol is one datagram of ``KEY=VALUE`` lines to an ``AF_UNIX`` socket (a leading ``@`` names the
abstract namespace). systemd documents it as a stable interface and, in sd_notify(3), invites
programs to speak it themselves rather than link libsystemd (it gives a reference implementation of
this size). Of the Python packages, ``systemd-python`` needs libsystemd and a C compiler to install,
``sdnotify`` is unmaintained since 2017 and swallows every error, and the small watchdog packages
time the pings with their own clock rather than the event loop's. So this module is a few lines of
stdlib, and the pings are scheduled by the daemon on its event loop (a stuck loop stops them, which
is what the watchdog is for).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("relay.systemd")
SEND_TIMEOUT = 2.0  # a datagram to systemd is queued at once; this only bounds a stuck manager


def _socket_address(value: str) -> str | None:
    """``$NOTIFY_SOCKET`` -> the address to send to: a path, or ``\\0name`` for ``@name``.

    Anything else (a relative path, ``vsock:``) is not something relay can reach: ``None``.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC`` (sd_watchdog_enabled(3)'s
    advice), or ``None`` when no watchdog is set up for this process (``$WATCHDOG_PID`` names another)."""
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


class Notifier:
    """Sends notifications to systemd, or nothing when relay was not started by it (``enabled``)."""

    def __init__(self, address: str | None = None, *, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog_interval = watchdog if address is not None else None
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = _socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("notify_socket_unsupported", notify_socket=raw, effect="systemd is not told when relay is ready")
        return cls(address, watchdog=watchdog_interval(env, os.getpid()))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str) -> None:
        """Listeners bound and spool recovered (or a reload finished): systemd may count relay as running."""
        self.send("READY=1", f"MAINPID={os.getpid()}", f"STATUS={status}")

    def reloading(self) -> None:
        """A reload (SIGHUP) begins; ``ready`` ends it. ``MONOTONIC_USEC`` is required by systemd 253+."""
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str = "stopping: finishing open sessions and deliveries") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def ping(self) -> None:
        self.send("WATCHDOG=1")

    def send(self, *fields: str) -> None:
        """One datagram; a failure is logged once and never stops relay (mail matters more)."""
        if self.address is None:
            return
        message = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.settimeout(SEND_TIMEOUT)
            self._socket.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("notify_failed", notify_socket=self.address.replace("\0", "@"),
                            error=f"{type(exc).__name__}: {exc}")  # fmt: skip

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
