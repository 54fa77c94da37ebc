"""Credentials without a shared secret (issue 18): an Entra app's certificate and a Google service account.

The emulators verify what the providers verify: Entra finds the uploaded certificate by the assertion's
thumbprint, refuses it once expired, and checks the signature with its public key; Google checks the
service account's signature, the scope delegated to it in the Admin console and the mailbox in ``sub``.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from relay.commands.cli import main
from relay.config.accounts import account_for
from relay.config.load import parse_config
from relay.envelope import Account
from relay.errors import TokenError
from relay.transports.tokens import TokenCache
from tests.conftest import UpstreamFactory, smtp_send
from tests.oauth_servers import TENANT, GoogleTokenServer, TokenServer, run_closing
from tests.servers import RelayRunner

MAILBOX = "yritys.tunnus@yritys.fi"
APP = "cert-app"
SecretWriter = Callable[[str, str], Path]
_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # one key per run: keygen is the slow part


def _pem_key(key: rsa.RSAPrivateKey, password: str | None = None) -> bytes:
    encryption = (serialization.BestAvailableEncryption(password.encode()) if password
                  else serialization.NoEncryption())  # fmt: skip
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def make_certificate(folder: Path, name: str, *, days: float = 365, key: rsa.RSAPrivateKey = _KEY,
                     password: str | None = None, combined: bool = False) -> tuple[x509.Certificate, dict[str, str]]:  # fmt: skip
    """A self-signed certificate as ``openssl req -x509`` makes it (the README's command), valid ``days``
    more days (negative: expired); and the oauth2 keys that name its files."""
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay o365")])
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=400))
        .not_valid_after(now + datetime.timedelta(days=days)).sign(key, hashes.SHA256())
    )  # fmt: skip
    folder.mkdir(mode=0o700, exist_ok=True)
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    keys: dict[str, str] = {"client_certificate_file": str(folder / f"{name}.pem")}
    if combined:
        (folder / f"{name}.pem").write_bytes(cert_pem + _pem_key(key, password))
    else:
        (folder / f"{name}.pem").write_bytes(cert_pem)
        (folder / f"{name}.key").write_bytes(_pem_key(key, password))
        keys["client_key_file"] = str(folder / f"{name}.key")
    for path in folder.iterdir():
        path.chmod(0o600)
    if password:
        (folder / f"{name}.pass").write_text(password + "\n")
        keys["client_key_password_file"] = str(folder / f"{name}.pass")
    return certificate, keys


def cert_account(tokens: TokenServer, keys: dict[str, str], ca_file: Path, port: int = 1) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "security": "starttls", "ca_file": str(ca_file), "timeout": 10,
            "username": MAILBOX, "auth": "oauth2",
            "oauth2": {"provider": "microsoft", "tenant": TENANT, "client_id": APP, "token_url": tokens.url, **keys}}  # fmt: skip


def resolved(up: dict[str, Any], name: str = "o365") -> Account:
    config = parse_config(yaml.safe_dump({"upstreams": {name: up}, "company": {"upstream": name}}))
    return account_for(config, name)


def fetch(acct: Account) -> str:
    cache = TokenCache()
    return run_closing(cache, cache.token(acct))[0].reveal()


@pytest.fixture
def entra(token_server: Callable[..., TokenServer]) -> TokenServer:
    return token_server(roles=("SMTP.SendAsApp",))


class TestCertificate:
    def test_the_assertion_is_verified_with_the_certificates_public_key(
        self, entra: TokenServer, ca_file: Path, tmp_path: Path
    ) -> None:
        """As Entra documents it: PS256, x5t#S256 = the certificate's SHA-256 thumbprint, aud the token
        endpoint, iss = sub = the client id, a fresh jti each time; no client secret is sent."""
        certificate, keys = make_certificate(tmp_path / "certs", "o365")
        entra.certificates[APP] = certificate
        acct = resolved(cert_account(entra, keys, ca_file))

        first, second = fetch(acct), fetch(acct)

        assert entra.valid(first, "SMTP.SendAsApp") and entra.valid(second)
        [(header, claims), (_, again)] = entra.assertions
        assert "PS256" == header["alg"]
        assert certificate.fingerprint(hashes.SHA256()) == _unb64(header["x5t#S256"])
        assert (entra.url, APP, APP) == (claims["aud"], claims["iss"], claims["sub"])
        assert claims["jti"] != again["jti"] and claims["exp"] - claims["nbf"] <= 600

    def test_one_file_with_both_and_an_encrypted_key(self, entra: TokenServer, ca_file: Path, tmp_path: Path) -> None:
        certificate, keys = make_certificate(tmp_path / "certs", "o365", combined=True, password="kissa123")
        entra.certificates[APP] = certificate

        assert entra.valid(fetch(resolved(cert_account(entra, keys, ca_file))))

    def test_a_certificate_not_uploaded_is_refused_with_what_to_do(
        self, entra: TokenServer, ca_file: Path, tmp_path: Path
    ) -> None:
        uploaded, _ = make_certificate(tmp_path / "uploaded", "o365")
        _, keys = make_certificate(tmp_path / "other", "o365", key=rsa.generate_private_key(65537, 2048))
        entra.certificates[APP] = uploaded

        with pytest.raises(TokenError) as info:
            fetch(resolved(cert_account(entra, keys, ca_file)))

        assert "AADSTS700027" in str(info.value) and "token refused" == info.value.step

    def test_a_key_that_is_not_the_certificates_is_named_before_asking(
        self, entra: TokenServer, ca_file: Path, tmp_path: Path
    ) -> None:
        _, keys = make_certificate(tmp_path / "a", "o365")
        _, other = make_certificate(tmp_path / "b", "o365", key=rsa.generate_private_key(65537, 2048))
        keys["client_key_file"] = other["client_key_file"]

        with pytest.raises(TokenError) as info:
            fetch(resolved(cert_account(entra, keys, ca_file)))

        assert "secret" == info.value.step and "does not belong to the certificate" in str(info.value)
        assert [] == entra.grants + entra.refused

    def test_an_expired_certificate(self, entra: TokenServer, ca_file: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
        """Entra refuses it (AADSTS700027, the key used is expired); relay check says so as an error, exit 1."""
        certificate, keys = make_certificate(tmp_path / "certs", "o365", days=-2)
        entra.certificates[APP] = certificate
        up = cert_account(entra, keys, ca_file)

        with pytest.raises(TokenError) as info:
            fetch(resolved(up))
        path = tmp_path / "relay.yaml"
        path.write_text(yaml.safe_dump({"spool_dir": str(tmp_path / "spool"), "upstreams": {"o365": up},
                                        "company": {"upstream": "o365"}}))  # fmt: skip
        code = main(["check", str(path)])
        out, err = capsys.readouterr()

        assert "AADSTS700027" in str(info.value) and "expired" in info.value.description
        thumbprint = certificate.fingerprint(hashes.SHA1()).hex().upper()
        assert 1 == code
        assert re.search(rf"error: o365: the certificate \(thumbprint {thumbprint}\) expired on \d{{4}}-", err)
        assert "1 expired credential(s)" in out

    def test_check_prints_the_thumbprint_and_warns_30_days_before(
        self, entra: TokenServer, ca_file: Path, tmp_path: Path, secret: SecretWriter,
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        certificate, keys = make_certificate(tmp_path / "certs", "o365", days=10.5)
        dated = {**cert_account(entra, {}, ca_file), "oauth2": {"provider": "microsoft", "tenant": TENANT,
                 "client_id": "secret-app", "client_secret_file": str(secret("app", "s3cr3t")),
                 "client_secret_expires": (datetime.date.today() + datetime.timedelta(days=5)).isoformat()}}  # fmt: skip
        path = tmp_path / "relay.yaml"
        path.write_text(yaml.safe_dump({"spool_dir": str(tmp_path / "spool"), "company": {"upstream": "o365"},
                                        "upstreams": {"o365": cert_account(entra, keys, ca_file), "old": dated}}))  # fmt: skip

        code = main(["check", str(path)])
        out, err = capsys.readouterr()

        thumbprint = certificate.fingerprint(hashes.SHA1()).hex().upper()
        assert 0 == code
        assert f"certificate: o365: thumbprint {thumbprint}" in out
        assert f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC" in out
        assert re.search(rf"warning: o365: the certificate \(thumbprint {thumbprint}\) expires on .*, in 10 day", err)
        assert re.search(r"warning: old: the client secret \(client_secret_expires\) expires on .*, in [45] day", err)
        key_text = Path(keys["client_key_file"]).read_text()
        assert not [line for line in key_text.splitlines()[1:-1] if line in out + err]
        assert "PRIVATE KEY" not in out + err

    def test_an_office_365_app_on_a_certificate_delivers_and_the_daemon_watches_the_expiry(
        self, entra: TokenServer, ca_file: Path, tmp_path: Path, upstream: UpstreamFactory,
        relay_with: Callable[..., RelayRunner],
    ) -> None:  # fmt: skip
        """End to end through the daemon: XOAUTH2 with a token got by the certificate; the daemon logs the
        expiry warning at start, the metric gives the expiry time, and no key or assertion is logged."""
        certificate, keys = make_certificate(tmp_path / "certs", "o365", days=20)
        entra.certificates[APP] = certificate
        up = upstream("o365", xoauth2=lambda user, token: user == MAILBOX and entra.valid(token, "SMTP.SendAsApp"))
        with capture_logs() as logs:
            relay = relay_with(upstreams={"o365": cert_account(entra, keys, ca_file, port=up.port)},
                               company={"upstream": "o365", "from_address": MAILBOX})  # fmt: skip
            smtp_send(relay.port, "erp@legacy.local", ["asiakas@example.com"], b"Subject: Lasku\r\n\r\nLasku.\r\n")
            [mail] = up.wait_for(1)
            metrics = relay.run(lambda daemon: generate_latest(daemon.metrics.registry).decode())
            relay.stop()

        assert MAILBOX == mail.login
        [expiring] = [e for e in logs if e["event"] == "credential_expiring"]
        assert ("o365", "certificate") == (expiring["upstream"], expiring["credential"])
        assert f"{certificate.not_valid_after_utc:%Y-%m-%d}" == expiring["expires"]
        gauge = re.search(r'relay_credential_expiry_timestamp_seconds\{account="o365",credential="certificate"\} (\S+)',
                          metrics)  # fmt: skip
        assert gauge is not None and float(gauge[1]) == certificate.not_valid_after_utc.timestamp()
        logged = repr(logs)
        key_lines = Path(keys["client_key_file"]).read_text().splitlines()[1:-1]
        assert [] == [line for line in key_lines if line in logged]
        assert "eyJ" not in logged  # no JWT (an assertion or a token) in any log event


def _unb64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# region #### Google service accounts ####

SA_EMAIL = "relay-mailer@yritys-project.iam.gserviceaccount.com"
WORKSPACE = ("myynti@yritys.fi", "laskutus@yritys.fi")


def service_account_key(folder: Path, key: rsa.RSAPrivateKey = _KEY) -> Path:
    """Google's JSON key as the Cloud console downloads it."""
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / "workspace-sa.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "yritys-project", "private_key_id": "0123456789abcdef",
        "private_key": _pem_key(key).decode(), "client_email": SA_EMAIL, "client_id": "109876543210987654321",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": "https://oauth2.googleapis.com/token",
    }))  # fmt: skip
    path.chmod(0o600)
    return path


@pytest.fixture
def google(server_context: Any) -> Any:
    server = GoogleTokenServer(server_context)
    server.service_accounts[SA_EMAIL] = _KEY.public_key()
    server.delegation[SA_EMAIL] = {"https://mail.google.com/"}
    server.domain_users.update(WORKSPACE)
    yield server
    server.close()


def workspace_account(google: GoogleTokenServer, key: Path, ca_file: Path, mailbox: str, port: int = 1) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "security": "ssl", "ca_file": str(ca_file), "timeout": 10,
            "username": mailbox, "auth": "oauth2",
            "oauth2": {"provider": "google", "service_account_file": str(key), "token_url": google.url}}  # fmt: skip


class TestServiceAccount:
    def test_the_assertion_names_the_mailbox_in_sub(self, google: GoogleTokenServer, ca_file: Path,
                                                    tmp_path: Path) -> None:  # fmt: skip
        key = service_account_key(tmp_path / "secrets")
        token = fetch(resolved(workspace_account(google, key, ca_file, WORKSPACE[0]), "workspace"))

        assert google.valid_for(WORKSPACE[0], token)
        [(header, claims)] = google.assertions
        assert ("RS256", "0123456789abcdef") == (header["alg"], header["kid"])
        assert (SA_EMAIL, WORKSPACE[0], "https://mail.google.com/", google.url) == (
            claims["iss"], claims["sub"], claims["scope"], claims["aud"])  # fmt: skip
        assert claims["exp"] - claims["iat"] <= 3600

    def test_without_domain_wide_delegation(self, google: GoogleTokenServer, ca_file: Path, tmp_path: Path) -> None:
        google.delegation[SA_EMAIL] = set()
        key = service_account_key(tmp_path / "secrets")

        with pytest.raises(TokenError) as info:
            fetch(resolved(workspace_account(google, key, ca_file, WORKSPACE[0]), "workspace"))

        assert "unauthorized_client" == info.value.code

    def test_two_mailboxes_of_the_domain_through_one_key(
        self, google: GoogleTokenServer, ca_file: Path, tmp_path: Path, upstream: UpstreamFactory,
        relay_with: Callable[..., RelayRunner],
    ) -> None:  # fmt: skip
        """One key, every mailbox: each user's mail goes out logged in as that user, with a token for them."""
        key = service_account_key(tmp_path / "secrets")
        up = upstream("gmail", security="ssl", xoauth2=google.valid_for)
        relay = relay_with(
            upstreams={"workspace": workspace_account(google, key, ca_file, WORKSPACE[0], up.port)},
            company={"upstream": "workspace", "from_address": WORKSPACE[0]},
            users={"laskutus": {"addresses": WORKSPACE[1], "from_address": WORKSPACE[1],
                                "upstream": {"username": WORKSPACE[1]}}},
        )  # fmt: skip
        smtp_send(relay.port, "erp@legacy.local", ["a@example.com"], b"Subject: 1\r\n\r\n1\r\n")
        smtp_send(relay.port, WORKSPACE[1], ["b@example.com"], b"Subject: 2\r\n\r\n2\r\n")

        got = up.wait_for(2)

        assert {("a@example.com", WORKSPACE[0]), ("b@example.com", WORKSPACE[1])} == {
            (m.rcpt_tos[0], m.login) for m in got}  # fmt: skip
        assert set(WORKSPACE) == {claims["sub"] for _, claims in google.assertions}


# endregion


def test_config_refuses_mixed_credentials(tmp_path: Path) -> None:
    """A certificate with a secret, a service account for Microsoft, a key without a certificate."""
    from relay.errors import ConfigError

    oauth = {"provider": "microsoft", "tenant": TENANT, "client_id": "a", "client_secret_file": "/s",
             "client_certificate_file": "/c.pem", "service_account_file": "/k.json"}  # fmt: skip
    up = {"host": "smtp.office365.com", "username": MAILBOX, "auth": "oauth2", "oauth2": oauth}
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump({"upstreams": {"o365": up}}))

    text = str(info.value)
    assert "a client secret or a certificate, not both" in text
    assert "service_account_file is for provider google" in text
