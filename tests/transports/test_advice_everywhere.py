"""The daemon's ``delivery_attempt`` log and ``relay send-test`` give the same advice for the same provider
reply (README: one function gives them), and call a temporary refusal temporary (black-box findings 7, 8).

Office 365's ``550 5.7.60`` at MAIL FROM (the account may not send as that sender) got advice in send-test
and none in the log; ``454 4.7.0`` to AUTH (RFC 4954: the login service failed for now) was taken for a
wrong password: "check the username and the password", the account's mail held behind a login hold, and
send-test exit 78 ("the settings must change") where nothing needs to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiosmtpd.smtp import AuthResult
from structlog.testing import capture_logs

from relay.commands.sendtest import EX_CONFIG, EX_TEMPFAIL, Report
from relay.config.models import Config
from relay.queue.spool import State
from tests.commands.test_sendtest import _config, _provider, _run
from tests.conftest import UpstreamFactory, smtp_send, wait_for_entries
from tests.servers import RelayRunner

COMPANY = "toimisto@rakennus.fi"


def _daemon_events(config: Config, spool: Path, state: State) -> list[dict[str, Any]]:
    """The log of the daemon taking one message for the company and trying it once."""
    relay = RelayRunner(config).start()
    try:
        with capture_logs() as logs:
            smtp_send(relay.port, "erp@legacy.local", ["asiakas@example.com"], b"Subject: x\r\n\r\nx\r\n")
            wait_for_entries(spool, state)
    finally:
        relay.close()
    return logs


def _advice(report: Report) -> str:
    return report.lines[-1].removeprefix("  -> ")


def test_a_temporary_login_failure_is_temporary_in_the_log_and_in_send_test(
    upstream: UpstreamFactory, tmp_path: Path
) -> None:
    up = _provider(upstream)

    def unavailable(*_: Any) -> AuthResult:
        return AuthResult(success=False, handled=False, message="454 4.7.0 Temporary authentication failure")

    up._authenticate = unavailable  # type: ignore[method-assign]
    config, _ = _config(tmp_path, upstream.account(up, COMPANY))

    report = _run(config, "company")
    logs = _daemon_events(config, tmp_path / "spool", "deferred")

    said = _advice(report)
    assert EX_TEMPFAIL == report.code, "\n".join(report.lines)
    assert "login service" in said and "temporar" in said and "check the username" not in said, said
    [attempt] = [e for e in logs if e["event"] == "delivery_attempt"]
    assert ("deferred", 454, said) == (attempt["result"], attempt["code"], attempt.get("advice"))
    assert "refused the login" not in attempt["error"]
    assert [] == [e for e in logs if e["event"] == "login_refused_holding"]  # no wrong password to protect


def test_send_as_denied_at_mail_gets_the_same_advice_in_the_log_as_in_send_test(
    upstream: UpstreamFactory, tmp_path: Path
) -> None:
    up = _provider(upstream)
    up.faults.mail = "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
    config, _ = _config(tmp_path, upstream.account(up, COMPANY))

    report = _run(config, "company")
    logs = _daemon_events(config, tmp_path / "spool", "failed")

    said = _advice(report)
    assert EX_CONFIG == report.code
    assert "from_address" in said, said
    attempts = [e for e in logs if e["event"] == "delivery_attempt" and e["bounced"]]
    assert attempts and {said} == {e.get("advice") for e in attempts}
