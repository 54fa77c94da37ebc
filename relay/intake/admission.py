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

Every refusal is logged (``client_limited`` with the ``limit`` reached). The rate limits are off by
default (0) and the connection limits generous, so a month-end burst (one ERP, 500 invoices in one
session, or a few dozen parallel sessions) passes untouched. Minutes are fixed 60-second windows per
client or user, as anvil's time unit: a dictionary look-up per MAIL, nothing when the limit is 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from relay import replies
from relay.config.models import LimitsConfig

log = structlog.get_logger("relay.admission")
WINDOW = 60.0
SWEEP_AT = 10_000  # windows kept before the expired ones are dropped (one entry per client or user)


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


class Admission:
    """One per daemon, shared by every listener; ``limits`` is replaced on reload."""

    def __init__(self, limits: LimitsConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.connections = 0
        self._per_client: dict[str, int] = {}
        self._client_rate = _Rate(clock)
        self._user_rate = _Rate(clock)

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

    @staticmethod
    def _refuse(reply: str, client: str, limit: str, value: int, **fields: str) -> str:
        log.warning("client_limited", client=client, limit=limit, value=value, reply=reply, **fields)
        return reply
