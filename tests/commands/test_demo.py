"""The README's first command, as a newcomer runs it: ``relay demo``, one legacy message, look at the Maildir."""

from __future__ import annotations

import os
import shlex
import signal
import smtplib
import subprocess
import sys
import time
from email import message_from_bytes, policy
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow


def test_demo_relays_a_legacy_message_to_its_built_in_provider(tmp_path: Path) -> None:
    """Latin-1 text without MIME headers and a ``;`` list go in; the built-in TLS+AUTH provider stores
    the rewritten message (sender locked to the demo mailbox, Reply-To matti's reply_to and not his
    ERP-internal address, signature, valid MIME); Ctrl-C stops it."""
    port, upstream_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "demo", "--data", str(tmp_path / "demo"), "--port", str(port),
         "--upstream-port", str(upstream_port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = [proc.stdout.readline() for _ in range(4)]  # printed once relay listens
        assert any("relay demo is running" in line for line in banner), banner
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("matti@erp.local", ["customer@example.com", "boss@example.com"],
                            "From: matti@erp.local\r\nTo: customer@example.com; boss@example.com\r\n"
                            "Subject: Lasku 1234\r\n\r\nHyvää päivää!\r\n".encode("latin-1"))  # fmt: skip
        maildir = tmp_path / "demo" / "maildir" / "new"
        deadline = time.monotonic() + 15
        while not list(maildir.glob("*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        [stored] = list(maildir.glob("*"))
        message = message_from_bytes(stored.read_bytes(), policy=policy.default)
        assert "invoices@demo.example" in str(message["From"])
        # the ERP's internal name for matti (swaks --from writes it in From) is no address to reply to
        assert b"\r\nReply-To: matti@demo.example\r\n" in stored.read_bytes().split(b"\r\n\r\n")[0]
        text = message.get_body().get_content()  # type: ignore[union-attr]
        assert "Hyvää päivää!" in text and "Matti Meikäläinen" in text  # matti's own signature
        assert ["customer@example.com", "boss@example.com"] == [a.addr_spec for a in message["To"].addresses]
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(20)
        if proc.stdout is not None:
            proc.stdout.close()
    assert 0 == code


def test_demo_writes_its_config_and_prints_the_queue_command(tmp_path: Path) -> None:
    """Run from another directory without --data, the demo says where it made demo-data/, writes its config
    there and prints a ``relay queue -c`` line that works as printed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port, upstream_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "demo", "--port", str(port), "--upstream-port", str(upstream_port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=elsewhere,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = [proc.stdout.readline() for _ in range(12)]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
        if proc.stdout is not None:
            proc.stdout.close()
    data = elsewhere / "demo-data"
    assert f"  its files are in     {data}/  (made now; --data DIR for another place)\n" in banner, banner
    assert f"  its config is        {data / 'relay.yaml'}\n" in banner, banner
    [line] = [line for line in banner if line.startswith("  see the queue with ")]
    command = shlex.split(line.removeprefix("  see the queue with "))
    assert command[-3:] == ["queue", "-c", "demo-data/relay.yaml"]

    listed = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, timeout=30, check=False)

    assert (0, "") == (listed.returncode, listed.stderr)
    assert listed.stdout.startswith("QUEUE ID") and listed.stdout.endswith("-- 0 message(s) in queue\n")


@pytest.mark.parametrize(("option", "value"), [("--port", "99999"), ("--port", "0"), ("--upstream-port", "65536")])
def test_a_port_out_of_range_is_a_usage_error(tmp_path: Path, option: str, value: str) -> None:
    """argparse's own error and exit 2, not a traceback from the demo's config (nor a random port for 0)."""
    done = subprocess.run([sys.executable, "-m", "relay", "demo", "--data", str(tmp_path / "demo"), option, value],
                          capture_output=True, text=True, timeout=20, check=False)  # fmt: skip

    assert 2 == done.returncode, done.stderr
    assert f"relay demo: error: argument {option}: {value} is not a port (1-65535)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "demo").exists()


def _start_demo(data: Path, port: int, upstream_port: int) -> subprocess.Popen[str]:
    """A demo that has printed its banner (so it listens)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "demo", "--data", str(data), "--port", str(port),
         "--upstream-port", str(upstream_port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    banner = [proc.stdout.readline() for _ in range(4)]
    assert any("relay demo is running" in line for line in banner), banner
    return proc


def _files(data: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}


def test_a_second_demo_in_the_same_directory_leaves_the_running_one_alone(tmp_path: Path) -> None:
    """1. a demo runs  2. another starts in its directory on the same ports, then on free ones.
    Both refuse (exit 3) saying why, before writing a file: the running demo's ca.pem and config are
    unchanged and it still delivers over TLS to its provider."""
    data = tmp_path / "demo"
    port, upstream_port = free_port(), free_port()
    first = _start_demo(data, port, upstream_port)
    try:
        before = _files(data)
        same = subprocess.run([sys.executable, "-m", "relay", "demo", "--data", str(data), "--port", str(port),
                               "--upstream-port", str(upstream_port)],
                              capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        other = subprocess.run([sys.executable, "-m", "relay", "demo", "--data", str(data), "--port",
                                str(free_port()), "--upstream-port", str(free_port())],
                               capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        after = _files(data)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("matti@erp.local", ["customer@example.com"], b"Subject: after\r\n\r\nstill here\r\n")
        maildir = data / "maildir" / "new"
        deadline = time.monotonic() + 15
        while not list(maildir.glob("*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        delivered = list(maildir.glob("*"))
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(20)
        if first.stdout is not None:
            first.stdout.close()

    assert {"ca.pem", "relay.yaml"} <= set(after)
    assert before == after
    assert 1 == len(delivered)
    assert (3, 3) == (same.returncode, other.returncode), same.stderr + other.stderr
    assert f"127.0.0.1:{upstream_port} is taken" in same.stderr and "is a demo already running?" in same.stderr
    assert f"a demo is already running in {data}/" in other.stderr
    assert "Traceback" not in same.stderr + other.stderr
