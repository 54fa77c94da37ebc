"""The sd_notify protocol: where the datagrams go, when the watchdog is ours, what a datagram holds."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from relay.systemd import Notifier, watchdog_interval


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # another process's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_the_watchdog_pings_at_half_its_timeout_only_when_it_is_this_process_s(
    environ: dict[str, str], expected: float | None
) -> None:
    assert expected == watchdog_interval(environ, os.getpid())


def test_without_a_notify_socket_nothing_is_sent_and_no_watchdog_runs() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    notifier.ready("accepting")  # no socket: a no-op, not an error

    assert (False, None) == (notifier.enabled, notifier.watchdog_interval)


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_one_datagram_of_key_value_lines_reaches_the_socket(kind: str) -> None:
    """A path or an ``@name`` in NOTIFY_SOCKET; a line break in a status cannot start a new field."""
    with tempfile.TemporaryDirectory(prefix="relay-sd-") as folder:
        address = str(Path(folder) / "n") if kind == "path" else f"@relay-unit-{uuid.uuid4().hex}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
            systemd.bind("\0" + address[1:] if address.startswith("@") else address)
            systemd.settimeout(10)
            notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
            notifier.ready("accepting on 127.0.0.1:2525,\nWATCHDOG=1")
            notifier.close()
            got = systemd.recv(4096).decode()

    assert f"READY=1\nMAINPID={os.getpid()}\nSTATUS=accepting on 127.0.0.1:2525, WATCHDOG=1" == got


def test_an_unreachable_socket_is_logged_once_and_does_not_stop_relay() -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "/nonexistent/relay-notify"})
    with capture_logs() as logs:
        notifier.ready("accepting")
        notifier.ping()
    notifier.close()

    assert ["notify_failed"] == [e["event"] for e in logs]
