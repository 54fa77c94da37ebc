"""``/metrics`` scraped over HTTP while relay delivers to real loopback upstreams (TLS, AUTH)."""

from __future__ import annotations

import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay.config.load import parse_config
from relay.daemon import _restart_only_changes
from relay.errors import ConfigError
from relay.queue.metrics import Metrics
from tests.conftest import UpstreamFactory, smtp_send
from tests.servers import RelayRunner
from tests.test_daemon import RelayProcess, write_config

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
MESSAGE = b"From: erp@legacy.local\r\nTo: c@example.com\r\nSubject: Lasku %d\r\n\r\nInvoice %d\r\n"
STATES = ("incoming", "active", "deferred", "hold", "failed")


def scrape(port: int) -> Samples:
    """Every sample of one scrape, parsed with prometheus-client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_until(port: int, done: Callable[[Samples], bool], timeout: float = 15.0) -> Samples:
    deadline = time.monotonic() + timeout
    samples = scrape(port)
    while not done(samples) and time.monotonic() < deadline:
        time.sleep(0.05)
        samples = scrape(port)
    return samples


def settled(samples: Samples, *, latencies: int, entries: int) -> bool:
    """Every attempt so far fully counted (the latency is observed last) and recorded in the spool."""
    counted = value(samples, "relay_delivery_latency_seconds_count", account="provider") >= latencies
    return counted and entries == sum(value(samples, "relay_queue_entries", state=s) for s in STATES)


def _company(upstream: str) -> dict[str, object]:
    return {"from_address": "laskutus@rakennus.fi", "upstream": upstream}


class TestScrapedDuringARun:
    def test_counts_match_what_the_upstream_received(
        self, upstream: UpstreamFactory, relay_with: Callable[..., RelayRunner]
    ) -> None:
        """Received, delivered, bounced, queue states and up/down, as a provider's refusals and an outage
        happen: delivered always equals the copies the upstream holds."""
        up = upstream("provider", security="starttls", accounts={"laskutus@rakennus.fi": "pw-1"})
        up.faults.rcpt["nobody@example.com"] = "550 5.1.1 User unknown"
        relay = relay_with(
            upstreams={"provider": upstream.account(up, "laskutus@rakennus.fi")}, company=_company("provider"),
            metrics={"address": "127.0.0.1", "port": 0}, delivery={"notices": False},  # counts of this mail only
        )  # fmt: skip
        address = relay.run(lambda d: d.metrics_address)
        assert address is not None
        port = address[1]

        for n, rcpt in enumerate(["a@example.com", "b@example.com", "nobody@example.com"]):
            smtp_send(relay.port, "erp@legacy.local", [rcpt], MESSAGE % (n, n))
        up.wait_for(2)
        bounced = lambda s: value(s, "relay_messages_bounced_total", account="provider")
        first = scrape_until(port, lambda s: settled(s, latencies=2, entries=1) and bounced(s) == 1)

        assert 3 == value(first, "relay_messages_received_total", account="provider")
        assert len(up.received) == 2 == value(first, "relay_messages_delivered_total", account="provider")
        assert 1 == value(first, "relay_messages_bounced_total", account="provider")
        assert 0 == value(first, "relay_messages_deferred_total", account="provider")
        assert {"failed": 1} == {s: v for s in STATES if (v := value(first, "relay_queue_entries", state=s))}
        assert 1 == value(first, "relay_upstream_up", account="provider")
        assert 0 < value(first, "relay_queue_oldest_seconds", state="failed") < 60
        assert 0 == value(first, "relay_queue_oldest_seconds", state="deferred")
        assert 2 == value(first, "relay_delivery_latency_seconds_count", account="provider")
        assert 3 == value(first, "relay_attempt_duration_seconds_count", account="provider")

        up.stop()  # the provider goes down: mail waits, the account is down
        smtp_send(relay.port, "erp@legacy.local", ["d@example.com"], MESSAGE % (4, 4))
        down = scrape_until(port, lambda s: value(s, "relay_messages_deferred_total", account="provider") >= 1)
        assert 0 == value(down, "relay_upstream_up", account="provider")
        assert 1 <= value(down, "relay_messages_deferred_total", account="provider")

        up.start()  # and comes back: the deferred message goes out, the account is up again
        up.wait_for(3)
        back = scrape_until(port, lambda s: settled(s, latencies=3, entries=1))
        assert len(up.received) == 3 == value(back, "relay_messages_delivered_total", account="provider")
        assert 1 == value(back, "relay_upstream_up", account="provider")
        assert 4 == value(back, "relay_messages_received_total", account="provider")
        assert {"failed": 1} == {s: v for s in STATES if (v := value(back, "relay_queue_entries", state=s))}

    @pytest.mark.slow
    def test_the_daemon_process_serves_metrics(
        self, tmp_path: Path, upstream: UpstreamFactory, processes: list[RelayProcess]
    ) -> None:
        """``relay serve`` as its own process: the endpoint is logged, scraped mid-run, and agrees with the
        upstream's count; SIGTERM closes it."""
        up = upstream("provider", security="starttls", accounts={"laskutus@rakennus.fi": "pw-2"})
        path = write_config(tmp_path, upstream, up, metrics={"address": "127.0.0.1", "port": 0})
        relay = RelayProcess(path).start()
        processes.append(relay)
        port = int(relay.wait_event("metrics_listening")["url"].rsplit(":", 1)[1].split("/")[0])

        for n in range(5):
            smtp_send(relay.port, "erp@legacy.local", ["c@example.com"], MESSAGE % (n, n))
        up.wait_for(5)
        samples = scrape_until(port, lambda s: settled(s, latencies=5, entries=0))

        assert 5 == value(samples, "relay_messages_received_total", account="provider")
        assert len(up.received) == 5 == value(samples, "relay_messages_delivered_total", account="provider")
        assert 5 == value(samples, "relay_delivery_latency_seconds_count", account="provider")
        relay.signal(signal.SIGTERM)
        assert 0 == relay.wait()
        with pytest.raises(OSError):
            scrape(port)


class TestMetricsObject:
    def test_limit_waits_and_token_failures_are_counted_per_account(self) -> None:
        """The hooks other stages call (provider limits, OAuth2 refresh) show up per account; two daemons'
        registries never collide."""
        metrics, other = Metrics(), Metrics()
        metrics.limit_wait("o365")
        metrics.limit_wait("o365")
        metrics.token_refresh_failed("gmail")

        text = generate_latest(metrics.registry).decode()

        assert 'relay_limit_waits_total{account="o365"} 2.0' in text
        assert 'relay_token_refresh_failures_total{account="gmail"} 1.0' in text
        assert "relay_limit_waits_total{" not in generate_latest(other.registry).decode()


class TestMetricsConfig:
    BASE = "upstreams: {o365: {host: smtp.office365.com}}\n"

    def test_off_by_default(self) -> None:
        assert None is parse_config(self.BASE).metrics

    def test_non_loopback_address_needs_allow_remote(self) -> None:
        """The counts name every account: published to the network only when the admin says so."""
        with pytest.raises(ConfigError) as refused:
            parse_config(self.BASE + "metrics: {address: 0.0.0.0}\n")
        [problem] = refused.value.problems
        assert "metrics" == problem.path and 2 == problem.line
        assert "allow_remote: true" in problem.message

        allowed = parse_config(self.BASE + "metrics: {address: 0.0.0.0, allow_remote: true}\n").metrics
        assert allowed is not None and ("0.0.0.0", 9464) == (allowed.address, allowed.port)

    def test_a_reload_cannot_move_the_endpoint(self) -> None:
        """The endpoint is bound at start: a reload that changes it is refused (restart to apply)."""
        old, new = parse_config(self.BASE), parse_config(self.BASE + "metrics: {port: 9100}\n")

        assert ["metrics"] == _restart_only_changes(old, new)
