"""Shared fixtures: a trustme CA, provider-like upstreams, relay itself, config and secret helpers.

Example usage::

    def test_something(upstream, relay_with, smtp_send):
        up = upstream("o365", security="starttls", accounts={"a@x.fi": "pw"})
        relay = relay_with(upstreams={"o365": up.account("a@x.fi")}, company={"upstream": "o365", ...})
        smtp_send(relay.port, "erp@local", ["customer@example.com"], b"Subject: hi\\r\\n\\r\\nbody\\r\\n")
        [msg] = up.wait_for(1)
"""

from __future__ import annotations

import errno
import logging
import os
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import trustme
import yaml

from relay.config.load import parse_config
from relay.config.models import Config
from relay.queue.spool import QueueEntry, Spool, State
from tests.oauth_servers import GraphServer, TokenServer
from tests.servers import RelayRunner, Upstream


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
def secret(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a password to a 0600 file, as an admin would; return its path."""

    def write(name: str, value: str) -> Path:
        path = tmp_path / "secrets" / name
        path.parent.mkdir(exist_ok=True, mode=0o700)
        path.write_text(value + "\n")
        path.chmod(0o600)
        return path

    return write


class UpstreamFactory:
    def __init__(self, server_context: ssl.SSLContext, ca_file: Path, secret: Callable[[str, str], Path]) -> None:
        self.server_context = server_context
        self.ca_file = ca_file
        self.secret = secret
        self.started: list[Upstream] = []

    def __call__(
        self, name: str, *, security: str = "starttls", accounts: dict[str, str] | None = None,
        xoauth2: Callable[[str, str], bool] | None = None,
    ) -> Upstream:  # fmt: skip
        up = Upstream(
            name,
            security=security,
            server_context=self.server_context if security != "none" else None,
            accounts=accounts or {},
            xoauth2=xoauth2,
        ).start()
        self.started.append(up)
        return up

    def account(self, up: Upstream, username: str | None, *, password: str | None = None) -> dict[str, Any]:
        """The ``upstreams:`` entry relay needs to reach ``up`` as ``username``."""
        entry: dict[str, Any] = {"host": "127.0.0.1", "port": up.port, "security": up.security, "timeout": 10}
        if up.security != "none":
            entry["ca_file"] = str(self.ca_file)
        if username is not None:
            entry["username"] = username
            value = password if password is not None else up.accounts[username]
            entry["password_file"] = str(self.secret(f"{up.name}-{username}", value))
        return entry


@pytest.fixture
def upstream(server_context: ssl.SSLContext, ca_file: Path, secret: Callable[[str, str], Path]) -> Iterator[UpstreamFactory]:
    factory = UpstreamFactory(server_context, ca_file, secret)
    yield factory
    for up in factory.started:
        up.close()


def build_config(tmp_path: Path, **sections: Any) -> tuple[Config, Path]:
    """A config like an admin's file, with fast retries for tests; write it and parse it."""
    data: dict[str, Any] = {
        "listeners": [{"address": "127.0.0.1", "port": 0}],
        "spool_dir": str(tmp_path / "spool"),
        "delivery": {"retry_interval": 0.2, "max_retry_interval": 0.5, "workers": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp_path / "relay.yaml"
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return parse_config(text, file=str(path)), path


@pytest.fixture
def relay_with(tmp_path: Path) -> Iterator[Callable[..., RelayRunner]]:
    """Start relay (in-process, own loop) on a config built from keyword sections."""
    runners: list[RelayRunner] = []

    def start(**sections: Any) -> RelayRunner:
        config, path = build_config(tmp_path, **sections)
        runner = RelayRunner(config, config_path=path).start()
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        runner.close()


def free_port() -> int:
    """A loopback port nobody listens on (the OS picked it, it is free again): connecting is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def smtp_send(port: int, mail_from: str, rcpt_tos: list[str], content: bytes, *, host: str = "127.0.0.1") -> str:
    """Send like a legacy program: plain SMTP, no TLS, no AUTH. Return the final reply text."""
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.ehlo("erp-server")
        client.mail(mail_from)
        for rcpt in rcpt_tos:
            code, text = client.rcpt(rcpt)
            assert code == 250, (rcpt, code, text)
        code, text = client.data(content)
        assert code == 250, (code, text)
        return text.decode()


@pytest.fixture(name="smtp_send")
def smtp_send_fixture() -> Callable[..., str]:
    return smtp_send


def wait_for_entries(spool_dir: Path, state: State, timeout: float = 10.0) -> None:
    """Wait (bounded) until ``state`` holds an entry; the caller asserts on what is there."""
    deadline = time.monotonic() + timeout
    while not queue_entries(spool_dir, state) and time.monotonic() < deadline:
        time.sleep(0.05)


def queue_entries(spool_dir: Path, state: State, *, expected_count: int | None = None) -> list[QueueEntry]:
    """What is in one spool state (Mailman's ``get_queue_messages``)."""
    entries = list(Spool(spool_dir).entries(state))
    if expected_count is not None:
        assert expected_count == len(entries), [e.id for e in entries]
    return entries


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A test that runs a command in this process (``relay check``, ``relay queue``) configures logging to
    the ``sys.stderr`` pytest gave that test, a stream closed after it: a daemon a later test starts would
    then log into a closed file ("--- Logging error ---" for every event). The level goes back through
    ``setLevel``, which empties the loggers' caches of what is enabled: a reload in a test sets INFO, and
    with the level merely assigned back, aiosmtpd's ``mail.log`` kept logging INFO into later tests'
    reports (an address with a stray byte then broke pytest-xdist's report of the test)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RELAY_"):
            monkeypatch.delenv(name)


@pytest.fixture
def token_server(server_context: ssl.SSLContext) -> Iterator[Callable[..., TokenServer]]:
    """Start Microsoft-like token endpoints (HTTPS, trustme): ``token_server(lifetime=2, roles=("Mail.Send",))``."""
    started: list[TokenServer] = []

    def start(**options: Any) -> TokenServer:
        server = TokenServer(server_context, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def graph_server(server_context: ssl.SSLContext) -> Iterator[Callable[..., GraphServer]]:
    """Start Graph sendMail servers that take the tokens a ``TokenServer`` issued: ``graph_server(tokens.valid)``."""
    started: list[GraphServer] = []

    def start(valid: Callable[[str, str | None], bool], **options: Any) -> GraphServer:
        server = GraphServer(server_context, valid=valid, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def processes() -> Iterator[list[Any]]:
    """Daemons a test started as processes (``tests/test_daemon.py``'s ``RelayProcess``): killed at the
    end if still running, so no test leaves a daemon behind."""
    started: list[Any] = []
    yield started
    for process in started:
        if process.proc is not None:
            if process.proc.poll() is None:
                process.proc.kill()
            process.wait(10)


@pytest.fixture
def small_disk() -> Iterator[Callable[[Path, int], Path]]:
    """Mount a tmpfs of ``size`` bytes at a directory: a real filesystem a test can fill, as a full disk
    is met in production (``ENOSPC`` from the kernel, space given back by an unlink). Mounting needs root
    (the CI runs tests as root); elsewhere the test is skipped. Request it before ``relay_with``, so relay
    is stopped before the filesystem goes (it is unmounted lazily anyway)."""
    mounted: list[Path] = []

    def mount(path: Path, size: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small filesystem needs root")
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill_disk(directory: Path, name: str = "filler") -> Path:
    """Write a file in ``directory`` until its filesystem refuses more (``dd if=/dev/zero of=DIR/filler``)."""
    filler = directory / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    chunk = b"\0" * 65536
    try:
        while True:
            os.write(fd, chunk)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler
