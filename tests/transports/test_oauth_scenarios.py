"""Issue 11 end to end: legacy client -> relay -> OAuth2 providers (XOAUTH2 SMTP, Microsoft Graph).

Every server is real and on loopback: a v2.0 token endpoint over HTTPS, an SMTP upstream that takes
only XOAUTH2 with a token that endpoint says is valid now, and a Graph sendMail server. The legacy
client is smtplib, unauthenticated, as the ERP is.
"""

from __future__ import annotations

import re
import signal
import smtplib
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from relay.commands.cli import main
from relay.config.accounts import account_for
from relay.config.load import parse_config
from relay.envelope import Account
from relay.transports.smtp import Outcome, deliver, login_advice
from relay.transports.tokens import TokenCache
from tests.conftest import UpstreamFactory, queue_entries, smtp_send
from tests.oauth_servers import GraphServer, TokenServer, graph_error, run_closing
from tests.servers import RelayRunner, Upstream, settle
from tests.test_daemon import RelayProcess
from tests.transports.test_tokens import oauth2_block

RelayFactory = Callable[..., RelayRunner]
SecretWriter = Callable[[str, str], Path]
MAILBOX = "yritys@yritys.fi"
CLIENT_SECRET = "s3cr3t-value"


def legacy(n: int, to: str = "asiakas@example.com") -> bytes:
    return f"Subject: Lasku {n}\r\nFrom: erp@legacy.local\r\nTo: {to}\r\n\r\nLasku {n} liitteena.\r\n".encode()


def xoauth2_upstream(upstream: UpstreamFactory, tokens: TokenServer) -> Upstream:
    """Office 365-like: STARTTLS, AUTH XOAUTH2 only, a token valid now with SMTP.SendAsApp for the mailbox."""
    return upstream("o365", security="starttls",
                    xoauth2=lambda user, token: user == MAILBOX and tokens.valid(token, "SMTP.SendAsApp"))  # fmt: skip


def smtp_account(up: Upstream, tokens: TokenServer, secret: SecretWriter, ca_file: Path, **oauth: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": up.port, "security": "starttls", "ca_file": str(ca_file), "timeout": 10,
            "username": MAILBOX, "auth": "oauth2", "oauth2": oauth2_block(tokens, secret, **oauth)}  # fmt: skip


def app_tokens(token_server: Callable[..., TokenServer], **options: Any) -> TokenServer:
    """The token endpoint with relay's app (``app-1``, ``CLIENT_SECRET``) registered in the tenant."""
    tokens = token_server(**options)
    tokens.clients["app-1"] = CLIENT_SECRET
    return tokens


def o365_account(up: Upstream, tokens: TokenServer, secret: SecretWriter, ca_file: Path) -> Account:
    """The resolved ``o365`` account on XOAUTH2, as delivery receives it."""
    config = parse_config(yaml.safe_dump({"upstreams": {"o365": smtp_account(up, tokens, secret, ca_file)},
                                          "company": company("o365")}))  # fmt: skip
    return account_for(config, "o365")


def graph_account(graph: GraphServer, tokens: TokenServer, secret: SecretWriter, ca_file: Path,
                  mailbox: str = MAILBOX) -> dict[str, Any]:  # fmt: skip
    return {"type": "graph", "host": "127.0.0.1", "port": graph.port, "ca_file": str(ca_file), "timeout": 10,
            "username": mailbox, "max_connections": 4, "oauth2": oauth2_block(tokens, secret)}  # fmt: skip


def company(upstream: str, **extra: Any) -> dict[str, Any]:
    return {"upstream": upstream, "from_address": MAILBOX, "from_name": "Yritys Oy", **extra}


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition()


def files_of(directory: Path) -> Iterable[bytes]:
    for path in directory.rglob("*"):
        if path.is_file():
            yield path.read_bytes()


def assert_no_secret(secrets: Iterable[str], logs: list[Any], spool: Path) -> None:
    """The secret-grep: no client secret, refresh token or access token in any log event or queue file."""
    texts = [repr(logs).encode(), *files_of(spool)]
    found = [s for s in secrets for text in texts if s.encode() in text]
    assert [] == found


class TestXOAuth2:
    def test_200_messages_across_token_expiry(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, token_server: Callable[..., TokenServer],
        secret: SecretWriter, ca_file: Path,
    ) -> None:  # fmt: skip
        """Tokens live 1 s; the provider drops every connection half way, after the first token expired.

        All 200 arrive exactly once, every XOAUTH2 login presents a valid token, and tokens are fetched
        per login, never per message.
        """
        tokens = app_tokens(token_server, lifetime=1, roles=("SMTP.SendAsApp",))
        up = xoauth2_upstream(upstream, tokens)
        relay = relay_with(upstreams={"o365": smtp_account(up, tokens, secret, ca_file)}, company=company("o365"),
                           delivery={"workers": 4})  # fmt: skip

        started = time.monotonic()
        for n in range(100):
            smtp_send(relay.port, "erp@legacy.local", [f"asiakas{n}@example.com"], legacy(n))
        up.wait_for(100, timeout=30)
        time.sleep(1.1)  # the first token has expired
        up.stop()  # the provider drops the pooled connections (as a restart or an idle cut does)
        up.start()
        for n in range(100, 200):
            smtp_send(relay.port, "erp@legacy.local", [f"asiakas{n}@example.com"], legacy(n))
        got = up.wait_for(200, timeout=30)
        elapsed = time.monotonic() - started

        assert sorted(f"asiakas{n}@example.com" for n in range(200)) == sorted(r for m in got for r in m.rcpt_tos)
        assert [] == up.failed_logins
        requests = len(tokens.grants)
        print(f"\n200 messages in {elapsed:.1f} s: {requests} token requests, {len(up.logins)} XOAUTH2 logins")
        assert 2 <= requests <= len(up.logins)

    def test_switching_the_o365_account_to_oauth2_and_reloading_sends_the_waiting_mail(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, token_server: Callable[..., TokenServer],
        secret: SecretWriter, ca_file: Path, tmp_path: Path,
    ) -> None:  # fmt: skip
        """Issue 11's promise: Office 365 stops taking passwords; mail waits; the admin switches the account to
        auth: oauth2 and reloads; the waiting mail and the next go out, and the ERP changed nothing."""
        tokens = app_tokens(token_server, roles=("SMTP.SendAsApp",))
        up = xoauth2_upstream(upstream, tokens)  # password AUTH is not offered any more
        password = {"host": "127.0.0.1", "port": up.port, "security": "starttls", "ca_file": str(ca_file),
                    "timeout": 10, "username": MAILBOX, "password_file": str(secret("o365", "old-password"))}  # fmt: skip
        relay = relay_with(upstreams={"o365": password}, company=company("o365"))
        smtp_send(relay.port, "erp@legacy.local", ["a@example.com"], legacy(1))
        wait_until(lambda: bool(queue_entries(tmp_path / "spool", "deferred")))
        assert "switch this account to auth: oauth2" in queue_entries(tmp_path / "spool", "deferred")[0].last_reply

        path = tmp_path / "relay.yaml"
        data = yaml.safe_load(path.read_text())
        data["upstreams"]["o365"] = smtp_account(up, tokens, secret, ca_file)
        path.write_text(yaml.safe_dump(data))
        relay.run(lambda daemon: daemon.request_reload())
        smtp_send(relay.port, "erp@legacy.local", ["b@example.com"], legacy(2))

        got = up.wait_for(2)
        assert ["a@example.com", "b@example.com"] == sorted(r for m in got for r in m.rcpt_tos)
        assert [MAILBOX, MAILBOX] == [m.login for m in got]

    def test_revoked_secret_waits_then_goes_when_the_file_is_fixed(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, token_server: Callable[..., TokenServer],
        secret: SecretWriter, ca_file: Path, tmp_path: Path,
    ) -> None:  # fmt: skip
        """The app's secret was replaced in Entra ID: mail is kept, one upstream_down names AADSTS7000215 and what
        to do; when the admin writes the new secret to the file, the queued mail goes, without a restart."""
        tokens = token_server(roles=("SMTP.SendAsApp",))
        tokens.clients["app-1"] = "the-new-secret-value"
        up = xoauth2_upstream(upstream, tokens)
        with capture_logs() as logs:
            relay = relay_with(upstreams={"o365": smtp_account(up, tokens, secret, ca_file)}, company=company("o365"))
            for n in range(3):
                smtp_send(relay.port, "erp@legacy.local", [f"asiakas{n}@example.com"], legacy(n))
            attempts = lambda: [e for e in logs if e["event"] == "delivery_attempt"]
            wait_until(lambda: len(attempts()) >= 6)  # every message tried at least twice
            assert [] == up.received
            secret("app-1-secret", "the-new-secret-value")
            up.wait_for(3)
            metrics = relay.run(lambda daemon: generate_latest(daemon.metrics.registry).decode())
            relay.stop()

        downs = [e for e in logs if e["event"] == "upstream_down"]
        assert 1 == len(downs)
        assert "AADSTS7000215" in downs[0]["reason"]
        assert "client secret" in downs[0]["advice"]
        assert 1 == len([e for e in logs if e["event"] == "upstream_up"])
        failures = re.search(r'relay_token_refresh_failures_total\{account="o365"\} (\d+)', metrics)
        assert failures is not None and len(tokens.refused) == int(float(failures[1]))
        deferred = [e for e in logs if e["event"] == "delivery_attempt" and e["result"] == "deferred"]
        assert deferred and all("AADSTS7000215" in e["reply"] for e in deferred)
        # the retries share a remembered refusal instead of each asking Entra again with the same secret
        assert 1 <= len(tokens.refused) < len(deferred) / 2
        assert_no_secret([CLIENT_SECRET, "the-new-secret-value", *tokens.issued], logs, tmp_path / "spool")

    def test_rotated_refresh_token_is_saved_and_nothing_secret_is_logged_or_queued(
        self, upstream: UpstreamFactory, relay_with: RelayFactory, token_server: Callable[..., TokenServer],
        secret: SecretWriter, ca_file: Path, tmp_path: Path,
    ) -> None:  # fmt: skip
        """Delegated flow with rotation: each refresh gets a new refresh token, which is in the file afterwards;
        a secret-grep over the run's logs and queue files finds none of the secrets or tokens."""
        tokens = app_tokens(token_server, lifetime=1, roles=("SMTP.SendAsApp",))
        tokens.rotate = True
        tokens.refresh_tokens["rt-first"] = "app-1"
        seen_refresh = ["rt-first"]
        up = xoauth2_upstream(upstream, tokens)
        with capture_logs() as logs:
            relay = relay_with(upstreams={"o365": smtp_account(up, tokens, secret, ca_file, refresh="rt-first")},
                               company=company("o365"))  # fmt: skip
            smtp_send(relay.port, "erp@legacy.local", ["a@example.com"], legacy(1))
            up.wait_for(1)
            seen_refresh += list(tokens.refresh_tokens)
            time.sleep(1.1)
            up.stop()
            up.start()
            smtp_send(relay.port, "erp@legacy.local", ["b@example.com"], legacy(2))
            up.wait_for(2)
            relay.stop()

        [current] = tokens.refresh_tokens
        assert current == (tmp_path / "secrets" / "app-1-refresh").read_text().strip()
        assert ["refresh_token", "refresh_token"] == tokens.grants
        assert 2 == len([e for e in logs if e["event"] == "refresh_token_rotated"])
        assert_no_secret([CLIENT_SECRET, *seen_refresh, current, *tokens.issued], logs, tmp_path / "spool")


async def settled(attempt: Coroutine[Any, Any, Outcome]) -> Outcome:
    """The attempt's outcome, once its TLS transport had the moment it needs to close (close_notify)."""
    outcome = await attempt
    await settle(0.1)
    return outcome


class TestXOAuth2Login:
    def test_a_refused_cached_token_is_replaced_once(
        self, upstream: UpstreamFactory, token_server: Callable[..., TokenServer], secret: SecretWriter, ca_file: Path
    ) -> None:
        """AUTH refused with a cached token (revoked early): dropped, a fresh one fetched, the login succeeds."""
        tokens = app_tokens(token_server, roles=("SMTP.SendAsApp",))
        up = xoauth2_upstream(upstream, tokens)
        acct = o365_account(up, tokens, secret, ca_file)
        cache = TokenCache()

        async def run() -> Outcome:
            await cache.token(acct)
            tokens.issued.clear()  # every token issued so far is revoked
            return await settled(deliver(acct, None, MAILBOX, ["a@example.com"], legacy(1), tokens=cache))

        outcome = run_closing(cache, run())

        assert "delivered" == outcome.result
        assert ["client_credentials", "client_credentials"] == tokens.grants
        assert ([MAILBOX], [MAILBOX]) == (up.failed_logins, up.logins)

    def test_a_refused_fresh_token_defers_with_what_to_do(
        self, upstream: UpstreamFactory, token_server: Callable[..., TokenServer], secret: SecretWriter, ca_file: Path
    ) -> None:
        """The app has no SMTP.SendAsApp: XOAUTH2 refused with a fresh token, the mail waits, the advice says why."""
        tokens = app_tokens(token_server, roles=("Mail.Send",))
        up = xoauth2_upstream(upstream, tokens)
        acct = o365_account(up, tokens, secret, ca_file)

        cache = TokenCache()
        outcome = run_closing(cache, settled(deliver(acct, None, MAILBOX, ["a@example.com"], legacy(1), tokens=cache)))

        assert ("deferred", True, 535) == (outcome.result, outcome.session_failed, outcome.reply[0])
        assert outcome.advice is not None and "SMTP.SendAsApp" in outcome.advice
        assert 1 == len(tokens.grants) and [MAILBOX] == up.failed_logins


    def test_a_refused_delegated_token_says_sign_in_again_not_office_365_app_setup(
        self, upstream: UpstreamFactory, token_server: Callable[..., TokenServer], secret: SecretWriter, ca_file: Path
    ) -> None:
        """Someone else signed in (the token is valid, but not for the mailbox): the advice was Office 365's app
        setup (SMTP.SendAsApp, New-ServicePrincipal) for every provider, Gmail and Outlook.com included; a
        person's token is fixed by signing in again as the mailbox, and the advice says with which command."""
        tokens = app_tokens(token_server, roles=("Mail.Send",))
        tokens.refresh_tokens["rt-someone-else"] = "app-1"
        up = xoauth2_upstream(upstream, tokens)
        config = parse_config(yaml.safe_dump({
            "upstreams": {"o365": smtp_account(up, tokens, secret, ca_file, refresh="rt-someone-else")},
            "company": company("o365")}))  # fmt: skip
        cache = TokenCache()
        outcome = run_closing(cache, settled(deliver(account_for(config, "o365"), None, MAILBOX, ["a@example.com"],
                                                     legacy(1), tokens=cache)))  # fmt: skip

        assert ("deferred", 535) == (outcome.result, outcome.reply[0])
        assert outcome.advice is not None and "SendAsApp" not in outcome.advice
        assert f"sign-in as {MAILBOX}" in outcome.advice and outcome.advice.endswith("relay oauth login o365")

    def test_before_the_first_sign_in_the_attempt_says_which_command_signs_in(
        self, upstream: UpstreamFactory, token_server: Callable[..., TokenServer], secret: SecretWriter,
        ca_file: Path, tmp_path: Path,
    ) -> None:  # fmt: skip
        """No refresh token file yet (nobody ran relay oauth login): the mail waits, and delivery_attempt and
        upstream_down carry the command (they had no advice; only the start's config_error said it, once)."""
        tokens = app_tokens(token_server, roles=("SMTP.SendAsApp",))
        up = xoauth2_upstream(upstream, tokens)
        block = smtp_account(up, tokens, secret, ca_file, refresh="rt-to-be-removed")
        Path(block["oauth2"]["refresh_token_file"]).unlink()
        config = parse_config(yaml.safe_dump({"upstreams": {"o365": block}, "company": company("o365")}))
        cache = TokenCache()
        outcome = run_closing(cache, settled(deliver(account_for(config, "o365"), None, MAILBOX, ["a@example.com"],
                                                     legacy(1), tokens=cache)))  # fmt: skip

        assert "deferred" == outcome.result and "does not exist" in (outcome.error or "")
        assert "relay oauth login o365" in (outcome.advice or "") and [] == tokens.grants

    def test_a_refused_google_service_account_is_told_about_domain_wide_delegation(
        self, secret: SecretWriter, ca_file: Path, tmp_path: Path
    ) -> None:
        key = tmp_path / "service-account.json"
        key.write_text("{}")
        config = parse_config(yaml.safe_dump({
            "upstreams": {"gmail": {"host": "127.0.0.1", "port": 2, "security": "ssl", "username": MAILBOX,
                                    "auth": "oauth2", "oauth2": {"provider": "google", "service_account_file": str(key)}}},
            "company": company("gmail")}))  # fmt: skip

        advice = login_advice(account_for(config, "gmail"), 535, "5.7.8 Username and Password not accepted")

        assert "domain-wide delegation" in advice and "SendAsApp" not in advice


class TestGraph:
    def test_bcc_copies_reach_their_recipients(
        self, relay_with: RelayFactory, token_server: Callable[..., TokenServer],
        graph_server: Callable[..., GraphServer], secret: SecretWriter, ca_file: Path,
    ) -> None:  # fmt: skip
        """Graph sends to the headers: the company's copy_to and the ERP's envelope-only recipient are in Bcc."""
        tokens = app_tokens(token_server, roles=("Mail.Send",))
        graph = graph_server(tokens.valid)
        relay = relay_with(upstreams={"graph": graph_account(graph, tokens, secret, ca_file)},
                           company=company("graph", copy_to="arkisto@yritys.fi"))  # fmt: skip

        smtp_send(relay.port, "erp@legacy.local", ["asiakas@example.com", "salainen@example.com"], legacy(1))
        [mail] = graph.wait_for(1)

        assert MAILBOX == mail.mailbox
        assert "asiakas@example.com" == mail.message["To"]
        assert {"salainen@example.com", "arkisto@yritys.fi"} == {a.strip() for a in mail.message["Bcc"].split(",")}
        assert "Yritys Oy <yritys@yritys.fi>" == mail.message["From"]

    def test_throttled_mailbox_waits_for_retry_after_and_others_are_not_slowed(
        self, relay_with: RelayFactory, token_server: Callable[..., TokenServer],
        graph_server: Callable[..., GraphServer], secret: SecretWriter, ca_file: Path,
    ) -> None:  # fmt: skip
        """429 + Retry-After: 2 for one mailbox: its mail goes after 2 s; another account's mail goes at once."""
        tokens = app_tokens(token_server, roles=("Mail.Send",))
        graph = graph_server(tokens.valid)
        graph.faults.add(MAILBOX, 429, graph_error("ApplicationThrottled", "Too many requests"), **{"Retry-After": "2"})
        relay = relay_with(
            upstreams={"busy": graph_account(graph, tokens, secret, ca_file),
                       "calm": graph_account(graph, tokens, secret, ca_file, mailbox="myynti@yritys.fi")},
            company=company("busy"),
            users={"myynti": {"addresses": "myynti@yritys.fi", "from_address": "myynti@yritys.fi", "upstream": "calm"}},
        )  # fmt: skip

        smtp_send(relay.port, "erp@legacy.local", ["a@example.com"], legacy(1))
        wait_until(lambda: any(status == 429 for _, _, status in graph.requests))
        throttled_at = time.monotonic()
        smtp_send(relay.port, "myynti@yritys.fi", ["b@example.com"], legacy(2))
        graph.wait_for(1)
        calm_after = time.monotonic() - throttled_at
        graph.wait_for(2)
        busy_after = time.monotonic() - throttled_at

        assert ["myynti@yritys.fi", MAILBOX] == [m.mailbox for m in graph.received]
        assert calm_after < 1.0 and busy_after >= 1.9
        assert [429, 202, 202] == [status for _, _, status in graph.requests]

    def test_a_retry_after_of_infinity_defers_the_mailboxs_mail_instead_of_holding_it(
        self, relay_with: RelayFactory, token_server: Callable[..., TokenServer],
        graph_server: Callable[..., GraphServer], secret: SecretWriter, ca_file: Path,
    ) -> None:  # fmt: skip
        """``Retry-After: inf`` once made the next attempt crash (OverflowError): the mail went to hold/."""
        tokens = app_tokens(token_server, roles=("Mail.Send",))
        graph = graph_server(tokens.valid)
        graph.faults.add(MAILBOX, 429, graph_error("ApplicationThrottled", "Too many requests"), **{"Retry-After": "inf"})
        relay = relay_with(upstreams={"busy": graph_account(graph, tokens, secret, ca_file)}, company=company("busy"))
        spool = Path(relay.config.spool_dir)

        smtp_send(relay.port, "erp@legacy.local", ["a@example.com"], legacy(1))

        wait_until(lambda: bool(queue_entries(spool, "deferred")))
        [entry] = queue_entries(spool, "deferred")
        assert [] == queue_entries(spool, "hold")
        assert 20 <= entry.next_attempt_at - time.time() <= 30  # the default pause, not forever, not at once
        assert "429 ApplicationThrottled" in entry.last_reply
        assert [429] == [status for _, _, status in graph.requests]

    def test_a_message_over_graphs_4_mb_is_refused_before_the_250(
        self, relay_with: RelayFactory, token_server: Callable[..., TokenServer],
        graph_server: Callable[..., GraphServer], secret: SecretWriter, ca_file: Path, tmp_path: Path,
    ) -> None:  # fmt: skip
        """The client hears 552 with the reason while it can still tell its user; nothing is queued."""
        tokens = app_tokens(token_server, roles=("Mail.Send",))
        graph = graph_server(tokens.valid)
        relay = relay_with(upstreams={"graph": graph_account(graph, tokens, secret, ca_file)}, company=company("graph"))
        big = legacy(1) + (b"y" * 998 + b"\r\n") * 3300  # 3.3 MB: 4.4 MB in base64

        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.sendmail("erp@legacy.local", ["a@example.com"], big)

        assert 552 == info.value.smtp_code
        assert b"Microsoft Graph" in info.value.smtp_error
        assert [] == queue_entries(tmp_path / "spool", "incoming") + queue_entries(tmp_path / "spool", "deferred")


class TestCheckConnect:
    def test_oauth_accounts_are_tried_step_by_step(
        self, upstream: UpstreamFactory, token_server: Callable[..., TokenServer],
        graph_server: Callable[..., GraphServer], secret: SecretWriter, ca_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """XOAUTH2 login accepted; Graph's token carries Mail.Send (or not: FAILED); a wrong secret names
        AADSTS7000215 and the fix."""
        tokens = app_tokens(token_server, roles=("SMTP.SendAsApp", "Mail.Send"))
        tokens.clients["app-2"] = "another-secret"
        smtp_only = token_server(roles=("SMTP.SendAsApp",))
        smtp_only.clients["app-3"] = CLIENT_SECRET
        up = xoauth2_upstream(upstream, tokens)
        graph = graph_server(tokens.valid)
        nosend = {**graph_account(graph, smtp_only, secret, ca_file), "oauth2": oauth2_block(smtp_only, secret, client="app-3")}
        config = {
            "spool_dir": str(tmp_path / "spool"),
            "upstreams": {
                "o365": smtp_account(up, tokens, secret, ca_file),
                "graph": graph_account(graph, tokens, secret, ca_file),
                "badsecret": smtp_account(up, tokens, secret, ca_file, client="app-2", client_secret="stale"),
                "nosend": nosend,
            },
            "company": company("o365"),
        }
        path = tmp_path / "relay.yaml"
        path.write_text(yaml.safe_dump(config))

        code = main(["check", "--connect", str(path)])

        out = capsys.readouterr().out
        assert 1 == code
        lines = {line.split()[1]: line for line in out.splitlines() if line.startswith(("ok", "FAILED"))}
        assert lines["o365"].startswith("ok") and "XOAUTH2 login accepted" in lines["o365"]
        assert lines["graph"].startswith("ok") and "Mail.Send" in lines["graph"]
        assert "without Mail.ReadWrite: messages over about 3 MB are refused (552)" in lines["graph"]
        assert "Mail.ReadWrite" in out.split(lines["graph"])[1].splitlines()[1]  # the hint line: how to grant it
        assert lines["badsecret"].startswith("FAILED") and "token refused" in lines["badsecret"]
        assert "AADSTS7000215" in lines["badsecret"]
        assert "client secret is wrong" in out
        assert lines["nosend"].startswith("FAILED") and "without Mail.Send (it has: SMTP.SendAsApp)" in lines["nosend"]
        assert "stale" not in out and CLIENT_SECRET not in out


@pytest.mark.slow
def test_secret_grep_over_a_daemon_run(
    upstream: UpstreamFactory, token_server: Callable[..., TokenServer], graph_server: Callable[..., GraphServer],
    secret: SecretWriter, ca_file: Path, tmp_path: Path, processes: list[RelayProcess],
) -> None:  # fmt: skip
    """``relay serve`` at debug level, XOAUTH2 with a rotating refresh token and Graph with a secret fixed
    while it runs: no client secret, refresh token or access token in any log line or queue file."""
    tokens = token_server(lifetime=1, roles=("SMTP.SendAsApp", "Mail.Send"))
    tokens.clients.update({"app-1": CLIENT_SECRET, "app-g": "graph-secret-new-4d2a"})
    tokens.rotate = True
    tokens.refresh_tokens["rt-daemon-first"] = "app-1"
    up = xoauth2_upstream(upstream, tokens)
    graph = graph_server(tokens.valid)
    stale = {**graph_account(graph, tokens, secret, ca_file, mailbox="myynti@yritys.fi"),
             "oauth2": oauth2_block(tokens, secret, client="app-g", client_secret="stale-graph-secret")}  # fmt: skip
    data = {
        "listeners": [{"address": "127.0.0.1", "port": 0}], "spool_dir": str(tmp_path / "spool"),
        "upstreams": {"o365": smtp_account(up, tokens, secret, ca_file, refresh="rt-daemon-first"), "graph": stale},
        "company": company("o365"),
        "users": {"myynti": {"addresses": "myynti@yritys.fi", "from_address": "myynti@yritys.fi", "upstream": "graph"}},
        "delivery": {"retry_interval": 0.2, "max_retry_interval": 0.5}, "logging": {"format": "json", "level": "debug"},
    }  # fmt: skip
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(data))
    relay = RelayProcess(path).start()
    processes.append(relay)

    smtp_send(relay.port, "erp@legacy.local", ["a@example.com"], legacy(1))
    smtp_send(relay.port, "myynti@yritys.fi", ["b@example.com"], legacy(2))
    relay.wait_event("upstream_down")
    secret("app-g-secret", "graph-secret-new-4d2a")
    time.sleep(1.1)  # the first access token expires: the next login refreshes (and rotates) again
    up.stop()
    up.start()
    smtp_send(relay.port, "erp@legacy.local", ["c@example.com"], legacy(3))
    up.wait_for(2)
    graph.wait_for(1)
    relay.signal(signal.SIGTERM)
    assert 0 == relay.wait()

    assert 2 <= len(tokens.rotated)  # the run did rotate, and did refuse the stale secret:
    [down] = relay.named("upstream_down")
    assert "graph" == down["upstream"] and "AADSTS7000215" in down["reason"]
    secrets = [CLIENT_SECRET, "graph-secret-new-4d2a", "stale-graph-secret", "rt-daemon-first", *tokens.rotated,
               *tokens.issued]  # fmt: skip
    texts = ["".join(relay.raw).encode(), *files_of(tmp_path / "spool")]
    assert [] == [s for s in secrets for text in texts if s.encode() in text]
