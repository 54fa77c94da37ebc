"""Local SMTP AUTH logins (``relay passwd USER --login``): a checked login identifies the user (rule
``auth``), a wrong password gets 535 5.7.8 after a delay, and logins of users without a local password
are taken as before (legacy programs that insist on AUTH)."""

from __future__ import annotations

import io
import smtplib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from relay.commands import passwd
from relay.config.load import load_config
from relay.config.secretstore import FailureThrottle, hash_login, verify_login
from tests.conftest import UpstreamFactory
from tests.servers import RelayRunner, Upstream

ANNA = "anna@rakennus.fi"
LOCAL_PW = "anna-local-pw"
MESSAGE = b"From: erp@legacy.local\r\nTo: customer@example.com\r\nSubject: Lasku\r\n\r\nlasku\r\n"


@pytest.fixture
def setup(upstream: UpstreamFactory, relay_with: Callable[..., RelayRunner], tmp_path: Path) -> tuple[RelayRunner, Upstream]:
    """relay with users anna (who has a local login) and pekka (who has none)."""
    up = upstream("provider", accounts={"toimisto@rakennus.fi": "t-pw"})
    relay = relay_with(
        secret_store=str(tmp_path / "store"),
        upstreams={"provider": upstream.account(up, "toimisto@rakennus.fi")},
        company={"from_address": "toimisto@rakennus.fi", "upstream": "provider"},
        users={"anna": {"from_address": ANNA}, "pekka": {"from_address": "pekka@rakennus.fi"}},
    )
    assert 0 == passwd.run(load_config(tmp_path / "relay.yaml"), "anna", login=True, stdin=io.StringIO(LOCAL_PW + "\n"))
    return relay, up


def _send_after_login(port: int, mechanism: str, login: str, password: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("erp")
        client.user, client.password = login, password
        try:
            code, text = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"), initial_response_ok=False)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code, exc.smtp_error
        client.sendmail("erp@legacy.local", ["customer@example.com"], MESSAGE)
        return code, text


def _events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_right_password_identifies_the_user(setup: tuple[RelayRunner, Upstream], mechanism: str) -> None:
    relay, up = setup

    with capture_logs() as logs:
        code, _ = _send_after_login(relay.port, mechanism, "anna", LOCAL_PW)
        [got] = up.wait_for(1)

    assert 235 == code
    assert ANNA == got.mail_from
    [received] = _events(logs, "received")
    assert ("anna", "auth") == (received["user"], received["identified_by"])
    assert [{"client": "127.0.0.1", "user": "anna", "result": "accepted"}] == [
        {k: e[k] for k in ("client", "user", "result")} for e in _events(logs, "client_login_checked")
    ]


def test_an_address_of_the_user_is_a_login_too(setup: tuple[RelayRunner, Upstream]) -> None:
    relay, up = setup

    code, _ = _send_after_login(relay.port, "PLAIN", ANNA.upper(), LOCAL_PW)

    assert 235 == code
    assert ANNA == up.wait_for(1)[0].mail_from


def test_wrong_password_is_refused_and_logged_without_it(setup: tuple[RelayRunner, Upstream]) -> None:
    relay, up = setup

    with capture_logs() as logs:
        code, text = _send_after_login(relay.port, "PLAIN", "anna", "guess-1")

    assert (535, b"5.7.8 Authentication credentials invalid") == (code, text)
    [failed] = _events(logs, "client_login_failed")
    assert ("127.0.0.1", "anna", "anna") == (failed["client"], failed["user"], failed["login"])
    assert failed["delay"] > 0
    assert "guess-1" not in repr(logs)
    assert [] == up.received


@pytest.mark.parametrize("login", ["pekka", "old.isp.login"])
def test_a_login_without_local_password_is_taken_as_before(setup: tuple[RelayRunner, Upstream], login: str) -> None:
    """pekka has no local password, old.isp.login is nobody: both are let in and identify no one (the
    mail goes with the company defaults, as for a program that sends no AUTH at all)."""
    relay, up = setup

    code, _ = _send_after_login(relay.port, "LOGIN", login, "anything")

    assert 235 == code
    assert "toimisto@rakennus.fi" == up.wait_for(1)[0].mail_from


class TestHashes:
    def test_hash_is_salted_and_verifies(self, tmp_path: Path) -> None:
        """(The password has a '-', which base64 has not: "pw" alone was in a random hash 1 run in 50.)"""
        first, second = hash_login("pw-1"), hash_login("pw-1")
        (tmp_path / "u.login").write_text(first + "\n")

        assert first != second and "pw-1" not in first
        assert first.startswith("scrypt$16384$8$1$")
        assert verify_login(tmp_path, "u", b"pw-1") is True
        assert verify_login(tmp_path, "u", b"pW-1") is False
        assert verify_login(tmp_path, "nobody", b"pw-1") is None

    @pytest.mark.parametrize("content", ["", "plaintext-pw", "scrypt$x$8$1$AA==$AA==", "md5$1$1$1$AA==$AA=="])
    def test_a_damaged_hash_refuses_rather_than_lets_in(self, tmp_path: Path, content: str) -> None:
        (tmp_path / "u.login").write_text(content)

        assert verify_login(tmp_path, "u", b"plaintext-pw") is False


class TestThrottle:
    def test_each_failure_waits_longer_up_to_the_cap_per_client(self) -> None:
        throttle = FailureThrottle(delay=1.0, cap=3.0)

        waits = [throttle.failed("127.0.0.2") for _ in range(4)]
        other = throttle.failed("127.0.0.3")

        assert [1.0, 2.0, 3.0, 3.0] == waits
        assert 1.0 == other

    def test_failures_age_out_of_the_window_and_no_login_resets_them(self) -> None:
        throttle = FailureThrottle(delay=1.0, cap=10.0, window=0.2)
        first = [throttle.failed("127.0.0.1") for _ in range(3)]
        time.sleep(0.25)

        assert [1.0, 2.0, 3.0] == first
        assert 1.0 == throttle.failed("127.0.0.1")

    def test_remembers_a_bounded_number_of_clients(self) -> None:
        throttle = FailureThrottle(max_clients=2)
        for client in ("a", "b", "c"):
            throttle.failed(client)

        assert 1.0 == throttle.failed("a")  # forgotten: the oldest went first
