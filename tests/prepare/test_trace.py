"""relay's Received field and its hop limit, from outside: a legacy client, relay, a real upstream."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable

import pytest

from tests.conftest import UpstreamFactory, free_port, queue_entries, smtp_send
from tests.servers import RelayRunner

RelayFactory = Callable[..., RelayRunner]
BODY = b"Subject: Lasku 1\r\nFrom: erp@legacy.local\r\nTo: customer@example.com\r\n\r\nInvoice.\r\n"


def _relay(upstream: UpstreamFactory, relay_with: RelayFactory) -> tuple[RelayRunner, object]:
    up = upstream("provider", security="none")
    relay = relay_with(
        hostname="relay.example.fi",
        upstreams={"provider": {"host": "127.0.0.1", "port": up.port, "security": "none"}},
        company={"upstream": "provider", "from_address": "laskutus@rakennus.fi"},
    )
    return relay, up


def test_every_message_gets_a_received_field_at_the_top(upstream: UpstreamFactory, relay_with: RelayFactory) -> None:
    """RFC 5321 4.4: the server that takes a message adds its trace field first; the client as its session
    named itself (HELO and address), relay as it greeted."""
    relay, up = _relay(upstream, relay_with)

    smtp_send(relay.port, "erp@legacy.local", ["customer@example.com"], BODY)
    [got] = up.wait_for(1)  # type: ignore[attr-defined]

    first = got.content.split(b"\r\n\t")[0]
    assert b"Received: from erp-server ([127.0.0.1])" == first
    assert b"\r\n\tby relay.example.fi (relay) with ESMTP;\r\n\t" in got.content.split(b"\r\n\r\n")[0]
    assert 1 == len(got.message.get_all("Received"))


@pytest.mark.parametrize(("hops", "refused"), [(49, False), (50, True)])
def test_a_message_that_passed_fifty_servers_is_refused(
    upstream: UpstreamFactory, relay_with: RelayFactory, hops: int, refused: bool
) -> None:
    """Postfix's hopcount_limit and reply: the loop ends at the first server that counts."""
    relay, up = _relay(upstream, relay_with)
    trace = b"".join(b"Received: from hop%d.example by hop%d.example; Mon, 7 Dec 2026 10:00:00 +0000\r\n" % (i, i + 1)
                     for i in range(hops))  # fmt: skip

    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        client.ehlo("erp-server")
        client.mail("erp@legacy.local")
        client.rcpt("customer@example.com")
        code, text = client.data(trace + BODY)

    if refused:
        assert (554, b"5.4.6 Too many hops") == (code, text[:19])
        assert [] == queue_entries(relay.config.spool_dir, "incoming") + queue_entries(relay.config.spool_dir, "deferred")
    else:
        assert 250 == code
        [got] = up.wait_for(1)  # type: ignore[attr-defined]
        assert hops + 1 == len(got.message.get_all("Received"))


def test_an_upstream_that_is_relay_itself_loops_no_more_than_the_hop_limit(relay_with: RelayFactory) -> None:
    """A tester pointed the upstream at relay's own listener: one message went round ~240 times a second,
    for ever. Now it goes round 50 times and fails (554 5.4.6), as it would between two MTAs."""
    port = free_port()
    relay = relay_with(
        listeners=[{"address": "127.0.0.1", "port": port}],
        upstreams={"self": {"host": "127.0.0.1", "port": port, "security": "none"}},
        company={"upstream": "self", "from_address": "laskutus@rakennus.fi"},
        delivery={"retry_interval": 0.2, "max_retry_interval": 0.5, "workers": 2, "notices": False},
    )

    smtp_send(relay.port, "erp@legacy.local", ["customer@example.com"], BODY)
    spool = relay.config.spool_dir
    deadline = time.monotonic() + 60
    while not queue_entries(spool, "failed") and time.monotonic() < deadline:
        time.sleep(0.1)

    [failed] = queue_entries(spool, "failed")
    assert "554 5.4.6 Too many hops" in failed.last_reply, failed.last_reply
    time.sleep(0.5)
    waiting = [e for state in ("incoming", "active", "deferred") for e in queue_entries(spool, state)]  # type: ignore[arg-type]
    assert [] == waiting  # the loop is over: nothing else goes round
