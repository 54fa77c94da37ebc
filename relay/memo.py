"""Memoising pure functions of a ``Config`` (frozen: a reload makes a new one, never changes one).

``ByIdentity`` makes an object a cache key by identity: hashing a whole frozen config field by field
would cost more than the work saved. The cache holds the key, so the object stays alive (and its id
unique) as long as it is cached.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class ByIdentity(Generic[T]):
    """A cache key that is equal only to a key for the very same object."""

    __slots__ = ("obj",)

    def __init__(self, obj: T) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByIdentity) and other.obj is self.obj
