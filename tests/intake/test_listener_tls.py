"""Listener TLS: programs that insist on encryption (STARTTLS, implicit TLS, TLS before AUTH) keep sending.

Real clients over loopback against relay's own listener, with certificates from a trustme CA that the
clients verify (as a workstation with the company CA installed would): smtplib, and swaks when it is
installed. The upstream is a real TLS+AUTH server; what it receives is what the client sent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from structlog.testing import capture_logs

try:
    import uvloop
except ImportError:  # the daemon then runs on asyncio's loop only
    uvloop = None  # type: ignore[assignment]

from relay.commands import cli
from relay.config import listener_tls
from relay.config.load import parse_config
from relay.errors import CertificateError, ConfigError
from tests.conftest import UpstreamFactory, build_config, queue_entries
from tests.servers import RelayRunner, Upstream

MESSAGE = b"From: erp@legacy.local\r\nTo: asiakas@example.com\r\nSubject: lasku 1\r\n\r\nLasku liitteena.\r\n"


class CertFiles:
    """A certificate and key written as an admin would install them; ``issue`` replaces them (a renewal)."""

    def __init__(self, ca: trustme.CA, folder: Path) -> None:
        self.ca = ca
        self.cert = folder / "relay.crt"
        self.key = folder / "relay.key"
        folder.mkdir(exist_ok=True)

    def issue(self, *names: str, not_after: dt.datetime | None = None) -> trustme.LeafCert:
        leaf = self.ca.issue_cert(*(names or ("127.0.0.1", "localhost")), not_after=not_after)
        leaf.private_key_pem.write_to_path(str(self.key))
        self.key.chmod(0o600)
        self.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        return leaf

    def listener(self, **extra: Any) -> dict[str, Any]:
        return {"address": "127.0.0.1", "port": 0, "tls_cert_file": str(self.cert), "tls_key_file": str(self.key),
                **extra}  # fmt: skip


@pytest.fixture
def certs(ca: trustme.CA, tmp_path: Path) -> CertFiles:
    files = CertFiles(ca, tmp_path / "tls")
    files.issue()
    return files


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """What a workstation with the company's CA installed uses: full verification, names checked."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def provider(upstream: UpstreamFactory) -> Upstream:
    return upstream("provider", security="ssl", accounts={"laskutus@rakennus.fi": "pw"})


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop if uvloop is not None else None}


@pytest.fixture(params=sorted(LOOPS))
def start(
    request: pytest.FixtureRequest, provider: Upstream, upstream: UpstreamFactory, tmp_path: Path
) -> Iterator[Callable[..., RelayRunner]]:
    """relay with the given listeners in front of a TLS+AUTH provider, on asyncio's loop and on uvloop (the
    daemon's when installed): aiosmtpd's STARTTLS moves the connection under asyncio's TLS layer by hand."""
    factory = LOOPS[request.param]
    if factory is None:
        pytest.skip("uvloop is not installed")
    runners: list[RelayRunner] = []

    def run(*listeners: dict[str, Any], **sections: Any) -> RelayRunner:
        config, path = build_config(
            tmp_path, listeners=list(listeners), company={"from_address": "laskutus@rakennus.fi", "upstream": "provider"},
            upstreams={"provider": upstream.account(provider, "laskutus@rakennus.fi")}, **sections,
        )  # fmt: skip
        runner = RelayRunner(config, config_path=path, loop_factory=factory)
        try:
            runner.start()
        except BaseException:
            runner._thread.close()  # it never served: nothing to stop
            raise
        runners.append(runner)
        return runner

    yield run
    for runner in runners:
        runner.close()


def port_of(relay: RelayRunner, index: int) -> int:
    assert relay.daemon is not None
    return relay.daemon.addresses[index][1]


def serial_seen(port: int, context: ssl.SSLContext, *, implicit: bool = False) -> int:
    """The serial number of the certificate a new connection is shown."""
    from cryptography import x509

    client = smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=10) if implicit else smtplib.SMTP(
        "127.0.0.1", port, timeout=10)  # fmt: skip
    with client:
        if not implicit:
            client.starttls(context=context)
        der = client.sock.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def leaf_serial(leaf: trustme.LeafCert) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


class TestStartTLS:
    def test_smtplib_starttls_verified_against_the_ca_delivers(
        self, certs: CertFiles, start: Callable[..., RelayRunner], provider: Upstream, client_context: ssl.SSLContext
    ) -> None:
        """EHLO offers STARTTLS; the client verifies relay's certificate (CA and name 127.0.0.1) and sends."""
        relay = start(certs.listener())
        with capture_logs() as logs, smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("erp")
            offered = dict(client.esmtp_features)
            code, _ = client.starttls(context=client_context)
            client.ehlo("erp")
            after = dict(client.esmtp_features)
            version = client.sock.version()
            client.sendmail("erp@legacy.local", ["asiakas@example.com"], MESSAGE)

        [got] = provider.wait_for(1)
        assert "starttls" in offered and "starttls" not in after
        assert code == 220
        assert version in ("TLSv1.2", "TLSv1.3")
        assert b"Lasku liitteena." in got.content
        assert [version] == [e.get("tls") for e in logs if e["event"] == "received"]

    def test_auth_is_offered_before_and_after_starttls_as_in_plain(
        self, certs: CertFiles, start: Callable[..., RelayRunner], provider: Upstream, client_context: ssl.SSLContext
    ) -> None:
        """Without require_tls nothing changes for a plain client (AUTH offered as today), and a client that
        logs in only over TLS finds AUTH after STARTTLS."""
        relay = start(certs.listener())
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("erp")
            plain = client.esmtp_features.get("auth", "")
            client.starttls(context=client_context)
            client.ehlo("erp")
            encrypted = client.esmtp_features.get("auth", "")
            login = client.login("matti", "vanha-isp-salasana")
            client.sendmail("erp@legacy.local", ["asiakas@example.com"], MESSAGE)

        provider.wait_for(1)
        assert plain.split() == encrypted.split() == ["LOGIN", "PLAIN"]
        assert login[0] == 235

    def test_second_starttls_is_refused_not_nested(
        self, certs: CertFiles, start: Callable[..., RelayRunner], client_context: ssl.SSLContext
    ) -> None:
        """RFC 3207: no STARTTLS inside TLS; relay says so (503 5.5.1) and the session goes on."""
        relay = start(certs.listener())
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.starttls(context=client_context)
            again = client.docmd("STARTTLS")
            noop = client.noop()

        assert again == (503, b"5.5.1 Error: TLS already active")
        assert noop[0] == 250

    def test_data_reader_size_limit_and_reply_sanitiser_work_inside_tls(
        self, certs: CertFiles, start: Callable[..., RelayRunner], provider: Upstream, client_context: ssl.SSLContext
    ) -> None:
        """relay's own DATA reader runs on the decrypted stream: a 300 KB message (many TLS records, the end
        marker in the last) arrives whole; one over max_message_size gets 552 after its DATA and the session
        goes on; a NUL in a command is escaped in the reply."""
        relay = start(certs.listener(), limits={"max_message_size": "400K"})
        lines = b"".join(b"%05d " % n + b"x" * 980 + b"\r\n" for n in range(300))
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.starttls(context=client_context)
            client.ehlo("erp")
            client.sendmail("erp@legacy.local", ["asiakas@example.com"], MESSAGE + lines)
            client.mail("erp@legacy.local")  # no SIZE=: the limit is found while reading
            client.rcpt("asiakas@example.com")
            too_big = client.data(MESSAGE + lines * 2)
            odd = client.docmd("RSET\x00")
            client.sendmail("erp@legacy.local", ["asiakas@example.com"], MESSAGE)

        first, second = provider.wait_for(2)
        assert lines in first.content
        assert too_big[0] == 552
        assert odd[0] == 500 and b"\\x00" in odd[1]
        assert b"Lasku liitteena." in second.content

    def test_commands_sent_with_starttls_in_clear_are_dropped(
        self, certs: CertFiles, start: Callable[..., RelayRunner], client_context: ssl.SSLContext
    ) -> None:
        """RFC 3207 5 (the CVE-2011-0411 injection): a MAIL pipelined after STARTTLS in the same packet,
        in clear, must not become the encrypted session's first command."""
        relay = start(certs.listener())
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            stream = sock.makefile("rb")
            stream.readline()  # greeting
            sock.sendall(b"EHLO erp\r\n")
            while stream.readline()[3:4] == b"-":
                pass
            sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
            ready = stream.readline()
            with client_context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                secure = tls.makefile("rb")
                tls.sendall(b"RCPT TO:<asiakas@example.com>\r\n")
                rcpt = secure.readline()

        assert ready.startswith(b"220 2.0.0")
        assert rcpt.startswith(b"503 ")  # no MAIL in this session: the injected one was dropped

    def test_a_client_that_distrusts_the_certificate_is_logged_and_released(
        self, certs: CertFiles, start: Callable[..., RelayRunner], provider: Upstream, client_context: ssl.SSLContext
    ) -> None:
        """A client without the CA refuses relay's certificate: relay logs why in words (no traceback) and
        forgets the connection, so failed handshakes never use up the client's connection limit."""
        relay = start(certs.listener(), limits={"max_connections_per_client": 2})
        with capture_logs() as logs:
            for _ in range(3):
                with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client, pytest.raises(ssl.SSLError):
                    client.starttls(context=ssl.create_default_context())  # no CA: verification fails
            deadline = time.monotonic() + 5
            while len([e for e in logs if e["event"] == "tls_handshake_failed"]) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.starttls(context=client_context)
            client.sendmail("erp@legacy.local", ["asiakas@example.com"], MESSAGE)

        provider.wait_for(1)
        failed = [e for e in logs if e["event"] == "tls_handshake_failed"]
        assert len(failed) == 3
        assert "UNKNOWN_CA" in failed[0]["error"] and "install the CA" in failed[0]["advice"]
        assert not [e for e in logs if e["event"] == "session_error"]


class TestRequireTLS:
    def test_mail_and_auth_before_starttls_get_530(self, certs: CertFiles, start: Callable[..., RelayRunner]) -> None:
        """require_tls: MAIL, RCPT, DATA and AUTH in plain get 530 5.7.0; EHLO does not offer AUTH yet;
        nothing is queued."""
        relay = start(certs.listener(require_tls=True))
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("erp")
            features = dict(client.esmtp_features)
            refused = [client.docmd(*command) for command in (("MAIL", "FROM:<erp@legacy.local>"),
                       ("RCPT", "TO:<asiakas@example.com>"), ("DATA",), ("AUTH", "PLAIN AGVycABwdw=="))]  # fmt: skip
            noop = client.noop()

        assert "starttls" in features and "auth" not in features
        assert refused == [(530, b"5.7.0 Must issue a STARTTLS command first")] * 4
        assert noop[0] == 250
        assert queue_entries(relay.config.spool_dir, "incoming") == []

    def test_client_that_logs_in_only_after_starttls(
        self, certs: CertFiles, start: Callable[..., RelayRunner], provider: Upstream, client_context: ssl.SSLContext
    ) -> None:
        """The .NET ``EnableSsl = true`` way: STARTTLS, EHLO again, AUTH (now offered), then the mail."""
        relay = start(certs.listener(require_tls=True))
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.starttls(context=client_context)
            client.ehlo("erp")
            mechanisms = client.esmtp_features["auth"].split()
            login = client.login("laskutus", "ohjelmaan-kovakoodattu")
            client.sendmail("erp@legacy.local", ["asiakas@example.com"], MESSAGE)

        provider.wait_for(1)
        assert mechanisms == ["LOGIN", "PLAIN"]
        assert login[0] == 235


class TestSendmail:
    def test_relay_sendmail_submits_to_the_listener_that_takes_plain_smtp(
        self, certs: CertFiles, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream,
        start: Callable[..., RelayRunner],
    ) -> None:  # fmt: skip
        """With TLS-only listeners first, ``relay-sendmail`` (plain SMTP) still finds the plain loopback one."""
        relay = start(certs.listener(tls="implicit"), certs.listener(require_tls=True), {"address": "127.0.0.1",
                                                                                         "port": 0})  # fmt: skip
        config = yaml.safe_load(relay.config_path.read_text())  # type: ignore[union-attr]
        config["listeners"][2]["port"] = port_of(relay, 2)
        path = tmp_path / "sendmail.yaml"
        path.write_text(yaml.safe_dump(config))
        done = subprocess.run([sys.executable, "-m", "relay", "sendmail", "-c", str(path), "asiakas@example.com"],
                              input=MESSAGE, capture_output=True, timeout=60, check=False)  # fmt: skip

        assert done.returncode == 0, done.stderr
        provider.wait_for(1)


class TestImplicitTLS:
    def test_smtp_ssl_delivers_and_no_starttls_is_offered(
        self, certs: CertFiles, start: Callable[..., RelayRunner], provider: Upstream, client_context: ssl.SSLContext
    ) -> None:
        """tls: implicit (the 465 style): TLS from the first byte, verified; EHLO offers AUTH, not STARTTLS."""
        relay = start(certs.listener(tls="implicit"))
        with smtplib.SMTP_SSL("127.0.0.1", relay.port, context=client_context, timeout=10) as client:
            client.ehlo("erp")
            features = dict(client.esmtp_features)
            starttls = client.docmd("STARTTLS")
            login = client.login("laskutus", "x")
            client.sendmail("erp@legacy.local", ["asiakas@example.com"], MESSAGE)

        [got] = provider.wait_for(1)
        assert "starttls" not in features and "auth" in features
        assert starttls[0] == 503
        assert login[0] == 235
        assert b"Lasku liitteena." in got.content

    def test_a_connection_over_the_limit_gets_its_421_inside_tls(
        self, certs: CertFiles, start: Callable[..., RelayRunner], client_context: ssl.SSLContext
    ) -> None:
        """relay's ``_handle_client`` answers 421 instead of the greeting over the connection limit; with
        implicit TLS that reply goes out encrypted, and the client can read it."""
        relay = start(certs.listener(tls="implicit"), limits={"max_connections_per_client": 1})
        with smtplib.SMTP_SSL("127.0.0.1", relay.port, context=client_context, timeout=10) as first:
            with pytest.raises(smtplib.SMTPConnectError) as refused:
                smtplib.SMTP_SSL("127.0.0.1", relay.port, context=client_context, timeout=10)
            assert first.noop()[0] == 250

        assert refused.value.smtp_code == 421
        assert b"too many connections" in refused.value.smtp_error

    def test_a_plain_client_on_the_implicit_port_does_not_stop_the_listener(
        self, certs: CertFiles, start: Callable[..., RelayRunner], provider: Upstream, client_context: ssl.SSLContext
    ) -> None:
        """A client speaking plain SMTP to the TLS port gets no greeting and is dropped; TLS clients go on."""
        relay = start(certs.listener(tls="implicit"))
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            sock.sendall(b"EHLO erp\r\nMAIL FROM:<erp@legacy.local>\r\n")
            sock.settimeout(5)
            answer = b""
            try:
                while chunk := sock.recv(4096):
                    answer += chunk
            except (ConnectionResetError, TimeoutError):
                pass
        with smtplib.SMTP_SSL("127.0.0.1", relay.port, context=client_context, timeout=10) as client:
            client.sendmail("erp@legacy.local", ["asiakas@example.com"], MESSAGE)
        deadline = time.monotonic() + 5
        while relay.run(lambda daemon: len(daemon.sessions)) and time.monotonic() < deadline:
            time.sleep(0.02)

        provider.wait_for(1)
        assert b"220" not in answer and b"250" not in answer
        assert relay.run(lambda daemon: len(daemon.sessions)) == 0  # nothing for a stop to wait 30 s for

    def test_plain_and_tls_listeners_side_by_side(
        self, certs: CertFiles, start: Callable[..., RelayRunner], provider: Upstream, client_context: ssl.SSLContext
    ) -> None:
        """The ERP keeps plain loopback on one port while workstations use implicit TLS on another."""
        relay = start({"address": "127.0.0.1", "port": 0}, certs.listener(tls="implicit"))
        with smtplib.SMTP("127.0.0.1", port_of(relay, 0), timeout=10) as plain:
            plain.ehlo("erp")
            offered = dict(plain.esmtp_features)
            plain.sendmail("erp@legacy.local", ["asiakas@example.com"], MESSAGE)
        with smtplib.SMTP_SSL("127.0.0.1", port_of(relay, 1), context=client_context, timeout=10) as client:
            client.sendmail("erp@legacy.local", ["asiakas@example.com"], MESSAGE)

        provider.wait_for(2)
        assert "starttls" not in offered


class TestReload:
    @pytest.mark.parametrize("mode", ["starttls", "implicit"])
    def test_a_renewed_certificate_is_shown_to_new_connections(
        self, mode: str, certs: CertFiles, start: Callable[..., RelayRunner], provider: Upstream,
        client_context: ssl.SSLContext,
    ) -> None:  # fmt: skip
        """Renew the files, reload: the next connection sees the new certificate, one opened before keeps
        the old and still delivers."""
        implicit = mode == "implicit"
        relay = start(certs.listener(tls=mode))
        old_serial = serial_seen(relay.port, client_context, implicit=implicit)
        before = (smtplib.SMTP_SSL("127.0.0.1", relay.port, context=client_context, timeout=10) if implicit
                  else smtplib.SMTP("127.0.0.1", relay.port, timeout=10))  # fmt: skip
        if not implicit:
            before.starttls(context=client_context)
        new_serial = leaf_serial(certs.issue())
        with capture_logs() as logs:
            relay.run(lambda daemon: daemon.request_reload())  # what SIGHUP does
            deadline = time.monotonic() + 10
            while not any(e["event"] == "config_reloaded" for e in logs) and time.monotonic() < deadline:
                time.sleep(0.02)
        seen = serial_seen(relay.port, client_context, implicit=implicit)
        with before:
            held = before.sock.getpeercert(binary_form=True)
            before.sendmail("erp@legacy.local", ["asiakas@example.com"], MESSAGE)

        provider.wait_for(1)
        assert old_serial != new_serial
        assert seen == new_serial
        from cryptography import x509

        assert held is not None and x509.load_der_x509_certificate(held).serial_number == old_serial
        loaded = [e for e in logs if e["event"] == "tls_certificate_loaded"]
        assert len(loaded) == 1 and "127.0.0.1" in loaded[0]["names"]

    def test_a_broken_renewal_is_refused_and_the_old_certificate_stays(
        self, certs: CertFiles, ca: trustme.CA, start: Callable[..., RelayRunner], client_context: ssl.SSLContext
    ) -> None:
        """A key that does not belong to the new certificate (a half-done renewal): the reload is refused
        with the reason, and clients still get the certificate that works."""
        relay = start(certs.listener())
        old_serial = serial_seen(relay.port, client_context)
        other = ca.issue_cert("127.0.0.1")
        other.cert_chain_pems[0].write_to_path(str(certs.cert))  # the new certificate, the old key
        with capture_logs() as logs:
            applied = relay._thread.call(relay.daemon.reload())  # type: ignore[union-attr]

        assert applied is False
        [refused] = [e for e in logs if e["event"] == "reload_refused"]
        assert "is not the private key of" in refused["errors"][0]
        assert serial_seen(relay.port, client_context) == old_serial

    def test_sighup_renewal_under_uvloop_in_the_real_daemon(
        self, certs: CertFiles, tmp_path: Path, upstream: UpstreamFactory, provider: Upstream,
        client_context: ssl.SSLContext,
    ) -> None:  # fmt: skip
        """``relay serve`` (uvloop's event loop when installed) with a STARTTLS and an implicit listener:
        both deliver, and after SIGHUP both show the renewed certificate."""
        from tests.test_daemon import RelayProcess

        path = tmp_path / "relay.yaml"
        path.write_text(yaml.safe_dump({
            "listeners": [certs.listener(require_tls=True), certs.listener(tls="implicit")],
            "spool_dir": str(tmp_path / "spool"),
            "upstreams": {"provider": upstream.account(provider, "laskutus@rakennus.fi")},
            "company": {"from_address": "laskutus@rakennus.fi", "upstream": "provider"},
            "logging": {"format": "json"},
        }))  # fmt: skip
        relay = RelayProcess(path).start()
        try:
            started = relay.wait_event("relay_started")
            ports = [int(listener.rsplit(":", 1)[1]) for listener in started["listeners"]]
            old = [serial_seen(ports[0], client_context), serial_seen(ports[1], client_context, implicit=True)]
            new_serial = leaf_serial(certs.issue())
            relay.signal(1)  # SIGHUP
            relay.wait_event("config_reloaded")
            new = [serial_seen(ports[0], client_context), serial_seen(ports[1], client_context, implicit=True)]
            with smtplib.SMTP("127.0.0.1", ports[0], timeout=10) as client:
                client.starttls(context=client_context)
                client.sendmail("erp@legacy.local", ["asiakas@example.com"], MESSAGE)
            with smtplib.SMTP_SSL("127.0.0.1", ports[1], context=client_context, timeout=10) as client:
                client.sendmail("erp@legacy.local", ["asiakas@example.com"], MESSAGE)
            provider.wait_for(2)
        finally:
            relay.signal(15)
            relay.wait()

        assert old[0] == old[1] != new_serial
        assert new == [new_serial, new_serial]
        assert len(relay.named("tls_certificate_loaded")) == 4  # two at start, two at the reload


def _swaks_without_tls() -> bool:
    """swaks installed without its recommended Net::SSLeay (``--no-install-recommends``) has no TLS."""
    found = subprocess.run(["swaks", "--support"], capture_output=True, text=True, timeout=30, check=False)
    return "TLS supported" not in found.stdout + found.stderr


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (apt-get install swaks)")
@pytest.mark.skipif(shutil.which("swaks") is not None and _swaks_without_tls(),
                    reason="swaks has no TLS here (apt-get install libnet-ssleay-perl)")  # fmt: skip
class TestSwaks:
    @pytest.mark.parametrize(("flag", "mode"), [("--tls", "starttls"), ("--tlsc", "implicit")])
    def test_swaks_with_certificate_verification(
        self, flag: str, mode: str, certs: CertFiles, ca_file: Path, start: Callable[..., RelayRunner],
        provider: Upstream,
    ) -> None:  # fmt: skip
        """swaks ``--tls`` (STARTTLS) and ``--tlsc`` (TLS on connect), verifying relay's certificate with the
        CA, logging in after TLS as a program with a hard-coded login does."""
        relay = start(certs.listener(tls=mode, require_tls=mode == "starttls"))
        done = subprocess.run(
            ["swaks", "--server", "127.0.0.1", "--port", str(relay.port), flag, "--tls-verify", "--tls-ca-path",
             str(ca_file), "--auth", "LOGIN", "--auth-user", "laskutus", "--auth-password", "x", "--from",
             "erp@legacy.local", "--to", "asiakas@example.com", "--header", "Subject: swaks " + flag,
             "--body", "Lasku liitteena."],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        [got] = provider.wait_for(1)
        assert b"Subject: swaks " + flag.encode() in got.content
        assert "TLS started" in done.stdout or "TLS" in done.stdout


class TestConfig:
    def _listener(self, **fields: Any) -> str:
        return yaml.safe_dump({"listeners": [{"address": "127.0.0.1", "port": 2525, **fields}],
                               "upstreams": {"p": {"host": "smtp.example.com"}}})  # fmt: skip

    @pytest.mark.parametrize(("fields", "words"), [
        ({"tls_cert_file": "/etc/relay/relay.crt"}, "tls_cert_file is set but tls_key_file is not"),
        ({"tls_key_file": "/etc/relay/relay.key"}, "tls_key_file is set but tls_cert_file is not"),
        ({"tls": "implicit"}, "tls: implicit needs tls_cert_file and tls_key_file"),
        ({"require_tls": True}, "require_tls: true needs tls_cert_file and tls_key_file"),
        ({"tls": "ssl", "tls_cert_file": "/c", "tls_key_file": "/k"}, "'starttls' or 'implicit'"),
    ])  # fmt: skip
    def test_incomplete_tls_settings_are_errors(self, fields: dict[str, Any], words: str) -> None:
        with pytest.raises(ConfigError) as error:
            parse_config(self._listener(**fields))

        assert words in str(error.value)
        assert "listeners[0]" in str(error.value) or "listeners.0" in str(error.value)

    def test_tls_mode_follows_the_certificate(self) -> None:
        plain = parse_config(self._listener()).listeners[0]
        starttls = parse_config(self._listener(tls_cert_file="/c", tls_key_file="/k")).listeners[0]
        implicit = parse_config(self._listener(tls_cert_file="/c", tls_key_file="/k", tls="implicit")).listeners[0]

        assert (plain.tls_mode, starttls.tls_mode, implicit.tls_mode) == (None, "starttls", "implicit")

    def test_a_missing_key_stops_the_daemon_at_start_naming_it(
        self, certs: CertFiles, start: Callable[..., RelayRunner]
    ) -> None:
        certs.key.unlink()
        with pytest.raises(CertificateError) as error:
            start(certs.listener())

        assert f"listener 127.0.0.1:0: tls_key_file {certs.key} does not exist" == str(error.value)

    def test_the_certificate_path_may_change_on_reload_the_mode_may_not(self, certs: CertFiles) -> None:
        from relay.daemon import _restart_only_changes

        base = parse_config(_with_listeners([certs.listener()]))
        moved = parse_config(_with_listeners([certs.listener(tls_cert_file="/etc/relay/new.crt")]))
        implicit = parse_config(_with_listeners([certs.listener(tls="implicit")]))
        plain = parse_config(_with_listeners([{"address": "127.0.0.1", "port": 0}]))

        assert _restart_only_changes(base, moved) == []
        assert _restart_only_changes(base, implicit) == ["listeners"]
        assert _restart_only_changes(base, plain) == ["listeners"]


class TestCheck:
    def check(self, tmp_path: Path, capsys: pytest.CaptureFixture[str], *listeners: dict[str, Any],
              **top: Any) -> tuple[int, str]:  # fmt: skip
        path = tmp_path / "relay.yaml"
        path.write_text(yaml.safe_dump({"listeners": list(listeners), "spool_dir": str(tmp_path / "spool"),
                                        "upstreams": {"p": {"host": "smtp.example.com"}}, **top}))  # fmt: skip
        code = cli.main(["check", str(path)])
        return code, capsys.readouterr().err

    def test_a_good_certificate_checks_clean(
        self, certs: CertFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, err = self.check(tmp_path, capsys, certs.listener())

        assert code == 0
        assert [line for line in err.splitlines() if line.lstrip().startswith(("warning:", "error:"))] == []

    def test_a_missing_key_is_an_error_with_its_line(
        self, certs: CertFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        certs.key.unlink()
        code, err = self.check(tmp_path, capsys, certs.listener())

        assert code == 1
        assert f"error: listeners[0].tls_key_file: tls_key_file {certs.key} does not exist" in err
        assert "relay.yaml:5)" in err

    def test_an_unreadable_key_is_an_error(
        self, certs: CertFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Checked as the user that runs the check (relay's own, with sudo -u relay): as root the key is made
        root's own and the check runs in a child that has become nobody."""
        if os.geteuid() != 0:
            certs.key.chmod(0)
            code, err = self.check(tmp_path, capsys, certs.listener())
            assert code == 1, err
            assert "cannot be read by this user (uid" in err and "tls_key_file" in err
            return
        folder = Path(tempfile.mkdtemp(prefix="relay-tls-"))  # outside pytest's 0700 tree: nobody reaches it
        try:
            folder.chmod(0o755)
            shutil.copy(certs.cert, folder / "relay.crt")
            shutil.copy(certs.key, folder / "relay.key")  # root's alone (0600)
            (folder / "relay.crt").chmod(0o644)
            report = self._check_as_nobody(folder / "relay.crt", folder / "relay.key")
        finally:
            shutil.rmtree(folder)

        assert report == f"tls_key_file|True|tls_key_file {folder / 'relay.key'} cannot be read by this user (uid " \
                         "65534): relay reads it as its own user; give that user read access (e.g. chgrp relay and " \
                         "chmod 640)"

    @staticmethod
    def _check_as_nobody(cert: Path, key: Path) -> str:
        """``listener_tls.check`` in a child process that has become nobody; its findings, one per line."""
        listener = parse_config(_with_listeners([{"address": "127.0.0.1", "port": 2525, "tls_cert_file": str(cert),
                                                  "tls_key_file": str(key)}])).listeners[0]  # fmt: skip
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover (runs in the child)
            try:  # whatever happens, the child never returns into pytest
                os.setgid(65534)
                os.setuid(65534)
                found = listener_tls.check(listener, "127.0.0.1")
                os.write(write, "\n".join(f"{f.key}|{f.error}|{f.message}" for f in found).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            report = pipe.read().decode()
        os.waitpid(child, 0)
        return report

    def test_a_key_that_is_not_the_certificates_is_an_error(
        self, certs: CertFiles, ca: trustme.CA, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(certs.key))
        code, err = self.check(tmp_path, capsys, certs.listener())

        assert code == 1
        assert "is not the private key of tls_cert_file" in err

    def test_an_encrypted_key_is_an_error_and_never_asks_for_a_passphrase(
        self, certs: CertFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(certs.key.read_bytes(), password=None)
        certs.key.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"salainen"),
        ))  # fmt: skip
        code, err = self.check(tmp_path, capsys, certs.listener())

        assert code == 1
        assert "is encrypted (has a passphrase)" in err
        with pytest.raises(CertificateError):
            listener_tls.server_context(certs.cert, certs.key)

    def test_a_certificate_expiring_within_30_days_is_a_warning(
        self, certs: CertFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=12)
        certs.issue("127.0.0.1", not_after=soon)
        code, err = self.check(tmp_path, capsys, certs.listener())

        assert code == 0
        assert f"expires on {soon:%Y-%m-%d} (in 11 day(s))" in err or f"expires on {soon:%Y-%m-%d} (in 12 day(s))" in err

    def test_an_expired_certificate_is_a_warning(self, certs: CertFiles) -> None:
        listener = parse_config(_with_listeners([certs.listener()])).listeners[0]
        later = dt.datetime(3000, 1, 2, tzinfo=dt.UTC)  # trustme's certificates end with 2999

        [finding] = listener_tls.check(listener, "127.0.0.1", now=later)
        assert not finding.error and "expired on" in finding.message

    def test_a_certificate_for_other_names_is_a_warning_naming_both(
        self, certs: CertFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        certs.issue("mail.example.com")
        code, err = self.check(tmp_path, capsys, certs.listener(hostname="relay.rakennus.fi"))

        assert code == 0
        assert "is not valid for relay.rakennus.fi or 127.0.0.1 or localhost (it names mail.example.com)" in err

    @pytest.mark.parametrize(("names", "hostname"), [
        (("relay.rakennus.fi",), "relay.rakennus.fi"),
        (("*.rakennus.fi",), "relay.rakennus.fi"),
        (("RELAY.Rakennus.FI",), "relay.rakennus.fi."),
    ])  # fmt: skip
    def test_the_configured_name_is_enough(self, certs: CertFiles, names: tuple[str, ...], hostname: str) -> None:
        certs.issue(*names)
        listener = parse_config(_with_listeners([certs.listener(hostname=hostname)])).listeners[0]

        assert listener_tls.check(listener, hostname) == []

    def test_a_wildcard_covers_one_label_only(self, certs: CertFiles) -> None:
        certs.issue("*.rakennus.fi")
        listener = parse_config(_with_listeners([certs.listener()])).listeners[0]

        [finding] = listener_tls.check(listener, "a.relay.rakennus.fi")
        assert "is not valid for" in finding.message

    def test_a_key_others_can_read_and_a_port_mixup_are_warnings(
        self, certs: CertFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        certs.key.chmod(0o644)
        code, err = self.check(tmp_path, capsys, {**certs.listener(tls="implicit"), "port": 587})

        assert code == 0
        assert "can be read by every user on this machine (mode 0644)" in err
        assert "port 587 speaks STARTTLS (tls: starttls)" in err



def _with_listeners(listeners: list[dict[str, Any]]) -> str:
    return yaml.safe_dump({"listeners": listeners, "upstreams": {"p": {"host": "smtp.example.com"}}})
