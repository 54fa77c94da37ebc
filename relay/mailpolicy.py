"""The one ``email`` policy relay reads and writes messages with: SMTP line ends, strict folding.

``policy.SMTP`` (CRLF, RFC 5322 folding) with ``refold_source="none"`` so headers relay does not touch
go out exactly as they came in. Its header factory caches the header classes: the stdlib registry
builds a fresh class with ``type()`` for *every* header it parses, which made class creation one of
the largest costs of rewriting a small message.
"""

from __future__ import annotations

from email.headerregistry import HeaderRegistry
from email.policy import SMTP
from typing import Any


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


POLICY = SMTP.clone(refold_source="none", header_factory=CachedHeaderRegistry())
