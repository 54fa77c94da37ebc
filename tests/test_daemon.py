"""The real daemon as a separate process: JSON logs, SIGTERM drain, SIGHUP reload, kill -9 recovery."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import UpstreamFactory, free_port, queue_entries, smtp_send
from tests.servers import Upstream

pytestmark = pytest.mark.slow
PASSWORD = "daemon-test-secret-9f2c"


class RelayProcess:
    """``python -m relay serve`` with JSON logs collected from stderr."""

    def __init__(
        self, config_path: Path, *, env: dict[str, str] | None = None, command: list[str] | None = None,
        cwd: Path | None = None, umask: int = -1,
    ) -> None:  # fmt: skip
        """``command`` runs instead of this checkout's relay (a packaged one, or a unit's ExecStart line)."""
        self.config_path = config_path
        self.env = env or {}
        self.command = command or [sys.executable, "-m", "relay", "serve", "-c", str(config_path)]
        self.cwd = cwd
        self.umask = umask
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> RelayProcess:
        started = self.launch().wait_event("relay_started", timeout=20)
        self.port = int(started["listeners"][0].rsplit(":", 1)[1])
        return self

    def launch(self) -> RelayProcess:
        """Start the process and return at once (``start`` also waits until it listens)."""
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=self.cwd, umask=self.umask,
            env={**_environ_without_systemd(), "PYTHONUNBUFFERED": "1", **self.env},
        )  # fmt: skip
        self.reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self.reader.start()
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.raw.append(line)
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                pass

    def wait_event(self, name: str, *, count: int = 1, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events if e.get("event") == name]
            if len(found) >= count:
                return found[count - 1]
            if self.proc is not None and self.proc.poll() is not None and name != "relay_stopped":
                raise AssertionError(f"relay exited with {self.proc.returncode}: {''.join(self.raw)[-2000:]}")
            time.sleep(0.02)
        raise AssertionError(f"no {name!r} event within {timeout}s: {''.join(self.raw)[-2000:]}")

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self.reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code


def _environ_without_systemd() -> dict[str, str]:
    """This environment, less what would make relay talk to a systemd the test did not set up."""
    return {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}


@pytest.fixture
def provider(upstream: UpstreamFactory) -> Upstream:
    return upstream("provider", security="starttls", accounts={"laskutus@rakennus.fi": PASSWORD})


def write_config(tmp_path: Path, upstream: UpstreamFactory, up: Upstream, **extra: Any) -> Path:
    data: dict[str, Any] = {
        "listeners": [{"address": "127.0.0.1", "port": 0}],
        "spool_dir": str(tmp_path / "spool"),
        "upstreams": {"provider": upstream.account(up, "laskutus@rakennus.fi")},
        "company": {"from_address": "laskutus@rakennus.fi", "from_name": "Rakennus Oy", "upstream": "provider"},
        "delivery": {"retry_interval": 0.2, "max_retry_interval": 0.5},
        "logging": {"format": "json"},
        **extra,
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


MESSAGE = b"From: erp@legacy.local\r\nTo: c@example.com\r\nSubject: Lasku %d\r\n\r\nInvoice %d\r\n"


class TestLogs:
    def test_one_received_and_one_attempt_event_per_message_with_the_fields_ops_need(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, processes: list[RelayProcess]
    ) -> None:
        """JSON lines: 'received' and 'delivery_attempt' carry queue id, user, upstream, result, reply."""
        relay = RelayProcess(write_config(tmp_path, upstream, provider)).start()
        processes.append(relay)
        ids = [smtp_send(relay.port, "erp@legacy.local", ["c@example.com"], MESSAGE % (n, n)).rsplit(" ", 1)[1]
               for n in range(3)]  # fmt: skip
        provider.wait_for(3)
        relay.wait_event("delivery_attempt", count=3)
        relay.signal(signal.SIGTERM)

        assert relay.wait() == 0
        received = relay.named("received")
        attempts = relay.named("delivery_attempt")
        assert ids == [e["queue_id"] for e in received]
        assert sorted(ids) == sorted(e["queue_id"] for e in attempts)
        for event in received:
            assert {"queue_id", "user", "identified_by", "client", "size", "recipients", "timestamp"} <= set(event)
            assert ["c@example.com"] == event["to"]  # "did the ERP's mail to X reach relay?" from this event alone
        for event in attempts:
            assert {"queue_id", "upstream", "attempt", "duration", "result", "code", "reply"} <= set(event)
            assert (event["result"], event["code"], event["attempt"]) == ("delivered", 250, 1)
        assert relay.named("relay_stopped")
        assert PASSWORD not in "".join(relay.raw)


class TestSignals:
    def test_sigterm_lets_an_open_session_finish(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, processes: list[RelayProcess]
    ) -> None:
        """1. a client is mid-transaction  2. SIGTERM  3. the client sends DATA
        Result: the message is accepted and delivered, the daemon exits 0."""
        relay = RelayProcess(write_config(tmp_path, upstream, provider)).start()
        processes.append(relay)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("erp")
            client.mail("erp@legacy.local")
            client.rcpt("c@example.com")
            relay.signal(signal.SIGTERM)
            relay.wait_event("relay_stopping")
            code, _ = client.data(MESSAGE % (1, 1))

        assert code == 250
        assert relay.wait() == 0
        [got] = provider.wait_for(1)
        assert got.rcpt_tos == ["c@example.com"]

    def test_sighup_with_an_invalid_config_keeps_the_old_one(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, processes: list[RelayProcess]
    ) -> None:
        """A broken edit followed by SIGHUP is refused with its errors logged; mail keeps flowing."""
        path = write_config(tmp_path, upstream, provider)
        relay = RelayProcess(path).start()
        processes.append(relay)
        good = path.read_text()
        path.write_text(good + "\nbogus_key: 1\n")
        relay.signal(signal.SIGHUP)
        refused = relay.wait_event("reload_refused")
        smtp_send(relay.port, "erp@legacy.local", ["c@example.com"], MESSAGE % (1, 1))
        provider.wait_for(1)

        assert any("bogus_key" in error for error in refused["errors"])
        relay.signal(signal.SIGTERM)
        assert relay.wait() == 0


    def test_sighup_logs_the_same_config_errors_as_a_start(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, processes: list[RelayProcess]
    ) -> None:
        """A config whose password file is missing: the start logs ``config_error`` for it, and so does a
        SIGHUP with that same file (it logged only ``config_reloaded``), before saying it reloaded."""
        path = write_config(tmp_path, upstream, provider)
        data = yaml.safe_load(path.read_text())
        data["upstreams"]["provider"]["password_file"] = str(tmp_path / "no-such-secret")
        path.write_text(yaml.safe_dump(data))
        relay = RelayProcess(path).start()
        processes.append(relay)
        relay.signal(signal.SIGHUP)
        relay.wait_event("config_reloaded")
        relay.signal(signal.SIGTERM)

        assert relay.wait() == 0
        errors = relay.named("config_error")
        assert 2 == len(errors), errors
        assert errors[0]["problem"] == errors[1]["problem"]
        assert str(tmp_path / "no-such-secret") in errors[1]["problem"]
        order = [e["event"] for e in relay.events if e["event"] in ("config_error", "config_reloaded")]
        assert ["config_error", "config_error", "config_reloaded"] == order


class TestReloadScope:
    def test_sighup_that_changes_listeners_is_refused_until_restart(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, processes: list[RelayProcess]
    ) -> None:
        """Bound sockets cannot follow a reload: a changed listeners list is refused, not half-applied."""
        path = write_config(tmp_path, upstream, provider)
        relay = RelayProcess(path).start()
        processes.append(relay)
        data = yaml.safe_load(path.read_text())
        data["listeners"].append({"address": "127.0.0.1", "port": 0})
        path.write_text(yaml.safe_dump(data))
        relay.signal(signal.SIGHUP)
        refused = relay.wait_event("reload_refused")
        smtp_send(relay.port, "erp@legacy.local", ["c@example.com"], MESSAGE % (1, 1))
        provider.wait_for(1)

        assert ["listeners changed: restart relay to apply it"] == refused["errors"]


class TestCrashSafety:
    def test_kill_9_under_load_loses_nothing_that_got_250(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, processes: list[RelayProcess]
    ) -> None:
        """Send a stream, SIGKILL relay three times mid-stream, restart it each time.
        Every message that got 250 arrives; duplicates are only the documented in-flight ones."""
        path = write_config(tmp_path, upstream, provider)
        accepted: list[int] = []
        sent = 0
        for _round in range(3):
            relay = RelayProcess(path).start()
            processes.append(relay)
            stop_at = time.monotonic() + 1.0
            while time.monotonic() < stop_at:
                try:
                    smtp_send(relay.port, "erp@legacy.local", ["c@example.com"], MESSAGE % (sent, sent))
                    accepted.append(sent)
                except (smtplib.SMTPException, OSError, AssertionError):
                    pass
                sent += 1
            relay.signal(signal.SIGKILL)
            relay.wait()
        relay = RelayProcess(path).start()
        processes.append(relay)
        provider.wait_for(len(accepted), timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(
            queue_entries(tmp_path / "spool", s) for s in ("incoming", "active", "deferred")
        ):
            time.sleep(0.1)

        arrived = [int(r.message["Subject"].split()[-1]) for r in provider.received]
        assert set(accepted) <= set(arrived), sorted(set(accepted) - set(arrived))
        duplicates = len(arrived) - len(set(arrived))
        assert duplicates <= 3 * relay_workers(path), duplicates
        assert queue_entries(tmp_path / "spool", "hold") + queue_entries(tmp_path / "spool", "failed") == []


    def test_kill_9_while_the_upstream_hangs_puts_nothing_on_hold(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, processes: list[RelayProcess]
    ) -> None:
        """QA's case: 1. the upstream hangs at MAIL  2. 10 messages for one account (max_connections 3)
        3. SIGKILL relay while 3 attempts hang, start it again on the same spool; three times  4. the
        upstream answers again. Result: only the entries in an attempt were in active/ at each kill (the
        7 waiting for a connection stayed in incoming/), nothing is on hold, and every message arrives once."""
        provider.faults.hang = 30.0
        path = write_config(tmp_path, upstream, provider)
        spool = tmp_path / "spool"
        relay = RelayProcess(path).start()
        processes.append(relay)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            for n in range(10):
                client.sendmail("erp@legacy.local", ["c@example.com"], MESSAGE % (n, n))
        for kill in range(3):
            if kill:
                relay = RelayProcess(path).start()
                processes.append(relay)
            deadline = time.monotonic() + 15
            while (len(queue_entries(spool, "active")), len(queue_entries(spool, "incoming"))) != (3, 7):
                assert time.monotonic() < deadline, [len(queue_entries(spool, s)) for s in ("active", "incoming")]
                time.sleep(0.02)
            time.sleep(0.2)  # (the three hang at MAIL: nothing else moves)
            assert 3 == len(queue_entries(spool, "active"))
            relay.signal(signal.SIGKILL)
            relay.wait()
        active, waiting = queue_entries(spool, "active"), queue_entries(spool, "incoming")
        assert [] == queue_entries(spool, "hold")
        assert 10 == len({e.id for e in active + waiting})
        # each kill counts a crash for the three in an attempt (the last three at the next start), and a
        # restart tries the others first: no entry had two
        crashes = sorted([e.crashes + 1 for e in active] + [e.crashes for e in waiting])
        assert [0] + [1] * 9 == crashes, [(e.id, e.crashes) for e in active + waiting]

        provider.faults.hang = 0
        relay = RelayProcess(path).start()
        processes.append(relay)
        provider.wait_for(10, timeout=30)
        deadline = time.monotonic() + 10
        while any(queue_entries(spool, s) for s in ("incoming", "active", "deferred")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        relay.signal(signal.SIGTERM)
        assert relay.wait() == 0

        arrived = sorted(int(r.message["Subject"].split()[-1]) for r in provider.received)
        assert list(range(10)) == arrived
        assert queue_entries(spool, "hold") + queue_entries(spool, "failed") == []


def relay_workers(path: Path) -> int:
    return int(yaml.safe_load(path.read_text()).get("delivery", {}).get("workers", 4))


class TestStartup:
    def test_port_in_use_exits_with_startup_failure_and_delivers_nothing(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream
    ) -> None:
        """A listener that cannot bind stops relay with exit code 3 before any queued mail is sent."""
        import socket

        from relay.envelope import Outgoing
        from relay.queue.spool import Spool

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            path = write_config(tmp_path, upstream, provider, listeners=[{"address": "127.0.0.1", "port": port}])
            spool = Spool(tmp_path / "spool")
            spool.setup()
            spool.commit([Outgoing("provider", "laskutus@rakennus.fi", ("c@example.com",), MESSAGE % (1, 1))])
            result = subprocess.run(
                [sys.executable, "-m", "relay", "serve", "-c", str(path)], capture_output=True, text=True, timeout=30
            )

        failed = [json.loads(line) for line in result.stderr.splitlines() if '"relay_start_failed"' in line]
        assert 3 == result.returncode
        assert "cannot start" in result.stderr
        assert str(port) in failed[0]["error"]  # the journal's structured line says why, too
        assert [] == provider.received
        assert 1 == len(queue_entries(tmp_path / "spool", "incoming"))

    def test_a_second_daemon_on_the_same_spool_refuses_to_start(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, processes: list[RelayProcess]
    ) -> None:
        """Two daemons on one queue would requeue each other's in-flight mail: the second exits 3."""
        path = write_config(tmp_path, upstream, provider)
        first = RelayProcess(path).start()
        processes.append(first)

        second = subprocess.run(
            [sys.executable, "-m", "relay", "serve", "-c", str(path)], capture_output=True, text=True, timeout=30
        )
        smtp_send(first.port, "erp@legacy.local", ["c@example.com"], MESSAGE % (1, 1))
        provider.wait_for(1)

        assert 3 == second.returncode
        assert "another relay process is using the spool" in second.stderr
        assert [] == first.named("spool_recovered")


class NotifySocket:
    """A datagram socket standing in for systemd's ``$NOTIFY_SOCKET``: collects what relay tells it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, *, count: int = 1, timeout: float = 20) -> dict[str, str]:
        """The ``count``-th message that sets ``key`` (all its fields), waiting for it if need be."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.messages if key in m]
            if len(found) >= count:
                return found[count - 1]
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {key} #{count} within {timeout}s; got {self.messages}"
            self.sock.settimeout(min(remaining, 0.5))
            try:
                raw = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in raw.splitlines() if "=" in line))

    def keys(self) -> list[str]:
        """What relay said, in order, without the watchdog pings."""
        return [",".join(m) for m in self.messages if "WATCHDOG" not in m]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_dir() -> Any:
    with tempfile.TemporaryDirectory(prefix="relay-notify-") as folder:  # short: AF_UNIX paths max 108 bytes
        yield Path(folder)


class TestSystemdNotify:
    def test_ready_only_when_listening_then_watchdog_pings_and_stopping(
        self, tmp_path: Path, notify_dir: Path, upstream: UpstreamFactory, provider: Upstream,
        processes: list[RelayProcess],
    ) -> None:  # fmt: skip
        """1. two messages wait in the spool, the provider is down  2. relay starts with NOTIFY_SOCKET and
        WATCHDOG_USEC  3. SIGTERM. Result: READY=1 with MAINPID and a STATUS naming the port and the 2
        queued, and the port answers as soon as READY=1 arrives; WATCHDOG=1 keeps coming; STOPPING=1, exit 0."""
        from relay.envelope import Outgoing
        from relay.queue.spool import Spool

        path = write_config(tmp_path, upstream, provider, delivery={"retry_interval": 60})
        data = yaml.safe_load(path.read_text())
        data["upstreams"]["provider"]["port"] = free_port()
        path.write_text(yaml.safe_dump(data))
        spool = Spool(tmp_path / "spool")
        spool.setup()
        for n in range(2):
            spool.commit([Outgoing("provider", "laskutus@rakennus.fi", ("c@example.com",), MESSAGE % (n, n))])
        systemd = NotifySocket(str(notify_dir / "notify"))
        env = {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "200000"}
        relay = RelayProcess(path, env=env).launch()
        processes.append(relay)
        try:
            ready = systemd.wait_for("READY")
            port = int(ready["STATUS"].split(",")[0].rsplit(":", 1)[1])
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                assert 250 == client.noop()[0]
            systemd.wait_for("WATCHDOG", count=3)
            relay.signal(signal.SIGTERM)
            stopping = systemd.wait_for("STOPPING")
            code = relay.wait()
        finally:
            systemd.close()

        assert str(relay.proc.pid if relay.proc else 0) == ready["MAINPID"]
        assert ready["STATUS"].startswith("accepting on 127.0.0.1:") and ready["STATUS"].endswith(", 2 queued")
        assert "1" == stopping["STOPPING"]
        assert ["READY,MAINPID,STATUS", "STOPPING,STATUS"] == systemd.keys()
        assert 0 == code

    def test_status_follows_the_queue_and_keeps_the_last_reload_outcome(
        self, tmp_path: Path, notify_dir: Path, upstream: UpstreamFactory, provider: Upstream,
        processes: list[RelayProcess],
    ) -> None:  # fmt: skip
        """``systemctl status`` shows the queue as it is now: 1. relay starts, nothing queued, the provider
        down  2. a message is submitted  3. a broken edit + SIGHUP. Result: a STATUS= update says 1 queued,
        and later updates still say the reload was refused (RELAY_STATUS_INTERVAL shortens the 30 s)."""
        path = write_config(tmp_path, upstream, provider, delivery={"retry_interval": 60})
        data = yaml.safe_load(path.read_text())
        data["upstreams"]["provider"]["port"] = free_port()
        path.write_text(yaml.safe_dump(data))
        systemd = NotifySocket(str(notify_dir / "notify"))
        relay = RelayProcess(path, env={"NOTIFY_SOCKET": systemd.address, "RELAY_STATUS_INTERVAL": "0.2"}).launch()
        processes.append(relay)
        try:
            ready = systemd.wait_for("READY")
            port = int(ready["STATUS"].split(",")[0].rsplit(":", 1)[1])
            smtp_send(port, "erp@legacy.local", ["c@example.com"], MESSAGE % (1, 1))
            deadline = time.monotonic() + 20
            while not [m for m in systemd.messages if m.get("STATUS", "").endswith(", 1 queued")]:
                assert time.monotonic() < deadline, systemd.messages
                systemd.wait_for("STATUS", count=len([m for m in systemd.messages if "STATUS" in m]) + 1)
            path.write_text(path.read_text() + "\nbogus_key: 1\n")
            relay.signal(signal.SIGHUP)
            refused = systemd.wait_for("READY", count=2)
            later = systemd.wait_for("STATUS", count=len([m for m in systemd.messages if "STATUS" in m]) + 1)
            relay.signal(signal.SIGTERM)
            code = relay.wait()
        finally:
            systemd.close()

        assert ready["STATUS"].endswith(", 0 queued")
        assert refused["STATUS"].endswith("1 queued; reload refused, previous configuration kept")
        assert ["STATUS"] == list(later) and later["STATUS"] == refused["STATUS"]
        assert 0 == code

    def test_sighup_says_reloading_then_ready_even_when_the_new_config_is_refused(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, processes: list[RelayProcess]
    ) -> None:
        """An abstract-namespace NOTIFY_SOCKET (@name). 1. a valid edit + SIGHUP  2. a broken edit + SIGHUP.
        Result: each gives RELOADING=1 (with MONOTONIC_USEC) and then READY=1, whose STATUS says whether
        the new config is in use or the old one kept; no watchdog pings without WATCHDOG_USEC."""
        path = write_config(tmp_path, upstream, provider)
        systemd = NotifySocket(f"@relay-test-{uuid.uuid4().hex}")
        relay = RelayProcess(path, env={"NOTIFY_SOCKET": systemd.address}).launch()
        processes.append(relay)
        try:
            systemd.wait_for("READY")
            data = yaml.safe_load(path.read_text())
            data["company"]["from_name"] = "Rakennus Oyj"
            path.write_text(yaml.safe_dump(data))
            relay.signal(signal.SIGHUP)
            reloading = systemd.wait_for("RELOADING")
            reloaded = systemd.wait_for("READY", count=2)
            path.write_text(path.read_text() + "\nbogus_key: 1\n")
            relay.signal(signal.SIGHUP)
            systemd.wait_for("RELOADING", count=2)
            refused = systemd.wait_for("READY", count=3)
            relay.signal(signal.SIGTERM)
            systemd.wait_for("STOPPING")
            code = relay.wait()
        finally:
            systemd.close()

        assert abs(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000 - int(reloading["MONOTONIC_USEC"])) < 60e6
        assert reloaded["STATUS"].endswith("; configuration reloaded")
        assert refused["STATUS"].endswith("; reload refused, previous configuration kept")
        assert ["READY,MAINPID,STATUS", "RELOADING,MONOTONIC_USEC", "READY,MAINPID,STATUS",
                "RELOADING,MONOTONIC_USEC", "READY,MAINPID,STATUS", "STOPPING,STATUS"] == systemd.keys()  # fmt: skip
        assert [] == [m for m in systemd.messages if "WATCHDOG" in m]
        assert 0 == code


def _stat(path: Path) -> list[str] | None:
    """The fields of a ``/proc`` ``stat`` file after the command name (state, parent, ...), ``None`` once gone."""
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(entry / "stat")) is not None and int(stat[1]) == pid:
            found.append(int(entry.name))
    return found


def _listening(port: int) -> list[str]:
    """The processes that hold a socket listening on ``port`` (from /proc), to name them when one should not."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    holders = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) in inodes:
                command = (fd.parent.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                holders.append(f"{fd.parent.parent.name} {command}")
        except OSError:
            continue
    return holders or ["nobody listens: the connection was made to itself or the port changed hands"]


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    """Whether every thread of ``pid`` has exited (a zombie counts as gone) within ``timeout``. Every thread,
    not the process's first: killed, a process's main thread can be a zombie while another one still
    finishes a system call (an fsync is not interrupted), and that thread still holds the process's files,
    its listening sockets too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            return True
        if all((stat := _stat(task / "stat")) is None or stat[0] in ("Z", "X") for task in tasks):
            return True
        time.sleep(0.05)
    return False


class TestTwoProcesses:
    """issue 20: the listeners in a process of their own (daemon.IntakeProcess), one daemon for the admin."""

    def test_kill_9_of_the_daemon_leaves_no_process_taking_mail(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, processes: list[RelayProcess]
    ) -> None:
        relay = RelayProcess(write_config(tmp_path, upstream, provider)).start()
        processes.append(relay)
        assert relay.proc is not None
        [child] = _children(relay.proc.pid)
        smtp_send(relay.port, "erp@legacy.local", ["c@example.com"], MESSAGE % (1, 1))
        provider.wait_for(1)

        relay.signal(signal.SIGKILL)
        relay.wait()

        assert _wait_gone(child), "the intake process outlived the daemon"
        try:
            probe = socket.create_connection(("127.0.0.1", relay.port), timeout=2)
        except OSError:
            return  # refused: nobody takes mail
        probe.close()
        pytest.fail(f"port {relay.port} still takes connections: {_listening(relay.port)}")

    def test_a_dead_intake_process_is_restarted_and_mail_flows(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, processes: list[RelayProcess]
    ) -> None:
        relay = RelayProcess(write_config(tmp_path, upstream, provider)).start()
        processes.append(relay)
        assert relay.proc is not None
        [child] = _children(relay.proc.pid)

        os.kill(child, signal.SIGKILL)
        died = relay.wait_event("intake_process_died")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _children(relay.proc.pid) in ([], [child]):
            time.sleep(0.05)
        reply = ""
        while time.monotonic() < deadline and not reply:
            try:
                reply = smtp_send(relay.port, "erp@legacy.local", ["c@example.com"], MESSAGE % (1, 1))
            except (OSError, smtplib.SMTPException):  # the new one imports and reads its config first
                time.sleep(0.2)

        assert died["returncode"] == -signal.SIGKILL
        assert "queued" in reply
        provider.wait_for(1)
        relay.signal(signal.SIGTERM)
        assert relay.wait() == 0

    def test_mail_sent_while_relay_is_stopped_waits_in_the_drop_directory_and_goes_at_the_next_start(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, processes: list[RelayProcess]
    ) -> None:
        """The ops finding: relay-sendmail while relay is stopped (a restart, an upgrade) exited 75 and cron
        lost the mail. Now it waits in the drop directory, and the intake process takes it at the next start."""
        path = write_config(tmp_path, upstream, provider)
        relay = RelayProcess(path).start()
        processes.append(relay)
        port = relay.port
        relay.signal(signal.SIGTERM)
        assert relay.wait() == 0
        client = tmp_path / "client.yaml"
        client.write_text(path.read_text().replace("port: 0", f"port: {port}"))
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}

        done = subprocess.run([sys.executable, "-m", "relay", "sendmail", "-c", str(client), "-i", "c@example.com"],
                              input=b"Subject: cron output\n\nbackup done\n", capture_output=True, env=clean,
                              timeout=60, check=False)  # fmt: skip
        again = RelayProcess(path).start()
        processes.append(again)
        [got] = provider.wait_for(1)
        received = again.wait_event("received")
        again.signal(signal.SIGTERM)

        assert 0 == done.returncode, done.stderr
        assert again.wait() == 0
        assert "laskutus@rakennus.fi" == got.mail_from and ["c@example.com"] == got.rcpt_tos
        assert ("maildrop", "maildrop") == (received["via"], received["client"])
        assert ["bad"] == [p.name for p in (tmp_path / "spool" / "maildrop").iterdir()]

    def test_sighup_reaches_the_listeners(
        self, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream, processes: list[RelayProcess]
    ) -> None:
        """A reload that lowers the size limit is applied where mail is taken: the next big message gets 552."""
        path = write_config(tmp_path, upstream, provider)
        relay = RelayProcess(path).start()
        processes.append(relay)
        data = yaml.safe_load(path.read_text())
        data["limits"] = {"max_message_size": 1000}
        path.write_text(yaml.safe_dump(data))
        relay.signal(signal.SIGHUP)
        relay.wait_event("config_reloaded")
        big = MESSAGE % (1, 1) + b"x" * 2000 + b"\r\n"
        deadline = time.monotonic() + 15
        code = 250
        while time.monotonic() < deadline and code == 250:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
                client.ehlo("erp-server")
                client.mail("erp@legacy.local")
                client.rcpt("c@example.com")
                try:
                    code, _ = client.data(big)
                except smtplib.SMTPDataError as exc:
                    code = exc.smtp_code
            time.sleep(0.2)  # 250: the intake process has not re-read the file yet

        assert code == 552
        relay.signal(signal.SIGTERM)
        assert relay.wait() == 0
