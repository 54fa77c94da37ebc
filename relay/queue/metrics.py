"""What the daemon counts, for Prometheus: ``/metrics`` in the text format on a loopback port.

Off unless the config has a ``metrics:`` section; the counting itself always runs (it costs a lock and
an addition), so turning the endpoint on needs a restart but no code path changes. Every daemon owns
its own ``CollectorRegistry``: two daemons in one process (the tests) never share a count, and nothing
of the library's process-wide default registry (GC, process metrics) is mixed in.

Counted per upstream account (the ``account`` label is the queue entry's account name: an
``upstreams`` key, or ``user:<id>`` for a user's own account; never a login or a password):

    relay_messages_received_total       queued entries (after the spool commit, i.e. after the 250)
    relay_messages_delivered_total      attempts an upstream accepted for at least one recipient
                                        (= the copies the provider received)
    relay_messages_deferred_total       attempts that left recipients waiting for a retry
    relay_messages_bounced_total        entries moved to failed/ (a 5xx, or max_queue_lifetime reached)
    relay_delivery_latency_seconds      histogram: from acceptance to the upstream's acceptance
    relay_attempt_duration_seconds      histogram: one delivery attempt, connect to last reply
    relay_upstream_up                   1 after an attempt that reached a transaction, 0 after one that
                                        could not connect, start TLS or log in
    relay_limit_waits_total             times mail waited for a provider limit (``limit_wait``)
    relay_token_refresh_failures_total  failed OAuth2 token refreshes (``token_refresh_failed``)

and, read at scrape time from the config in use:

    relay_credential_expiry_timestamp_seconds{account,credential}  when an account's certificate (read
                                        from its file) or client secret (client_secret_expires) expires,
                                        in Unix seconds (alert: less than 30 days away)

and, read from the spool directories at scrape time (a directory listing per state, no file opened):

    relay_queue_entries{state}          entries in incoming, active, deferred, hold, failed
    relay_queue_oldest_seconds{state}   age of the oldest of them (alert: deferred mail older than an hour)

Where the events come from: ``Scheduler.submit`` (received), ``Scheduler._attempt`` (each attempt),
``Scheduler._store`` (deferred, bounced). Provider limits and OAuth2 call ``scheduler.metrics.limit_wait
(account)`` and ``scheduler.metrics.token_refresh_failed(account)`` where they happen.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.config.models import MetricsConfig
from relay.envelope import Account
from relay.queue.spool import STATES, QueueEntry, Spool
from relay.transports.assertions import expiries
from relay.transports.smtp import Outcome

log = structlog.get_logger("relay.metrics")
ACCOUNT = ("account",)
# Mail waits seconds when all goes well and hours when a provider is down: buckets from 1 s to 1 day.
LATENCY_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0, float("inf"))
ATTEMPT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf"))


class _QueueCollector(Collector):
    """Queue entries per state, counted when Prometheus scrapes: always the spool's truth, no bookkeeping."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def collect(self) -> Iterator[Metric]:
        entries = GaugeMetricFamily("relay_queue_entries", "Queue entries per spool state", labels=["state"])
        oldest = GaugeMetricFamily(
            "relay_queue_oldest_seconds", "Age of the oldest entry per spool state (0 when empty)", labels=["state"]
        )
        now = time.time()
        for state in STATES:
            count, arrived = self.spool.census(state)
            entries.add_metric([state], count)
            oldest.add_metric([state], max(now - arrived, 0.0) if arrived is not None else 0.0)
        yield entries
        yield oldest


class _CredentialCollector(Collector):
    """Each account's certificate or dated client secret and when it expires, looked at when scraped (a
    renewed certificate file shows at once)."""

    def __init__(self, current: Callable[[], Iterable[Account]]) -> None:
        self.current = current

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("relay_credential_expiry_timestamp_seconds", "When an account's certificate or "
                                   "client secret expires (Unix time)", labels=["account", "credential"])  # fmt: skip
        try:
            found, _ = expiries(self.current())
        except Exception:  # noqa: BLE001  (a scrape must not fail: the daemon logs the trouble daily)
            found = []
        for expiry in found:
            family.add_metric([expiry.account, expiry.credential], expiry.expires.timestamp())
        yield family


class Metrics:
    """The daemon's counters; the scheduler calls one method per event, the exporter serves them."""

    def __init__(self, spool: Spool | None = None) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._received = Counter(
            "relay_messages_received", "Messages queued (answered 250)", ACCOUNT, registry=registry
        )
        self._delivered = Counter(
            "relay_messages_delivered", "Attempts an upstream accepted for at least one recipient", ACCOUNT,
            registry=registry,
        )  # fmt: skip
        self._deferred = Counter(
            "relay_messages_deferred", "Attempts that left recipients waiting for a retry", ACCOUNT,
            registry=registry,
        )  # fmt: skip
        self._bounced = Counter(
            "relay_messages_bounced", "Entries moved to failed/ (5xx or queue lifetime reached)", ACCOUNT,
            registry=registry,
        )  # fmt: skip
        self._latency = Histogram(
            "relay_delivery_latency_seconds", "Seconds from acceptance to the upstream's acceptance", ACCOUNT,
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self._duration = Histogram(
            "relay_attempt_duration_seconds", "Seconds one delivery attempt took", ACCOUNT, buckets=ATTEMPT_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self._up = Gauge("relay_upstream_up", "1: the last attempt reached the upstream; 0: it did not", ACCOUNT,
                         registry=registry)  # fmt: skip
        self._limit_waits = Counter(
            "relay_limit_waits", "Times mail waited for a provider limit (not for a failure)", ACCOUNT,
            registry=registry,
        )  # fmt: skip
        self._token_failures = Counter(
            "relay_token_refresh_failures", "Failed OAuth2 access token refreshes", ACCOUNT, registry=registry
        )
        if spool is not None:
            registry.register(_QueueCollector(spool))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def watch_credentials(self, current: Callable[[], Iterable[Account]]) -> None:
        """Publish the expiry of the credentials of ``current()``'s accounts (the daemon's config)."""
        self.registry.register(_CredentialCollector(current))

    # region #### events: one call per thing that happened ####

    def received(self, entries: list[QueueEntry]) -> None:
        for entry in entries:
            self._received.labels(entry.account).inc()

    def attempted(self, entry: QueueEntry, outcome: Outcome) -> None:
        """One delivery attempt's outcome: what the provider took, how long it took, is it up."""
        account = entry.account
        self._duration.labels(account).observe(outcome.duration)
        self._up.labels(account).set(0 if outcome.session_failed else 1)
        if outcome.delivered:
            self._delivered.labels(account).inc()
            self._latency.labels(account).observe(max(time.time() - entry.received_at, 0.0))

    def deferred(self, account: str) -> None:
        self._deferred.labels(account).inc()

    def bounced(self, account: str) -> None:
        self._bounced.labels(account).inc()

    def limit_wait(self, account: str) -> None:
        """Call when mail for ``account`` waits for a provider limit (messages a minute, a day's budget)."""
        self._limit_waits.labels(account).inc()

    def token_refresh_failed(self, account: str) -> None:
        """Call when an OAuth2 access token for ``account`` could not be refreshed."""
        self._token_failures.labels(account).inc()

    # endregion

    # region #### the HTTP endpoint ####

    def serve(self, config: MetricsConfig | None) -> tuple[str, int] | None:
        """Start ``/metrics`` (prometheus-client's WSGI server, in its own thread) if configured.

        Blocking (it binds): call through ``asyncio.to_thread``. An address in use raises ``OSError``,
        which stops the daemon's start-up like a listener's port in use would.
        """
        if config is None:
            return None
        self._server, self._thread = start_http_server(config.port, addr=config.address, registry=self.registry)
        host, port = self._server.server_address[:2]
        log.info("metrics_listening", url=f"http://{_url_host(str(host))}:{port}/metrics")
        return str(host), int(port)

    def close(self) -> None:
        """Stop serving (idempotent). Blocks until the server thread has finished its current request."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    # endregion


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
