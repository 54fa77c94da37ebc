"""``relay check`` on what a sign-in needs: one refresh token per mailbox, a certificate's own key.

Both run offline (plain ``relay check`` and ``check --startup``), through the command itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.commands import cli
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


class TestOneRefreshTokenPerMailbox:
    BOB = {"bob": {"addresses": "bob@outlook.com", "upstream": {"username": "bob@outlook.com"}}}

    def test_a_user_inheriting_a_personal_sign_in_is_an_error(self, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
        """Outlook.com: the company's refresh token logs in as the company's mailbox only, so bob's mail can never
        go (and his sign-in would have replaced the company's token): an error that names the fix."""
        path = write_config(tmp_path, delegated(tmp_path, "consumers"), self.BOB)

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
        path = write_config(tmp_path, delegated(tmp_path, "yritys.onmicrosoft.com"), self.BOB)

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

        code, out, err = check(path, capsys)

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
