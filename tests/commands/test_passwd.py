"""``relay passwd USER``: a user's own password goes to the secret store, never into the YAML, and the
running daemon logs in with it from the next delivery, with no restart."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay.commands import cli, passwd
from relay.commands.sendtest import EX_CONFIG, EX_NOUSER
from relay.config.load import load_config
from tests.conftest import UpstreamFactory, build_config, smtp_send
from tests.servers import RelayRunner

ANNA = "anna@rakennus.fi"
MESSAGE = b"From: anna@erp.local\r\nTo: customer@example.com\r\nSubject: Lasku\r\n\r\nlasku\r\n"


def _passwd(path: Path, *args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "passwd", *args, "-c", str(path)], input=stdin,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def _sections(tmp_path: Path, company_account: dict[str, Any]) -> dict[str, Any]:
    return {
        "secret_store": str(tmp_path / "state" / "secrets"),
        "upstreams": {"provider": company_account},
        "company": {"from_address": "toimisto@rakennus.fi", "upstream": "provider"},
        "users": {
            "anna": {"addresses": "anna@erp.local", "from_address": ANNA, "upstream": {"username": ANNA}},
            "pekka": {"addresses": "pekka@erp.local"},  # sends through the company's shared account
        },
    }


class TestDaemonUsesTheNewPassword:
    def test_set_then_changed_without_restart(
        self, upstream: UpstreamFactory, relay_with: Callable[..., RelayRunner], tmp_path: Path
    ) -> None:
        """1. anna sets her password (stdin, as a script would); the provider takes only that one; her
           mail goes. 2. Her password changes at the provider and she sets the new one: the next message
           logs in again with it (the pooled login made with the old one is not reused)."""
        (tmp_path / "state").mkdir()
        up = upstream("provider", accounts={"toimisto@rakennus.fi": "t-pw", ANNA: "first-pw"})
        relay = relay_with(**_sections(tmp_path, upstream.account(up, "toimisto@rakennus.fi")))
        path = tmp_path / "relay.yaml"

        first = _passwd(path, "anna", stdin="first-pw\n")
        smtp_send(relay.port, "anna@erp.local", ["customer@example.com"], MESSAGE)
        up.wait_for(1)
        up.accounts[ANNA] = "second-pw"
        second = _passwd(path, "anna", stdin="second-pw\n")
        smtp_send(relay.port, "anna@erp.local", ["customer@example.com"], MESSAGE)
        got = up.wait_for(2)

        assert (0, 0) == (first.returncode, second.returncode), first.stderr + second.stderr
        stored = tmp_path / "state" / "secrets" / "anna.password"
        assert f"password of anna stored in {stored}" in second.stdout
        assert [ANNA, ANNA] == [m.login for m in got]
        assert [ANNA, ANNA] == up.logins  # two logins: the second message did not ride the old one
        assert [] == up.failed_logins
        assert "second-pw\n" == stored.read_text()
        assert 0o600 == stat.S_IMODE(stored.stat().st_mode)
        assert 0o700 == stat.S_IMODE(stored.parent.stat().st_mode)
        assert [] == [p.name for p in stored.parent.iterdir() if p.name.endswith(".tmp")]
        assert "first-pw" not in path.read_text() and "second-pw" not in path.read_text()


class TestUserWithoutOwnUsername:
    def test_refused_and_the_company_mailbox_keeps_its_password(
        self, upstream: UpstreamFactory, relay_with: Callable[..., RelayRunner], tmp_path: Path
    ) -> None:
        """dora's own section changes only the port, so she logs in as the company's mailbox: ``relay
        passwd dora`` is refused (78, saying what to set), nothing is stored, and her mail still logs in
        with the company's password."""
        (tmp_path / "state").mkdir()
        up = upstream("provider", accounts={"toimisto@rakennus.fi": "t-pw"})
        sections = _sections(tmp_path, upstream.account(up, "toimisto@rakennus.fi"))
        sections["users"]["dora"] = {"addresses": "dora@erp.local", "upstream": {"port": up.port}}
        relay = relay_with(**sections)

        done = _passwd(tmp_path / "relay.yaml", "dora", stdin="dora-pw\n")
        smtp_send(relay.port, "dora@erp.local", ["customer@example.com"], MESSAGE.replace(b"anna@", b"dora@"))
        [got] = up.wait_for(1)

        assert EX_CONFIG == done.returncode, done.stdout + done.stderr
        assert "users.dora.upstream gives no username of its own" in done.stderr
        assert "set users.dora.upstream.username in the config" in done.stderr
        assert "" == done.stdout
        store = tmp_path / "state" / "secrets"
        assert not (store / "dora.password").exists()
        assert [] == (sorted(p.name for p in store.iterdir()) if store.exists() else [])
        assert "toimisto@rakennus.fi" == got.login
        assert [] == up.failed_logins


class TestCommand:
    @pytest.fixture
    def config_path(self, upstream: UpstreamFactory, tmp_path: Path) -> Path:
        (tmp_path / "state").mkdir()
        up = upstream("provider", accounts={"toimisto@rakennus.fi": "t-pw"})
        _, path = build_config(tmp_path, **_sections(tmp_path, upstream.account(up, "toimisto@rakennus.fi")))
        return path

    def test_unknown_user_is_refused(self, config_path: Path) -> None:
        done = _passwd(config_path, "bob", stdin="pw\n")

        assert EX_NOUSER == done.returncode
        assert "relay passwd: no user 'bob' in the config (users: anna, pekka)\n" == done.stderr
        assert not (config_path.parent / "state" / "secrets").exists()

    def test_a_user_on_the_shared_account_is_told_how_to_get_an_own_login(self, config_path: Path) -> None:
        code = passwd.run(load_config(config_path), "pekka", stdin=io.StringIO("pw\n"))

        assert EX_CONFIG == code

    def test_a_user_on_a_shared_oauth2_account_is_not_sent_for_a_username(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The shared account signs in with OAuth2: the advice was to set a username, which then led to
        'there is no password to set'. Now it says so at once, and how the user gets a sign-in of their own."""
        secret = tmp_path / "client-secret"
        secret.write_text("s\n")
        app = {"host": "smtp.office365.com", "port": 587, "security": "starttls", "username": "toimisto@rakennus.fi",
               "auth": "oauth2", "oauth2": {"provider": "microsoft", "tenant": "rakennus.onmicrosoft.com",
                                            "client_id": "app", "client_secret_file": str(secret)}}  # fmt: skip
        config, _ = build_config(tmp_path, **_sections(tmp_path, app))

        code = passwd.run(config, "pekka", stdin=io.StringIO("pw\n"))

        assert EX_CONFIG == code
        err = capsys.readouterr().err
        assert "which signs in with OAuth2 (an app's secret, not a password): there is no password to set" in err
        assert "relay oauth login pekka" in err

    def test_empty_password_changes_nothing(self, config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        code = passwd.run(load_config(config_path), "anna", stdin=io.StringIO("\n"))

        assert 1 == code
        assert "an empty password" in capsys.readouterr().err

    def test_a_state_directory_not_made_yet_is_named_with_what_to_do(
        self, upstream: UpstreamFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """relay.service's StateDirectory= makes /var/lib/relay at the first start: ``relay passwd`` run
        before that (as root) is told which directory is missing and how to make it, not "run as root"."""
        up = upstream("provider", accounts={"toimisto@rakennus.fi": "t-pw"})
        config, _ = build_config(tmp_path, **_sections(tmp_path, upstream.account(up, "toimisto@rakennus.fi")))

        code = passwd.run(config, "anna", stdin=io.StringIO("pw\n"))

        err = capsys.readouterr().err
        assert EX_CONFIG == code
        state = tmp_path / "state"
        assert f"{state} does not exist" in err and "systemctl start relay" in err, err
        assert f"install -d -m 0750 -o relay -g relay {state}" in err
        assert "run as root" not in err

    def test_delete(self, config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = load_config(config_path)
        passwd.run(config, "anna", stdin=io.StringIO("pw\n"))

        removed = passwd.run(config, "anna", delete=True)
        again = passwd.run(config, "anna", delete=True)

        assert (0, 1) == (removed, again)
        assert not (config_path.parent / "state" / "secrets" / "anna.password").exists()

    def test_check_shows_each_source_and_warns_while_unset(
        self, config_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``relay check`` names every login's secret source; anna's is missing (a warning saying how to
        set it), then set."""
        store = config_path.parent / "state" / "secrets" / "anna.password"

        cli.main(["check", str(config_path)])
        before = capsys.readouterr()
        passwd.run(load_config(config_path), "anna", stdin=io.StringIO("pw\n"))
        capsys.readouterr()
        cli.main(["check", str(config_path)])
        after = capsys.readouterr()

        company_file = config_path.parent / "secrets" / "provider-toimisto@rakennus.fi"
        assert f"  secret: provider as toimisto@rakennus.fi: password_file {company_file}" in before.out
        assert (f"  secret: user:anna as {ANNA}: password_file {company_file}, inherited from the company's "
                f"account ({store} not set)") in before.out  # fmt: skip
        assert f"anna logs in as {ANNA} with the password of the company's account" in before.err
        assert f"  secret: user:anna as {ANNA}: secret store {store} (relay passwd)" in after.out
        assert "relay passwd anna" not in after.err
        assert os.path.exists(store)
