"""The certificate a listener shows to programs that insist on encryption: loaded, renewed, checked.

A program set to "TLS" or "SSL" (a .NET program with ``EnableSsl = true``, an ERP once pointed at
Office 365) starts with STARTTLS, or with TLS from the first byte on port 465, and gives up on a server
that offers neither. A listener with ``tls_cert_file`` and ``tls_key_file`` gets a ``ServerCertificate``
for the daemon's lifetime: its ``context`` is handed to each STARTTLS session and, for ``tls: implicit``,
to the server socket itself. A reload (SIGHUP) builds a new context from the renewed files (in a
thread, checked whole: a half-copied renewal is refused) and ``replace`` makes it the one every new
handshake switches to; open connections keep the certificate they started with.

``check`` is ``relay check``'s part: a key or certificate relay cannot load is an error (the daemon
would not start); a certificate that names none of the names clients connect to, or that expires
within ``EXPIRY_WARNING_DAYS``, is a warning.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from relay.errors import CertificateError

if TYPE_CHECKING:
    from cryptography import x509

    from relay.config.models import ListenerConfig

# cryptography is imported where a certificate is looked at (relay check, a listener's reload): at
# import it would cost each of relay's two processes some 8 MB for as long as they run

EXPIRY_WARNING_DAYS = 30
# what a client connecting to relay by name is told to expect on these ports
_PORT_HINTS = {
    ("implicit", 25): "port 25 speaks plain SMTP and STARTTLS; clients will not start with TLS there (tls: starttls)",
    ("implicit", 587): "port 587 speaks STARTTLS (tls: starttls); a client set to port 587 will not start with TLS",
    ("starttls", 465): "port 465 is implicit TLS: a client set to port 465 starts with TLS (tls: implicit)",
}


@dataclass(frozen=True)
class Finding:
    """One thing ``relay check`` says about a listener's TLS: ``key`` is the listener's key it is about."""

    key: str
    message: str
    error: bool = False


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server-side context showing ``cert_file``; ``CertificateError`` says which file is wrong and how.

    Python's defaults for a server (TLS 1.2 or later, OpenSSL's ciphers), no client certificates asked.
    """
    _parse_certificates(cert_file)
    _parse_key(key_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load(context, cert_file, key_file)
    return context


class ServerCertificate:
    """A listener's certificate, replaceable while it serves.

    ``context`` is fixed for the listener's lifetime (an implicit-TLS server socket keeps the context it
    was created with). Its ``sni_callback``, which OpenSSL calls at every handshake's ClientHello (with
    ``None`` as the name when the client sends none, as clients connecting by IP address do), moves the
    handshake to the newest context: a replacement is one assignment on the event loop, never a context
    half reloaded.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self._current = context
        context.sni_callback = self._choose

    def _choose(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        if self._current is not self.context:
            connection.context = self._current

    def replace(self, context: ssl.SSLContext) -> None:
        """New handshakes show ``context``'s certificate (built by ``server_context``)."""
        self._current = context


def _load(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CertificateError(
                f"tls_key_file {key_file} is not the private key of tls_cert_file {cert_file}: give the key the "
                "certificate was made for", key="tls_key_file",
            ) from None
        raise CertificateError(f"tls_cert_file {cert_file} with tls_key_file {key_file} cannot be used: {exc}") from None
    except CertificateError:
        raise
    except OSError as exc:  # a file replaced between the checks and the load
        raise CertificateError(_unreadable("tls_cert_file", Path(exc.filename or cert_file), exc)) from None


def _no_passphrase() -> bytes:
    """OpenSSL's default would ask for a passphrase on the daemon's terminal; relay cannot type one."""
    raise CertificateError("the TLS private key is encrypted: relay needs it without a passphrase", key="tls_key_file")


def _read(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(_unreadable(key, path, exc), key=key) from None


def _unreadable(key: str, path: Path, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"{key} {path} does not exist"
    if isinstance(exc, IsADirectoryError):
        return f"{key} {path} is a directory, not a PEM file"
    if isinstance(exc, PermissionError):
        return (f"{key} {path} cannot be read by this user (uid {os.geteuid()}): relay reads it as its own user; "
                "give that user read access (e.g. chgrp relay and chmod 640)")  # fmt: skip
    return f"{key} {path} cannot be read: {exc.strerror or exc}"


def _parse_certificates(cert_file: Path) -> list[x509.Certificate]:
    """The PEM certificates in ``cert_file``, the server's own first (then its chain)."""
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(_read("tls_cert_file", cert_file))
    except ValueError:
        raise CertificateError(
            f"tls_cert_file {cert_file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        ) from None
    return certificates


def _parse_key(key_file: Path) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        load_pem_private_key(_read("tls_key_file", key_file), password=None)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        raise CertificateError(
            f"tls_key_file {key_file} is encrypted (has a passphrase), which relay cannot type: store it without "
            f"one, readable by relay only (openssl pkey -in {key_file} -out relay.key; chmod 600)", key="tls_key_file"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(
            f"tls_key_file {key_file} holds no PEM private key (-----BEGIN PRIVATE KEY-----)", key="tls_key_file"
        ) from None


def names(certificate: x509.Certificate) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """The DNS names and IP addresses a certificate is valid for (its subjectAltName; clients ignore the CN)."""
    from cryptography import x509

    try:
        alt = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    addresses = [a for a in alt.get_values_for_type(x509.IPAddress) if isinstance(a, (ipaddress.IPv4Address,
                                                                                         ipaddress.IPv6Address))]
    return alt.get_values_for_type(x509.DNSName), addresses


def covers(certificate: x509.Certificate, name: str) -> bool:
    """Would a client connecting to ``name`` accept this certificate's names (RFC 6125: one ``*`` label)?"""
    dns, addresses = names(certificate)
    try:
        return ipaddress.ip_address(name) in addresses
    except ValueError:
        pass
    wanted = name.lower().rstrip(".")
    for pattern in (d.lower().rstrip(".") for d in dns):
        if pattern == wanted:
            return True
        if pattern.startswith("*.") and "." in wanted and wanted.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def summary(cert_file: Path) -> dict[str, object]:
    """What the daemon logs about the certificate it now shows: names and expiry."""
    try:
        [certificate, *_] = _parse_certificates(cert_file)
    except (CertificateError, ValueError):
        return {}
    dns, addresses = names(certificate)
    return {"names": [*dns, *map(str, addresses)], "not_after": certificate.not_valid_after_utc.isoformat()}


def check(listener: ListenerConfig, server_name: str, *, now: dt.datetime | None = None) -> list[Finding]:
    """What ``relay check`` says about one listener's TLS (nothing for a plain listener).

    ``server_name`` is the name the listener announces (its ``hostname``, the top-level one, or this
    machine's); with the address it listens on (unless that is every address) those are the names a
    client may connect to. The certificate must cover one of them.
    """
    if listener.tls_cert_file is None or listener.tls_key_file is None:
        return []
    found = _port_findings(listener)
    try:
        server_context(listener.tls_cert_file, listener.tls_key_file)
    except CertificateError as exc:
        return [*found, Finding(exc.key, str(exc), error=True)]
    found += _key_mode_findings(listener.tls_key_file)
    [certificate, *_] = _parse_certificates(listener.tls_cert_file)
    found += _expiry_findings(listener.tls_cert_file, certificate, now or dt.datetime.now(dt.UTC))
    found += _name_findings(listener, certificate, server_name)
    return found


def _port_findings(listener: ListenerConfig) -> list[Finding]:
    hint = _PORT_HINTS.get((listener.tls_mode or "", listener.port))
    return [Finding("tls", hint)] if hint else []


def _key_mode_findings(key_file: Path) -> list[Finding]:
    mode = key_file.stat().st_mode
    if mode & stat.S_IRWXO:
        return [Finding("tls_key_file", f"private key {key_file} can be read by every user on this machine (mode "
                                        f"{stat.S_IMODE(mode):04o}): chmod 640 (group relay) or 600")]  # fmt: skip
    return []


def _expiry_findings(cert_file: Path, certificate: x509.Certificate, now: dt.datetime) -> list[Finding]:
    not_after, not_before = certificate.not_valid_after_utc, certificate.not_valid_before_utc
    if not_after <= now:
        return [Finding("tls_cert_file", f"certificate {cert_file} expired on {not_after:%Y-%m-%d}: clients that "
                                         "check it refuse to send; renew it, then reload relay")]  # fmt: skip
    if not_before > now:
        return [Finding("tls_cert_file", f"certificate {cert_file} is valid only from {not_before:%Y-%m-%d %H:%M} "
                                         "UTC (is this machine's clock right?)")]  # fmt: skip
    days = round((not_after - now).total_seconds() / 86400)
    if days < EXPIRY_WARNING_DAYS:
        return [Finding("tls_cert_file", f"certificate {cert_file} expires on {not_after:%Y-%m-%d} (in {days} "
                                         "day(s)): renew it, then reload relay (systemctl reload relay)")]  # fmt: skip
    return []


def _name_findings(listener: ListenerConfig, certificate: x509.Certificate, server_name: str) -> list[Finding]:
    address = ipaddress.ip_address(listener.address)
    wanted = [server_name]
    if not address.is_unspecified:
        wanted.append(listener.address)
    if address.is_loopback:
        wanted.append("localhost")
    if any(covers(certificate, name) for name in wanted):
        return []
    dns, addresses = names(certificate)
    has = ", ".join([*dns, *map(str, addresses)]) or "no subjectAltName at all (clients ignore the CN)"
    return [Finding("tls_cert_file", f"certificate {listener.tls_cert_file} is not valid for {' or '.join(wanted)} "
                                     f"(it names {has}): clients that check it refuse it unless they connect by one "
                                     "of its names; set hostname to the name they use, or issue the certificate "
                                     "for it")]  # fmt: skip
