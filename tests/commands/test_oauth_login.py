"""``relay oauth login`` against loopback emulators of Microsoft's and Google's sign-in endpoints (issue 18).

The emulators (tests/oauth_servers.py) check what the real services check: PKCE S256 and ``state`` at
``authorize``, the verifier at the code's redemption, the device code's polling interval, expiry and
refusals. The "browser" is httpx following the authorization address to the emulator, which answers
with the redirect a real sign-in ends with, then to relay's loopback listener.
"""

from __future__ import annotations

import io
import os
import re
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import yaml

from relay.commands import oauthlogin
from relay.config.load import parse_config
from relay.config.models import Config
from tests.conftest import UpstreamFactory, free_port, smtp_send
from tests.oauth_servers import PERSONAL_TENANT_ID, TENANT, TokenServer
from tests.servers import RelayRunner

MAILBOX = "yritys@outlook.com"
PUBLIC_APP = "public-app"
TokenServerFactory = Callable[..., TokenServer]


class Lines(io.StringIO):
    """An output stream a test can wait on, line by line, while the command runs in another thread."""

    def __init__(self) -> None:
        self.text = ""
        self._changed = threading.Condition()

    def write(self, data: str) -> int:
        with self._changed:
            self.text += data
            self._changed.notify_all()
        return len(data)

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while (found := re.search(pattern, self.text, re.MULTILINE)) is None:
                left = deadline - time.monotonic()
                assert left > 0, f"no {pattern!r} in {self.text!r}"
                self._changed.wait(left)
        return found


@pytest.fixture
def tokens(token_server: TokenServerFactory) -> TokenServer:
    """Entra with a public client app (Outlook.com: personal accounts, public client flows allowed)."""
    server = token_server(roles=())
    server.clients[PUBLIC_APP] = ""
    server.person = MAILBOX
    return server


def oauth_block(tokens: TokenServer, refresh_file: Path | None, **extra: Any) -> dict[str, Any]:
    block: dict[str, Any] = {"provider": "microsoft", "tenant": TENANT, "client_id": PUBLIC_APP, "token_url": tokens.url}
    if refresh_file is not None:
        block["refresh_token_file"] = str(refresh_file)
    return {**block, **extra}


def outlook(tokens: TokenServer, refresh_file: Path | None, ca_file: Path, *, port: int = 1, **extra: Any) -> dict[str, Any]:
    """The Outlook.com upstream of the README: starttls, XOAUTH2 with a delegated token."""
    return {"host": "127.0.0.1", "port": port, "security": "starttls", "ca_file": str(ca_file), "timeout": 10,
            "username": MAILBOX, "auth": "oauth2", "oauth2": oauth_block(tokens, refresh_file, **extra)}  # fmt: skip


def config_of(tmp_path: Path, **upstreams: dict[str, Any]) -> Config:
    data = {"spool_dir": str(tmp_path / "spool"), "upstreams": upstreams,
            "company": {"upstream": next(iter(upstreams)), "from_address": MAILBOX}}  # fmt: skip
    return parse_config(yaml.safe_dump(data))


@pytest.fixture
def refresh_file(tmp_path: Path) -> Path:
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / "outlook-refresh"


def login(config: Config, name: str = "outlook", **options: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = oauthlogin.run(config, name, out=out, err=err, **options)
    return code, out.getvalue(), err.getvalue()


def secrets_of(server: TokenServer) -> list[str]:
    """Everything a sign-in handed out that must never be shown: codes, device codes, every token."""
    return [*server.device_codes, *server.all_codes, *server.refresh_tokens, *server.issued]


def assert_nothing_secret(server: TokenServer, *texts: str, verifiers: tuple[str, ...] = ()) -> None:
    found = [s for s in [*secrets_of(server), *verifiers] for text in texts if s in text]
    assert [] == found


@pytest.fixture
def fast_slow_down(monkeypatch: pytest.MonkeyPatch, tokens: TokenServer) -> float:
    """RFC 8628's 5 s per slow_down, shortened on both sides so the test takes a second, not ten."""
    monkeypatch.setattr(oauthlogin, "SLOW_DOWN_STEP", 0.3)
    tokens.slow_down_step = 0.3
    return 0.3


class TestDevice:
    def test_pending_then_slow_down_then_signed_in(
        self, tokens: TokenServer, refresh_file: Path, ca_file: Path, tmp_path: Path, fast_slow_down: float
    ) -> None:
        """Polls at the interval given, slower after slow_down (the emulator would answer slow_down again to a
        poll that came too soon), and saves the refresh token the sign-in gave, 0600."""
        tokens.device_script = ["pending", "slow_down", "ok"]
        config = config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file))

        code, out, err = login(config, flow="device")

        assert (0, "") == (code, err)
        assert ["pending", "slow_down", "ok"] == [step for _, step in tokens.device_polls]
        times = [at for at, _ in tokens.device_polls]
        assert times[2] - times[1] >= tokens.device_interval + fast_slow_down - 0.05
        [refresh] = tokens.refresh_tokens
        assert refresh == refresh_file.read_text().strip() and MAILBOX == tokens.issued_to[refresh]
        assert 0o600 == stat.S_IMODE(refresh_file.stat().st_mode)
        assert re.search(rf"open https://127\.0\.0\.1:{tokens.port}/devicelogin and enter the code [A-Z0-9]{{9}}", out)
        assert f"Signed in as {MAILBOX}." in out
        assert f"Refresh token saved to {refresh_file} (mode 0600" in out
        assert_nothing_secret(tokens, out, err)

    def test_declined_leaves_the_old_file_as_it_was(
        self, tokens: TokenServer, refresh_file: Path, ca_file: Path, tmp_path: Path
    ) -> None:
        refresh_file.write_text("the-old-refresh-token\n")
        tokens.device_script = ["pending", "declined"]
        config = config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file))

        code, _, err = login(config)  # device is microsoft's default

        assert 77 == code
        assert "declined (authorization_declined" in err and "nothing was written" in err
        assert "the-old-refresh-token\n" == refresh_file.read_text()
        assert ["outlook-refresh"] == os.listdir(refresh_file.parent)  # no temp file left either

    def test_expired_by_the_provider(self, tokens: TokenServer, refresh_file: Path, ca_file: Path, tmp_path: Path) -> None:
        tokens.device_script = ["pending", "expired"]
        code, _, err = login(config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file)))

        assert 77 == code and "expired" in err and not refresh_file.exists()

    def test_relay_stops_at_expires_in(self, tokens: TokenServer, refresh_file: Path, ca_file: Path, tmp_path: Path) -> None:
        """Nobody signs in: relay gives up when the code expires, without waiting for the provider to say so."""
        tokens.device_script = ["pending"]
        tokens.device_lifetime = 0.6
        started = time.monotonic()
        code, _, err = login(config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file)))

        assert 77 == code and "the code expired" in err
        assert time.monotonic() - started < 2
        assert {"pending"} == {step for _, step in tokens.device_polls} and not refresh_file.exists()

    def test_google_is_told_to_use_the_browser(self, tokens: TokenServer, refresh_file: Path, ca_file: Path,
                                               tmp_path: Path) -> None:  # fmt: skip
        up = {**outlook(tokens, refresh_file, ca_file), "oauth2": {"provider": "google", "client_id": "g",
              "client_secret_file": str(refresh_file.parent / "g-secret"), "refresh_token_file": str(refresh_file)}}  # fmt: skip
        code, _, err = login(config_of(tmp_path, outlook=up), flow="device")

        assert 64 == code and "--flow browser" in err and "device flow" in err


def follow(url: str, ca_file: Path, *, state: str | None = None) -> tuple[httpx.Response, str]:
    """A browser: the authorization address, then the provider's redirect to relay's loopback listener
    (with ``state`` replaced when given, as a forged redirect would carry)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with httpx.Client(verify=context) as web:
        signed_in = web.get(url)
    assert 302 == signed_in.status_code, signed_in.text
    location = signed_in.headers["location"]
    if state is not None:
        parts = urlsplit(location)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()} | {"state": state}
        location = parts._replace(query=urlencode(query)).geturl()
    return httpx.get(location, timeout=10), location


class Running:
    """``relay oauth login`` in a thread, its output watched line by line."""

    def __init__(self, config: Config, name: str = "outlook", **options: Any) -> None:
        self.out, self.err = Lines(), Lines()
        self.code: int | None = None
        self._thread = threading.Thread(target=self._run, args=(config, name), kwargs=options, daemon=True)
        self._thread.start()

    def _run(self, config: Config, name: str, **options: Any) -> None:
        self.code = oauthlogin.run(config, name, out=self.out, err=self.err, **options)

    def url(self) -> str:
        return self.out.wait_for(r"^https://\S+")[0]

    def wait(self) -> int:
        self._thread.join(15)
        assert self.code is not None, self.err.text
        return self.code


class TestBrowser:
    def test_signed_in_through_the_loopback_redirect(
        self, tokens: TokenServer, refresh_file: Path, ca_file: Path, tmp_path: Path
    ) -> None:
        config = config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file))
        running = Running(config, flow="browser")

        url = running.url()
        page, location = follow(url, ca_file)

        assert 0 == running.wait(), running.err.text
        query = parse_qs(urlsplit(url).query)
        assert ["S256"] == query["code_challenge_method"] and [MAILBOX] == query["login_hint"]
        port = urlsplit(location).port
        assert f"http://localhost:{port}/" == query["redirect_uri"][0]
        assert 200 == page.status_code and "signed in" in page.text
        assert f"ssh -L {port}:127.0.0.1:{port} " in running.out.text
        [refresh] = tokens.refresh_tokens
        assert refresh == refresh_file.read_text().strip()
        assert ["authorization_code"] == tokens.grants
        assert_nothing_secret(tokens, running.out.text, running.err.text, page.text)

    def test_a_wrong_state_is_refused_and_nothing_is_written(
        self, tokens: TokenServer, refresh_file: Path, ca_file: Path, tmp_path: Path
    ) -> None:
        refresh_file.write_text("the-old-refresh-token\n")
        running = Running(config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file)), flow="browser")

        page, _ = follow(running.url(), ca_file, state="forged-state")

        assert 77 == running.wait()
        assert 400 == page.status_code and "state" in page.text
        assert "state does not match" in running.err.text
        assert [] == tokens.grants  # the code was never sent to the token endpoint
        assert "the-old-refresh-token\n" == refresh_file.read_text()

    def test_a_code_from_another_challenge_is_refused_by_the_provider(
        self, tokens: TokenServer, refresh_file: Path, ca_file: Path, tmp_path: Path
    ) -> None:
        """PKCE at work: an attacker's code (asked with their own code_challenge) slipped into relay's redirect
        with relay's state is refused at redemption, because relay's verifier does not match it."""
        running = Running(config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file)), flow="browser")
        url = running.url()
        parts = urlsplit(url)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        attackers = parts._replace(query=urlencode({**query, "code_challenge": "A" * 43})).geturl()

        page, _ = follow(attackers, ca_file)

        assert 77 == running.wait()
        assert 200 == page.status_code  # the state was relay's own
        assert "AADSTS501481" in running.err.text and "PKCE verifier" in running.err.text
        assert ["AADSTS501481"] == tokens.refused and not refresh_file.exists()

    def test_declined_consent(self, tokens: TokenServer, refresh_file: Path, ca_file: Path, tmp_path: Path) -> None:
        tokens.consent = False
        running = Running(config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file)), flow="browser")

        follow(running.url(), ca_file)

        assert 77 == running.wait() and "declined (access_denied: AADSTS65004" in running.err.text


class TestPaste:
    def test_the_address_pasted_on_stdin(self, tokens: TokenServer, refresh_file: Path, ca_file: Path,
                                         tmp_path: Path) -> None:  # fmt: skip
        """Nothing listens: the browser's redirect fails, and the admin pastes the address it ended on."""
        read, write = os.pipe()
        with open(read, encoding="utf-8") as stdin, open(write, "w", encoding="utf-8") as typed:
            running = Running(config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file)), flow="paste",
                              stdin=stdin)  # fmt: skip
            url = running.url()
            running.out.wait_for("paste it here")
            context = ssl.create_default_context(cafile=str(ca_file))
            with httpx.Client(verify=context) as web:
                location = web.get(url).headers["location"]
            with pytest.raises(httpx.ConnectError):  # what the admin's browser shows: nothing there
                httpx.get(location, timeout=5)
            typed.write(location + "\n")
            typed.flush()
            assert 0 == running.wait(), running.err.text

        assert refresh_file.read_text().strip() in tokens.refresh_tokens
        assert_nothing_secret(tokens, running.out.text, running.err.text)

    def test_what_is_no_redirect_address_is_asked_again(self, tokens: TokenServer, refresh_file: Path,
                                                         ca_file: Path, tmp_path: Path) -> None:  # fmt: skip
        """A stray line, the code alone and the sign-in address itself are slips of the clipboard: relay says what
        was wrong and asks again (the sign-in and consent are not lost); the right address then signs in."""
        read, write = os.pipe()
        with open(read, encoding="utf-8") as stdin, open(write, "w", encoding="utf-8") as typed:
            running = Running(config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file)), flow="paste",
                              stdin=stdin)  # fmt: skip
            url = running.url()
            running.out.wait_for("paste it here")
            context = ssl.create_default_context(cafile=str(ca_file))
            with httpx.Client(verify=context) as web:
                location = web.get(url).headers["location"]
            typed.write(f"hello\n{url}\n")
            typed.flush()
            running.err.wait_for("that is the sign-in address relay printed")
            typed.write(location + "\n")
            typed.flush()
            assert 0 == running.wait(), running.err.text

        err = running.err.text
        assert "that is not the address the browser ended on" in err and "paste it again (2 more tries)" in err
        assert "paste it again (1 more tries)" in err and "state does not match" not in err
        assert refresh_file.read_text().strip() in tokens.refresh_tokens
        assert ["authorization_code"] == tokens.grants
        assert_nothing_secret(tokens, running.out.text, err)

    def test_three_wrong_pastes_or_the_end_of_input_end_it(self, tokens: TokenServer, refresh_file: Path,
                                                          ca_file: Path, tmp_path: Path) -> None:  # fmt: skip
        config = config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file))

        code, _, err = login(config, flow="paste", stdin=io.StringIO("hello\nABC123\n\n"))
        assert 77 == code and "nothing was pasted; no redirect address after 3 tries; nothing was written" in err
        assert 2 == err.count("paste it again")

        code, _, err = login(config, flow="paste", stdin=io.StringIO("hello\n"))
        assert 77 == code and err.endswith("nothing was pasted; nothing was written\n")
        assert not refresh_file.exists() and [] == tokens.grants

    def test_a_state_of_another_sign_in_still_ends_it(self, tokens: TokenServer, refresh_file: Path, ca_file: Path,
                                                     tmp_path: Path) -> None:  # fmt: skip
        """A real redirect address whose state is not this sign-in's (an old or forged one) is not asked again."""
        pasted = "http://localhost:1/?code=some-code&state=another-sign-in\n" * 2
        code, _, err = login(config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file)), flow="paste",
                             stdin=io.StringIO(pasted))  # fmt: skip

        assert 77 == code and "state does not match" in err and "paste it again" not in err
        assert [] == tokens.grants


class TestRefusals:
    def test_an_app_only_account_needs_no_sign_in(self, tokens: TokenServer, ca_file: Path, tmp_path: Path,
                                                 secret: Callable[[str, str], Path]) -> None:  # fmt: skip
        up = outlook(tokens, None, ca_file, client_secret_file=str(secret("app", "s3cr3t")))
        code, _, err = login(config_of(tmp_path, outlook=up))

        assert 78 == code and "no sign-in is needed" in err and "add refresh_token_file" in err

    def test_a_token_from_the_environment_cannot_be_written(self, tokens: TokenServer, ca_file: Path,
                                                           tmp_path: Path) -> None:  # fmt: skip
        up = outlook(tokens, None, ca_file, refresh_token_env="RELAY_OUTLOOK_REFRESH")
        code, _, err = login(config_of(tmp_path, outlook=up))

        assert 78 == code and "name a refresh_token_file instead" in err

    def test_unknown_account_and_unreachable_endpoint(self, tokens: TokenServer, refresh_file: Path, ca_file: Path,
                                                      tmp_path: Path) -> None:  # fmt: skip
        dead = f"https://127.0.0.1:{free_port()}/{TENANT}/oauth2/v2.0/token"
        config = config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file, token_url=dead))

        assert 64 == login(config, "nobody")[0]
        code, _, err = login(config)
        assert 69 == code and "127.0.0.1" in err

    @pytest.mark.parametrize("dead", ["device", "token"])
    def test_an_unreachable_endpoint_is_named_with_what_to_check(
        self, tokens: TokenServer, refresh_file: Path, ca_file: Path, tmp_path: Path, dead: str
    ) -> None:
        """``relay oauth login`` (the command, a config file) whose device endpoint (made from token_url) or token
        endpoint (device_url set apart, alive) refuses connections: the error names that endpoint, its
        host:port and what to check, not a bare "127.0.0.1: Connection refused"."""
        port = free_port()
        token_url = f"https://127.0.0.1:{port}/{TENANT}/oauth2/v2.0/token"
        device_url = token_url.removesuffix("token") + "devicecode"
        extra = {"token_url": token_url} if dead == "device" else {
            "token_url": token_url, "device_url": tokens.url.removesuffix("token") + "devicecode"}  # fmt: skip
        data = {"spool_dir": str(tmp_path / "spool"), "company": {"upstream": "outlook", "from_address": MAILBOX},
                "upstreams": {"outlook": outlook(tokens, refresh_file, ca_file, **extra)}}  # fmt: skip
        path = tmp_path / "relay.yaml"
        path.write_text(yaml.safe_dump(data))

        done = subprocess.run([sys.executable, "-m", "relay", "oauth", "login", "outlook", "-c", str(path)],
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip

        err = done.stderr
        assert 69 == done.returncode, err
        url = device_url if dead == "device" else token_url
        assert f"cannot reach the {dead} endpoint 127.0.0.1:{port} ({url}): " in err
        assert f"check oauth2.{dead}_url" in err and f"this machine reaches 127.0.0.1:{port}" in err
        assert not refresh_file.exists()

    def test_a_user_whose_own_account_signs_in(self, tokens: TokenServer, refresh_file: Path, ca_file: Path,
                                               tmp_path: Path) -> None:  # fmt: skip
        """ACCOUNT may be a user id, as ``relay passwd USER`` takes one: the user's own oauth2 account."""
        data = {"spool_dir": str(tmp_path / "spool"), "upstreams": {"o365": outlook(tokens, None, ca_file,
                client_secret_file=str(refresh_file.parent / "app"))}, "company": {"upstream": "o365"},
                "users": {"matti": {"addresses": "matti@yritys.fi", "upstream": {"username": "matti@outlook.com",
                          "oauth2": oauth_block(tokens, refresh_file)}}}}  # fmt: skip
        tokens.person = "matti@outlook.com"
        code, out, err = login(parse_config(yaml.safe_dump(data)), "matti")

        assert (0, "") == (code, err)
        assert "Signed in as matti@outlook.com." in out and "relay send-test matti" in out

    def test_an_office_365_delegate_is_saved_with_a_warning(self, tokens: TokenServer, refresh_file: Path,
                                                            ca_file: Path, tmp_path: Path) -> None:  # fmt: skip
        """A work or school account (tid of the company's tenant) may have Full Access to the mailbox (a shared
        mailbox): its token is saved, with a warning that names what it needs."""
        tokens.person = "someone.else@outlook.com"
        code, out, err = login(config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file)))

        assert 0 == code and "Signed in as someone.else@outlook.com." in out
        assert f"but outlook sends as {MAILBOX}" in err and f"has Full Access to {MAILBOX}'s mailbox" in err
        assert refresh_file.read_text().strip() in tokens.refresh_tokens

    def test_another_person_on_a_personal_account_keeps_the_old_token(self, tokens: TokenServer, refresh_file: Path,
                                                                     ca_file: Path, tmp_path: Path) -> None:  # fmt: skip
        """Outlook.com: a person's token logs in as their own mailbox only. Signing in as someone else would
        replace a working token with one that cannot send: nothing is written (77) unless --force."""
        refresh_file.write_text("the-old-refresh-token\n")
        tokens.tenant_id = PERSONAL_TENANT_ID
        tokens.person = "toinen@outlook.com"
        config = config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file))

        code, out, err = login(config)

        assert 77 == code and "Signed in as toinen@outlook.com." in out
        assert (f"signed in as toinen@outlook.com, but outlook sends as {MAILBOX}, and a personal Microsoft account "
                "(Outlook.com, Hotmail) lets a person's token log in as their own mailbox only") in err  # fmt: skip
        assert f"nothing was written (the old token in {refresh_file} is kept)" in err and "--force" in err
        assert "the-old-refresh-token\n" == refresh_file.read_text() and "Refresh token saved" not in out

        code, out, err = login(config, force=True)

        assert 0 == code and "Refresh token saved" in out and "saved because of --force" in err
        assert refresh_file.read_text().strip() in tokens.refresh_tokens

    def test_the_same_mailbox_in_other_letters_is_the_mailbox(self, tokens: TokenServer, refresh_file: Path,
                                                              ca_file: Path, tmp_path: Path) -> None:  # fmt: skip
        tokens.tenant_id = PERSONAL_TENANT_ID
        tokens.person = MAILBOX.upper()
        code, out, err = login(config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file)))

        assert (0, "") == (code, err) and "Refresh token saved" in out

    def test_a_users_own_block_naming_the_companys_token_file_is_refused(
        self, tokens: TokenServer, refresh_file: Path, ca_file: Path, tmp_path: Path
    ) -> None:
        """The same overwrite by another road: anna's own oauth2: block names the company's refresh_token_file
        (copied from the company's block). Refused before any sign-in (78); the company's token stays."""
        refresh_file.write_text("the-companys-refresh-token\n")
        data = {"spool_dir": str(tmp_path / "spool"), "upstreams": {"outlook": outlook(tokens, refresh_file, ca_file)},
                "company": {"upstream": "outlook", "from_address": MAILBOX},
                "users": {"anna": {"addresses": "anna@outlook.com", "upstream": {
                    "username": "anna@outlook.com", "oauth2": oauth_block(tokens, refresh_file)}}}}  # fmt: skip
        tokens.person = "anna@outlook.com"

        code, out, err = login(parse_config(yaml.safe_dump(data)), "anna")

        assert 78 == code and "" == out
        assert f"refresh_token_file {refresh_file} is also outlook's, which logs in as {MAILBOX}" in err
        assert "the-companys-refresh-token\n" == refresh_file.read_text() and [] == tokens.grants

    def test_a_user_who_inherits_the_company_sign_in_is_refused(self, tokens: TokenServer, refresh_file: Path,
                                                                ca_file: Path, tmp_path: Path) -> None:  # fmt: skip
        """A user with only an own username under the company's delegated account would write the company's
        refresh token file: refused before any sign-in (78), as relay passwd refuses a user on a shared account."""
        refresh_file.write_text("the-companys-refresh-token\n")
        data = {"spool_dir": str(tmp_path / "spool"), "upstreams": {"outlook": outlook(tokens, refresh_file, ca_file)},
                "company": {"upstream": "outlook", "from_address": MAILBOX},
                "users": {"bob": {"addresses": "bob@outlook.com", "upstream": {"username": "bob@outlook.com"}},
                          "office": {"addresses": "toimisto@yritys.fi", "upstream": {"port": 2}}}}  # fmt: skip
        config = parse_config(yaml.safe_dump(data))
        tokens.person = "bob@outlook.com"

        code, out, err = login(config, "bob")

        assert 78 == code and "" == out
        assert ("users.bob.upstream has no oauth2: block of its own: bob (bob@outlook.com) inherits upstream outlook's "
                f"sign-in, whose refresh_token_file {refresh_file} holds {MAILBOX}'s token") in err  # fmt: skip
        assert "add users.bob.upstream.oauth2" in err and "nothing was written" in err
        assert "the-companys-refresh-token\n" == refresh_file.read_text() and [] == tokens.grants
        tokens.person = MAILBOX  # a user who logs in as the company's mailbox signs in the same mailbox
        assert 0 == login(config, "office")[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_the_file_keeps_its_owner_and_a_new_one_is_owned_like_its_folder(
    tokens: TokenServer, refresh_file: Path, ca_file: Path, tmp_path: Path
) -> None:
    """``sudo relay oauth login`` must leave a file the daemon (another user) can read and rewrite."""
    refresh_file.write_text("old\n")
    refresh_file.chmod(0o644)
    os.chown(refresh_file, 65534, 65533)
    fresh_dir = tmp_path / "relay-owned"
    fresh_dir.mkdir(mode=0o700)
    os.chown(fresh_dir, 65534, 65533)
    config = config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file),
                       second=outlook(tokens, fresh_dir / "second-refresh", ca_file))  # fmt: skip

    assert 0 == login(config)[0]
    code, out, _ = login(config, "second")

    assert 0 == code
    for path in (refresh_file, fresh_dir / "second-refresh"):
        info = path.stat()
        assert (65534, 65533, 0o600) == (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode))
        assert path.read_text().strip() in tokens.refresh_tokens
    assert "owner 65534:65533" in out or "owner nobody:" in out


def test_a_running_daemon_delivers_with_the_new_token_without_a_restart(
    tokens: TokenServer, refresh_file: Path, ca_file: Path, tmp_path: Path, upstream: UpstreamFactory,
    relay_with: Callable[..., RelayRunner],
) -> None:  # fmt: skip
    """Outlook.com end to end: the mail waits for the sign-in (no refresh token yet), the admin signs in, and
    the waiting mail goes out with a token issued to that mailbox, from the same daemon."""
    up = upstream("outlook", security="starttls", xoauth2=tokens.valid_for)
    relay = relay_with(upstreams={"outlook": outlook(tokens, refresh_file, ca_file, port=up.port)},
                       company={"upstream": "outlook", "from_address": MAILBOX})  # fmt: skip
    smtp_send(relay.port, "erp@legacy.local", ["asiakas@example.com"], b"Subject: Lasku\r\n\r\nLasku.\r\n")
    time.sleep(0.5)
    assert [] == up.received

    code, _, err = login(relay.config, flow="device")
    [mail] = up.wait_for(1)

    assert 0 == code, err
    assert MAILBOX == mail.login and ["asiakas@example.com"] == mail.rcpt_tos
    assert ["device_code", "refresh_token"] == [g.rsplit(":", 1)[-1] for g in tokens.grants]


def test_the_command_line(tokens: TokenServer, refresh_file: Path, ca_file: Path, tmp_path: Path) -> None:
    """``relay oauth login ACCOUNT -c CONFIG``: exit 0, the two lines, and no secret in anything it printed."""
    path = tmp_path / "relay.yaml"
    data = {"spool_dir": str(tmp_path / "spool"), "upstreams": {"outlook": outlook(tokens, refresh_file, ca_file)},
            "company": {"upstream": "outlook", "from_address": MAILBOX}}  # fmt: skip
    path.write_text(yaml.safe_dump(data))
    tokens.device_script = ["pending", "ok"]

    done = subprocess.run([sys.executable, "-m", "relay", "oauth", "login", "outlook", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip

    assert 0 == done.returncode, done.stderr
    assert "enter the code" in done.stdout and "Refresh token saved to" in done.stdout
    assert done.stdout.rstrip().endswith(f"Try: relay send-test company -c {path}")  # the config it was given
    assert_nothing_secret(tokens, done.stdout, done.stderr)
    bad = subprocess.run([sys.executable, "-m", "relay", "oauth", "login", "outlook", "-c", str(path), "--port", "0"],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert 64 == bad.returncode


def test_a_gmail_mailbox_signed_in_in_the_browser_then_delivered(
    server_context: ssl.SSLContext, ca_file: Path, tmp_path: Path, refresh_file: Path, upstream: UpstreamFactory,
    relay_with: Callable[..., RelayRunner], secret: Callable[[str, str], Path],
) -> None:  # fmt: skip
    """Gmail on OAuth2 with relay's own commands: a Desktop-app client (its secret in a file), ``relay oauth
    login gmail`` (the browser flow is Google's default; redirect to 127.0.0.1), then the daemon sends."""
    from tests.oauth_servers import GoogleTokenServer

    google = GoogleTokenServer(server_context)
    try:
        google.clients["123-abc.apps.googleusercontent.com"] = "GOCSPX-desktop-secret"
        google.person = "myynti.yritys@gmail.com"
        up = upstream("gmail", security="ssl", xoauth2=google.valid_for)
        gmail = {"host": "127.0.0.1", "port": up.port, "security": "ssl", "ca_file": str(ca_file), "timeout": 10,
                 "username": "myynti.yritys@gmail.com", "auth": "oauth2",
                 "oauth2": {"provider": "google", "client_id": "123-abc.apps.googleusercontent.com",
                            "client_secret_file": str(secret("gmail-client", "GOCSPX-desktop-secret")),
                            "refresh_token_file": str(refresh_file), "token_url": google.url,
                            "authorize_url": google.authorize_url}}  # fmt: skip
        relay = relay_with(upstreams={"gmail": gmail},
                           company={"upstream": "gmail", "from_address": "myynti.yritys@gmail.com"})  # fmt: skip
        running = Running(relay.config, "gmail")

        url = running.url()
        page, location = follow(url, ca_file)

        assert 0 == running.wait(), running.err.text
        query = parse_qs(urlsplit(url).query)
        assert ["offline"] == query["access_type"] and ["consent"] == query["prompt"]
        assert location.startswith("http://127.0.0.1:") and 200 == page.status_code
        assert "Signed in as myynti.yritys@gmail.com." in running.out.text
        smtp_send(relay.port, "erp@legacy.local", ["asiakas@example.com"], b"Subject: Tilaus\r\n\r\nTilaus.\r\n")
        [mail] = up.wait_for(1)
        assert "myynti.yritys@gmail.com" == mail.login
        assert_nothing_secret(google, running.out.text, running.err.text, page.text)
        assert "GOCSPX-desktop-secret" not in running.out.text + running.err.text
    finally:
        google.close()


def test_a_confidential_app_signs_its_code_redemption_with_its_certificate(
    tokens: TokenServer, refresh_file: Path, ca_file: Path, tmp_path: Path
) -> None:
    """Delegated SMTP.Send through an Entra app that has a certificate and no secret: the device code's
    token request carries a client assertion, which the emulator verifies."""
    from tests.transports.test_assertions import make_certificate

    certificate, keys = make_certificate(tmp_path / "certs", "app")
    tokens.certificates["cert-app"] = certificate
    confidential: dict[str, Any] = {"client_id": "cert-app", **keys}
    up = outlook(tokens, refresh_file, ca_file, **confidential)

    code, out, err = login(config_of(tmp_path, outlook=up))

    assert (0, "") == (code, err)
    [(header, claims)] = tokens.assertions
    assert "x5t#S256" in header and "cert-app" == claims["sub"]
    assert refresh_file.read_text().strip() in tokens.refresh_tokens
    assert "eyJ" not in out


def test_check_tells_to_sign_in_while_the_token_file_is_missing(
    tokens: TokenServer, refresh_file: Path, ca_file: Path, tmp_path: Path
) -> None:
    """A refresh token file not there yet is an error of ``relay check`` (exit 1) naming the command that
    writes it."""
    from relay.config.warnings import check_errors

    errors = [str(e) for e in check_errors(config_of(tmp_path, outlook=outlook(tokens, refresh_file, ca_file)))]

    assert [e for e in errors if "does not exist: sign in with relay oauth login outlook" in e]


@pytest.mark.parametrize("tenant", ["consumers", "organizations", "common", "yritys.onmicrosoft.com"])
def test_microsoft_endpoints_come_from_the_tenant(tenant: str) -> None:
    from relay.config.accounts import account_for

    up = {"host": "smtp-mail.outlook.com", "username": MAILBOX, "auth": "oauth2",
          "oauth2": {"provider": "microsoft", "tenant": tenant, "client_id": "a", "refresh_token_file": "/r"}}  # fmt: skip
    oauth = account_for(parse_config(yaml.safe_dump({"upstreams": {"outlook": up}})), "outlook").oauth2
    assert oauth is not None

    found = oauthlogin.endpoints(oauth)

    base = f"https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
    assert (f"{base}/token", f"{base}/authorize", f"{base}/devicecode") == (found.token, found.authorize, found.device)
