"""Stage 1: who is submitting? (envelope sender, From header, client address, listener, OS user) -> user id.

Legacy programs cannot authenticate, so relay recognises the user the way the seeds' ERPs did: by the
address the program puts in MAIL FROM or From (maestro*CLOUD: the user code *is* the address), by the
workstation's address, or by the port the program was pointed at. On a terminal server, where every
user's program connects from 127.0.0.1, the OS user owning the client's socket (found by the listener,
see ``osuser.py``) tells them apart, and cannot be forged by the client. Rules are tried in the configured
order; the first that matches wins and its name is logged. With no match the company defaults apply,
or the message is refused with 550 when ``identify.unknown: reject``. A program that can log in may
prove its user instead (rule ``auth``): the listener checks the login against the user's local
password (``relay passwd USER --login``) and only a checked login counts.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from email.utils import getaddresses

from relay import replies
from relay.config.models import Config
from relay.envelope import Submission
from relay.errors import RefusedError
from relay.idn import with_a_label
from relay.memo import ByIdentity
from relay.prepare.charset import header_block, normalize_line_endings
from relay.prepare.mailpolicy import CACHED_VALUE_MAX

COMPANY = "company_default"


def header_from_addresses(content: bytes) -> list[str]:
    """Addresses in the From header(s), read leniently: legacy mail may be 8-bit or malformed.

    Uses the rewrite stage's header-block splitter rather than a full ``email`` parse: only one
    field is wanted, and this runs for every message.
    """
    fields, _ = header_block(normalize_line_endings(content[:65536]))
    values = [
        b"".join(lines).split(b":", 1)[1].decode("latin-1")
        for lines in fields
        if lines[0][:5].lower() == b"from:"
    ]
    if sum(map(len, values)) > CACHED_VALUE_MAX:
        return _addresses(tuple(values))
    return list(_addresses_cached(tuple(values)))


def _addresses(values: tuple[str, ...]) -> list[str]:
    return [addr for _name, addr in getaddresses(values) if "@" in addr]


@functools.lru_cache(maxsize=1024)  # the same From, message after message: parsed once
def _addresses_cached(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_addresses(values))


def user_by_address(config: Config, addresses: list[str]) -> str | None:
    """The first user one of whose addresses (or from_address) is among ``addresses``, case-insensitively
    and whichever form an internationalised domain is written in (``laskutus@yhtiö.fi`` in the config is
    ``laskutus@xn--yhti-8qa.fi`` from an ERP that writes the A-label: that user's mail went as the company's)."""
    wanted = {_comparable(a) for a in addresses if a}
    for user_id, own in _users_addresses(ByIdentity(config)):
        if own & wanted:
            return user_id
    return None


@functools.lru_cache(maxsize=8)
def _users_addresses(key: ByIdentity[Config]) -> tuple[tuple[str, frozenset[str]], ...]:
    """Each user's addresses as compared, worked out once per (frozen) config, not at every message."""
    table = []
    for user_id, user in key.obj.users.items():
        own = {_comparable(a) for a in user.addresses}
        if user.from_address:
            own.add(_comparable(user.from_address))
        table.append((user_id, frozenset(own)))
    return tuple(table)


def _comparable(address: str) -> str:
    return with_a_label(address).lower()


@functools.lru_cache(maxsize=1024)
def client_ip(client: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client's address (a scope ``%eth0`` dropped), parsed once per address: the same programs connect
    again and again, a new connection per message. The listener's network check uses it too."""
    try:
        return ipaddress.ip_address(client.split("%")[0])
    except ValueError:
        return None


def _by_client(config: Config, sub: Submission) -> str | None:
    client = client_ip(sub.client)
    if client is None:
        return None
    for user_id, user in config.users.items():
        for net in user.clients:
            if isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                if client in net:
                    return user_id
            elif client == net:
                return user_id
    return None


def _by_listener(config: Config, sub: Submission) -> str | None:
    if 0 <= sub.listener < len(config.listeners):
        return config.listeners[sub.listener].user
    return None


def _by_os_user(config: Config, sub: Submission) -> str | None:
    """The user whose ``os_users`` names the socket owner's uid or its name."""
    if sub.os_user is None:
        return None
    for user_id, user in config.users.items():
        if sub.os_user.uid in user.os_users or (sub.os_user.name and sub.os_user.name in user.os_users):
            return user_id
    return None


_RULES: dict[str, Callable[[Config, Submission], str | None]] = {
    "auth": lambda c, s: s.login if s.login in c.users else None,  # checked by the listener (secretstore)
    "envelope_sender": lambda c, s: user_by_address(c, [s.mail_from]),
    # the header is read only when there are users to find (a company-only config has none)
    "header_from": lambda c, s: user_by_address(c, header_from_addresses(s.content)) if c.users else None,
    "client_address": _by_client,
    "listener": _by_listener,
    "os_user": _by_os_user,
}


def identify(config: Config, sub: Submission) -> tuple[str | None, str]:
    """Return ``(user_id, rule)``; ``(None, 'company_default')`` when no rule matched.

    Raises:
        RefusedError: no rule matched and unknown senders are refused.
    """
    for rule in config.identify.order:
        user_id = _RULES[rule](config, sub)
        if user_id is not None:
            return user_id, rule
    if config.identify.unknown == "reject":
        raise RefusedError(replies.R550_UNKNOWN_USER)
    return None, COMPANY


__all__ = ["COMPANY", "header_from_addresses", "identify"]
