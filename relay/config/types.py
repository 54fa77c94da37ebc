"""The validated scalar values of the config file: addresses, sizes, host names, phone numbers.

Pure functions that pydantic validators call, shared by the models, the cross-reference checks and the
account overlay; each raises ``ValueError`` with a sentence an admin can act on."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    WithJsonSchema,
)

Security = Literal["none", "ssl", "starttls"]
ListenerTLS = Literal["starttls", "implicit"]

AuthMechanism = Literal["plain", "login", "cram-md5"]  # password SASL mechanisms aiosmtplib speaks

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
        raise ValueError("expected an address or a list of addresses")  # noqa: TRY004  (pydantic reports ValueError only)
    return tuple(check(a) for a in split_addresses(value))

def _size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size such as 35M or a number of bytes")  # noqa: TRY004  (pydantic reports ValueError only)
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

LinePath = tuple[str | int, ...]

_SEPARATORS = re.compile(r"[\s\-().]")


_DIGITS = re.compile(r"[1-9][0-9]{6,14}")  # E.164: at most 15 digits, no leading 0 after the '+'


def normalize_number(raw: str, country_code: str) -> str:
    """``040 123 4567`` / ``00358...`` / ``+358...`` -> ``+358401234567``; ValueError if not a number.

    A national number (leading 0) gets ``country_code``; digits without any prefix are ambiguous
    (national without the trunk 0, or international without '+') and refused rather than guessed.
    """
    number = _SEPARATORS.sub("", raw)
    if number.startswith("00"):
        number = "+" + number[2:]
    elif number.startswith("0"):
        number = "+" + country_code.lstrip("+") + number[1:]
    if not number.startswith("+") or not _DIGITS.fullmatch(number[1:]) or not number[1:].isascii():
        raise ValueError(f"not a phone number: {raw!r}")
    return number
