"""Frozen values that cross stage boundaries: what was received, whom it is for, what is queued.

No stage passes a bare dict to the next: the listener builds a ``Submission``, identification and
resolution produce ``Settings`` (with its ``Account``), rewriting turns the submission into one or more
``Outgoing`` messages, and the spool stores each as a ``QueueEntry``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

USER_ACCOUNT_PREFIX = "user:"  # an account that is a user's own login is named user:<id>

Security = Literal["none", "ssl", "starttls"]
Transport = Literal["smtp", "graph"]


@dataclass(frozen=True)
class OAuth2:
    """Where an account's access tokens come from: the endpoint, the client, and where its secrets live.

    Only the *sources* of the client secret and the refresh token are here (read when a token is
    needed), so this value can key a cache or a connection pool without holding a secret.
    ``refresh_token_*`` set means the delegated flow (refresh token), otherwise app-only (client
    credentials).
    """

    provider: Literal["microsoft", "google", "generic"]
    token_url: str
    scope: str
    client_id: str
    client_secret_file: Path | None = None
    client_secret_env: str | None = None
    client_secret_credential: str | None = None
    refresh_token_file: Path | None = None
    refresh_token_env: str | None = None
    refresh_token_credential: str | None = None
    client_secret_expires: datetime.date | None = None
    client_certificate_file: Path | None = None  # an Entra app's certificate: a signed client assertion
    client_key_file: Path | None = None  # its key, when not in the certificate's file
    client_key_password_file: Path | None = None
    client_key_password_env: str | None = None
    client_key_password_credential: str | None = None
    service_account_file: Path | None = None  # a Google service account's JSON key (JWT-bearer grant)
    subject: str | None = None  # the mailbox a service account acts for (``sub``): part of the cache key
    authorize_url: str | None = None  # relay oauth login's endpoints, when the config names them
    device_url: str | None = None

    @property
    def delegated(self) -> bool:
        return bool(self.refresh_token_file or self.refresh_token_env or self.refresh_token_credential)

    @property
    def certificate(self) -> bool:
        return self.client_certificate_file is not None


@dataclass(frozen=True)
class OsUser:
    """The OS user owning a local client's socket (``osuser.py``): its uid, and its name if it has one."""

    uid: int
    name: str | None

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid})" if self.name else f"uid {self.uid}"


@dataclass(frozen=True)
class Submission:
    """One SMTP transaction as the legacy client sent it; ``content`` is the raw bytes.

    ``os_user`` is set only when the ``os_user`` rule is configured and the client is a local process.
    """

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    client: str
    listener: int = 0
    os_user: OsUser | None = None
    helo: str | None = None
    login: str | None = None  # the user id a local SMTP AUTH login was checked for (identify rule auth)
    server: str = ""  # the name relay greeted the client with (its Received field's "by")


@dataclass(frozen=True)
class SendLimits:
    """An account's effective sending limits (configured, else the provider's defaults); 0 = no limit."""

    messages: int = 0  # per ``window`` seconds
    window: float = 60.0
    messages_per_day: int = 0
    recipients_per_day: int = 0
    recipients_per_message: int = 0

    def __str__(self) -> str:
        """What logs and ``relay queue`` show, e.g. ``30 messages per 60 s, 10000 recipients per day``."""
        parts = [f"{self.messages} messages per {self.window:g} s"] if self.messages else []
        parts += [f"{self.messages_per_day} messages per day"] if self.messages_per_day else []
        parts += [f"{self.recipients_per_day} recipients per day"] if self.recipients_per_day else []
        return ", ".join(parts) or "no limit"


@dataclass(frozen=True)
class Account:
    """An upstream account after the user's fields were laid over the company's.

    ``name`` is the key a queue entry stores: a named upstream, or ``user:<id>`` for a user's own
    account, so that delivery re-resolves it from the current config (new password, reload).
    """

    name: str
    host: str
    port: int
    security: Security
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    password_credential: str | None = None
    password_store: Path | None = None  # a user's own login: their ``relay passwd`` file (credentials.py)
    ca_file: Path | None = None
    verify: bool = True
    timeout: float = 60.0
    local_hostname: str | None = None
    max_connections: int = 3
    transport: Transport = "smtp"
    oauth2: OAuth2 | None = None  # set: XOAUTH2 (smtp) or a bearer token (graph) instead of a password
    auth_mechanism: str | None = None  # a password login's one mechanism (None: the best the server offers)
    limits: SendLimits = SendLimits()

    @property
    def own_user(self) -> str | None:
        """The user whose own login this is (a ``user:<id>`` account), else ``None``."""
        return self.name.removeprefix(USER_ACCOUNT_PREFIX) if self.name.startswith(USER_ACCOUNT_PREFIX) else None

    @property
    def label(self) -> str:
        """What logs show: never a secret."""
        if self.transport == "graph":
            return f"{self.name} (Microsoft Graph https://{self.host}:{self.port})"
        how = " oauth2" if self.oauth2 is not None else ""
        return f"{self.name} ({self.host}:{self.port} {self.security}{how})"


@dataclass(frozen=True)
class Settings:
    """Everything the rewriting and delivery stages need to know about the submitting user."""

    user: str | None
    identified_by: str
    enabled: bool
    from_address: str
    from_name: str | None
    copy_to: tuple[str, ...]
    copy_to_mode: Literal["bcc", "cc"]
    signature: str | None
    reply_to: str | None
    reply_to_original: bool
    account: Account | None


@dataclass(frozen=True, slots=True)
class Joined:
    """A message as pieces not yet joined into one ``bytes``: rewritten parts and parts as received.

    Rewriting a big message usually changes only its header block (or a small text part, see
    ``skeleton.py``); joining those changes to a 25 MB body would copy it, and for a moment hold the
    message twice (the submission and the copy). The spool writes the pieces one after the other
    instead (``Spool.commit``).
    """

    pieces: tuple[bytes | memoryview, ...]

    def __len__(self) -> int:
        return sum(map(len, self.pieces))

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)

    def isascii(self) -> bool:
        """Whether every octet is 7-bit, looked at a slice at a time (a memoryview has no ``isascii``)."""
        step = 64 * 1024  # a small copy at a time: a big one would hold the message twice for a moment
        return all(
            bytes(piece[at : at + step]).isascii() for piece in self.pieces for at in range(0, len(piece), step)
        )


Content = bytes | Joined


@dataclass(frozen=True)
class Outgoing:
    """One message ready to be spooled: who sends it, to whom, through which account."""

    account: str
    mail_from: str
    recipients: tuple[str, ...]
    content: Content
    user: str | None = None
    kind: Literal["mail", "sms", "notice"] = "mail"
    notes: tuple[str, ...] = field(default=())
