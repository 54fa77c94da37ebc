"""The one ``email`` policy relay reads and writes messages with: SMTP line ends, strict folding.

``policy.SMTP`` (CRLF, RFC 5322 folding) with ``refold_source="none"`` so headers relay does not touch
go out exactly as they came in. Its header factory caches the header classes: the stdlib registry
builds a fresh class with ``type()`` for *every* header it parses, which made class creation one of
the largest costs of rewriting a small message. It also keeps the header objects it made for the most
recent values: a legacy program sends the same From in every message, and the rewrite sets the same
From (and Reply-To) each time, so parsing an address header (most of a small message's rewrite) is
done once, not per message. Header objects are immutable, so sharing one between messages is safe.
"""

from __future__ import annotations

import functools
from email.headerregistry import Address, HeaderRegistry
from email.policy import SMTP
from email.utils import make_msgid
from typing import Any

from relay.idn import ascii_domain

CACHED_VALUE_MAX = 1000  # longer values are parsed every time (no hostile header fills the cache)


class CachedHeaderRegistry(HeaderRegistry):
    """``HeaderRegistry`` that builds each header class once instead of once per header."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[type[Any], type[Any]] = {}  # keyed by kind, so hostile header names cannot grow it

    def __getitem__(self, name: str) -> type[Any]:
        kind = self.registry.get(name.lower(), self.default_class)
        cls = self._classes.get(kind)
        if cls is None:
            cls = self._classes[kind] = type("_" + kind.__name__, (kind, self.base_class), {})
        return cls

    def __call__(self, name: str, value: Any) -> Any:
        key = _cache_key(value)
        if key is None:
            return super().__call__(name, value)
        return self._cached(name, key)

    @functools.lru_cache(maxsize=1024)  # noqa: B019  (one policy object for the process's life: nothing leaks)
    def _cached(self, name: str, key: str | tuple[tuple[str, str, str], ...]) -> Any:
        if isinstance(key, str):
            return super().__call__(name, key)
        return super().__call__(name, [Address(display_name=d, username=u, domain=h) for d, u, h in key])


def _cache_key(value: Any) -> str | tuple[tuple[str, str, str], ...] | None:
    """What identifies a header value exactly: the text itself, or each address's parts (an ``Address``
    is not hashable); ``None`` for anything else (groups, long values): not cached."""
    if isinstance(value, str):
        return value if len(value) <= CACHED_VALUE_MAX and type(value) is str else None
    items = [value] if isinstance(value, Address) else value if isinstance(value, (list, tuple)) else None
    if items is None or not items or not all(type(a) is Address for a in items):
        return None
    key = tuple((a.display_name, a.username, a.domain) for a in items)
    return key if sum(len(d) + len(u) + len(h) for d, u, h in key) <= CACHED_VALUE_MAX else None


POLICY = SMTP.clone(refold_source="none", header_factory=CachedHeaderRegistry())


def message_id(address: str) -> str:
    """A new Message-ID at the domain of ``address``, its A-label for an IDN (a msg-id is ASCII, RFC 5322
    3.6.4: at ``yhtiö.fi`` it came out as an encoded word, or the message could not be written at all)."""
    return make_msgid(domain=ascii_domain(address.rpartition("@")[2]) or "relay.invalid")
