"""OAuth2 tokens against a real HTTPS token endpoint (Microsoft identity platform v2.0, trustme TLS)."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
import socket
import ssl
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from relay.config.accounts import account_for
from relay.config.credentials import Secret
from relay.config.load import parse_config
from relay.envelope import Account, OAuth2
from relay.errors import TokenError
from relay.transports import tokens as token_module
from relay.transports.smtp import advice, tls_context
from relay.transports.tokens import TokenCache, claims, permissions
from tests.oauth_servers import TENANT, TokenServer, run_closing

TokenServerFactory = Callable[..., TokenServer]
SecretWriter = Callable[[str, str], Path]


def fetch_once(acct: Account) -> tuple[Secret, bool]:
    """One token from a cache of its own, as ``relay check --connect`` gets it."""
    cache = TokenCache()
    return run_closing(cache, cache.token(acct))


def oauth2_block(tokens: TokenServer, secret: SecretWriter, *, client: str = "app-1", client_secret: str | None = "s3cr3t-value",
                 refresh: str | None = None, **extra: Any) -> dict[str, Any]:  # fmt: skip
    """The ``oauth2:`` entry of an account that gets its tokens from ``tokens``."""
    block: dict[str, Any] = {"provider": "microsoft", "tenant": TENANT, "client_id": client, "token_url": tokens.url}
    if client_secret is not None:
        block["client_secret_file"] = str(secret(f"{client}-secret", client_secret))
    if refresh is not None:
        block["refresh_token_file"] = str(secret(f"{client}-refresh", refresh))
    return {**block, **extra}


def account(ca_file: Path | None, oauth2: dict[str, Any], **fields: Any) -> Account:
    """An Account resolved from YAML-shaped data, as the daemon resolves it (``ca_file`` None: system CAs)."""
    up = {"host": "127.0.0.1", "port": 1, "username": "yritys@yritys.fi", "auth": "oauth2", "oauth2": oauth2,
          "timeout": 5, **fields}  # fmt: skip
    if ca_file is not None:
        up["ca_file"] = str(ca_file)
    config = parse_config(_yaml({"upstreams": {"o365": up}, "company": {"upstream": "o365"}}))
    return account_for(config, "o365")


def refused_token(acct: Account) -> TokenError:
    """The error a fresh cache's token request for ``acct`` raises (the test fails if it raises none)."""
    cache = TokenCache()

    async def run() -> TokenError:
        with pytest.raises(TokenError) as raised:
            await cache.token(acct)
        return raised.value

    return run_closing(cache, run())


def _yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data)


@pytest.fixture
def tokens(token_server: TokenServerFactory) -> TokenServer:
    server = token_server(lifetime=3600, roles=("SMTP.SendAsApp",))
    server.clients["app-1"] = "s3cr3t-value"
    return server


class TestTokenCache:
    def test_concurrent_deliveries_share_one_token_request(
        self, tokens: TokenServer, secret: SecretWriter, ca_file: Path
    ) -> None:
        """Single flight: 20 deliveries that need a token at once cause one request, and all get that token."""
        acct = account(ca_file, oauth2_block(tokens, secret))
        cache = TokenCache()

        async def many() -> list[tuple[Secret, bool]]:
            return await asyncio.gather(*(cache.token(acct) for _ in range(20)))

        got = run_closing(cache, many())

        assert ["client_credentials"] == tokens.grants
        assert 1 == len({value.reveal() for value, _ in got})
        assert tokens.valid(got[0][0].reveal())

    def test_deliveries_behind_a_failed_request_share_its_error(self, secret: SecretWriter, ca_file: Path) -> None:
        """A hung token endpoint: four deliveries waiting at once get one TokenError after one timeout, not four
        requests and four timeouts one after another."""
        with socket.create_server(("127.0.0.1", 0), backlog=16) as hung:  # takes TCP, never answers
            block = {"provider": "microsoft", "tenant": TENANT, "client_id": "app-1",
                     "token_url": f"https://127.0.0.1:{hung.getsockname()[1]}/{TENANT}/oauth2/v2.0/token",
                     "client_secret_file": str(secret("app-1-secret", "s3cr3t-value"))}  # fmt: skip
            failed: list[str] = []
            cache = TokenCache(on_failure=failed.append)
            acct = account(ca_file, block, timeout=1)

            async def many() -> list[BaseException | tuple[Secret, bool]]:
                return await asyncio.gather(*(cache.token(acct) for _ in range(4)), return_exceptions=True)

            started = time.monotonic()
            got = run_closing(cache, many())
            took = time.monotonic() - started

        assert [TokenError] * 4 == [type(g) for g in got] and 1 == len({id(g) for g in got})
        assert (1, ["o365"]) == (cache.requests, failed)
        assert took < 2.5

    def test_a_token_is_reused_then_renewed_before_it_expires(
        self, token_server: TokenServerFactory, secret: SecretWriter, ca_file: Path
    ) -> None:
        """A 2 s token is used for its first 1.5 s, then replaced while it is still valid (a quarter left)."""
        server = token_server(lifetime=2)
        server.clients["app-1"] = "s3cr3t-value"
        acct = account(ca_file, oauth2_block(server, secret))
        cache = TokenCache()

        async def run() -> tuple[Secret, Secret, Secret, bool]:
            first, fresh = await cache.token(acct)
            again, cached_fresh = await cache.token(acct)
            await asyncio.sleep(1.6)
            later, _ = await cache.token(acct)
            return first, again, later, fresh and not cached_fresh

        first, again, later, flags = run_closing(cache, run())

        assert flags
        assert first is again
        assert first.reveal() != later.reveal()
        assert 2 == len(server.grants)
        assert server.valid(later.reveal())

    def test_a_refusal_is_remembered_until_the_secret_changes(
        self, tokens: TokenServer, secret: SecretWriter, ca_file: Path
    ) -> None:
        """Twenty retries with the wrong secret ask Entra once; the moment the file holds the fixed secret,
        the next one asks again and gets a token (no restart, no waiting out the hold)."""
        acct = account(ca_file, oauth2_block(tokens, secret, client_secret="wrong-secret"))
        failed: list[str] = []
        cache = TokenCache(on_failure=failed.append)

        async def run() -> tuple[list[str], Secret]:
            codes = []
            for _ in range(20):
                with pytest.raises(TokenError) as info:
                    await cache.token(acct)
                codes.append(info.value.code or "")
            secret("app-1-secret", "s3cr3t-value")
            token, _ = await cache.token(acct)
            return codes, token

        codes, token = run_closing(cache, run())

        assert ["invalid_client"] * 20 == codes  # each retry still gets the provider's words
        assert (["AADSTS7000215"], ["o365"]) == (tokens.refused, failed)
        assert ["client_credentials"] == tokens.grants and tokens.valid(token.reveal())

    def test_an_endpoint_that_takes_the_request_and_stays_silent_is_not_called_unreachable(
        self, tokens: TokenServer, secret: SecretWriter, ca_file: Path
    ) -> None:
        tokens.silence = 3.0
        acct = account(ca_file, oauth2_block(tokens, secret), timeout=0.5)
        error = refused_token(acct)

        assert "took the request and did not answer in time (timed out)" in str(error) and "unreachable" not in str(error)

    @pytest.mark.parametrize("status", [200, 403])
    def test_a_web_page_instead_of_the_endpoint_is_named_as_such(
        self, tokens: TokenServer, secret: SecretWriter, ca_file: Path, status: int
    ) -> None:
        """A web filter or a TLS-inspecting proxy answers with its own HTML page (or token_url names a web
        page): it was "refused the token request (HTTP 403)" or "answered without an access_token", which sent
        the admin to the app's registration. Named as a page, with its title and where to look; the mail waits."""
        tokens.web_page = (status, b"<html><head><title>Access Denied\x1b[31m</title></head><body>Blocked</body></html>")
        acct = account(ca_file, oauth2_block(tokens, secret))
        error = refused_token(acct)

        assert f"answered HTTP {status} with text/html ('Access Denied [31m'), not OAuth2 JSON" in str(error)
        assert "check token_url and any proxy or web filter" in str(error) and "token endpoint" == error.step

    def test_a_failure_that_goes_on_is_asked_about_less_and_less_often(
        self, tokens: TokenServer, secret: SecretWriter, ca_file: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The endpoint keeps failing: asked again after the hold, which doubles (0.2 s, 0.4 s, ...); a 429's
        Retry-After holds at least that long; when the endpoint is back, mail gets its token."""
        monkeypatch.setattr(token_module, "FIRST_HOLD", 0.2)
        tokens.outage = (503, {})
        acct = account(ca_file, oauth2_block(tokens, secret))
        cache = TokenCache()

        async def ask_for(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                with pytest.raises(TokenError):
                    await cache.token(acct)
                await asyncio.sleep(0.02)

        async def run() -> list[int]:
            counts = []
            await ask_for(0.15)  # first request, then held for 0.2 s
            counts.append(len(tokens.refused))
            await ask_for(0.3)  # asked once more after 0.2 s, then held for 0.4 s
            counts.append(len(tokens.refused))
            tokens.outage = (429, {"Retry-After": "1"})
            await asyncio.sleep(0.45)
            await ask_for(0.6)  # one 429, then held for its second (more than the 0.8 s doubling would... not)
            counts.append(len(tokens.refused))
            tokens.outage = None
            await asyncio.sleep(1.7)
            await cache.token(acct)
            return counts

        assert [1, 2, 3] == run_closing(cache, run())
        assert ["client_credentials"] == tokens.grants

    def test_a_renewal_that_fails_keeps_using_the_token_that_has_not_expired(
        self, token_server: TokenServerFactory, secret: SecretWriter, ca_file: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The endpoint blips just when a token is due for renewal: the still-valid token is used, no mail
        waits; once it is about to expire, the failure is the caller's."""
        monkeypatch.setattr(token_module, "EXPIRY_SLACK", 0.2)
        server = token_server(lifetime=4)  # renewed from 3 s; kept on failure until 3.8 s
        server.clients["app-1"] = "s3cr3t-value"
        acct = account(ca_file, oauth2_block(server, secret))
        cache = TokenCache()

        async def run() -> tuple[Secret, tuple[Secret, bool], bool]:
            first, _ = await cache.token(acct)
            await asyncio.sleep(3.05)  # past the renewal point (3 s), before expiry (4 s) less the slack
            server.outage = (503, {})
            during = await cache.token(acct)
            still_valid = server.valid(during[0].reveal())
            await asyncio.sleep(0.9)
            with pytest.raises(TokenError):
                await cache.token(acct)
            return first, during, still_valid

        first, (during, fresh), still_valid = run_closing(cache, run())

        assert during is first and not fresh and still_valid
        assert 1 == len(server.refused)  # the renewal tried; its failure is held, not asked again at once

    def test_two_accounts_sharing_a_rotated_refresh_token_take_turns(
        self, tokens: TokenServer, secret: SecretWriter, ca_file: Path
    ) -> None:
        """An SMTP and a Graph account of one delegated sign-in (two scopes, one refresh_token_file), and a
        provider that takes each refresh token once: asked at the same moment, both get a token, because
        the second request reads the token the first one wrote back."""
        tokens.rotate = True
        tokens.clients["app-1"] = ""  # a public client: the refresh token is the whole credential
        tokens.refresh_tokens["rt-shared"] = "app-1"
        smtp = account(ca_file, oauth2_block(tokens, secret, client_secret=None, refresh="rt-shared",
                                             scope="https://outlook.office.com/SMTP.Send offline_access"))  # fmt: skip
        graph = account(ca_file, oauth2_block(tokens, secret, client_secret=None, refresh="rt-shared",
                                              scope="https://graph.microsoft.com/.default offline_access"))  # fmt: skip
        assert smtp.oauth2 != graph.oauth2
        cache = TokenCache()

        async def both() -> list[tuple[Secret, bool]]:
            return await asyncio.gather(cache.token(smtp), cache.token(graph))

        got = run_closing(cache, both())

        assert ([], ["refresh_token"] * 2) == (tokens.refused, tokens.grants)
        assert all(tokens.valid(value.reveal()) for value, _ in got)

    def test_a_dropped_token_is_replaced(self, tokens: TokenServer, secret: SecretWriter, ca_file: Path) -> None:
        """After the upstream refused a token, the next caller gets a fresh one, not the refused one."""
        acct = account(ca_file, oauth2_block(tokens, secret))
        cache = TokenCache()

        async def run() -> tuple[Secret, Secret]:
            first, _ = await cache.token(acct)
            cache.drop(acct, first)
            second, fresh = await cache.token(acct)
            assert fresh
            return first, second

        first, second = run_closing(cache, run())
        assert first.reveal() != second.reveal()

    def test_rotated_refresh_token_is_written_back_atomically_0600(
        self, tokens: TokenServer, secret: SecretWriter, ca_file: Path
    ) -> None:
        """The provider replaces the refresh token at each use: the file holds the new one (mode 0600), and the
        next refresh uses it (the old one is no longer accepted)."""
        tokens.rotate = True
        tokens.refresh_tokens["rt-original"] = "app-1"
        acct = account(ca_file, oauth2_block(tokens, secret, refresh="rt-original"))
        assert acct.oauth2 is not None and acct.oauth2.refresh_token_file is not None
        path = acct.oauth2.refresh_token_file
        cache = TokenCache()

        with capture_logs() as logs:
            first, _ = run_closing(cache, cache.token(acct))
            cache.drop(acct, first)
            _second, _ = run_closing(cache, cache.token(acct))

        assert ["refresh_token", "refresh_token"] == tokens.grants
        [current] = tokens.refresh_tokens
        assert current == path.read_text().strip()
        assert 0o600 == stat.S_IMODE(path.stat().st_mode)
        assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
        assert ["refresh_token_rotated", "refresh_token_rotated"] == [e["event"] for e in logs]
        assert current not in repr(logs) and first.reveal() not in repr(logs)

    @pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
    def test_rotation_by_root_keeps_the_files_owner(
        self, tokens: TokenServer, secret: SecretWriter, ca_file: Path
    ) -> None:
        """``sudo relay check --connect`` rotates the token of a file the daemon's user owns: it stays theirs."""
        tokens.rotate = True
        tokens.refresh_tokens["rt-original"] = "app-1"
        acct = account(ca_file, oauth2_block(tokens, secret, refresh="rt-original"))
        assert acct.oauth2 is not None and acct.oauth2.refresh_token_file is not None
        path = acct.oauth2.refresh_token_file
        os.chown(path, 65534, 65533)  # the relay user (nobody here) and its group

        fetch_once(acct)

        assert path.read_text().strip() in tokens.refresh_tokens
        assert (65534, 65533, 0o600) == (path.stat().st_uid, path.stat().st_gid, stat.S_IMODE(path.stat().st_mode))

    def test_rotation_into_an_environment_variable_is_kept_in_memory_and_warned_once(
        self, tokens: TokenServer, secret: SecretWriter, ca_file: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A refresh token from the environment cannot be written back: relay uses the new one from memory and
        says so once."""
        tokens.rotate = True
        tokens.refresh_tokens["rt-env"] = "app-1"
        monkeypatch.setenv("RELAY_TEST_REFRESH", "rt-env")
        acct = account(ca_file, oauth2_block(tokens, secret, refresh_token_env="RELAY_TEST_REFRESH"))
        cache = TokenCache()

        with capture_logs() as logs:
            for _ in range(3):
                value, _ = run_closing(cache, cache.token(acct))
                cache.drop(acct, value)

        assert ["refresh_token"] * 3 == tokens.grants  # each used the previous rotation's token
        assert ["refresh_token_not_saved"] == [e["event"] for e in logs]
        assert "rt-" not in repr(logs)


    def test_a_refresh_token_file_the_admin_replaces_wins_over_one_kept_in_memory(
        self, tokens: TokenServer, secret: SecretWriter, ca_file: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The file could not be written (ProtectSystem=strict), so the rotated token lives in memory; it is
        revoked and the admin signs in again into the file, as the README says: no restart needed."""
        tokens.rotate = True
        tokens.refresh_tokens["rt-original"] = "app-1"
        acct = account(ca_file, oauth2_block(tokens, secret, refresh="rt-original"))
        assert acct.oauth2 is not None and acct.oauth2.refresh_token_file is not None

        def read_only(path: Path, value: str) -> None:
            raise OSError(errno.EROFS, "Read-only file system", str(path))

        monkeypatch.setattr(token_module, "write_secret_file", read_only)
        cache = TokenCache()
        first, _ = run_closing(cache, cache.token(acct))
        cache.drop(acct, first)
        tokens.refresh_tokens.clear()  # the admin revoked the app's sessions
        with pytest.raises(TokenError):
            run_closing(cache, cache.token(acct))
        acct.oauth2.refresh_token_file.write_text("rt-new-signin\n")
        tokens.refresh_tokens["rt-new-signin"] = "app-1"

        token, fresh = run_closing(cache, cache.token(acct))

        assert fresh and tokens.valid(token.reveal())
        assert (["refresh_token"] * 2, 1) == (tokens.grants, len(tokens.refused))


class TestTokenErrors:
    @pytest.mark.parametrize(
        ("change", "code", "number"),
        [
            ({"client_secret": "wrong-secret"}, "invalid_client", "AADSTS7000215"),
            ({"client": "unknown-app"}, "unauthorized_client", "AADSTS700016"),
            ({"token_url": "https://127.0.0.1:{port}/other.onmicrosoft.com/oauth2/v2.0/token"}, "invalid_request",
             "AADSTS90002"),
            ({"client_secret": None, "refresh": "rt-revoked"}, "invalid_grant", "AADSTS70008"),
        ],
    )  # fmt: skip
    def test_refusals_name_the_provider_code_and_what_to_do(
        self, tokens: TokenServer, secret: SecretWriter, ca_file: Path, change: dict[str, Any], code: str, number: str
    ) -> None:
        """Each AADSTS refusal becomes a TokenError with the code in its words and advice an admin can act on."""
        tokens.clients["unknown-app-never"] = ""
        tokens.clients["app-1"] = "s3cr3t-value" if change.get("client_secret", "x") is not None else ""
        extra = {k: v.format(port=tokens.port) for k, v in change.items() if k == "token_url"}
        options = {k: v for k, v in change.items() if k != "token_url"}
        acct = account(ca_file, oauth2_block(tokens, secret, **options, **extra))

        with pytest.raises(TokenError) as info:
            fetch_once(acct)

        error = info.value
        assert "token refused" == error.step
        assert code == error.code
        assert number in str(error) and number in error.reply_text
        assert advice(None, error.reply_text) is not None
        assert "s3cr3t" not in str(error) + error.reply_text and "wrong-secret" not in error.reply_text

    def test_unreachable_endpoint(self, secret: SecretWriter, ca_file: Path, tokens: TokenServer) -> None:
        """Nothing listening: the step is the endpoint, and the words say it cannot be reached."""
        tokens.close()
        acct = account(ca_file, oauth2_block(tokens, secret))

        with pytest.raises(TokenError) as info:
            fetch_once(acct)

        assert "token endpoint" == info.value.step
        assert "unreachable" in str(info.value)

    def test_certificate_is_verified(self, secret: SecretWriter, tokens: TokenServer) -> None:
        """Without the test CA (no ca_file) the endpoint's certificate is not trusted: no token, no secret sent."""
        acct = account(None, oauth2_block(tokens, secret))

        with pytest.raises(TokenError) as info:
            fetch_once(acct)

        assert "certificate" in str(info.value).lower()
        assert [] == tokens.grants and [] == tokens.refused

    def test_a_secret_pasted_with_a_bom_or_trailing_spaces_still_works(
        self, tokens: TokenServer, secret: SecretWriter, ca_file: Path
    ) -> None:
        """Notepad's BOM and a space after the pasted value are not part of an Entra secret: stripped, not
        sent as AADSTS7000215 'invalid client secret'."""
        block = oauth2_block(tokens, secret)
        Path(block["client_secret_file"]).write_text("\ufeffs3cr3t-value  \r\n", encoding="utf-8")

        token, _ = fetch_once(account(ca_file, block))

        assert tokens.valid(token.reveal()) and [] == tokens.refused

    def test_missing_secret_file_is_named(self, secret: SecretWriter, ca_file: Path, tokens: TokenServer) -> None:
        """The client secret file is gone: the error names it (not a value), and no request is made."""
        block = oauth2_block(tokens, secret)
        os.unlink(block["client_secret_file"])
        acct = account(ca_file, block)

        with pytest.raises(TokenError) as info:
            fetch_once(acct)

        assert "secret" == info.value.step
        assert f"client secret file {block['client_secret_file']} does not exist" == str(info.value)
        assert [] == tokens.grants


class TestClaims:
    def test_permissions_come_from_roles_and_scp(self) -> None:
        """Application roles and delegated scopes are both read; an opaque token has none."""
        payload = base64.urlsafe_b64encode(json.dumps({"roles": ["Mail.Send"], "scp": "SMTP.Send"}).encode()).rstrip(b"=")
        token = Secret(f"e30.{payload.decode()}.sig")

        assert {"Mail.Send", "SMTP.Send"} == permissions(token)
        assert {} == claims(Secret("ya29.opaque-google-token"))


def test_tls_context_is_shared_until_the_ca_file_changes(tokens: TokenServer, secret: SecretWriter, ca_file: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    """Each Graph or token request once loaded the CA store anew; a replaced ca_file must still be read."""
    own_ca = tmp_path / "ca.pem"
    own_ca.write_bytes(ca_file.read_bytes())
    acct = account(own_ca, oauth2_block(tokens, secret))
    first = tls_context(acct)
    same = tls_context(acct)
    unverified = tls_context(account(own_ca, oauth2_block(tokens, secret), verify=False))
    os.utime(own_ca, ns=(own_ca.stat().st_atime_ns, own_ca.stat().st_mtime_ns + 1_000_000_000))
    replaced = tls_context(acct)
    own_ca.unlink()

    assert first is same and unverified is not first and replaced is not first
    assert ssl.CERT_NONE == unverified.verify_mode and ssl.CERT_REQUIRED == replaced.verify_mode
    with pytest.raises(FileNotFoundError):
        tls_context(acct)


def test_oauth2_value_holds_no_secret(tokens: TokenServer, secret: SecretWriter, ca_file: Path) -> None:
    """The account's OAuth2 settings (a cache and pool key) name sources only."""
    acct = account(ca_file, oauth2_block(tokens, secret))
    assert isinstance(acct.oauth2, OAuth2)
    assert "s3cr3t-value" not in repr(acct)
