"""The config file as typed, frozen pydantic models: listeners, upstreams, company, users, rewriting, SMS.

One model per section of the YAML; validation that needs only one section lives on its model, checks
across sections live in ``checks.py``."""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from relay import maildrop
from relay.config.types import (
    DEFAULT_ARCHIVE,
    DEFAULT_SECRET_STORE,
    DEFAULT_SPOOL,
    IP_ADDRESS_SCHEMA,
    LOOPBACK,
    Address,
    AddressList,
    AddressOrNone,
    AuthMechanism,
    Charset,
    EhloName,
    FilePath,
    HeaderText,
    HostName,
    IdentifyRule,
    IPNetwork,
    ListenerTLS,
    Port,
    RecipientList,
    Security,
    Size,
    described,
)


class _Model(BaseModel):
    # field docstrings are the descriptions in ``relay schema`` (an editor shows them while typing)
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    SECTION: ClassVar[str] = "settings"  # what the section holds, in the admin's words
    SECRET: ClassVar[bool] = False  # a value written in place of the section may be a secret: not echoed

    @model_validator(mode="before")
    @classmethod
    def _a_section(cls, data: Any) -> Any:
        """pydantic's own words for a section given as a single value or left empty name the Python class
        (``instance of UserConfig``), which the admin never wrote."""
        if isinstance(data, (Mapping, BaseModel)):
            return data
        raise ValueError(f"expected {cls.SECTION} as key: value lines indented under it, "
                         f"got {described(data, echo=not cls.SECRET)}")  # fmt: skip

class SecretSource(_Model):
    """Where a secret lives. At most one source; none means 'no secret'.

    "At most one" is checked on the raw YAML (``_secret_source_clashes``), not here: a model validator
    runs only once every field of the model is valid, so ``relay check`` would hide it behind them.
    """

    SECTION: ClassVar[str] = "a secret's source"
    SECRET: ClassVar[bool] = True

    password_file: FilePath | None = None
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
OAUTH2_KEY_PASSWORD_KEYS = ("client_key_password_file", "client_key_password_env", "client_key_password_credential")

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
        _ = parts.port  # urlsplit checks the port only when asked
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

    App-only (client credentials: a client secret or, for Entra apps, a certificate; a Google service
    account) or delegated (a refresh token from ``relay oauth login``, with a client secret or a
    certificate when the app is a confidential client). Secrets come from files, variables or systemd
    credentials, like passwords. Cross-key rules (one source each, a tenant for microsoft) are checked
    on the raw YAML in ``_oauth2_problems`` so that ``relay check`` reports them with the other errors.
    """

    SECTION: ClassVar[str] = "the account's OAuth2 settings (provider, tenant, client_id...)"
    SECRET: ClassVar[bool] = True

    provider: OAuthProvider = "microsoft"
    """Whose token endpoint: microsoft (needs tenant) | google | generic (needs token_url). Default
    microsoft."""
    tenant: Annotated[HeaderText | None, BeforeValidator(_tenant)] = None
    """Microsoft tenant: its domain (yritys.onmicrosoft.com) or its id (a GUID); consumers for Outlook.com
    / Hotmail mailboxes, organizations or common for a sign-in from any work account."""
    client_id: HeaderText | None = None
    """The app's (client) id from the app registration (not needed with service_account_file)."""
    client_secret_file: FilePath | None = None
    """A file (mode 600) holding the app's client secret."""
    client_secret_env: str | None = None
    """An environment variable holding the app's client secret."""
    client_secret_credential: str | None = None
    """A systemd credential holding the app's client secret."""
    client_secret_expires: datetime.date | None = None
    """The client secret's expiry date (YYYY-MM-DD, shown in the app registration): relay check and the
    daemon warn from 30 days before."""
    client_certificate_file: FilePath | None = None
    """Microsoft: a PEM file with the certificate uploaded to the app registration (and its key, or give
    client_key_file); relay signs a client assertion with it instead of sending a client secret."""
    client_key_file: FilePath | None = None
    """The certificate's private key (PEM, mode 600). Default: the key in client_certificate_file."""
    client_key_password_file: FilePath | None = None
    """A file holding the private key's password, when the key is encrypted."""
    client_key_password_env: str | None = None
    """An environment variable holding the private key's password."""
    client_key_password_credential: str | None = None
    """A systemd credential holding the private key's password."""
    service_account_file: FilePath | None = None
    """Google: a service account's JSON key (mode 600) with domain-wide delegation: relay gets a token for
    the account's username, no sign-in."""
    refresh_token_file: FilePath | None = None
    """A file (mode 600) holding the refresh token (delegated sign-in: relay oauth login writes it); a
    rotated token is written back to it."""
    refresh_token_env: str | None = None
    """An environment variable holding the refresh token (a rotated one is kept in memory only)."""
    refresh_token_credential: str | None = None
    """A systemd credential holding the refresh token (a rotated one is kept in memory only)."""
    scope: HeaderText | None = None
    """The scope to ask for. Default: the provider's for SMTP or Graph."""
    token_url: Annotated[HeaderText | None, BeforeValidator(_token_url)] = None
    """The token endpoint (https://). Default: the provider's; for microsoft, relay oauth login takes the
    authorize and devicecode endpoints from the same .../oauth2/v2.0/ prefix."""
    authorize_url: Annotated[HeaderText | None, BeforeValidator(_token_url)] = None
    """relay oauth login --flow browser|paste: the authorization endpoint. Default: the provider's (needed
    for generic)."""
    device_url: Annotated[HeaderText | None, BeforeValidator(_token_url)] = None
    """relay oauth login --flow device: the device authorization endpoint. Default: the provider's (needed
    for generic)."""

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
    """An account's sending limits; a key left out takes the provider's default (``accounts.py``), 0 = none.

    ``window`` is the length in seconds of the ``messages`` limit: 60 for "30 messages a minute".
    """

    SECTION: ClassVar[str] = "the account's sending limits (messages, window...)"

    messages: int | None = Field(default=None, ge=0)
    """At most this many messages per window. Default: the provider's (Office 365: 30 a minute); 0 = none."""
    window: float = Field(default=60.0, gt=0, le=86400)
    """Seconds that the messages limit counts over, at most 86400 (a day). Default 60."""
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

    SECTION: ClassVar[str] = "the account's settings (host, port, username...)"

    host: HostName
    """The provider's SMTP server (smtp.office365.com), or Graph's host for type graph. A host name, not a
    URL."""
    port: Port | None = None
    """Default: 465 for ssl, 587 for starttls, 25 for none, 443 for graph."""
    security: Security = "starttls"
    """ssl (implicit TLS, port 465) | starttls (port 587) | none. Default starttls."""
    username: HeaderText | None = None
    """The login, usually the mailbox address (the XOAUTH2 user, or the Graph mailbox)."""
    ca_file: FilePath | None = None
    """A PEM file of CA certificates for a private CA. Default: the system's."""
    verify: bool = True
    """Check the server's TLS certificate. Default true; false lets anyone on the path read the password."""
    timeout: float = Field(default=60.0, gt=0, le=3600)
    """Seconds to wait for each reply of the provider, at most 3600. Default 60."""
    local_hostname: EhloName | None = None
    """The name sent in EHLO. Default: this machine's name."""
    max_connections: int = Field(default=3, ge=1, le=100)  # Office 365 allows 3 per mailbox
    """Connections to this account at once, kept open and reused, 1-100. Default 3 (Office 365's limit)."""
    type: Literal["smtp", "graph"] = "smtp"
    """smtp (default) | graph (Microsoft Graph sendMail over HTTPS; needs auth oauth2)."""
    auth: Literal["password", "oauth2"] = "password"
    """password (a password source) | oauth2 (an oauth2 block). Default password."""
    auth_mechanism: AuthMechanism | None = None
    """The one SASL mechanism a password login uses: plain | login | cram-md5. Default: PLAIN if the
    server offers it, else LOGIN, else CRAM-MD5. Only one is tried per attempt (a wrong password costs
    one failed login); set login for a server that offers PLAIN but refuses it."""
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

    SECTION: ClassVar[str] = "the user's own account settings (host, username...)"

    host: HostName | None = None
    """The user's own server. Default: the company upstream's."""
    port: Port | None = None
    """Default: the company upstream's, or the own security's port."""
    security: Security | None = None
    """ssl | starttls | none. Default: the company upstream's."""
    username: HeaderText | None = None
    """The user's own login on the company's server, or on their own."""
    ca_file: FilePath | None = None
    """Default: the company upstream's."""
    verify: bool | None = None
    """Default: the company upstream's."""
    timeout: float | None = Field(default=None, gt=0, le=3600)
    """Default: the company upstream's."""
    local_hostname: EhloName | None = None
    """Default: the company upstream's."""
    max_connections: int | None = Field(default=None, ge=1, le=100)
    """Default: the company upstream's."""
    auth: Literal["password", "oauth2"] | None = None
    """password | oauth2. Default: the company upstream's."""
    auth_mechanism: AuthMechanism | None = None
    """plain | login | cram-md5. Default: the company upstream's."""
    oauth2: OAuth2Config | None = None
    """The user's own OAuth2 sign-in."""
    sending_limits: SendingLimits | None = None
    """Default: the company upstream's."""

class ListenerConfig(_Model):
    """Where legacy programs connect. Unauthenticated mail is taken only from ``allowed_networks``."""

    SECTION: ClassVar[str] = "the listener's settings (address, port...)"

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
    tls_cert_file: FilePath | None = None
    """PEM certificate (its chain after it) relay shows to clients; with tls_key_file, STARTTLS is offered.
    Re-read on reload (SIGHUP)."""
    tls_key_file: FilePath | None = None
    """PEM private key of tls_cert_file, unencrypted, readable by relay's user only."""
    tls: ListenerTLS | None = None
    """starttls (default with a certificate: plain, then STARTTLS) | implicit (TLS from the first byte, as on
    port 465)."""
    require_tls: bool = False
    """Refuse MAIL and AUTH before STARTTLS (530 5.7.0); AUTH is offered only after it. Default false."""

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

    @model_validator(mode="after")
    def _tls_pair(self) -> ListenerConfig:
        """A certificate needs its key and the other way round; TLS settings need both."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            given, missing = ("tls_cert_file", "tls_key_file") if self.tls_key_file is None else (
                "tls_key_file", "tls_cert_file")  # fmt: skip
            raise ValueError(f"{given} is set but {missing} is not: TLS needs the certificate and its private key")
        if self.tls_cert_file is None and (self.tls is not None or self.require_tls):
            key = f"tls: {self.tls}" if self.tls is not None else "require_tls: true"
            raise ValueError(f"{key} needs tls_cert_file and tls_key_file (the certificate relay shows to clients)")
        return self

    @property
    def tls_mode(self) -> ListenerTLS | None:
        """How this listener speaks TLS: ``starttls``, ``implicit``, or ``None`` (plain only)."""
        return None if self.tls_cert_file is None else (self.tls or "starttls")

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return self.allowed_networks if self.allowed_networks is not None else LOOPBACK

class Profile(_Model):
    """Fields a company sets as defaults and a user may override one by one."""

    SECTION: ClassVar[str] = "settings"

    from_address: Address | None = None
    """The mailbox mail is sent as (the sender the provider accepts)."""
    from_name: HeaderText | None = None
    """The display name in From."""
    copy_to: RecipientList | None = None
    """Address(es) added to every message (';' or ',' separated, or a list); a phone number at the SMS domain
    is sent as an SMS."""
    signature: str | None = None
    """Text appended to every mail (plain and HTML parts, once). Empty: none."""
    reply_to: AddressOrNone | None = None
    """Reply-To of every message that has none of its own: where replies go (e.g. the person's own mailbox
    when From is a shared one). Default: none (the original From, see reply_to_original); "" in a user's
    settings: none for that user, whatever the company's."""
    reply_to_original: bool | None = None
    """Keep the address the program wrote in From as Reply-To when relay replaces From, if someone outside
    can answer it (not a bare name like root, not an internal name like x@erp.local). Default true."""
    archive_days: int | None = Field(default=None, ge=0)  # 0 or unset: no archive copies (archive.py)
    """Keep a copy of each delivered message for this many days under archive.dir. 0 or unset: no copies."""

class CompanyConfig(Profile):
    """Company-wide defaults (the seeds' company SMTP account and company email)."""

    SECTION: ClassVar[str] = "the company's settings (upstream, from_address...)"

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

    SECTION: ClassVar[str] = "the user's settings (addresses, from_name...)"

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

    SECTION: ClassVar[str] = "identify's settings (order, unknown)"

    order: tuple[IdentifyRule, ...] = ("auth", "envelope_sender", "header_from", "client_address", "listener")
    """Rules tried in order, first match wins: auth, envelope_sender, header_from, client_address, listener,
    os_user."""
    unknown: Literal["company", "reject"] = "company"
    """No rule matched: company (send with the company defaults) | reject (550). Default company."""

class DeliveryConfig(_Model):
    """Delivery workers and the retry policy (doubling waits between a minimum and a maximum)."""

    SECTION: ClassVar[str] = "delivery's settings (workers, retry_interval...)"

    workers: int = Field(default=4, ge=1, le=256)
    """Messages delivered at the same time, 1-256. Default 4."""
    retry_interval: float = Field(default=60.0, gt=0, le=86400)
    """Seconds before the first retry, at most 86400; doubles with each attempt. Default 60."""
    max_retry_interval: float = Field(default=4000.0, gt=0, le=86400)
    """The wait between retries never grows beyond this many seconds (at most 86400). Default 4000."""
    deadline: float = Field(default=300.0, gt=0, le=86400)
    """Seconds one whole delivery attempt may take, at most 86400. Default 300."""
    max_queue_lifetime: float = Field(default=5 * 86400.0, gt=0, le=100 * 86400)
    """Seconds a message may wait before it fails for good, at most 8640000 (100 days, Postfix's
    limit too). Default 432000 (5 days)."""
    notices: bool = True
    """Mail the sending user an RFC 3464 report when relay gives up on recipients. Default true."""
    notify: AddressList = ()
    """Addresses that get a copy of every notice. Default: none."""
    delay_warning: float = Field(default=0.0, ge=0, le=100 * 86400)
    """Seconds after which waiting mail gets one 'still trying' notice, at most 100 days. 0 = never
    (default)."""

class RecipientRule(_Model):
    """Rewrite one address, or every address of a domain (``match: '@old.fi'``)."""

    SECTION: ClassVar[str] = "the rule's match and replace"

    match: HeaderText
    """An exact address, or a whole domain ('@old.fi')."""
    replace: HeaderText
    """The new address, or '@domain' to keep the local part."""

class RewriteConfig(_Model):
    """How submitted mail is repaired and rewritten before it is queued."""

    SECTION: ClassVar[str] = "rewrite's settings (default_charset, recipient_rules...)"

    default_charset: Charset = "windows-1252"
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

    SECTION: ClassVar[str] = "the SMS settings (domain, gateway...)"

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

    SECTION: ClassVar[str] = "the limits (max_message_size, max_recipients...)"

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

    SECTION: ClassVar[str] = "the archive's settings (dir, sweep_interval)"

    dir: FilePath = Path(DEFAULT_ARCHIVE)
    """Where the archive Maildirs are, one per user. Default /var/lib/relay/archive."""
    sweep_interval: float = Field(default=3600.0, gt=0, le=7 * 86400)
    """Seconds between removals of copies past their archive_days, at most a week. Default 3600."""

class MetricsConfig(_Model):
    """The Prometheus endpoint (metrics.py). Loopback only unless ``allow_remote``: the counts name
    every account and show the mail volume, which is nobody's business outside this machine."""

    SECTION: ClassVar[str] = "the metrics settings (address, port...)"

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

    SECTION: ClassVar[str] = "the logging settings (format, level)"

    format: Literal["auto", "json", "console"] = "auto"
    """auto (readable on a terminal, JSON lines otherwise) | json | console. Default auto."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """debug | info | warning | error. Default info."""

class Config(_Model):
    """The whole, validated configuration. Built only by ``load_config`` / ``parse_config``."""

    listeners: tuple[ListenerConfig, ...] = (ListenerConfig(),)
    """Where legacy programs connect. Default: one on 127.0.0.1:2525."""
    spool_dir: FilePath = Path(DEFAULT_SPOOL)
    """The queue. Default /var/lib/relay/spool."""
    maildrop_dir: FilePath | None = None
    """Where relay-sendmail leaves mail while relay is not running; relay picks it up when it runs.
    Default <spool_dir>/maildrop; with the default spool_dir, /var/spool/relay/maildrop (the package
    makes it: /var/lib/relay is closed to other users)."""
    secret_store: FilePath = Path(DEFAULT_SECRET_STORE)
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
    def maildrop(self) -> Path:
        """The drop directory in use (``relay.maildrop.directory_for``)."""
        return maildrop.directory_for(self.spool_dir, self.maildrop_dir)

    @property
    def archiving(self) -> bool:
        """Is anyone's mail archived (``archive_days`` of the company or of a user)?"""
        return bool(self.company.archive_days) or any(user.archive_days for user in self.users.values())
