"""Signed JWT assertions (RFC 7523) in place of a shared secret, and when the credentials expire.

Two ways an account proves who it is without a client secret:

- **An Entra app's certificate** (``client_certificate_file`` + ``client_key_file``): each token
  request carries a ``client_assertion``, a JWT signed with the certificate's key (PS256), with the
  certificate's SHA-256 thumbprint as ``x5t#S256`` in its header, as Microsoft's "certificate
  credentials" page documents; Entra finds the uploaded certificate by that thumbprint and checks the
  signature with it. ``aud`` is the token endpoint, ``iss`` = ``sub`` = the client id, a fresh ``jti``.
- **A Google service account** (``service_account_file``, Google's JSON key) with domain-wide
  delegation: the JWT-bearer grant, an RS256 JWT with ``iss`` = the service account's e-mail, ``sub`` =
  the mailbox it acts for (the account's ``username``), ``scope`` and ``aud`` = the token endpoint.

The key files are read at each token request, like every other secret (a renewed certificate is used
without a restart), and nothing read from them ever reaches a message: errors name the file only.
PyJWT signs; cryptography parses the PEM files.

``expiries`` lists when each account's certificate or client secret (``client_secret_expires``) runs
out, for ``relay check``, the daemon's daily warning and the expiry metric.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog

from relay.config.credentials import Secret, SecretRef, read_secret
from relay.envelope import Account, OAuth2
from relay.errors import SecretError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

# PyJWT and cryptography are imported by the functions that sign or read a certificate: only accounts
# with a certificate or a service account use them, and at import they would cost each of relay's two
# processes some 9 MB for as long as they run

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME = 600  # seconds: Entra wants a short-lived assertion (5-10 minutes)
SERVICE_ACCOUNT_LIFETIME = 3600  # Google's maximum
WARN_DAYS = 30  # relay check and the daemon warn this many days before a credential expires
CHECK_INTERVAL = 86400.0  # the daemon looks at the expiry dates once a day

log = structlog.get_logger("relay.assertions")


@dataclass(frozen=True)
class Signed:
    """A signed assertion, and a digest of what signed it (a failed request is remembered by that digest:
    the assertion itself differs at each request)."""

    value: Secret
    material: str


@dataclass(frozen=True)
class CertificateInfo:
    """What an admin compares with the app registration's *Certificates & secrets* page."""

    thumbprint: str  # SHA-1, upper-case hex: the "Thumbprint" column Entra shows
    thumbprint_sha256: str
    not_after: datetime.datetime
    subject: str


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _read(path: Path, kind: str) -> bytes:
    """A key or certificate file, read under the secret-file rules (same errors, naming the file only)."""
    value = read_secret(SecretRef(password_file=path), kind=kind)
    assert value is not None  # a file was named
    return value.reveal().encode()


def _certificate(oauth: OAuth2) -> tuple[x509.Certificate, bytes]:
    """The first certificate of ``client_certificate_file`` and the file's bytes."""
    from cryptography import x509

    assert oauth.client_certificate_file is not None
    data = _read(oauth.client_certificate_file, "certificate file")
    try:
        certificate = x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        raise SecretError(f"certificate file {oauth.client_certificate_file} holds no PEM certificate "
                          "(-----BEGIN CERTIFICATE-----)") from None  # fmt: skip
    return certificate, data


def certificate_info(oauth: OAuth2) -> CertificateInfo:
    """The certificate's thumbprints and expiry (no key needed).

    Raises:
        SecretError: the file cannot be read or holds no certificate.
    """
    from cryptography.hazmat.primitives import hashes

    certificate, _ = _certificate(oauth)
    return CertificateInfo(
        thumbprint=certificate.fingerprint(hashes.SHA1()).hex().upper(),
        thumbprint_sha256=certificate.fingerprint(hashes.SHA256()).hex().upper(),
        not_after=certificate.not_valid_after_utc,
        subject=certificate.subject.rfc4514_string(),
    )


def _private_key(oauth: OAuth2, cert_data: bytes) -> tuple[rsa.RSAPrivateKey, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    path = oauth.client_key_file or oauth.client_certificate_file
    data = _read(oauth.client_key_file, "key file") if oauth.client_key_file is not None else cert_data
    ref = SecretRef(oauth.client_key_password_file, oauth.client_key_password_env, oauth.client_key_password_credential)
    password = read_secret(ref, kind="key password")
    try:
        key = serialization.load_pem_private_key(data, password.reveal().encode() if password else None)
    except TypeError:  # encrypted without a password, or a password for a key that has none
        words = "is encrypted: give client_key_password_file" if password is None else "is not encrypted: remove "\
                "client_key_password_*"  # fmt: skip
        raise SecretError(f"the private key in {path} {words}") from None
    except ValueError:
        raise SecretError(f"{path} holds no private key relay can read (PEM, -----BEGIN PRIVATE KEY-----), or its "
                          "password is wrong") from None  # fmt: skip
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SecretError(f"the key in {path} is not an RSA key: Entra takes RSA certificates (openssl req -newkey "
                          "rsa:2048, see the README)")  # fmt: skip
    return key, data


def client_assertion(oauth: OAuth2, audience: str) -> Signed:
    """An Entra client assertion for one token request to ``audience`` (the token endpoint).

    Raises:
        SecretError: the certificate or key cannot be read, or they do not belong together.
    """
    import jwt
    from cryptography.hazmat.primitives import hashes

    certificate, cert_data = _certificate(oauth)
    key, key_data = _private_key(oauth, cert_data)
    if key.public_key().public_numbers() != _public_numbers(certificate):
        raise SecretError(_NOT_THE_KEY.format(certificate=oauth.client_certificate_file))
    now = int(time.time())
    claims = {"aud": audience, "iss": oauth.client_id, "sub": oauth.client_id, "jti": str(uuid.uuid4()),
              "nbf": now, "iat": now, "exp": now + ASSERTION_LIFETIME}  # fmt: skip
    thumbprint = _b64url(certificate.fingerprint(hashes.SHA256()))
    value = jwt.encode(claims, key, algorithm="PS256", headers={"typ": "JWT", "x5t#S256": thumbprint})
    return Signed(Secret(value), hashlib.sha256(cert_data + key_data).hexdigest())


_NOT_THE_KEY = "the private key does not belong to the certificate in {certificate} (check client_key_file)"


def key_mismatch(oauth: OAuth2) -> str | None:
    """Offline, for ``relay check``: why the private key cannot sign for the certificate (it is another
    certificate's key), or ``None`` when it can or when either cannot be read here (a key password only
    the service has, a file only relay's user may read: ``--connect`` and the daemon say so)."""
    if oauth.client_certificate_file is None:
        return None
    try:
        certificate, cert_data = _certificate(oauth)
        key, _ = _private_key(oauth, cert_data)
    except SecretError:
        return None
    if key.public_key().public_numbers() == _public_numbers(certificate):
        return None
    return _NOT_THE_KEY.format(certificate=oauth.client_certificate_file) + (
        f": {oauth.client_key_file or oauth.client_certificate_file} holds the key of another certificate, so no "
        "token can be had; point client_key_file at this certificate's key (or client_certificate_file at the "
        "key's certificate, the one uploaded to the app registration)")  # fmt: skip


def _public_numbers(certificate: x509.Certificate) -> rsa.RSAPublicNumbers | None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    public = certificate.public_key()
    return public.public_numbers() if isinstance(public, rsa.RSAPublicKey) else None


def _service_account(oauth: OAuth2) -> tuple[dict[str, Any], bytes]:
    assert oauth.service_account_file is not None
    path = oauth.service_account_file
    data = _read(path, "service account file")
    try:
        key = json.loads(data)
    except ValueError:
        key = None
    if not isinstance(key, dict) or key.get("type") != "service_account":
        raise SecretError(f"service account file {path} is not a Google service account JSON key "
                          "(\"type\": \"service_account\")")  # fmt: skip
    missing = [name for name in ("client_email", "private_key") if not isinstance(key.get(name), str)]
    if missing:
        raise SecretError(f"service account file {path} has no {' and no '.join(missing)}")
    return key, data


def service_account_assertion(oauth: OAuth2, audience: str) -> Signed:
    """A Google JWT-bearer grant for the mailbox ``oauth.subject`` (domain-wide delegation).

    Raises:
        SecretError: the JSON key cannot be read or used.
    """
    import jwt
    from cryptography.hazmat.primitives import serialization

    key, data = _service_account(oauth)
    try:
        private = serialization.load_pem_private_key(key["private_key"].encode(), None)
    except (TypeError, ValueError):
        raise SecretError(f"the private_key in {oauth.service_account_file} cannot be read") from None
    now = int(time.time())
    claims = {"iss": key["client_email"], "scope": oauth.scope, "aud": audience, "iat": now,
              "exp": now + SERVICE_ACCOUNT_LIFETIME}  # fmt: skip
    if oauth.subject:
        claims["sub"] = oauth.subject
    headers = {"kid": key["private_key_id"]} if isinstance(key.get("private_key_id"), str) else None
    value = jwt.encode(claims, private, algorithm="RS256", headers=headers)  # type: ignore[arg-type]
    return Signed(Secret(value), hashlib.sha256(data).hexdigest())


# region #### expiry ####


@dataclass(frozen=True)
class Expiry:
    """When one account's credential runs out; ``detail`` says which one (a thumbprint, never a secret)."""

    account: str
    credential: Literal["certificate", "client secret"]
    expires: datetime.datetime
    detail: str

    def problem(self, now: datetime.datetime | None = None) -> tuple[Literal["warning", "error"], str] | None:
        """``("error", ...)`` once expired, ``("warning", ...)`` from ``WARN_DAYS`` before, else ``None``."""
        now = now or datetime.datetime.now(datetime.UTC)
        left = self.expires - now
        what = f"{self.account}: the {self.credential} ({self.detail})"
        renew = ("make a new certificate, upload it to the app registration and point client_certificate_file at "
                 "it" if self.credential == "certificate" else "add a new client secret in the app registration, "
                 "write it to the secret's file and update client_secret_expires")  # fmt: skip
        if left.total_seconds() <= 0:
            return "error", f"{what} expired on {self.expires:%Y-%m-%d}: no token can be had; {renew}"
        if left <= datetime.timedelta(days=WARN_DAYS):
            return "warning", f"{what} expires on {self.expires:%Y-%m-%d}, in {left.days} day(s): {renew}"
        return None


def expiries(accounts: Iterable[Account]) -> tuple[list[Expiry], list[tuple[str, str]]]:
    """Each account's certificate or dated client secret, and the certificates that cannot be read
    (account name, why). One credential shared by several accounts is listed for each."""
    found: list[Expiry] = []
    unreadable: list[tuple[str, str]] = []
    for account in accounts:
        oauth = account.oauth2
        if oauth is None:
            continue
        if oauth.client_certificate_file is not None:
            try:
                info = certificate_info(oauth)
            except SecretError as exc:
                unreadable.append((account.name, str(exc)))
                continue
            found.append(Expiry(account.name, "certificate", info.not_after, f"thumbprint {info.thumbprint}"))
        if oauth.client_secret_expires is not None:
            end = datetime.datetime.combine(oauth.client_secret_expires, datetime.time(), datetime.UTC)
            found.append(Expiry(account.name, "client secret", end, "client_secret_expires"))
    return found, unreadable


async def watch_expiries(current: Callable[[], Iterable[Account]]) -> None:
    """The daemon's daily look at its credentials: ``credential_expiring`` (a warning from ``WARN_DAYS``
    before) or ``credential_expired`` (an error), each once a day, and ``credential_unreadable`` for a
    certificate that cannot be read. ``current`` gives the accounts of the config in use (a reload applies)."""
    while True:
        try:
            found, unreadable = await asyncio.to_thread(expiries, current())
        except Exception as exc:  # noqa: BLE001  (a config that no longer resolves: the next round tries again)
            log.warning("credential_check_failed", error=f"{type(exc).__name__}: {exc}")
            found, unreadable = [], []
        for expiry in found:
            problem = expiry.problem()
            if problem is not None:
                level, words = problem
                event = "credential_expired" if level == "error" else "credential_expiring"
                getattr(log, level)(event, upstream=expiry.account, credential=expiry.credential,
                                    expires=f"{expiry.expires:%Y-%m-%d}", reason=words)  # fmt: skip
        for name, why in unreadable:
            log.warning("credential_unreadable", upstream=name, reason=why)
        await asyncio.sleep(CHECK_INTERVAL)


# endregion
