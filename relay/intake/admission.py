"""Listener-side limits that protect the host and the mailbox: connections and message rates.

``limits.py`` paces what relay *sends* to each provider; this module bounds what clients may *submit*,
like Postfix's anvil (``smtpd_client_connection_count_limit``, ``smtpd_client_message_rate_limit``):

- connections at once, in total (``limits.max_connections``) and per client IP
  (``limits.max_connections_per_client``): over either, the new connection gets
  ``421 4.7.0 ... too many connections`` instead of the greeting and is closed;
- messages a minute per client IP (``limits.messages_per_minute_per_client``, counted at MAIL, refused
  there with ``450 4.7.1``, as Postfix does) and per identified user
  (``limits.messages_per_minute_per_user``, counted once the user is known, after DATA, refused with
  ``450 4.7.1`` before anything is queued). A runaway ERP loop then fills neither the disk nor the
  user's daily quota at the provider, and the client keeps the mail and tries again later.

- free space on the spool's filesystem: under 1.5 times ``limits.max_message_size`` (``MIN_FREE`` at
  least), or under that plus the size a client announced (``SIZE=``), MAIL gets ``452 4.3.1
  Insufficient system storage``, as Postfix's smtpd answers under its ``queue_minfree``. The client keeps
  the mail and tries again later, and the space left is the delivery side's, to record what it delivers
  (spool.py, "The reserve"). Read with ``statvfs`` at most once a second (``SPACE_CHECK_INTERVAL``);
  logged as ``spool_low_on_space`` once a minute while it lasts, and ``spool_space_ok`` when it ends.

Every refusal for a limit is logged (``client_limited`` with the ``limit`` reached). The rate limits are off by
default (0) and the connection limits generous, so a month-end burst (one ERP, 500 invoices in one
session, or a few dozen parallel sessions) passes untouched. Minutes are fixed 60-second windows per
client or user, as anvil's time unit: a dictionary look-up per MAIL, nothing when the limit is 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import structlog

from relay import replies
from relay.config.models import LimitsConfig
from relay.queue.spool import RESERVE_SIZE, free_space

log = structlog.get_logger("relay.admission")
WINDOW = 60.0
SWEEP_AT = 10_000  # windows kept before the expired ones are dropped (one entry per client or user)
SPACE_FACTOR = 1.5  # free space wanted, in maximum message sizes (Postfix's 1.5 x message_size_limit)
# free space wanted whatever the maximum message size: well above the reserve and the room the delivery
# side waits for to make it again (2 x RESERVE_SIZE), so that new mail never takes the space it freed
MIN_FREE = 4 * RESERVE_SIZE
SPACE_CHECK_INTERVAL = 1.0  # seconds one reading of the free space is used for (a burst pays one statvfs)
SPACE_LOG_INTERVAL = 60.0  # seconds between two spool_low_on_space events while the space stays low


class _Rate:
    """Events per key in fixed windows of ``WINDOW`` seconds."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}

    def take(self, key: str, limit: int) -> bool:
        """Count one event for ``key`` unless ``limit`` are already counted in its window."""
        now = self._clock()
        start, count = self._windows.get(key, (now, 0))
        if now - start >= WINDOW:
            start, count = now, 0
        if count >= limit:
            return False
        if len(self._windows) >= SWEEP_AT and key not in self._windows:
            self._windows = {k: w for k, w in self._windows.items() if now - w[0] < WINDOW}
        self._windows[key] = (start, count + 1)
        return True


class SpoolSpace:
    """Free space on the spool's filesystem, read at most once every ``SPACE_CHECK_INTERVAL`` seconds."""

    def __init__(self, spool_dir: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.spool_dir = spool_dir
        self._clock = clock
        self._read_at = -SPACE_CHECK_INTERVAL
        self._free: int | None = None

    def free(self) -> int | None:
        """Bytes free for relay's user; ``None`` if the filesystem cannot be asked (the spool is missing:
        the commit reports that, with the right 451, so no mail is refused for it here)."""
        now = self._clock()
        if now - self._read_at >= SPACE_CHECK_INTERVAL:
            self._read_at = now
            try:
                self._free = free_space(self.spool_dir)
            except OSError:
                self._free = None
        return self._free


class Admission:
    """One per daemon, shared by every listener; ``limits`` is replaced on reload."""

    def __init__(
        self, limits: LimitsConfig, *, spool_dir: Path | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:  # fmt: skip
        self.limits = limits
        self.connections = 0
        self._per_client: dict[str, int] = {}
        self._client_rate = _Rate(clock)
        self._user_rate = _Rate(clock)
        self._clock = clock
        self._space = SpoolSpace(spool_dir, clock=clock) if spool_dir is not None else None
        self._low_logged_at: float | None = None  # while the space is low: when that was last logged
        self._refused_since_log = 0

    def connect(self, client: str) -> str | None:
        """A new connection: ``None`` if it may go on (then ``disconnect`` must follow), else the reply."""
        limits = self.limits
        if limits.max_connections and self.connections >= limits.max_connections:
            return self._refuse(replies.R421_TOO_MANY_CONNECTIONS.format(client), client, "max_connections",
                                limits.max_connections)  # fmt: skip
        open_here = self._per_client.get(client, 0)
        if limits.max_connections_per_client and open_here >= limits.max_connections_per_client:
            return self._refuse(replies.R421_TOO_MANY_CONNECTIONS.format(client), client,
                                "max_connections_per_client", limits.max_connections_per_client)  # fmt: skip
        self.connections += 1
        self._per_client[client] = open_here + 1
        return None

    def disconnect(self, client: str) -> None:
        self.connections -= 1
        left = self._per_client.get(client, 1) - 1
        if left > 0:
            self._per_client[client] = left
        else:
            self._per_client.pop(client, None)

    def message_from_client(self, client: str) -> str | None:
        """At MAIL: ``None``, or the reply when the client sent its messages for this minute."""
        limit = self.limits.messages_per_minute_per_client
        if not limit or self._client_rate.take(client, limit):
            return None
        return self._refuse(replies.R450_TOO_MUCH_MAIL.format(client), client, "messages_per_minute_per_client", limit)

    def message_from_user(self, user: str | None, client: str) -> str | None:
        """Once the sender is identified (``None``: the company's defaults): ``None`` or the reply."""
        limit = self.limits.messages_per_minute_per_user
        name = user if user is not None else "(company)"
        if not limit or self._user_rate.take(name, limit):
            return None
        return self._refuse(replies.R450_TOO_MUCH_MAIL_FROM_USER.format(name), client,
                            "messages_per_minute_per_user", limit, user=name)  # fmt: skip

    def storage(self, size: int, client: str) -> str | None:
        """At MAIL: ``None``, or the 452 when the spool's filesystem has too little room for new mail.
        ``size``: what the client announced with ``SIZE=`` (0 if nothing); it is counted on top, as Postfix
        does, so a big message is refused at MAIL rather than failing at its commit after the upload."""
        if self._space is None:
            return None
        free = self._space.free()
        if free is None:
            return None
        wanted = self.wanted_free()
        if free - size >= wanted:
            self._space_ok(free, wanted)
            return None
        self._refused_since_log += 1
        now = self._clock()
        if self._low_logged_at is None or now - self._low_logged_at >= SPACE_LOG_INTERVAL:
            self._low_logged_at = now
            log.error(
                "spool_low_on_space", spool=str(self._space.spool_dir), free=free,
                wanted=wanted, size=size or None, client=client, refused=self._refused_since_log,
                reply=replies.R452_INSUFFICIENT_STORAGE, fix="free space on the spool's filesystem (or lower "
                "limits.max_message_size: relay wants 1.5 times it free)",
            )  # fmt: skip
            self._refused_since_log = 0
        return replies.R452_INSUFFICIENT_STORAGE

    def wanted_free(self) -> int:
        """The free space below which MAIL is refused: 1.5 x ``limits.max_message_size``, ``MIN_FREE`` at least."""
        return max(int(SPACE_FACTOR * self.limits.max_message_size), MIN_FREE)

    def _space_ok(self, free: int, wanted: int) -> None:
        """Say once that mail is taken again after ``spool_low_on_space``."""
        if self._low_logged_at is not None:
            self._low_logged_at = None
            log.info("spool_space_ok", free=free, wanted=wanted, refused=self._refused_since_log)
            self._refused_since_log = 0

    @staticmethod
    def _refuse(reply: str, client: str, limit: str, value: int, **fields: str) -> str:
        log.warning("client_limited", client=client, limit=limit, value=value, reply=reply, **fields)
        return reply
