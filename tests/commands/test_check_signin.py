"""``relay check`` and ``send-test`` on what a sign-in needs: one refresh token per mailbox, a certificate's
own key (both offline), a refresh token used only by who can save its replacement, and the account to sign
in again named in the advice for a revoked one."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from structlog.testing import capture_logs

from relay.commands import cli
from tests.conftest import UpstreamFactory, smtp_send
from tests.oauth_servers import TENANT, TokenServer
from tests.servers import RelayRunner
from tests.transports.test_assertions import make_certificate

MAILBOX = "yritys@outlook.com"


def write_config(tmp_path: Path, upstream: dict[str, Any], users: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "relay.yaml"
    data = {"spool_dir": str(tmp_path / "spool"), "upstreams": {"outlook": upstream},
            "company": {"upstream": "outlook", "from_address": MAILBOX}, "users": users or {}}  # fmt: skip
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def delegated(tmp_path: Path, tenant: str) -> dict[str, Any]:
    """The README's Outlook.com account (``consumers``), or an Office 365 one signed in as a person."""
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o700, exist_ok=True)
    refresh = folder / "outlook-refresh"
    refresh.write_text("rt\n")
    refresh.chmod(0o600)
    return {"host": "smtp-mail.outlook.com", "port": 587, "security": "starttls", "username": MAILBOX,
            "auth": "oauth2", "oauth2": {"provider": "microsoft", "tenant": tenant, "client_id": "public-app",
                                         "refresh_token_file": str(refresh)}}  # fmt: skip


def check(path: Path, capsys: pytest.CaptureFixture[str], *options: str) -> tuple[int, str, str]:
    code = cli.main(["check", *options, str(path)])
    out, err = capsys.readouterr()
    return code, out, err


BOB: dict[str, Any] = {"bob": {"addresses": "bob@outlook.com", "upstream": {"username": "bob@outlook.com"}}}


class TestOneRefreshTokenPerMailbox:
    def test_a_user_inheriting_a_personal_sign_in_is_an_error(self, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
        """Outlook.com: the company's refresh token logs in as the company's mailbox only, so bob's mail can never
        go (and his sign-in would have replaced the company's token): an error that names the fix."""
        path = write_config(tmp_path, delegated(tmp_path, "consumers"), BOB)

        code, out, err = check(path, capsys)

        assert 1 == code and "NOT OK (1 error(s)" in out
        assert (f"error: users.bob.upstream: bob logs in as bob@outlook.com with upstream outlook's sign-in (no oauth2: "
                f"block of its own), whose refresh_token_file {tmp_path}/secrets/outlook-refresh logs in as {MAILBOX}: "
                "a person's refresh token logs in as their own mailbox only") in err  # fmt: skip
        assert ("give bob a sign-in of their own: users.bob.upstream.oauth2 with the app (as upstream outlook's) and a "
                "refresh_token_file of bob's own, then relay oauth login bob") in err  # fmt: skip
        assert 0 == check(path, capsys, "--startup")[0]  # the company's mail still goes: the daemon starts

    def test_an_office_365_sign_in_shared_by_two_mailboxes_is_a_warning(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A delegate with Full Access to both mailboxes may log in as either: a warning, not an error."""
        path = write_config(tmp_path, delegated(tmp_path, "yritys.onmicrosoft.com"), BOB)

        code, out, err = check(path, capsys)

        assert 0 == code and "OK (" in out
        assert "warning: users.bob.upstream: bob logs in as bob@outlook.com with upstream outlook's sign-in" in err
        assert "unless that person has Full Access to both mailboxes (an Office 365 delegate)" in err

    def test_a_user_with_a_sign_in_of_their_own_or_the_same_mailbox_is_fine(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        up = delegated(tmp_path, "consumers")
        own = {**up["oauth2"], "refresh_token_file": str(tmp_path / "secrets" / "bob-refresh")}
        (tmp_path / "secrets" / "bob-refresh").write_text("rt\n")
        (tmp_path / "secrets" / "bob-refresh").chmod(0o600)
        users = {"bob": {"addresses": "bob@outlook.com", "upstream": {"username": "bob@outlook.com", "oauth2": own}},
                 "office": {"addresses": "toimisto@yritys.fi", "upstream": {"username": MAILBOX.upper()}}}  # fmt: skip
        path = write_config(tmp_path, up, users)

        code, _, err = check(path, capsys)

        assert 0 == code and "refresh_token_file" not in err, err


class TestClientKey:
    def test_the_key_of_another_certificate_is_an_error_offline(self, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
        """The certificate is loaded anyway (its thumbprint is printed): the key is compared with it offline, so
        plain relay check fails, not only --connect. --startup lets the daemon start (other accounts work)."""
        _, keys = make_certificate(tmp_path / "a", "o365")
        _, other = make_certificate(tmp_path / "b", "o365", key=rsa.generate_private_key(65537, 2048))
        app = {"host": "smtp.office365.com", "port": 587, "security": "starttls", "username": MAILBOX,
               "auth": "oauth2", "oauth2": {"provider": "microsoft", "tenant": "yritys.onmicrosoft.com",
                                            "client_id": "app", **keys, "client_key_file": other["client_key_file"]}}  # fmt: skip
        path = write_config(tmp_path, app)

        code, out, err = check(path, capsys)

        assert 1 == code and "NOT OK (1 error(s)" in out
        assert (f"error: upstreams.outlook.oauth2.client_key_file: the private key does not belong to the certificate in "
                f"{keys['client_certificate_file']} (check client_key_file): {other['client_key_file']} holds the key "
                "of another certificate") in err  # fmt: skip
        assert "certificate: outlook: thumbprint" in out
        code, out, err = check(path, capsys, "--startup")
        assert 0 == code and "warning: upstreams.outlook.oauth2.client_key_file: the private key does not belong" in err

        path = write_config(tmp_path, {**app, "oauth2": {**app["oauth2"], **keys}})  # its own key: fine
        code, _, err = check(path, capsys)
        assert 0 == code and "client_key_file" not in err, err


def outlook_account(tokens: TokenServer, refresh_file: Path, ca_file: Path, port: int) -> dict[str, Any]:
    """Outlook.com through the emulators: STARTTLS, XOAUTH2 with the token of the person who signed in."""
    return {"host": "127.0.0.1", "port": port, "security": "starttls", "ca_file": str(ca_file), "timeout": 10,
            "username": MAILBOX, "auth": "oauth2",
            "oauth2": {"provider": "microsoft", "tenant": TENANT, "client_id": "public-app", "token_url": tokens.url,
                       "refresh_token_file": str(refresh_file)}}  # fmt: skip


@pytest.fixture
def outlook_tokens(token_server: Callable[..., TokenServer]) -> TokenServer:
    """Entra with a public client, rotating refresh tokens strictly (a used one is refused: RFC 9700 4.14.2)."""
    tokens = token_server(roles=())
    tokens.clients["public-app"] = ""
    tokens.person = MAILBOX
    tokens.rotate = True
    tokens.refresh_tokens["rt-signed-in"] = "public-app"
    tokens.issued_to["rt-signed-in"] = MAILBOX
    return tokens


class TestOneShotCommandsKeepARefreshTokenTheyCannotSave:
    """``check --connect`` and ``send-test`` run by a user who cannot write the refresh token's folder: a rotated
    token could not be saved and the file's one would be used up, so the token is not used at all."""

    @pytest.mark.parametrize("command", ["check", "send-test"])
    def test_not_tried_and_the_daemons_user_named(self, outlook_tokens: TokenServer, upstream: UpstreamFactory,
                                                  ca_file: Path, command: str) -> None:  # fmt: skip
        up = upstream("outlook", security="starttls", xoauth2=outlook_tokens.valid_for)
        with tempfile.TemporaryDirectory() as folder:
            base = Path(folder)
            base.chmod(0o755)
            shutil.copy(ca_file, base / "ca.pem")
            (base / "ca.pem").chmod(0o644)
            secrets = base / "secrets"
            secrets.mkdir(mode=0o755)  # the daemon's (here root's): the one running the command cannot write it
            refresh = secrets / "outlook-refresh"
            refresh.write_text("rt-signed-in\n")
            refresh.chmod(0o644 if os.geteuid() == 0 else 0o600)
            if os.geteuid() != 0:
                secrets.chmod(0o555)
            path = write_config(base, outlook_account(outlook_tokens, refresh, base / "ca.pem", up.port))
            path.chmod(0o644)
            as_other = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
            argv = ["check", "--connect", str(path)] if command == "check" else ["send-test", "company", "-c", str(path)]

            done = subprocess.run([*as_other, sys.executable, "-m", "relay", *argv], capture_output=True, text=True,
                                  timeout=60, check=False, cwd=folder)  # fmt: skip

            secrets.chmod(0o755)
            assert "rt-signed-in\n" == refresh.read_text()
        assert [] == outlook_tokens.grants and [] == up.received  # the refresh token was not sent
        run_as = "sudo " if os.geteuid() == 0 else f"sudo -u {pwd.getpwuid(os.geteuid()).pw_name} "
        if command == "check":
            assert 1 == done.returncode, done.stderr
            assert re.search(rf"^SKIPPED outlook .* as {MAILBOX}: token: not tried: {secrets} is not writable by this "
                             r"user \(uid \d+\)", done.stdout, re.MULTILINE), done.stdout  # fmt: skip
            assert f"-> run it as the daemon's user, who can write {secrets}: {run_as}relay check --connect {path}" in done.stdout
        else:
            assert 77 == done.returncode, done.stdout + done.stderr
            assert f"FAILED: the refresh token was not used: token: not tried: {secrets} is not writable" in done.stdout
            assert f"-> run it as the daemon's user, who can write {secrets}: {run_as}relay send-test company -c {path}" in done.stdout

    def test_a_user_who_can_write_the_folder_uses_and_saves_it(self, outlook_tokens: TokenServer,
                                                               upstream: UpstreamFactory, ca_file: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
        up = upstream("outlook", security="starttls", xoauth2=outlook_tokens.valid_for)
        folder = tmp_path / "secrets"
        folder.mkdir(mode=0o700)
        refresh = folder / "outlook-refresh"
        refresh.write_text("rt-signed-in\n")
        refresh.chmod(0o600)
        path = write_config(tmp_path, outlook_account(outlook_tokens, refresh, ca_file, up.port))

        code, out, _ = check(path, capsys, "--connect")

        assert 0 == code and "XOAUTH2 login accepted" in out, out
        assert [refresh.read_text().strip()] == list(outlook_tokens.refresh_tokens)  # rotated, and saved


class TestInvalidGrantNamesTheAccount:
    """The advice for a revoked refresh token names the account to sign in again, not ``ACCOUNT``."""

    def test_check_connect_for_an_upstream_and_a_users_own_account(
        self, outlook_tokens: TokenServer, upstream: UpstreamFactory, ca_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        up = upstream("outlook", security="starttls", xoauth2=outlook_tokens.valid_for)
        folder = tmp_path / "secrets"
        folder.mkdir(mode=0o700)
        for name in ("outlook-refresh", "matti-refresh"):
            (folder / name).write_text("rt-revoked\n")
            (folder / name).chmod(0o600)
        account = outlook_account(outlook_tokens, folder / "outlook-refresh", ca_file, up.port)
        own = {**account["oauth2"], "refresh_token_file": str(folder / "matti-refresh")}
        users = {"matti": {"addresses": "matti@outlook.com", "upstream": {"username": "matti@outlook.com", "oauth2": own}}}
        path = write_config(tmp_path, account, users)

        code, out, _ = check(path, capsys, "--connect")

        assert 1 == code
        assert "sign in again with relay oauth login outlook (it writes" in out, out
        assert "sign in again with relay oauth login matti (it writes" in out and "ACCOUNT" not in out

    def test_the_daemons_upstream_down(self, outlook_tokens: TokenServer, upstream: UpstreamFactory, ca_file: Path,
                                       tmp_path: Path, relay_with: Callable[..., RelayRunner]) -> None:  # fmt: skip
        up = upstream("outlook", security="starttls", xoauth2=outlook_tokens.valid_for)
        refresh = tmp_path / "outlook-refresh"
        refresh.write_text("rt-revoked\n")
        refresh.chmod(0o600)
        with capture_logs() as logs:
            relay = relay_with(upstreams={"outlook": outlook_account(outlook_tokens, refresh, ca_file, up.port)},
                               company={"upstream": "outlook", "from_address": MAILBOX})  # fmt: skip
            smtp_send(relay.port, "erp@legacy.local", ["asiakas@example.com"], b"Subject: Lasku\r\n\r\nLasku.\r\n")
            deadline = time.monotonic() + 10
            while not [e for e in logs if e["event"] == "upstream_down"] and time.monotonic() < deadline:
                time.sleep(0.05)
            relay.stop()

        [down] = [e for e in logs if e["event"] == "upstream_down"]
        assert "invalid_grant" in down["reply"] and "relay oauth login outlook (it writes" in down["advice"]
        attempts = [e for e in logs if e["event"] == "delivery_attempt"]
        assert attempts and all("relay oauth login outlook (it writes" in e["advice"] for e in attempts)
