"""The validated scalar values of the config file: addresses, sizes, host names, phone numbers.

Pure functions that pydantic validators call, shared by the models, the cross-reference checks and the
account overlay; each raises ``ValueError`` with a sentence an admin can act on."""

from __future__ import annotations

import codecs
import ipaddress
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    ValidationInfo,
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

CONTROL_NAMES = {0x1B: "ESC", 0x7F: "DEL", 0x0B: "vertical tab", 0x0C: "form feed", 0x08: "backspace"}


def _no_line_breaks(value: str) -> str:
    """Anything that reaches a header or an SMTP command must stay on one line (no injection), and hold no
    other control character either: the header folder then encodes the display name and the address
    together as one encoded word, and the From field ends up with no address in it. TAB is folding
    whitespace, allowed in a header."""
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError("must not contain line breaks or NUL characters")
    control = next((c for c in value if (ord(c) < 0x20 and c != "\t") or c == "\x7f"), None)
    if control is not None:
        raise ValueError(f"contains the control character {_escaped(control)}, which cannot be in a mail "
                         "header: remove it (many editors do not show it)")  # fmt: skip
    return value


def _escaped(char: str) -> str:
    """``\\x1b (ESC)``: as the admin would write it in a double-quoted YAML value, to search for it."""
    name = CONTROL_NAMES.get(ord(char))
    return f"\\x{ord(char):02x}" + (f" ({name})" if name else "")

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

def checked_recipient(value: str) -> str:
    """A recipient typed on a command line (``relay send-test --to``), checked as the config's own are:
    ``ValueError`` saying what is wrong."""
    return _recipient(value)

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
# an address, or "" for "none" where a user turns off what the company set (a missing key inherits it)
AddressOrNone = Annotated[str, BeforeValidator(lambda v: (_address(v) if v.strip() else "") if isinstance(v, str) else v)]

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

_HOST_PORT_RE = re.compile(r"^\[?([^\[\]/\s]+?)\]?:(\d+)$")  # smtp.office365.com:587, [::1]:25


def _host_name(value: Any) -> Any:
    """A host, not a URL: ``https://graph.microsoft.com`` or ``host/v1.0`` would fail each delivery as
    a name lookup error, far from the typo that caused it. Spaces around it (pasted from a web page)
    are dropped: no host name has one."""
    if not isinstance(value, str):
        return value
    value = value.strip(" \t")
    if "/" in value or any(c.isspace() for c in value):
        raise ValueError("expected a host name such as smtp.office365.com or graph.microsoft.com, not a URL "
                         "(the port goes in port)")
    if ":" in value and not _is_ip_address(value):
        return _host_with_port(value)
    return _valid_labels(value)


def _valid_labels(value: str) -> str:
    """A name the resolver can take: ``smtp..example`` passed every other check and then failed each
    delivery attempt as a crash (Python's IDNA codec refuses an empty label or one over 63 octets)."""
    if not _is_ip_address(value):
        try:
            value.encode("idna")
        except UnicodeError:
            raise ValueError(f"{value!r} is not a valid host name: a dot at the start or two in a row (an empty "
                             "part), or a part between dots longer than 63 characters") from None
    return value


def _ehlo_name(value: Any) -> Any:
    """The name relay gives in EHLO: a host name or an address literal (``[192.0.2.1]``). aiosmtplib
    refuses one with a space only when it connects, so a typo held every message of the account."""
    if not isinstance(value, str):
        return value
    value = value.strip(" \t")
    if any(c.isspace() for c in value) or not value:
        raise ValueError(f"{value!r} is not a host name: the name sent in EHLO has no spaces (e.g. erp.example.com)")
    if value.startswith("[") and value.endswith("]"):
        return value
    return _valid_labels(value)


def _is_ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _host_with_port(value: str) -> str:
    """``smtp.office365.com:587`` is refused: relay would look up the whole text as a name, and fail every
    delivery (an IPv6 address, the only host with a colon, needs no brackets)."""
    match = _HOST_PORT_RE.match(value)
    if match is None:
        raise ValueError(f"expected a host name or an IP address, got {value!r}")
    host, port = match.groups()
    raise ValueError(f"the port goes in its own key, not after the host: write  host: {host}  and  port: {port}")


HostName = Annotated[HeaderText, BeforeValidator(_host_name)]
EhloName = Annotated[HeaderText, BeforeValidator(_ehlo_name)]

_CHARSET_EXAMPLES = "windows-1252 (the default), iso-8859-1, iso-8859-15, cp850 or utf-8"


def _charset(value: Any) -> Any:
    """A charset that Python does not know, or that does not read ASCII as ASCII (utf-16, base64),
    would make relay decode every undeclared 8-bit text as latin-1 instead, silently."""
    if not isinstance(value, str):
        return value
    try:
        "".encode(value)  # LookupError also for base64, zlib, rot13: codecs, but of no text
    except (LookupError, ValueError):  # ValueError: the "undefined" codec's UnicodeError
        raise ValueError(f"{value!r} is not a charset Python knows: use one such as {_CHARSET_EXAMPLES}") from None
    if not _reads_ascii(value):
        raise ValueError(f"{value!r} does not read plain ASCII text as ASCII, so it cannot be the charset of 8-bit "
                         f"mail: use one such as {_CHARSET_EXAMPLES}")  # fmt: skip
    return value


def _reads_ascii(charset: str) -> bool:
    printable = bytes(range(0x20, 0x7F))
    try:
        return codecs.decode(printable, charset) == printable.decode("ascii")
    except ValueError:  # UnicodeDecodeError (utf-16: an odd number of bytes), punycode's UnicodeError
        return False


Charset = Annotated[HeaderText, BeforeValidator(_charset)]


def described(value: Any, *, echo: bool = True) -> str:
    """What the admin wrote, in words: ``'587x'``, ``a list``, ``nothing (the key has no value)``. With
    ``echo`` false a text is not repeated (under a key that may hold a secret)."""
    if value is None:
        return "nothing (the key has no value)"
    if isinstance(value, dict):
        return "a section of keys"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not echo:
        return "a single value"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


RELATIVE_TO = "relative_to"  # the validation context's key: the folder relative paths start from


def config_folder(config_path: str | os.PathLike[str]) -> str:
    """The folder a config file's relative paths are taken from: the file's own (see ``_path``)."""
    return os.path.dirname(os.path.abspath(config_path))


def from_config_folder(value: str, config_path: str | os.PathLike[str]) -> Path:
    """A path as a config file gives it, read the way ``load_config`` reads it (for the lenient readers
    of a file that does not load)."""
    return Path(os.path.join(config_folder(config_path), value))


EMPTY_PATH = "no path given: write the file's path after the key, or remove the key"


def _path(value: Any, info: ValidationInfo) -> Any:
    """pydantic's own words here name a Python class (``<class 'pathlib.Path'>``); an empty text would
    become ``.``, the current directory, read as a password file. The value is not echoed: the key may
    be a secret's.

    A relative path is taken from the config file's folder (``RELATIVE_TO``), as the admin reads the
    file: from the current directory, ``relay check`` in /etc/relay found ``secrets/o365`` and the
    service, started in /var/lib/relay, did not."""
    if isinstance(value, os.PathLike):
        return value
    if not isinstance(value, str):
        raise ValueError(  # noqa: TRY004  (pydantic reports ValueError only)
            f"expected a file path such as /etc/relay/secrets/o365, got {described(value, echo=False)}"
        )
    if not value.strip():
        raise ValueError(EMPTY_PATH)
    base = info.context.get(RELATIVE_TO) if isinstance(info.context, dict) else None
    if base is not None and not os.path.isabs(value):
        return os.path.join(base, value)
    return value


FilePath = Annotated[Path, BeforeValidator(_path)]

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
