"""``relay send-test USER``: one test message as a user, delivered now to a real loopback provider,
and a diagnosis for each way a provider fails (connect, TLS, AUTH, sender, recipient) with its exit code."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult
from structlog.testing import capture_logs

from relay.commands.sendtest import EX_CONFIG, EX_NOUSER, EX_OK, EX_UNAVAILABLE, Report, send_test
from relay.config.models import Config
from tests.conftest import UpstreamFactory, build_config, free_port, smtp_send, wait_for_entries
from tests.oauth_servers import GraphServer, TokenServer
from tests.servers import RelayRunner, Upstream, settle
from tests.transports.test_oauth_scenarios import (
    CLIENT_SECRET,
    MAILBOX,
    SecretWriter,
    app_tokens,
    company,
    graph_account,
    smtp_account,
    xoauth2_upstream,
)  # fmt: skip

ANNA = "anna@rakennus.fi"


def _config(tmp_path: Path, account: dict[str, Any], **extra: Any) -> tuple[Config, Path]:
    return build_config(
        tmp_path,
        upstreams={"provider": account},
        company={"from_address": "toimisto@rakennus.fi", "from_name": "Rakennus Oy", "upstream": "provider",
                 "copy_to": "asiakas@example.com"},
        users={"anna": {"addresses": ANNA, "from_address": ANNA, "from_name": "Anna A", "upstream": {"username": ANNA}}},
        **extra,
    )  # fmt: skip


def _provider(upstream: UpstreamFactory, security: str = "starttls") -> Upstream:
    up = upstream("provider", security=security, accounts={"toimisto@rakennus.fi": "t-pw", ANNA: "anna-pw"})
    return up


def _run(config: Config, user: str = "anna", to: str | None = None) -> Report:
    async def main() -> Report:
        report = await send_test(config, user, to)
        await settle()
        return report

    return asyncio.run(main())


@pytest.fixture
def anna_password(tmp_path: Path) -> None:
    """Anna's own password, in the secret store, as ``relay passwd anna`` leaves it."""
    store = tmp_path / "secrets-store"
    store.mkdir(mode=0o700)
    (store / "anna.password").write_text("anna-pw\n")


def _with_store(tmp_path: Path) -> dict[str, Any]:
    return {"secret_store": str(tmp_path / "secrets-store")}


class TestAccepted:
    def test_the_message_reaches_the_provider_rewritten_like_real_mail(
        self, upstream: UpstreamFactory, tmp_path: Path, anna_password: None
    ) -> None:
        """Sent as anna through her own login (her stored password), to her own address by default, with
        her name on From; the company's copy_to is left out; the provider's reply is printed; exit 0."""
        up = _provider(upstream)
        config, _ = _config(tmp_path, upstream.account(up, "toimisto@rakennus.fi"), **_with_store(tmp_path))

        report = _run(config)

        [got] = up.wait_for(1)
        text = "\n".join(report.lines)
        assert EX_OK == report.code, text
        assert {ANNA} == set(up.logins)  # the login check, then the delivery
        assert (ANNA, [ANNA]) == (got.mail_from, got.rcpt_tos)
        assert "Anna A <anna@rakennus.fi>" == str(got.message["From"])
        assert "relay test message (anna)" == got.message["Subject"]
        assert "accepted by the provider: 250 2.0.0 OK queued upstream" in text
        assert "copy_to (asiakas@example.com) is left out" in text
        assert f"secret store {tmp_path / 'secrets-store' / 'anna.password'}" in text
        assert "anna-pw" not in text

    def test_company_defaults_and_another_recipient(self, upstream: UpstreamFactory, tmp_path: Path) -> None:
        """``company`` sends with the company defaults; ``--to`` picks the recipient."""
        up = _provider(upstream)
        config, _ = _config(tmp_path, upstream.account(up, "toimisto@rakennus.fi"))

        report = _run(config, "company", "someone@example.com")

        [got] = up.wait_for(1)
        assert EX_OK == report.code, report.lines
        assert ("toimisto@rakennus.fi", ["someone@example.com"]) == (got.mail_from, got.rcpt_tos)

    def test_to_an_idn_address(self, upstream: UpstreamFactory, tmp_path: Path) -> None:
        """``--to info@yhtiö.fi`` to a provider without SMTPUTF8: RCPT and the To header name the domain's
        A-label (the To was an RFC 2047 word inside the address, which is none)."""
        up = _provider(upstream)
        config, _ = _config(tmp_path, upstream.account(up, "toimisto@rakennus.fi"))

        report = _run(config, "company", "info@yhtiö.fi")

        [got] = up.wait_for(1)
        assert EX_OK == report.code, report.lines
        assert ["info@xn--yhti-8qa.fi"] == got.rcpt_tos
        assert b"\r\nTo: info@xn--yhti-8qa.fi\r\n" in b"\r\n" + got.content

    def test_cli_as_a_subprocess(self, upstream: UpstreamFactory, tmp_path: Path, anna_password: None) -> None:
        """``relay send-test anna --to ... -c CONFIG``: the diagnosis on stdout, exit 0."""
        up = _provider(upstream, "ssl")
        _, path = _config(tmp_path, upstream.account(up, "toimisto@rakennus.fi"), **_with_store(tmp_path))

        done = subprocess.run(
            [sys.executable, "-m", "relay", "send-test", "anna", "--to", "x@example.com", "-c", str(path)],
            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONWARNINGS": "error"},
        )  # fmt: skip

        assert EX_OK == done.returncode, done.stdout + done.stderr
        assert done.stdout.startswith("relay send-test: anna: from anna@rakennus.fi to x@example.com\n")
        assert "OK: the test message was accepted" in done.stdout
        assert ["x@example.com"] == up.wait_for(1)[0].rcpt_tos


class TestFailures:
    def test_connection_refused(self, upstream: UpstreamFactory, tmp_path: Path) -> None:
        up = _provider(upstream)
        config, _ = _config(tmp_path, {**upstream.account(up, "toimisto@rakennus.fi"), "port": free_port()})

        report = _run(config, "company")

        assert EX_UNAVAILABLE == report.code
        assert report.lines[-2].startswith("FAILED: cannot connect to the provider: cannot connect: "), report.lines
        port = config.upstreams["provider"].port
        assert f"nothing accepts connections on 127.0.0.1:{port}" in report.lines[-1]  # what to check, in words
        assert "port" in report.lines[-1] and "firewall" in report.lines[-1]

    @pytest.mark.parametrize("security", ["ssl", "starttls"])
    def test_tls_certificate_not_trusted(self, upstream: UpstreamFactory, tmp_path: Path, security: str) -> None:
        """A certificate from a CA relay does not trust (no ca_file): the certificate problem is named."""
        up = _provider(upstream, security)
        account = upstream.account(up, "toimisto@rakennus.fi")
        del account["ca_file"]
        config, _ = _config(tmp_path, account)

        report = _run(config, "company")

        text = "\n".join(report.lines)
        assert EX_UNAVAILABLE == report.code
        assert "FAILED: TLS failure: TLS certificate not trusted: " in text
        assert "set ca_file" in report.lines[-1]
        assert [] == up.received

    def test_auth_refused_with_office365_advice(self, upstream: UpstreamFactory, tmp_path: Path) -> None:
        """Office 365's 5.7.139 (SMTP AUTH disabled) is explained: switch to OAuth2."""
        up = _provider(upstream)

        def tenant_says_no(*_: Any) -> AuthResult:
            return AuthResult(success=False, handled=False, message="535 5.7.139 Authentication unsuccessful, "
                              "SmtpClientAuthentication is disabled for the Tenant.")  # fmt: skip

        up._authenticate = tenant_says_no  # type: ignore[method-assign]
        config, _ = _config(tmp_path, upstream.account(up, "toimisto@rakennus.fi"))

        report = _run(config, "company")

        assert EX_CONFIG == report.code
        assert report.lines[-2].startswith("FAILED: login refused by the provider (AUTH): login refused: 535 5.7.139")
        assert "switch this upstream to auth: oauth2" in report.lines[-1]

    def test_wrong_password(self, upstream: UpstreamFactory, tmp_path: Path) -> None:
        up = _provider(upstream)
        config, _ = _config(tmp_path, upstream.account(up, "toimisto@rakennus.fi", password="old-pw"))

        report = _run(config, "company")

        assert EX_CONFIG == report.code
        assert "FAILED: login refused by the provider (AUTH): login refused: 535 5.7.3" in "\n".join(report.lines)
        assert "old-pw" not in "\n".join(report.lines)
        assert [["PLAIN"]] == up.auth_sessions()  # one failed login, not PLAIN and then LOGIN (issue 16)
        assert ["toimisto@rakennus.fi"] == up.failed_logins

    def test_sender_refused(self, upstream: UpstreamFactory, tmp_path: Path) -> None:
        up = _provider(upstream)
        up.faults.mail = "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
        config, _ = _config(tmp_path, upstream.account(up, "toimisto@rakennus.fi"))

        report = _run(config, "company")

        assert EX_CONFIG == report.code
        assert ("FAILED: sender refused by the provider: toimisto@rakennus.fi: 550 5.7.60 SMTP; Client does not "
                "have permissions to send as this sender") == report.lines[-2]  # fmt: skip
        assert "from_address" in report.lines[-1]

    def test_recipient_refused(self, upstream: UpstreamFactory, tmp_path: Path) -> None:
        up = _provider(upstream)
        up.faults.rcpt = {"nobody@example.com": "550 5.1.1 User unknown"}
        config, _ = _config(tmp_path, upstream.account(up, "toimisto@rakennus.fi"))

        report = _run(config, "company", "nobody@example.com")

        assert EX_NOUSER == report.code
        assert "FAILED: recipient refused by the provider: nobody@example.com: 550 5.1.1 User unknown" == report.lines[-2]
        assert report.lines[-1].startswith("  -> the account and its login work")

    def test_no_stored_password_yet(self, upstream: UpstreamFactory, tmp_path: Path) -> None:
        """Anna's own login has no password anywhere yet: she is told to set it; nothing is sent."""
        up = _provider(upstream)
        account = {k: v for k, v in upstream.account(up, "toimisto@rakennus.fi").items() if k != "password_file"}
        config, _ = _config(tmp_path, account, **_with_store(tmp_path))

        report = _run(config)

        assert EX_CONFIG == report.code
        assert "(set it with: relay passwd anna)" in report.lines[-1]
        assert [] == up.logins

    def test_login_refused_with_the_company_password_says_relay_passwd(
        self, upstream: UpstreamFactory, tmp_path: Path
    ) -> None:
        """Anna's own login still uses the company's password (she has not run relay passwd): the provider
        refuses it, and the diagnosis says how to give her login its own password, not only "wrong password"."""
        up = _provider(upstream)
        config, _ = _config(tmp_path, upstream.account(up, "toimisto@rakennus.fi"), **_with_store(tmp_path))

        report = _run(config)

        text = "\n".join(report.lines)
        assert EX_CONFIG == report.code, text
        assert "FAILED: login refused by the provider (AUTH): login refused: 535" in text
        assert "inherited from the company's account" in text
        assert "relay passwd anna" in report.lines[-1]
        assert "t-pw" not in text

    def test_the_daemon_logs_the_same_advice_as_send_test(self, upstream: UpstreamFactory, tmp_path: Path) -> None:
        """Issue 16: for anna's login still on the company's password, the daemon logged "check the
        password file" while send-test said ``relay passwd anna``. One advice, from one place
        (``transports.smtp.login_advice``): the delivery_attempt and upstream_down events carry send-test's."""
        up = _provider(upstream)

        def wrong(*_: Any) -> AuthResult:  # as Postfix and many ISPs say it
            return AuthResult(success=False, handled=False, message="535 5.7.8 Error: authentication failed")

        up._authenticate = wrong  # type: ignore[method-assign]
        config, _ = _config(tmp_path, upstream.account(up, "toimisto@rakennus.fi"), **_with_store(tmp_path))
        report = _run(config)
        relay = RelayRunner(config).start()
        try:
            with capture_logs() as logs:
                smtp_send(relay.port, ANNA, ["asiakas@example.com"], b"Subject: x\r\n\r\nx\r\n")
                wait_for_entries(tmp_path / "spool", "deferred")
        finally:
            relay.close()

        said = report.lines[-1].removeprefix("  -> ")
        assert said.startswith("anna's login uses the company account's password") and "relay passwd anna" in said
        events = [e for e in logs if e["event"] in ("delivery_attempt", "upstream_down")]
        assert {"delivery_attempt", "upstream_down"} <= {e["event"] for e in events}
        assert {said} == {e.get("advice") for e in events}

    @pytest.mark.parametrize("source", ["password_credential", "password_env"])
    def test_a_secret_only_the_service_has(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
    ) -> None:
        """A systemd credential or a service environment variable (config.example.yaml's Gmail account) is
        not in the admin's shell: send-test says how to run the test where the service's secrets are,
        rather than telling an admin whose unit has LoadCredential= to add it."""
        monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
        monkeypatch.delenv("GMAIL_PW", raising=False)
        name = "gmail-app-password" if source == "password_credential" else "GMAIL_PW"
        account = {"host": "127.0.0.1", "port": free_port(), "security": "ssl", "username": "toimisto@rakennus.fi",
                   source: name}  # fmt: skip
        config, _ = _config(tmp_path, account)

        report = _run(config, "company")

        assert EX_CONFIG == report.code
        assert report.lines[-2].startswith("FAILED: the password cannot be read: "), report.lines
        hint = report.lines[-1]
        assert hint.startswith("  -> ") and "systemd-run" in hint, report.lines
        if source == "password_credential":
            assert f"-p LoadCredential={name}:" in hint
            assert "add LoadCredential= to the unit" not in "\n".join(report.lines)
        else:
            assert "-p EnvironmentFile=" in hint

    @pytest.mark.parametrize(("to", "why"), [
        ("it tuki", "not an email address: 'it tuki'"), ("a@", "not an email address: 'a@'"),
        ("a@b.example\r\nBcc: x@y.example", "must not contain line breaks or NUL characters"),  # (tracebacks, as a@ was)
    ])  # fmt: skip
    def test_to_that_is_not_an_address_is_a_usage_error(self, tmp_path: Path, to: str, why: str) -> None:
        """A typo after --to is the command line's fault (64), not the settings' (78)."""
        config, _ = _config(tmp_path, {"host": "127.0.0.1", "port": free_port()})

        report = _run(config, "company", to)

        assert 64 == report.code
        assert report.lines[-1] == f"FAILED: --to is not an address relay can send to: {why}", report.lines

    def test_unknown_user(self, tmp_path: Path) -> None:
        config, _ = _config(tmp_path, {"host": "127.0.0.1", "port": free_port()})

        report = _run(config, "bob")

        assert EX_NOUSER == report.code
        assert "no user 'bob' in the config (users: anna; or company for the company defaults)" in report.lines[-1]


def test_the_cli_prints_the_diagnosis_and_no_debug_log_lines(tmp_path: Path, secret: SecretWriter) -> None:
    """The daemon's debug events (``token_request_held`` after a failed token request) are not for the
    admin reading send-test's report: only warnings and errors of the log reach the terminal."""
    oauth = {"provider": "generic", "token_url": f"https://127.0.0.1:{free_port()}/token", "client_id": "relay",
             "client_secret_file": str(secret("app", CLIENT_SECRET))}  # fmt: skip
    _, path = _config(tmp_path, {"host": "127.0.0.1", "port": free_port(), "username": "toimisto@rakennus.fi",
                                 "auth": "oauth2", "oauth2": oauth})  # fmt: skip

    done = subprocess.run([sys.executable, "-m", "relay", "send-test", "company", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip

    assert EX_CONFIG == done.returncode, done.stdout + done.stderr
    assert "FAILED: no OAuth2 token: token endpoint" in done.stdout
    assert "token_request_held" not in done.stdout + done.stderr
    assert CLIENT_SECRET not in done.stdout + done.stderr


class TestOAuth2Accounts:
    def test_xoauth2(self, upstream: UpstreamFactory, token_server: Callable[..., TokenServer],
                     secret: SecretWriter, ca_file: Path, tmp_path: Path) -> None:  # fmt: skip
        """An Office 365-like account on XOAUTH2: the app's token, the login, the message."""
        tokens = app_tokens(token_server, roles=("SMTP.SendAsApp",))
        up = xoauth2_upstream(upstream, tokens)
        config, _ = build_config(tmp_path, upstreams={"o365": smtp_account(up, tokens, secret, ca_file)},
                                 company=company("o365"))  # fmt: skip

        report = _run(config, "company")

        text = "\n".join(report.lines)
        assert EX_OK == report.code, text
        assert "login     ok: XOAUTH2 login accepted over starttls" in text
        assert "secret    OAuth2 token (client secret from " in text
        assert [MAILBOX] == up.wait_for(1)[0].rcpt_tos
        assert CLIENT_SECRET not in text

    def test_graph(self, token_server: Callable[..., TokenServer], graph_server: Callable[..., GraphServer],
                   secret: SecretWriter, ca_file: Path, tmp_path: Path) -> None:  # fmt: skip
        tokens = app_tokens(token_server, roles=("Mail.Send",))
        graph = graph_server(tokens.valid)
        config, _ = build_config(tmp_path, upstreams={"graph": graph_account(graph, tokens, secret, ca_file)},
                                 company=company("graph"))  # fmt: skip

        report = _run(config, "company", "asiakas@example.com")

        assert EX_OK == report.code, report.lines
        assert "token received, carries Mail.Send" in report.lines[-3]
        assert "  sending   ok: accepted by the provider: 250 2.0.0 Accepted by Microsoft Graph (202)" == report.lines[-2]
        assert "asiakas@example.com" == graph.wait_for(1)[0].message["To"]

    def test_graph_without_mail_send(self, token_server: Callable[..., TokenServer],
                                     graph_server: Callable[..., GraphServer], secret: SecretWriter, ca_file: Path,
                                     tmp_path: Path) -> None:  # fmt: skip
        tokens = app_tokens(token_server, roles=("SMTP.SendAsApp",))
        graph = graph_server(tokens.valid)
        config, _ = build_config(tmp_path, upstreams={"graph": graph_account(graph, tokens, secret, ca_file)},
                                 company=company("graph"))  # fmt: skip

        report = _run(config, "company")

        assert EX_CONFIG == report.code
        assert report.lines[-2].startswith("FAILED: the OAuth2 app may not send mail: token received, but without")
        assert "Mail.Send" in report.lines[-1]
