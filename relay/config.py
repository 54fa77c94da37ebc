"""YAML file -> one frozen, typed ``Config``, validated once, with every error placed in the file.

The admin edits one file: listeners, named upstream accounts, company defaults, per-user overrides,
rewriting rules and the SMS route. ``load_config`` reads it and either returns a ``Config`` or raises
one ``ConfigError`` that lists *all* problems at once, each with its key path and line number, the way
a compiler reports errors. ``check_warnings`` lists combinations that work but are probably mistakes
(``ssl`` on port 587, TLS verification off, a secret file others can read) or things missing on this
machine that the admin may still create (a password, a ``ca_file``, a writable ``spool_dir``).

Passwords are never inline: an upstream names where its secret lives (a 0600 file, an environment
variable, or a systemd credential) and ``credentials.py`` reads it only when a delivery needs it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from pydantic.json_schema import SkipJsonSchema

from relay.credentials import HasSecretSource, SecretRef, read_secret
from relay.errors import ConfigError, ConfigProblem, SecretError
from relay.yamlerrors import explain as explain_yaml_error

Security = Literal["none", "ssl", "starttls"]
IdentifyRule = Literal["auth", "envelope_sender", "header_from", "client_address", "listener", "os_user"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# what `relay schema` tells an editor about an IP address field: digits, dots and colons, so a host name
# (localhost) is underlined as the validator below will refuse it
IP_ADDRESS_SCHEMA: dict[str, Any] = {"pattern": r"^[0-9A-Fa-f.:]+(%[A-Za-z0-9_.-]+)?$"}  # (an IPv6 zone: %eth0)
LOOPBACK: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
DEFAULT_SPOOL = "/var/lib/relay/spool"
DEFAULT_ARCHIVE = "/var/lib/relay/archive"
DEFAULT_SECRET_STORE = "/var/lib/relay/secrets"  # relay passwd: users' own passwords and local logins
ARCHIVE_FOLDER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*")  # a user id that can name its archive folder
SECRET_KEYS = ("password_file", "password_env", "password_credential")
_ADDRESS_RE = re.compile(r"^[^@\s<>()\[\],;:\"\\]+@[^@\s<>()\[\],;:\"\\]+\.[^@\s<>()\[\],;:\"\\]+$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)[bB]?\s*$")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


# region #### value checks shared by several models ####


def _no_line_breaks(value: str) -> str:
    """Anything that reaches a header or an SMTP command must stay on one line (no injection)."""
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError("must not contain line breaks or NUL characters")
    return value


def _address(value: str) -> str:
    value = _no_line_breaks(value.strip())
    if not _ADDRESS_RE.match(value):
        raise ValueError(f"not an email address: {value!r}")
    return value


# A phone number at a one-word domain, the ERPs' way of naming an SMS recipient (``040 123 4567@sms``):
# not an email address, but a default recipient may be one (the seeds' "Vakio vastaanottaja").
_PHONE_RECIPIENT_RE = re.compile(r"^\+?[\d\s()\-/.]+@[A-Za-z0-9][A-Za-z0-9-]*$")


def _recipient(value: str) -> str:
    value = _no_line_breaks(value.strip())
    if _PHONE_RECIPIENT_RE.match(value) and any(c.isdigit() for c in value.partition("@")[0]):
        return value  # the SMS section is checked against it in _sms_copy_to_problems
    return _address(value)


def _recipient_list(value: Any) -> tuple[str, ...]:
    return _address_list(value, check=_recipient)


def split_addresses(value: str | Iterable[str]) -> tuple[str, ...]:
    """Split the seeds' ``a@x.fi; b@y.fi, c@z.fi`` lists (also given as YAML lists)."""
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        out.extend(part.strip() for part in re.split(r"[;,]", str(item)) if part.strip())
    return tuple(out)


def _address_list(value: Any, check: Callable[[str], str] = _address) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (str, list, tuple)):
        raise ValueError("expected an address or a list of addresses")
    return tuple(check(a) for a in split_addresses(value))


def _size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size such as 35M or a number of bytes")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"expected a size such as 35M or a number of bytes, got {value!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


Address = Annotated[str, BeforeValidator(lambda v: _address(v) if isinstance(v, str) else v)]
# the JSON Schema (relay schema) shows what may be written: one string ("a@x.fi; b@y.fi") or a list
AddressList = Annotated[
    tuple[str, ...], BeforeValidator(_address_list, json_schema_input_type=str | list[str])
]
RecipientList = Annotated[  # addresses or phone@sms
    tuple[str, ...], BeforeValidator(_recipient_list, json_schema_input_type=str | list[str])
]
HeaderText = Annotated[str, BeforeValidator(lambda v: _no_line_breaks(v) if isinstance(v, str) else v)]
_SIZE_SCHEMA = {
    "anyOf": [{"type": "integer", "exclusiveMinimum": 0}, {"type": "string", "pattern": _SIZE_RE.pattern}]
}
Size = Annotated[int, BeforeValidator(_size), Field(gt=0), WithJsonSchema(_SIZE_SCHEMA)]  # 35M or bytes


def _host_name(value: Any) -> Any:
    """A host, not a URL: ``https://graph.microsoft.com`` or ``host/v1.0`` would fail each delivery as
    a name lookup error, far from the typo that caused it."""
    if isinstance(value, str) and ("/" in value or any(c.isspace() for c in value)):
        raise ValueError("expected a host name such as smtp.office365.com or graph.microsoft.com, not a URL "
                         "(the port goes in port)")
    return value


HostName = Annotated[HeaderText, BeforeValidator(_host_name)]
Port = Annotated[int, Field(ge=1, le=65535)]

# endregion


class _Model(BaseModel):
    # field docstrings are the descriptions in ``relay schema`` (an editor shows them while typing)
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class SecretSource(_Model):
    """Where a secret lives. At most one source; none means 'no secret'.

    "At most one" is checked on the raw YAML (``_secret_source_clashes``), not here: a model validator
    runs only once every field of the model is valid, so ``relay check`` would hide it behind them.
    """

    password_file: Path | None = None
    """A file holding the password (one line), readable only by the relay user (chmod 600)."""
    password_env: str | None = None
    """An environment variable of the daemon that holds the password (e.g. from EnvironmentFile=)."""
    password_credential: str | None = None
    """A systemd credential name (LoadCredential=NAME:/path in relay.service), read from
    $CREDENTIALS_DIRECTORY."""
    password: SkipJsonSchema[Any] = Field(default=None, exclude=True, repr=False)  # refused, unlisted

    @field_validator("password", mode="before")
    @classmethod
    def _refuse_inline(cls, value: Any) -> None:
        if value is not None:
            raise ValueError(
                "passwords are never written in the shared config: use password_file (a file only the "
                "daemon can read), password_env or password_credential (systemd LoadCredential=)"
            )

    @property
    def has_secret(self) -> bool:
        return bool(self.password_file or self.password_env or self.password_credential)


OAuthProvider = Literal["microsoft", "google", "generic"]
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")
GRAPH_HOST = "graph.microsoft.com"
OAUTH2_SECRET_KEYS = ("client_secret_file", "client_secret_env", "client_secret_credential")
OAUTH2_REFRESH_KEYS = ("refresh_token_file", "refresh_token_env", "refresh_token_credential")
_TOKEN_URLS = {
    "microsoft": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
    "google": "https://oauth2.googleapis.com/token",
}


def _tenant(value: Any) -> Any:
    if isinstance(value, str) and not _TENANT_RE.match(value):
        raise ValueError("expected a tenant domain (yritys.onmicrosoft.com) or a tenant id (a GUID)")
    return value


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _token_url(value: Any) -> Any:
    """An https URL: the client secret and the refresh token are posted to it, so plain http would send
    them across the network in clear. ``http://`` only for an endpoint on this machine (a local proxy)."""
    if not isinstance(value, str):
        return value
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 (raises for a port that is not 1-65535)
    except ValueError:
        raise ValueError("the port in the URL is not a number from 0 to 65535") from None
    if not parts.hostname or any(c.isspace() for c in value):
        raise ValueError("expected a URL such as https://login.microsoftonline.com/TENANT/oauth2/v2.0/token")
    if parts.scheme == "https" or (parts.scheme == "http" and _loopback(parts.hostname)):
        return value
    raise ValueError("must start with https:// (the client secret and refresh token are sent to it); http:// "
                     "only for a token endpoint on this machine (127.0.0.1, ::1, localhost)")


class OAuth2Config(_Model):
    """How an account gets its OAuth2 access tokens (XOAUTH2 for SMTP, a bearer token for Graph).

    App-only (client credentials: a client secret) or delegated (a refresh token, with a client
    secret when the provider wants one). Secrets come from files, variables or systemd credentials,
    like passwords. Cross-key rules (one source each, a tenant for microsoft) are checked on the raw
    YAML in ``_oauth2_problems`` so that ``relay check`` reports them with the other errors.
    """

    provider: OAuthProvider = "microsoft"
    """Whose token endpoint: microsoft (needs tenant) | google | generic (needs token_url). Default
    microsoft."""
    tenant: Annotated[HeaderText | None, BeforeValidator(_tenant)] = None
    """Microsoft tenant: its domain (yritys.onmicrosoft.com) or its id (a GUID)."""
    client_id: HeaderText
    """The app's (client) id from the app registration."""
    client_secret_file: Path | None = None
    """A file (mode 600) holding the app's client secret."""
    client_secret_env: str | None = None
    """An environment variable holding the app's client secret."""
    client_secret_credential: str | None = None
    """A systemd credential holding the app's client secret."""
    refresh_token_file: Path | None = None
    """A file (mode 600) holding the refresh token (delegated sign-in); a rotated token is written back to
    it."""
    refresh_token_env: str | None = None
    """An environment variable holding the refresh token (a rotated one is kept in memory only)."""
    refresh_token_credential: str | None = None
    """A systemd credential holding the refresh token (a rotated one is kept in memory only)."""
    scope: HeaderText | None = None
    """The scope to ask for. Default: the provider's for SMTP or Graph."""
    token_url: Annotated[HeaderText | None, BeforeValidator(_token_url)] = None
    """The token endpoint (https://). Default: the provider's."""

    @property
    def delegated(self) -> bool:
        return any(getattr(self, key) for key in OAUTH2_REFRESH_KEYS)

    def effective_token_url(self) -> str:
        if self.token_url:
            return self.token_url
        return _TOKEN_URLS.get(self.provider, "").format(tenant=self.tenant or "common")

    def effective_scope(self, transport: str) -> str:
        """The provider's scope for this flow: app-only tokens ask for ``.default`` of the resource."""
        if self.scope is not None:
            return self.scope
        if transport == "graph":
            return "https://graph.microsoft.com/.default" + (" offline_access" if self.delegated else "")
        if self.provider == "google":
            return "https://mail.google.com/"
        if self.provider == "microsoft":
            if self.delegated:
                return "https://outlook.office.com/SMTP.Send offline_access"
            return "https://outlook.office365.com/.default"
        return ""


class SendingLimits(_Model):
    """An account's sending limits; a key left out takes the provider's default (``limits.py``), 0 = none.

    ``window`` is the length in seconds of the ``messages`` limit: 60 for "30 messages a minute".
    """

    messages: int | None = Field(default=None, ge=0)
    """At most this many messages per window. Default: the provider's (Office 365: 30 a minute); 0 = none."""
    window: float = Field(default=60.0, gt=0)
    """Seconds that the messages limit counts over. Default 60."""
    messages_per_day: int | None = Field(default=None, ge=0)
    """At most this many messages in any 24 hours. Default: the provider's; 0 = none."""
    recipients_per_day: int | None = Field(default=None, ge=0)
    """At most this many recipients in any 24 hours. Default: the provider's (Office 365: 10000); 0 = none."""
    recipients_per_message: int | None = Field(default=None, ge=0)
    """Larger recipient lists are sent in several transactions. Default: the provider's (Gmail: 100); 0 =
    none."""


class UpstreamConfig(SecretSource):
    """An authenticated account at a mail provider (the seeds' server, port, SSL, username, password).

    ``type: graph`` delivers through Microsoft Graph's sendMail over HTTPS instead of SMTP; ``host``
    and ``port`` are then Graph's (``graph.microsoft.com``, 443; another host for national clouds).
    """

    host: HostName
    """The provider's SMTP server (smtp.office365.com), or Graph's host for type graph. A host name, not a
    URL."""
    port: Port | None = None
    """Default: 465 for ssl, 587 for starttls, 25 for none, 443 for graph."""
    security: Security = "starttls"
    """ssl (implicit TLS, port 465) | starttls (port 587) | none. Default starttls."""
    username: HeaderText | None = None
    """The login, usually the mailbox address (the XOAUTH2 user, or the Graph mailbox)."""
    ca_file: Path | None = None
    """A PEM file of CA certificates for a private CA. Default: the system's."""
    verify: bool = True
    """Check the server's TLS certificate. Default true; false lets anyone on the path read the password."""
    timeout: float = Field(default=60.0, gt=0)
    """Seconds to wait for each reply of the provider. Default 60."""
    local_hostname: HeaderText | None = None
    """The name sent in EHLO. Default: this machine's name."""
    max_connections: int = Field(default=3, ge=1, le=100)  # Office 365 allows 3 per mailbox
    """Connections to this account at once, kept open and reused, 1-100. Default 3 (Office 365's limit)."""
    type: Literal["smtp", "graph"] = "smtp"
    """smtp (default) | graph (Microsoft Graph sendMail over HTTPS; needs auth oauth2)."""
    auth: Literal["password", "oauth2"] = "password"
    """password (a password source) | oauth2 (an oauth2 block). Default password."""
    oauth2: OAuth2Config | None = None
    """How this account gets OAuth2 tokens (auth: oauth2 or type: graph)."""

    @model_validator(mode="before")
    @classmethod
    def _graph_host(cls, data: Any) -> Any:
        """A Graph upstream needs no host: Microsoft's global Graph endpoint is the default."""
        if isinstance(data, Mapping) and data.get("type") == "graph" and "host" not in data:
            return {**data, "host": GRAPH_HOST}
        return data
    sending_limits: SendingLimits = SendingLimits()
    """The provider's sending limits relay keeps to; keys left out take the provider's defaults."""

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        if self.type == "graph":
            return 443
        return {"none": 25, "ssl": 465, "starttls": 587}[self.security]


class UpstreamOverride(SecretSource):
    """A user's own account fields; every field left out is taken from the company's upstream."""

    host: HostName | None = None
    """The user's own server. Default: the company upstream's."""
    port: Port | None = None
    """Default: the company upstream's, or the own security's port."""
    security: Security | None = None
    """ssl | starttls | none. Default: the company upstream's."""
    username: HeaderText | None = None
    """The user's own login on the company's server, or on their own."""
    ca_file: Path | None = None
    """Default: the company upstream's."""
    verify: bool | None = None
    """Default: the company upstream's."""
    timeout: float | None = Field(default=None, gt=0)
    """Default: the company upstream's."""
    local_hostname: HeaderText | None = None
    """Default: the company upstream's."""
    max_connections: int | None = Field(default=None, ge=1, le=100)
    """Default: the company upstream's."""
    auth: Literal["password", "oauth2"] | None = None
    """password | oauth2. Default: the company upstream's."""
    oauth2: OAuth2Config | None = None
    """The user's own OAuth2 sign-in."""
    sending_limits: SendingLimits | None = None
    """Default: the company upstream's."""


class ListenerConfig(_Model):
    """Where legacy programs connect. Unauthenticated mail is taken only from ``allowed_networks``."""

    address: Annotated[str, Field(json_schema_extra=IP_ADDRESS_SCHEMA)] = "127.0.0.1"
    """The IP address to listen on. Default 127.0.0.1; any other needs allowed_networks."""
    port: Annotated[int, Field(ge=0, le=65535)] = 2525  # 0: the OS picks a free port (tests)
    """Default 2525 (port 25 needs CAP_NET_BIND_SERVICE, see relay.service)."""
    allowed_networks: tuple[IPNetwork, ...] | None = None
    """Who may send through this listener without logging in (IP addresses or networks). Default: loopback
    only."""
    user: str | None = None
    """A user id (see users) for everything arriving on this listener (identify rule listener)."""
    hostname: HeaderText | None = None
    """The name in the SMTP greeting and EHLO reply. Default: the top-level hostname."""

    @field_validator("address")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)  # raises ValueError with a readable message
        return value

    @model_validator(mode="after")
    def _open_relay_guard(self) -> ListenerConfig:
        if self.allowed_networks is None and not ipaddress.ip_address(self.address).is_loopback:
            raise ValueError(
                f"listening on non-loopback address {self.address} needs an explicit allowed_networks "
                "list (who may send through relay without authenticating), or relay would be an open relay"
            )
        return self

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return self.allowed_networks if self.allowed_networks is not None else LOOPBACK


class Profile(_Model):
    """Fields a company sets as defaults and a user may override one by one."""

    from_address: Address | None = None
    """The mailbox mail is sent as (the sender the provider accepts)."""
    from_name: HeaderText | None = None
    """The display name in From."""
    copy_to: RecipientList | None = None
    """Address(es) added to every message (';' or ',' separated, or a list); a phone number at the SMS domain
    is sent as an SMS."""
    signature: str | None = None
    """Text appended to every mail (plain and HTML parts, once). Empty: none."""
    reply_to_original: bool | None = None
    """Keep the address the program wrote in From as Reply-To when relay replaces From. Default true."""
    archive_days: int | None = Field(default=None, ge=0)  # 0 or unset: no archive copies (archive.py)
    """Keep a copy of each delivered message for this many days under archive.dir. 0 or unset: no copies."""


class CompanyConfig(Profile):
    """Company-wide defaults (the seeds' company SMTP account and company email)."""

    enabled: bool = True
    """false refuses all mail (550). Default true."""
    upstream: str | None = None
    """The account for company mail and users without their own: a name under upstreams. Default: the only
    one."""
    copy_to_mode: Literal["bcc", "cc"] = "bcc"
    """How copy_to recipients are added: bcc (envelope only) | cc (visible). Default bcc."""


UserUpstream = Annotated[
    Annotated[str, Tag("upstream-name")] | Annotated[UpstreamOverride, Tag("upstream-fields")],
    Discriminator(lambda v: "upstream-name" if isinstance(v, str) else "upstream-fields"),
]


_OS_USER_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.@\\$-]*")  # POSIX names, also winbind's DOMAIN\user


def _os_users(value: Any) -> tuple[int | str, ...]:
    """``[matti, 1001, "1002"]`` -> names and uids; a name of digits only is a uid (useradd allows no such name)."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[int | str] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            out.append(item)
        elif isinstance(item, str) and item.strip().isdigit():
            out.append(int(item.strip()))
        elif isinstance(item, str) and _OS_USER_NAME_RE.fullmatch(item.strip()):
            out.append(item.strip())
        else:
            raise ValueError(f"expected OS user names or uids (numbers 0 or more), got {item!r}")
    return tuple(out)


OsUserList = Annotated[tuple[int | str, ...], BeforeValidator(_os_users)]


class UserConfig(Profile):
    """One user's own settings; each field given here overrides the company's."""

    addresses: AddressList = ()
    """Addresses that identify this user in MAIL FROM or From (';' or ',' separated, or a list)."""
    clients: tuple[IPNetwork | ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    """IP addresses or networks of this user's workstations (identify rule client_address)."""
    reject: bool = False
    """true refuses this user's mail (550). Default false."""
    upstream: UserUpstream | None = None
    """The user's own account: a name under upstreams, or fields laid over the company's account."""
    os_users: OsUserList = ()
    """Local OS users (names or uids) whose programs send as this user (identify rule os_user)."""


class IdentifyConfig(_Model):
    """How the submitting user is found, rule by rule, first match wins."""

    order: tuple[IdentifyRule, ...] = ("auth", "envelope_sender", "header_from", "client_address", "listener")
    """Rules tried in order, first match wins: auth, envelope_sender, header_from, client_address, listener,
    os_user."""
    unknown: Literal["company", "reject"] = "company"
    """No rule matched: company (send with the company defaults) | reject (550). Default company."""


class DeliveryConfig(_Model):
    """Delivery workers and the retry policy (doubling waits between a minimum and a maximum)."""

    workers: int = Field(default=4, ge=1, le=256)
    """Messages delivered at the same time, 1-256. Default 4."""
    retry_interval: float = Field(default=60.0, gt=0)
    """Seconds before the first retry; doubles with each attempt. Default 60."""
    max_retry_interval: float = Field(default=4000.0, gt=0)
    """The wait between retries never grows beyond this many seconds. Default 4000."""
    deadline: float = Field(default=300.0, gt=0)
    """Seconds one whole delivery attempt may take. Default 300."""
    max_queue_lifetime: float = Field(default=5 * 86400.0, gt=0)
    """Seconds a message may wait before it fails for good. Default 432000 (5 days)."""
    notices: bool = True
    """Mail the sending user an RFC 3464 report when relay gives up on recipients. Default true."""
    notify: AddressList = ()
    """Addresses that get a copy of every notice. Default: none."""
    delay_warning: float = Field(default=0.0, ge=0)
    """Seconds after which waiting mail gets one 'still trying' notice. 0 = never (default)."""


class RecipientRule(_Model):
    """Rewrite one address, or every address of a domain (``match: '@old.fi'``)."""

    match: HeaderText
    """An exact address, or a whole domain ('@old.fi')."""
    replace: HeaderText
    """The new address, or '@domain' to keep the local part."""


class RewriteConfig(_Model):
    """How submitted mail is repaired and rewritten before it is queued."""

    default_charset: HeaderText = "windows-1252"
    """Charset assumed for 8-bit text that declares none. Default windows-1252."""
    recipient_rules: tuple[RecipientRule, ...] = ()
    """Recipient rewriting, first match wins."""
    redirect_all: Address | None = None
    """Test installations: every message goes to this address instead. Default: off."""
    remove_dkim: bool = True
    """Remove DKIM-Signature headers the program added (relay changes From). Default true."""
    # a message whose body must be rewritten is parsed; these bound what a hostile one can cost
    max_mime_parts: int = Field(default=1000, ge=1)
    """A message relay must parse with more parts is refused (554). Default 1000."""
    max_mime_depth: int = Field(default=32, ge=1)
    """A message relay must parse nested deeper is refused (554). Default 32."""


class SmsConfig(SecretSource):
    """The seeds' SMS tab: phone-number recipients become mail to an email-to-SMS gateway."""

    enabled: bool = True
    """false keeps the settings but sends no SMS. Default true."""
    domain: HeaderText = "sms"
    """The pseudo-domain that marks a phone-number recipient (040 123 4567@sms). Default sms."""
    gateway: HeaderText = "{number}@smsmail.example.com"
    """The gateway's address; {number} is replaced by the phone number. Default {number}@smsmail.example.com.
    The gateway's address; {number} is replaced by the phone number. Default {number}@smsmail.example.com."""
    number_in: Literal["address", "subject", "body"] = "address"
    """Where the number goes: address | subject | body. Default address."""
    password_in: Literal["none", "subject", "body"] = "none"
    """Where the gateway's password goes: none | subject | body. Default none."""
    upstream: str | None = None
    """The account SMS are sent through (a name under upstreams). Default: the sender's own."""
    from_address: Address | None = None
    """The sender of SMS mail. Default: the sending user's."""
    country_code: HeaderText = "+358"
    """For numbers written without one (040...). Default +358."""
    # how {number} is written: +358401234567 (e164), 358401234567 (digits) or 0401234567 (national)
    number_format: Literal["e164", "digits", "national"] = "e164"
    """How {number} is written: e164 (+358401234567) | digits (358401234567) | national (0401234567). Default
    e164."""


class LimitsConfig(_Model):
    """What clients may submit: one message's size (552) and recipients (452); connections at once
    (421) and messages a minute (450), which protect the host and the mailbox (``admission.py``)."""

    max_message_size: Size = 35 * 1024 * 1024
    """Bigger messages are refused with 552: bytes, or a size such as 35M. Default 35M."""
    max_recipients: int = Field(default=100, ge=1)
    """The RCPT that goes over gets 452 (list members count one by one). Default 100."""
    max_connections: int = Field(default=200, ge=0)  # 0: no limit
    """Connections at once from all clients; one more gets 421. 0 = no limit. Default 200."""
    max_connections_per_client: int = Field(default=100, ge=0)
    """Connections at once from one client address; one more gets 421. 0 = no limit. Default 100."""
    messages_per_minute_per_client: int = Field(default=0, ge=0)  # 0: no limit (the default)
    """Messages a minute from one client address; more get 450 at MAIL. 0 = no limit (default)."""
    messages_per_minute_per_user: int = Field(default=0, ge=0)
    """Messages a minute from one user; more get 450 after DATA. 0 = no limit (default)."""


class ArchiveConfig(_Model):
    """Where archive copies are kept (a Maildir per user, see archive.py) and how often old ones go."""

    dir: Path = Path(DEFAULT_ARCHIVE)
    """Where the archive Maildirs are, one per user. Default /var/lib/relay/archive."""
    sweep_interval: float = Field(default=3600.0, gt=0)
    """Seconds between removals of copies past their archive_days. Default 3600."""


class MetricsConfig(_Model):
    """The Prometheus endpoint (metrics.py). Loopback only unless ``allow_remote``: the counts name
    every account and show the mail volume, which is nobody's business outside this machine."""

    address: Annotated[str, Field(json_schema_extra=IP_ADDRESS_SCHEMA)] = "127.0.0.1"
    """The address /metrics is served on. Default 127.0.0.1."""
    port: Annotated[int, Field(ge=0, le=65535)] = 9464  # 0: the OS picks a free port (tests)
    """Default 9464."""
    allow_remote: bool = False
    """Allow a non-loopback address (the counts name every account). Default false."""

    @field_validator("address")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value

    @model_validator(mode="after")
    def _loopback_guard(self) -> MetricsConfig:
        if not self.allow_remote and not ipaddress.ip_address(self.address).is_loopback:
            raise ValueError(
                f"metrics on non-loopback address {self.address}: set allow_remote: true to publish the "
                "counts (account names, mail volume) to the network, or use 127.0.0.1 behind a proxy"
            )
        return self


class LoggingConfig(_Model):
    """``auto``: readable on a terminal, JSON lines otherwise (journald, files)."""

    format: Literal["auto", "json", "console"] = "auto"
    """auto (readable on a terminal, JSON lines otherwise) | json | console. Default auto."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """debug | info | warning | error. Default info."""


class Config(_Model):
    """The whole, validated configuration. Built only by ``load_config`` / ``parse_config``."""

    listeners: tuple[ListenerConfig, ...] = (ListenerConfig(),)
    """Where legacy programs connect. Default: one on 127.0.0.1:2525."""
    spool_dir: Path = Path(DEFAULT_SPOOL)
    """The queue. Default /var/lib/relay/spool."""
    secret_store: Path = Path(DEFAULT_SECRET_STORE)
    """Where `relay passwd` keeps users' own passwords and local logins. Default /var/lib/relay/secrets."""
    hostname: HeaderText | None = None
    """The name in the SMTP greeting. Default: this machine's name."""
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    """Named accounts at mail providers, which company and users send through."""
    company: CompanyConfig = CompanyConfig()
    """Company-wide defaults."""
    users: dict[str, UserConfig] = Field(default_factory=dict)
    """Users by id; each field given overrides the company's."""
    identify: IdentifyConfig = IdentifyConfig()
    """How the sending user is found."""
    delivery: DeliveryConfig = DeliveryConfig()
    """Delivery workers, retries and notices."""
    rewrite: RewriteConfig = RewriteConfig()
    """How mail is repaired and rewritten before it is queued."""
    sms: SmsConfig | None = None
    """Phone-number recipients sent through an email-to-SMS gateway. Default: no SMS."""
    limits: LimitsConfig = LimitsConfig()
    """What clients may submit, and how fast."""
    logging: LoggingConfig = LoggingConfig()
    """Log format and level."""
    archive: ArchiveConfig = ArchiveConfig()
    """Where archive copies are kept."""
    metrics: MetricsConfig | None = None
    """Serve Prometheus metrics. Default: off."""
    source: SkipJsonSchema[str | None] = Field(default=None, exclude=True)

    @property
    def archiving(self) -> bool:
        """Is anyone's mail archived (``archive_days`` of the company or of a user)?"""
        return bool(self.company.archive_days) or any(user.archive_days for user in self.users.values())


# region #### loading with line numbers ####

LinePath = tuple[str | int, ...]


def _yaml_lines(node: yaml.Node, path: LinePath, lines: dict[LinePath, int], dups: list[LinePath]) -> None:
    """Walk the composed YAML tree and remember where every key path starts (1-based lines)."""
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                dups.append((*path, key))
            seen.add(key)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _yaml_lines(value_node, (*path, key), lines, dups)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _yaml_lines(item, (*path, index), lines, dups)


def _dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_for(path: LinePath, lines: Mapping[LinePath, int]) -> int | None:
    for cut in range(len(path), -1, -1):
        if path[:cut] in lines:
            return lines[path[:cut]]
    return None


def _pydantic_problems(exc: ValidationError, lines: Mapping[LinePath, int], file: str) -> list[ConfigProblem]:
    problems = []
    for err in exc.errors(include_url=False):
        # pydantic adds the union member or validator name to loc; keep only real keys of the file
        # (a key of the file is kept even when it looks like a tag, e.g. an upstream named "upstream-eu")
        loc: LinePath = ()
        for part in err["loc"]:
            if isinstance(part, int) or (*loc, part) in lines or not _is_pydantic_tag(part):
                loc = (*loc, part)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"].startswith("ip_v"):  # one message, not one per member of the IP union
            message = "not an IP address or network (such as 192.168.10.23 or 192.168.10.0/24)"
        elif err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see config.example.yaml for every key)"
        elif err["type"] == "missing":
            message = "required key is missing"
        elif err["type"] not in _OWN_WORDS and not _secret_key(loc):
            message = f"{_TYPE_WORDS.get(err['type'], message)}, got {_given(err['input'])}"
        problems.append(ConfigProblem(_dotted(loc), message, _line_for(loc, lines), file))
    return _dedupe(problems)


# pydantic's words for a value of the wrong type, said as an admin would; the value given is echoed after them
_TYPE_WORDS = {
    "int_parsing": "expected a whole number", "int_type": "expected a whole number",
    "int_from_float": "expected a whole number", "float_parsing": "expected a number", "float_type": "expected a number",
    "bool_parsing": "expected true or false", "bool_type": "expected true or false",
    "string_type": "expected text (a number or true/false is text when put in quotes)",
    "dict_type": "expected a section of keys (key: value lines indented under it)",
    "list_type": "expected a list", "tuple_type": "expected a list",
}  # fmt: skip
_OWN_WORDS = {"value_error", "assertion_error", "missing", "extra_forbidden"}  # relay's messages say it already


def _secret_key(loc: LinePath) -> bool:
    """A key whose value is never echoed, even when it is of the wrong type (it may be a secret)."""
    return any(word in str(part).lower() for part in loc for word in ("password", "secret", "token"))


def _given(value: Any) -> str:
    """The value the admin wrote, as the YAML gave it (``'587x'``), or what kind of thing it was."""
    if value is None:
        return "nothing (the key has no value)"
    if isinstance(value, Mapping):
        return "a section of keys"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_pydantic_tag(part: str) -> bool:
    return part.startswith("upstream-") or ("[" in part and "]" in part)


def _dedupe(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    seen: set[tuple[str, str]] = set()
    out = []
    for p in problems:
        if (p.path, p.message) not in seen:
            seen.add((p.path, p.message))
            out.append(p)
    return out


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
            "set company.upstream: with several upstreams relay cannot guess which one carries the company's "
            "mail (senders that match no user, and users without their own upstream)",
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
    return problems + _secret_source_clashes(data) + _archive_folder_problems(data) + _oauth2_problems(data)


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
                problems.append((("users", user_id, "os_users"), f"OS user {item} is already given for user "
                                 f"{owner[key]!r}"))  # fmt: skip
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
                "this user's mail is archived in a folder named after the user id: use letters, digits "
                "and . _ @ + - only, starting with a letter or digit",
            ))  # fmt: skip
    return problems


def _sms_copy_to_problems(
    sms: Mapping[str, Any], company: Mapping[str, Any], users: Mapping[str, Any]
) -> list[tuple[LinePath, str]]:
    """A default recipient at the SMS domain is sent as an SMS: it must be a phone number, or every
    message of that user would be refused."""
    from relay.sms import normalize_number  # sms.py needs this module's SmsConfig

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


def laid_over(base: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """A user's own account keys over the company's account keys (same server).

    An own password source replaces the company's whole way of logging in (its password source, or its
    OAuth2), and an own ``oauth2:`` replaces its password source: a login is never half of each.
    """
    fields = dict(base)
    if any(own.get(key) for key in SECRET_KEYS):
        for key in (*SECRET_KEYS, "auth", "oauth2"):
            fields.pop(key, None)
    if own.get("oauth2") is not None or own.get("auth") == "oauth2":
        for key in SECRET_KEYS:
            fields.pop(key, None)
    return {**fields, **own}


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
            problems.append((path, "OAuth2 (auth: oauth2 or type: graph) needs an oauth2: block with provider, "
                                   "tenant, client_id and client_secret_file (see config.example.yaml)"))  # fmt: skip
        if "oauth2" in section and not wants:
            problems.append(((*path, "oauth2"), "set auth: oauth2 to use it (auth is password)"))
        if wants and any(account.get(key) not in (None, "") for key in SECRET_KEYS):
            problems.append((path, "an OAuth2 account has no password: remove password_file/_env/_credential "
                                   "(the app's secret goes in oauth2.client_secret_file)"))  # fmt: skip
        if wants and not account.get("username"):
            problems.append((path, "username is required: the mailbox relay sends as (the XOAUTH2 user, "
                                   "or the Graph mailbox)"))  # fmt: skip
        if isinstance(section.get("oauth2"), Mapping):
            problems += _oauth2_block_problems((*path, "oauth2"), section["oauth2"])
    return problems


def _oauth2_block_problems(path: LinePath, oauth: Mapping[str, Any]) -> list[tuple[LinePath, str]]:
    problems: list[tuple[LinePath, str]] = []
    for keys, what in ((OAUTH2_SECRET_KEYS, "client secret"), (OAUTH2_REFRESH_KEYS, "refresh token")):
        given = [key for key in keys if oauth.get(key) not in (None, "")]
        if len(given) > 1:
            problems.append((path, f"give only one {what} source, not {' and '.join(given)}"))
    has_secret = any(oauth.get(key) for key in OAUTH2_SECRET_KEYS)
    if not has_secret and not any(oauth.get(key) for key in OAUTH2_REFRESH_KEYS):
        problems.append((path, "give client_secret_file (app-only, client credentials) or refresh_token_file "
                               "(delegated; _env and _credential work too)"))  # fmt: skip
    provider = oauth.get("provider", "microsoft")
    if provider == "microsoft" and not oauth.get("tenant") and not oauth.get("token_url"):
        problems.append((path, "tenant is required for provider microsoft (yritys.onmicrosoft.com or the tenant id)"))
    if provider == "generic" and not oauth.get("token_url"):
        problems.append((path, "token_url is required for provider generic"))
    if provider == "google" and has_secret and not any(oauth.get(key) for key in OAUTH2_REFRESH_KEYS):
        problems.append((path, "Gmail has no app-only (client credentials) grant: give refresh_token_file with "
                               "the client secret (see the README's Gmail section)"))  # fmt: skip
    if "client_secret" in oauth or "refresh_token" in oauth or "access_token" in oauth:
        problems.append((path, "secrets are never written in the shared config: use client_secret_file / "
                               "refresh_token_file (or _env, _credential)"))  # fmt: skip
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


def parse_config(text: str, *, file: str = "config") -> Config:
    """Parse and validate YAML text; raise ``ConfigError`` listing every problem found."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # in words that say what to change, on the line to change
        advice = explain_yaml_error(exc, text)
        raise ConfigError([ConfigProblem(advice.path, f"not valid YAML: {advice.message}", advice.line, file)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem("", "the file must be a mapping of keys to values", 1, file)])
    lines: dict[LinePath, int] = {}
    dups: list[LinePath] = []
    if node is not None:
        _yaml_lines(node, (), lines, dups)
    problems = [
        ConfigProblem(_dotted(p), "key given twice; the second would silently win", lines.get(p), file) for p in dups
    ]
    config: Config | None = None
    try:
        config = Config.model_validate({**data, "source": file})
    except ValidationError as exc:
        problems += _pydantic_problems(exc, lines, file)
    found = _references(data) + _address_clashes(data)
    problems += [ConfigProblem(_dotted(p), m, _line_for(p, lines), file) for p, m in found]
    if problems or config is None:
        raise ConfigError(sorted(problems, key=lambda p: p.line or 0))
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the admin's YAML file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem("", f"cannot read {path}: {exc}", None, str(path))]) from None
    return parse_config(text, file=str(path))


# endregion

# region #### warnings: valid but probably wrong ####

_PORT_HINTS = {
    ("ssl", 587): "port 587 normally speaks STARTTLS; with security: ssl the TLS handshake will hang or fail",
    ("starttls", 465): "port 465 normally speaks implicit TLS; use security: ssl",
    ("none", 465): "port 465 expects implicit TLS (security: ssl); without it the password would be refused",
    ("none", 587): "port 587 expects STARTTLS; security: none sends the password in clear text",
}


def _upstream_warnings(path: LinePath, up: UpstreamConfig | UpstreamOverride) -> list[tuple[LinePath, str]]:
    out: list[tuple[LinePath, str]] = []
    port = up.port
    if port == 995:
        out.append(((*path, "port"), "port 995 is POP3S (reading mail), not SMTP; use 465 or 587"))
    elif port == 993:
        out.append(((*path, "port"), "port 993 is IMAPS (reading mail), not SMTP; use 465 or 587"))
    if up.security and port and (up.security, port) in _PORT_HINTS:
        out.append(((*path, "security"), _PORT_HINTS[(up.security, port)]))
    if up.verify is False:
        out.append(((*path, "verify"), "TLS certificate verification is off: anyone on the path can read the password"))
    if up.security == "none" and up.has_secret:
        out.append(((*path, "security"), "security: none sends the password unencrypted"))
    if up.password_file is not None:
        out += _secret_file_warnings((*path, "password_file"), up.password_file)
    out += _secret_read_warnings(path, up)
    if up.ca_file is not None:
        out += _ca_file_warnings((*path, "ca_file"), up.ca_file)
    if isinstance(up, UpstreamConfig) and up.type == "smtp" and up.auth == "password":
        out += _basic_auth_end_warnings(path, up.host)
    if up.oauth2 is not None:
        out += _oauth2_warnings((*path, "oauth2"), up.oauth2)
    return out


BASIC_AUTH_END = "the end of December 2026"


def _basic_auth_end_warnings(path: LinePath, host: str) -> list[tuple[LinePath, str]]:
    """Office 365 turns password SMTP AUTH off: an account still on it will stop delivering."""
    if not host.lower().rstrip(".").endswith(("office365.com", "outlook.com")):
        return []
    return [((*path, "host"), f"Office 365 turns password (Basic) SMTP AUTH off by default at {BASIC_AUTH_END} "
                              "(tenants created after that never have it): switch this account to auth: oauth2 or "
                              "type: graph (README: Office 365 after December 2026)")]  # fmt: skip


def _own_login_warnings(config: Config, user_id: str) -> list[tuple[LinePath, str]]:
    """A user's own password laid over the company's Office 365 account (or an own Office 365 server) is
    Basic AUTH too, though the override names no host and no ``auth``: judged on the resolved account."""
    from relay.envelope import USER_ACCOUNT_PREFIX
    from relay.settings import account_for  # settings.py builds on this module

    try:
        account = account_for(config, USER_ACCOUNT_PREFIX + user_id)
    except (ConfigError, ValueError):  # an override that does not resolve is reported as an error
        return []
    if account.transport != "smtp" or account.oauth2 is not None or account.username is None:
        return []
    return _basic_auth_end_warnings(("users", user_id, "upstream"), account.host)


def secret_refs(oauth: OAuth2Config) -> tuple[SecretRef, SecretRef]:
    """The client secret's and the refresh token's sources, in the shape ``read_secret`` reads."""
    client = SecretRef(oauth.client_secret_file, oauth.client_secret_env, oauth.client_secret_credential)
    refresh = SecretRef(oauth.refresh_token_file, oauth.refresh_token_env, oauth.refresh_token_credential)
    return client, refresh


def _oauth2_warnings(path: LinePath, oauth: OAuth2Config) -> list[tuple[LinePath, str]]:
    out: list[tuple[LinePath, str]] = []
    for ref, kind in zip(secret_refs(oauth), ("client secret", "refresh token")):
        if ref.password_file is not None:
            out += _secret_file_warnings(path, ref.password_file)
        out += _secret_read_warnings(path, ref, kind=kind)
    folder = oauth.refresh_token_file.parent if oauth.refresh_token_file is not None else None
    if folder is not None and folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        out.append((path, f"{folder} is not writable by this user (uid {os.geteuid()}): a refresh token the "
                          "provider rotates cannot be saved there (relay writes a new file and renames it)"))  # fmt: skip
    if oauth.refresh_token_env or oauth.refresh_token_credential:
        out.append((path, "a refresh token the provider rotates (Microsoft does) cannot be written back to an "
                          "environment variable or a systemd credential: relay keeps the new one in memory only, "
                          "so after a restart the old one may be refused; use refresh_token_file"))  # fmt: skip
    return out


def _inherited_pair_warnings(
    path: LinePath, own: UpstreamOverride, base: UpstreamConfig | None
) -> list[tuple[LinePath, str]]:
    """A user's own port with the company account's security (same host) can be a bad pair too.

    (An own security without a port gets that security's port; an own host inherits nothing: settings.py.)
    """
    if base is None or own.port is None or own.security is not None:
        return []
    if own.host is not None and own.host.lower() != base.host.lower():
        return []
    pair = (base.security, own.port)
    if pair not in _PORT_HINTS:
        return []
    return [((*path, "port"), f"{_PORT_HINTS[pair]} (security {base.security} is the company upstream's)")]


def _secret_file_warnings(path: LinePath, file: Path) -> list[tuple[LinePath, str]]:
    """A password file others can read. (One that cannot be read at all: ``_secret_read_warnings``.)"""
    try:
        mode = file.stat().st_mode
    except OSError:
        return []
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return [(path, f"secret file {file} can be read by others (mode {stat.S_IMODE(mode):04o}); chmod 600 it")]
    return []


def _secret_read_warnings(
    path: LinePath, source: HasSecretSource, *, kind: str | None = None
) -> list[tuple[LinePath, str]]:
    """A password that cannot be read now: a warning, since the admin may create it before the first delivery.

    Read as the user running the check (the daemon at start-up, the admin for ``relay check``), with the
    environment of that process. ``SecretError`` messages name the source, never the value.
    """
    key = next((k for k in SECRET_KEYS if getattr(source, k) is not None), None)
    if key is None or (source.password_file is not None and _missing(Path(source.password_file))):
        return []  # an error: check_errors
    try:
        read_secret(source, kind=kind or "password")
    except SecretError as exc:
        return [(path if kind else (*path, key), str(exc))]
    return []


def _ca_file_warnings(path: LinePath, file: Path) -> list[tuple[LinePath, str]]:
    """A ``ca_file`` that cannot be opened makes every TLS connection of that account fail."""
    try:
        with open(file, "rb"):
            pass
    except FileNotFoundError:
        return [(path, f"ca_file {file} does not exist")]
    except IsADirectoryError:
        return [(path, f"ca_file {file} is a directory, not a PEM file")]
    except PermissionError:
        return [(path, f"ca_file {file} cannot be read by this user (uid {os.geteuid()})")]
    except OSError as exc:
        return [(path, f"ca_file {file} cannot be read: {exc.strerror}")]
    return []


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (what creating ``path`` depends on)."""
    while True:
        try:
            path.stat()
            return path
        except (FileNotFoundError, NotADirectoryError):
            if path.parent == path:
                return path
            path = path.parent


def _unwritable(directory: Path) -> str | None:
    """Why relay could not create or write ``directory`` (the closest existing one must let it), or None."""
    try:
        existing = _nearest_existing(directory)
        if not existing.is_dir():
            return "exists and is not a directory" if existing == directory else f"{existing} is not a directory"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"{existing} is not writable by this user (uid {os.geteuid()})"
    except OSError as exc:
        return f"cannot look at {exc.filename or directory}: {exc.strerror}"
    return None


def _spool_warnings(spool: Path) -> list[tuple[LinePath, str]]:
    """The daemon creates ``spool_dir`` (and its parents) at start: the closest existing one must let it.

    Checked as the user running the check; the daemon runs the same check at start-up as its own user.
    """
    reason = _unwritable(spool)
    if reason is None:
        return []
    return [(("spool_dir",), f"spool_dir {spool}: {reason}: relay will not be able to store mail")]


def _os_user_warnings(config: Config) -> list[tuple[LinePath, str]]:
    """The ``os_user`` rule needs Linux's socket tables; a name must exist on this machine to match."""
    import pwd

    from relay import osuser

    found: list[tuple[LinePath, str]] = []
    in_order = "os_user" in config.identify.order
    if in_order and not osuser.available():
        found.append((("identify", "order"), "os_user needs Linux's /proc/net/tcp, which this system does not "
                      "have: the rule will match nobody"))  # fmt: skip
    for user_id, user in config.users.items():
        if user.os_users and not in_order:
            found.append((("users", user_id, "os_users"), "is set, but identify.order has no os_user: "
                          "nobody is identified by it"))  # fmt: skip
        for name in (item for item in user.os_users if isinstance(item, str)):
            try:
                pwd.getpwnam(name)
            except KeyError:
                found.append((("users", user_id, "os_users"), f"OS user {name!r} does not exist on this machine"))
    return found


def _archive_warnings(config: Config) -> list[tuple[LinePath, str]]:
    """Mail is archived but ``archive.dir`` cannot be made: the copies would only be ``archive_failed`` logs."""
    reason = _unwritable(config.archive.dir) if config.archiving else None
    if reason is None:
        return []
    return [(("archive", "dir"), f"archive.dir {config.archive.dir}: {reason}: no copies will be archived "
                                 "(mail is still delivered)")]  # fmt: skip


def _secret_store_warnings(config: Config, user_id: str) -> list[tuple[LinePath, str]]:
    """A user's own login that would read their ``relay passwd`` file, when that file is not there yet."""
    from relay.envelope import USER_ACCOUNT_PREFIX
    from relay.settings import account_for  # settings.py builds on this module

    try:
        account = account_for(config, USER_ACCOUNT_PREFIX + user_id)
    except (ConfigError, ValueError):  # reported as an error
        return []
    store, path = account.password_store, ("users", user_id, "upstream")
    if store is None:
        return []
    try:
        store.stat()
        return []
    except PermissionError:
        return [(path, f"cannot look into secret_store {store.parent} as this user (uid {os.geteuid()}): run relay "
                       "check as root or as relay's user")]  # fmt: skip
    except OSError:
        pass
    if not any(getattr(account, key) for key in SECRET_KEYS):
        return [(path, f"no password stored for {user_id}'s login {account.username} yet ({store}): set it with "
                       f"relay passwd {user_id}; until then this user's mail waits in the queue")]  # fmt: skip
    company = config.upstreams.get(config.company.upstream or "")
    if company is not None and company.username != account.username:
        return [(path, f"{user_id} logs in as {account.username} with the password of the company's account "
                       f"({company.username}): if that mailbox has a password of its own, set it with relay passwd "
                       f"{user_id}")]  # fmt: skip
    return []


def _missing(file: Path) -> bool:
    """The file surely does not exist: its directory says so. (A directory this user cannot look into
    tells nothing: the daemon's user may well find the file there.)"""
    try:
        file.stat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def _secret_files(config: Config) -> list[tuple[LinePath, Path, str]]:
    """Every secret file the config names itself (key path, file, what it holds); inherited ones are
    named at the company's upstream."""
    sections: list[tuple[LinePath, UpstreamConfig | UpstreamOverride | SmsConfig]] = [
        (("upstreams", name), up) for name, up in config.upstreams.items()
    ]
    sections += [(("users", uid, "upstream"), user.upstream) for uid, user in config.users.items()
                 if isinstance(user.upstream, UpstreamOverride)]  # fmt: skip
    if config.sms is not None:
        sections.append((("sms",), config.sms))
    found: list[tuple[LinePath, Path, str]] = []
    for path, section in sections:
        if section.password_file is not None:
            found.append(((*path, "password_file"), section.password_file, "password file"))
        oauth = getattr(section, "oauth2", None)
        if isinstance(oauth, OAuth2Config):
            for key, kind in (("client_secret_file", "client secret file"), ("refresh_token_file", "refresh token file")):
                if getattr(oauth, key) is not None:
                    found.append(((*path, "oauth2", key), getattr(oauth, key), kind))
    return found


def check_errors(config: Config, text: str | None = None) -> list[ConfigProblem]:
    """What loads but cannot work on this machine: a secret file that does not exist, so no user (the
    daemon's included) can read it and every delivery through that account would fail. ``relay check``
    exits 1 on them; a file that exists but that this user cannot read stays a warning (check may run as
    another user than the daemon), and so does a secret from the environment or systemd, which only the
    service has."""
    found: list[tuple[LinePath, str]] = []
    seen: set[Path] = set()
    for path, file, kind in _secret_files(config):
        if file not in seen and _missing(file):  # once: a YAML alias (*app) names one file for several accounts
            found.append((path, f"{kind} {file} does not exist: create it (mode 0600, owned by relay's user) or "
                                "correct the path"))  # fmt: skip
        seen.add(file)
    return _placed(found, config, text)


def _placed(found: list[tuple[LinePath, str]], config: Config, text: str | None) -> list[ConfigProblem]:
    """Problems found on the loaded config, with the lines of ``text`` (the file it was loaded from)."""
    lines: dict[LinePath, int] = {}
    if text:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _yaml_lines(node, (), lines, [])
    return [ConfigProblem(_dotted(p), m, _line_for(p, lines) if lines else None, config.source) for p, m in found]


def check_warnings(config: Config, text: str | None = None) -> list[ConfigProblem]:
    """Combinations that load fine but are likely mistakes; ``relay check`` prints them."""
    found: list[tuple[LinePath, str]] = []
    for name, up in config.upstreams.items():
        found += _upstream_warnings(("upstreams", name), up)
    company_upstream = config.upstreams.get(config.company.upstream or "")
    for user_id, user in config.users.items():
        if isinstance(user.upstream, UpstreamOverride):
            found += _upstream_warnings(("users", user_id, "upstream"), user.upstream)
            found += _inherited_pair_warnings(("users", user_id, "upstream"), user.upstream, company_upstream)
            found += _own_login_warnings(config, user_id)
            found += _secret_store_warnings(config, user_id)
    if config.sms is not None and config.sms.password_file is not None:
        found += _secret_file_warnings(("sms", "password_file"), config.sms.password_file)
    if config.sms is not None:
        found += _secret_read_warnings(("sms",), config.sms)
    found += _spool_warnings(config.spool_dir)
    found += _archive_warnings(config)
    found += _os_user_warnings(config)
    if config.rewrite.redirect_all:
        found.append((("rewrite", "redirect_all"), f"all mail goes to {config.rewrite.redirect_all} (test installation)"))
    if config.delivery.delay_warning >= config.delivery.max_queue_lifetime:
        found.append((("delivery", "delay_warning"), "is not shorter than max_queue_lifetime: no delay warning would "
                      "ever be sent (the failure notice comes first)"))  # fmt: skip
    return _placed(found, config, text)


# endregion
