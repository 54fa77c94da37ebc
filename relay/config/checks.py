"""Cross-reference checks on the raw YAML mapping: names that must exist, addresses given twice.

Pure: they read only the mapping, so ``parse_config`` reports them together with the models' errors."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from relay.config.accounts import laid_over
from relay.config.models import OAUTH2_KEY_PASSWORD_KEYS, OAUTH2_REFRESH_KEYS, OAUTH2_SECRET_KEYS, _os_users
from relay.config.types import (
    _PHONE_RECIPIENT_RE,
    ARCHIVE_FOLDER_RE,
    EMPTY_PATH,
    SECRET_KEYS,
    LinePath,
    split_addresses,
)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}

def _references(data: Mapping[str, Any]) -> list[tuple[LinePath, str]]:
    """Cross-references that pydantic cannot check one field at a time.

    Works on the raw YAML data so that it can report alongside the per-field errors.
    """
    problems: list[tuple[LinePath, str]] = []
    names = set(_mapping(data.get("upstreams")))
    company = _mapping(data.get("company"))
    users = _mapping(data.get("users"))

    def known(path: LinePath, name: Any) -> None:
        if isinstance(name, str) and name not in names:
            choices = ", ".join(sorted(names)) or "none are defined"
            problems.append((path, f"no upstream named {name!r} (upstreams: {choices})"))

    known(("company", "upstream"), company.get("upstream"))
    unknown_senders = _mapping(data.get("identify")).get("unknown", "company")
    if company.get("upstream") is None and len(names) > 1 and unknown_senders != "reject":
        problems.append((
            ("company",),
            ("set company.upstream: with several upstreams relay cannot guess which one carries the company's "
            "mail (senders that match no user, and users without their own upstream)"),
        ))  # fmt: skip
    if company.get("enabled", True) is not False and not names:
        problems.append((("upstreams",), "define at least one upstream account to deliver through"))
    for user_id, user in users.items():
        upstream = _mapping(user).get("upstream")
        known(("users", user_id, "upstream"), upstream)
        if isinstance(upstream, Mapping) and "host" not in upstream and company.get("upstream") is None:
            problems.append(
                (("users", user_id, "upstream"), "gives no host and the company has no upstream to inherit it from")
            )
    sms = _mapping(data.get("sms"))
    known(("sms", "upstream"), sms.get("upstream"))
    gateway = sms.get("gateway", "{number}")  # the default gateway has the placeholder
    if sms and isinstance(gateway, str) and "{number}" not in gateway and sms.get("number_in", "address") == "address":
        problems.append((("sms", "gateway"), "must contain {number} when number_in is 'address'"))
    problems += _sms_copy_to_problems(sms, company, users)
    listeners = data.get("listeners")
    for index, listener in enumerate(listeners if isinstance(listeners, list) else []):
        user = _mapping(listener).get("user")
        if user is not None and user not in users:
            problems.append((("listeners", index, "user"), f"no user named {user!r}"))
    problems += _os_user_clashes(users)
    problems += _listener_clashes(data) + _empty_sources(data)
    return problems + _secret_source_clashes(data) + _archive_folder_problems(data) + _oauth2_problems(data)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _listener_clashes(data: Mapping[str, Any]) -> list[tuple[LinePath, str]]:
    """Two listeners on one address and port: ``relay check`` said OK and the daemon could not start (the
    second bind fails). ``0.0.0.0`` takes the port on every IPv4 address, ``::`` on every IPv6 one (relay
    binds IPv6 sockets IPv6-only, so ``::`` and an IPv4 address do not clash)."""
    listeners = data.get("listeners")
    bound: list[tuple[int, IPAddress, int]] = []
    problems: list[tuple[LinePath, str]] = []
    for index, listener in enumerate(listeners if isinstance(listeners, list) else []):
        socket = _listener_socket(listener)
        if socket is None:
            continue  # an invalid address or port is reported by the model
        address, port = socket
        clash = next((other for other in bound if other[2] == port and _overlap(address, other[1])), None)
        if clash is not None:
            problems.append((("listeners", index), _clash_words(address, port, clash)))
        bound.append((index, address, port))
    return problems


def _clash_words(address: IPAddress, port: int, other: tuple[int, IPAddress, int]) -> str:
    index, other_address, _ = other
    fix = "(relay would not start): remove one or change its port"
    if address == other_address:
        return f"{_where(address, port)} is also listeners[{index}]: two listeners cannot listen on one address and port {fix}"
    wildcard, specific = (address, other_address) if address.is_unspecified else (other_address, address)
    return (f"{_where(address, port)} overlaps listeners[{index}] ({_where(other_address, port)}): {wildcard} means "
            f"every IPv{address.version} address, so both would listen on {_where(specific, port)} {fix}")  # fmt: skip


def _listener_socket(listener: Any) -> tuple[IPAddress, int] | None:
    """The (address, port) a listener entry binds, with the model's defaults; None when the model refuses it
    or when the port is 0 (the OS picks a free one each time)."""
    listener = _mapping(listener)
    port = listener.get("port", 2525)
    if isinstance(port, str) and port.strip().isdigit():
        port = int(port)  # pydantic reads "2525" as 2525 too
    if not isinstance(port, int) or isinstance(port, bool) or port == 0:
        return None
    try:
        return ipaddress.ip_address(str(listener.get("address", "127.0.0.1"))), port
    except ValueError:
        return None


def _overlap(one: IPAddress, two: IPAddress) -> bool:
    return one.version == two.version and (one == two or one.is_unspecified or two.is_unspecified)


def _where(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


# keys that name where a secret or a file is; left empty (``password_file:``) they read as "not given"
_SOURCE_KEYS = (*SECRET_KEYS, *OAUTH2_SECRET_KEYS, *OAUTH2_REFRESH_KEYS, *OAUTH2_KEY_PASSWORD_KEYS, "ca_file",
                "client_certificate_file", "client_key_file", "service_account_file")  # fmt: skip


def _empty_sources(data: Mapping[str, Any]) -> list[tuple[LinePath, str]]:
    """A source key written with no value: the account silently had no password (``relay send-test`` then
    blamed the provider). On the raw data, the only place where an empty key differs from a missing one."""
    sections = [*_account_sections(data), (("sms",), _mapping(data.get("sms")))]
    sections += [((*path, "oauth2"), _mapping(section.get("oauth2"))) for path, section in _account_sections(data)]
    listeners = data.get("listeners")
    items = listeners if isinstance(listeners, list) else []
    sections += [(("listeners", index), _mapping(item)) for index, item in enumerate(items)]
    problems: list[tuple[LinePath, str]] = []
    for path, section in sections:
        for key, value in section.items():
            if key in (*_SOURCE_KEYS, "tls_cert_file", "tls_key_file") and _blank(value):
                problems.append(((*path, key), _empty_words(str(key))))
    return problems


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _empty_words(key: str) -> str:
    if key.endswith("_env"):
        return "no variable named: write the environment variable's name after the key, or remove the key"
    if key.endswith("_credential"):
        return "no credential named: write the systemd credential's name after the key, or remove the key"
    return EMPTY_PATH

def _os_user_clashes(users: Mapping[str, Any]) -> list[tuple[LinePath, str]]:
    """An OS user (name or uid) may be given for one relay user only: otherwise the first would silently win."""
    owner: dict[str, str] = {}
    problems: list[tuple[LinePath, str]] = []
    for user_id, user in users.items():
        try:
            given = _os_users(_mapping(user).get("os_users"))
        except ValueError:
            continue  # reported by the field's own check
        for item in given:
            key = str(item)
            if key in owner and owner[key] != user_id:
                problems.append((("users", user_id, "os_users"), (f"OS user {item} is already given for user "
                                 f"{owner[key]!r}")))  # fmt: skip
            owner.setdefault(key, user_id)
    return problems

def _archive_folder_problems(data: Mapping[str, Any]) -> list[tuple[LinePath, str]]:
    """A user whose mail is archived names a folder under ``archive.dir``: no ``/``, no ``..``."""
    company_days = _mapping(data.get("company")).get("archive_days")
    problems: list[tuple[LinePath, str]] = []
    for user_id, user in _mapping(data.get("users")).items():
        days = _mapping(user).get("archive_days", company_days)
        if days and not ARCHIVE_FOLDER_RE.fullmatch(str(user_id)):
            problems.append((
                ("users", user_id),
                ("this user's mail is archived in a folder named after the user id: use letters, digits "
                "and . _ @ + - only, starting with a letter or digit"),
            ))  # fmt: skip
    return problems

def _sms_copy_to_problems(
    sms: Mapping[str, Any], company: Mapping[str, Any], users: Mapping[str, Any]
) -> list[tuple[LinePath, str]]:
    """A default recipient at the SMS domain is sent as an SMS: it must be a phone number, or every
    message of that user would be refused."""
    from relay.config.types import normalize_number

    enabled = bool(sms) and sms.get("enabled", True) is not False
    domain, country = str(sms.get("domain", "sms")).lower(), str(sms.get("country_code", "+358"))
    sections: list[tuple[LinePath, Any]] = [(("company", "copy_to"), company.get("copy_to"))]
    sections += [(("users", uid, "copy_to"), _mapping(user).get("copy_to")) for uid, user in users.items()]
    problems: list[tuple[LinePath, str]] = []
    for path, value in sections:
        for address in split_addresses(value) if isinstance(value, (str, list, tuple)) else ():
            local, _, at = str(address).rpartition("@")
            phone = bool(_PHONE_RECIPIENT_RE.match(str(address))) and "." not in at
            if phone and (at.lower() != domain or not enabled):
                where = "the sms: section is off" if at.lower() == domain else f"the SMS domain is {domain!r}"
                problems.append((path, f"{address} is a phone number for SMS, but {where}"))
                continue
            if at.lower() != domain or not enabled:
                continue
            try:
                normalize_number(local, country)
            except ValueError:
                problems.append((path, f"{address} is at the SMS domain but is not a phone number"))
    return problems

def _secret_source_clashes(data: Mapping[str, Any]) -> list[tuple[LinePath, str]]:
    """Every section that names two password sources: upstreams, users' own accounts and sms.

    On the raw data, so the clash is reported together with the section's other errors (a pydantic
    model validator would only run once they are all fixed).
    """
    sections: list[tuple[LinePath, Any]] = [
        (("upstreams", name), upstream) for name, upstream in _mapping(data.get("upstreams")).items()
    ]
    for user_id, user in _mapping(data.get("users")).items():
        sections.append((("users", user_id, "upstream"), _mapping(user).get("upstream")))
    sections.append((("sms",), data.get("sms")))
    problems: list[tuple[LinePath, str]] = []
    for path, section in sections:
        given = [key for key in SECRET_KEYS if _mapping(section).get(key) not in (None, "")]
        if len(given) > 1:
            problems.append((path, f"give only one password source, not {' and '.join(given)}"))
    return problems

def _account_sections(data: Mapping[str, Any]) -> list[tuple[LinePath, Mapping[str, Any]]]:
    """Every account written in the file: named upstreams and users' inline accounts."""
    sections: list[tuple[LinePath, Mapping[str, Any]]] = [
        (("upstreams", name), _mapping(up)) for name, up in _mapping(data.get("upstreams")).items()
    ]
    for user_id, user in _mapping(data.get("users")).items():
        own = _mapping(user).get("upstream")
        if isinstance(own, Mapping):
            sections.append((("users", user_id, "upstream"), own))
    return sections

def _oauth2_problems(data: Mapping[str, Any]) -> list[tuple[LinePath, str]]:
    """OAuth2 accounts whose keys do not add up; on the raw data, reported with every other error."""
    problems: list[tuple[LinePath, str]] = []
    company_name = str(_mapping(data.get("company")).get("upstream") or "")
    company_up = _mapping(_mapping(data.get("upstreams")).get(company_name))
    for path, section in _account_sections(data):
        same_server = path[0] == "users" and section.get("host", company_up.get("host")) == company_up.get("host")
        account = laid_over(company_up, section) if same_server else dict(section)
        wants = account.get("type") == "graph" or account.get("auth") == "oauth2"
        if wants and not isinstance(account.get("oauth2"), Mapping):
            problems.append((path, ("OAuth2 (auth: oauth2 or type: graph) needs an oauth2: block with provider, "
                                   "tenant, client_id and client_secret_file (see config.example.yaml)")))  # fmt: skip
        if "oauth2" in section and not wants:
            problems.append(((*path, "oauth2"), "set auth: oauth2 to use it (auth is password)"))
        if wants and any(account.get(key) not in (None, "") for key in SECRET_KEYS):
            problems.append((path, ("an OAuth2 account has no password: remove password_file/_env/_credential "
                                   "(the app's secret goes in oauth2.client_secret_file)")))  # fmt: skip
        if wants and not account.get("username"):
            problems.append((path, ("username is required: the mailbox relay sends as (the XOAUTH2 user, "
                                   "or the Graph mailbox)")))  # fmt: skip
        if isinstance(section.get("oauth2"), Mapping):
            problems += _oauth2_block_problems((*path, "oauth2"), section["oauth2"])
    return problems

def _oauth2_block_problems(path: LinePath, oauth: Mapping[str, Any]) -> list[tuple[LinePath, str]]:
    problems: list[tuple[LinePath, str]] = []
    groups = ((OAUTH2_SECRET_KEYS, "client secret"), (OAUTH2_REFRESH_KEYS, "refresh token"),
              (OAUTH2_KEY_PASSWORD_KEYS, "key password"))  # fmt: skip
    for keys, what in groups:
        given = [key for key in keys if oauth.get(key) not in (None, "")]
        if len(given) > 1:
            problems.append((path, f"give only one {what} source, not {' and '.join(given)}"))
    has_secret = any(oauth.get(key) for key in OAUTH2_SECRET_KEYS)
    has_refresh = any(oauth.get(key) for key in OAUTH2_REFRESH_KEYS)
    has_cert, has_service = bool(oauth.get("client_certificate_file")), bool(oauth.get("service_account_file"))
    if not (has_secret or has_refresh or has_cert or has_service):
        problems.append((path, ("give client_secret_file or client_certificate_file (app-only), refresh_token_file "
                               "(delegated: relay oauth login writes it), or for Google service_account_file "
                               "(_env and _credential work for secrets too)")))  # fmt: skip
    provider = oauth.get("provider", "microsoft")
    if not oauth.get("client_id") and not has_service:
        problems.append(((*path, "client_id"), "required key is missing"))
    if provider == "microsoft" and not oauth.get("tenant") and not oauth.get("token_url"):
        problems.append((path, ("tenant is required for provider microsoft (yritys.onmicrosoft.com or the tenant id; "
                               "consumers for Outlook.com / Hotmail)")))  # fmt: skip
    if provider == "generic" and not oauth.get("token_url"):
        problems.append((path, "token_url is required for provider generic"))
    if provider == "google" and has_secret and not has_refresh:
        problems.append((path, ("Gmail has no app-only (client credentials) grant: give refresh_token_file with "
                               "the client secret (relay oauth login), or a Workspace service_account_file (see "
                               "the README's Gmail section)")))  # fmt: skip
    problems += _credential_problems(path, oauth, has_secret=has_secret, has_refresh=has_refresh)
    if "client_secret" in oauth or "refresh_token" in oauth or "access_token" in oauth:
        problems.append((path, ("secrets are never written in the shared config: use client_secret_file / "
                               "refresh_token_file (or _env, _credential)")))  # fmt: skip
    return problems


def _credential_problems(
    path: LinePath, oauth: Mapping[str, Any], *, has_secret: bool, has_refresh: bool
) -> list[tuple[LinePath, str]]:
    """Certificates (Entra apps) and service accounts (Google) exclude the keys they replace."""
    problems: list[tuple[LinePath, str]] = []
    provider = oauth.get("provider", "microsoft")
    has_cert, has_service = bool(oauth.get("client_certificate_file")), bool(oauth.get("service_account_file"))
    if has_cert and provider != "microsoft":
        problems.append((path, "client_certificate_file is for provider microsoft (Entra app registrations)"))
    if has_cert and has_secret:
        problems.append((path, ("give a client secret or a certificate, not both (the certificate is the one "
                               "Microsoft recommends: remove client_secret_*)")))  # fmt: skip
    if not has_cert and (oauth.get("client_key_file") or any(oauth.get(k) for k in OAUTH2_KEY_PASSWORD_KEYS)):
        problems.append((path, "client_key_file and client_key_password_* go with client_certificate_file"))
    if has_service and provider != "google":
        problems.append((path, "service_account_file is for provider google (Workspace domain-wide delegation)"))
    if has_service and (has_secret or has_refresh or has_cert):
        problems.append((path, ("a service account signs its own requests: remove client_secret_*, "
                               "refresh_token_* and client_certificate_file")))  # fmt: skip
    if oauth.get("client_secret_expires") is not None and not has_secret:
        problems.append((path, "client_secret_expires is the expiry of a client secret, and none is given"))
    return problems

def _address_clashes(data: Mapping[str, Any]) -> list[tuple[LinePath, str]]:
    """Two users identified by one address. On the raw data, so it is reported alongside other errors."""
    owner: dict[str, str] = {}
    problems: list[tuple[LinePath, str]] = []
    for user_id, user in _mapping(data.get("users")).items():
        given = [_mapping(user).get("addresses"), _mapping(user).get("from_address")]
        own = {a.lower() for v in given if isinstance(v, (str, list, tuple)) for a in split_addresses(v)}
        for address in sorted(own):
            if owner.setdefault(address, user_id) != user_id:
                problems.append(
                    (("users", user_id, "addresses"), f"{address} also identifies user {owner[address]!r}")
                )
    return problems
