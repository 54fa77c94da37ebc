"""The exception tree: one branch per thing the caller must do.

``ConfigError``     an admin edits a file (carries every problem found, with its place);
``RefusedError``    the SMTP client is told no, with the exact reply (4xx or 5xx);
``TransientError``  delivery will be retried (4xx, connection and TLS trouble);
``PermanentError``  delivery will not be retried (5xx): the message goes to the failed area.

Library exceptions (aiosmtplib, OSError, ssl) are translated into these at the boundary
(``transports/smtp.py``); nothing outside that module looks at aiosmtplib's error classes.
"""

from __future__ import annotations

from dataclasses import dataclass


class RelayError(Exception):
    """Root of everything relay raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong (or suspicious) in the configuration file."""

    path: str
    message: str
    line: int | None = None
    file: str | None = None

    def __str__(self) -> str:
        where = f" ({self.file or 'config'}:{self.line})" if self.line else ""
        if not self.path and self.line:  # a YAML syntax error: its place says where
            return f"{self.message}{where}"
        return f"{self.path or '(top level)'}: {self.message}{where}"


class ConfigError(RelayError):
    """The configuration cannot be used; ``problems`` lists every reason at once."""

    def __init__(self, problems: list[ConfigProblem], /) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class RefusedError(RelayError):
    """A pipeline stage refuses the submission; ``reply`` is sent to the SMTP client as is."""

    def __init__(self, reply: str, /) -> None:
        self.reply = reply
        super().__init__(reply)

    @property
    def code(self) -> int:
        return int(self.reply[:3])


class DeliveryError(RelayError):
    """A delivery attempt did not succeed; ``code`` and ``text`` are the upstream's reply if any."""

    def __init__(self, message: str, /, *, code: int | None = None, text: str = "") -> None:
        self.code = code
        self.text = text
        super().__init__(message)


class TransientError(DeliveryError):
    """Try again later: the message stays queued."""


class PermanentError(DeliveryError):
    """Retrying cannot help: the message moves to the failed area with this reason."""


class SecretError(RelayError):
    """A secret (password) could not be read; the message names the source, never the value."""


class QueueFileDamagedError(RelayError):
    """A queued body is not the size its envelope recorded (disk trouble, an edit by hand, or a power cut
    on a filesystem without a journal that brought a delivered entry back): held for a person, never sent."""


class SpoolBusyError(RelayError, OSError):
    """Another relay process holds the spool: two daemons on one queue would deliver mail twice.

    Also an ``OSError``: like a port in use, it is a resource the process could not get at start.
    """


class TokenError(RelayError):
    """No OAuth2 access token could be had: delivery through that account waits (a deferral, never a bounce).

    ``step`` says where it failed (the secret, the token endpoint, the provider's refusal); ``code`` is
    the provider's error (``invalid_client``, ``invalid_grant``) and ``description`` its words, which
    carry the ``AADSTS`` number for Microsoft. Neither ever holds a secret: they come from the
    provider's answer, not from the request.
    """

    def __init__(self, message: str, /, *, step: str, code: str | None = None, description: str = "") -> None:
        self.step = step
        self.code = code
        self.description = description
        self.secrets: str | None = None  # a digest of the secrets the request was sent with (tokens.py)
        self.retry_after: float | None = None  # the token endpoint's Retry-After, in seconds
        super().__init__(message)

    @property
    def reply_text(self) -> str:
        """The provider's error as a queue entry and a log line show it."""
        return " ".join(part for part in (self.code, self.description) if part)


class CertificateError(RelayError, OSError):
    """A listener's TLS certificate or key that cannot be used; ``key`` names the setting to change
    (an ``OSError``: the daemon cannot start, like a port in use)."""

    def __init__(self, message: str, /, *, key: str = "tls_cert_file") -> None:
        super().__init__(message)
        self.key = key
