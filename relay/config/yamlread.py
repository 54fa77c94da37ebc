"""The YAML reader of the admin's file: YAML 1.2's core schema, and limits a hostile file cannot pass.

PyYAML implements YAML 1.1, whose plain ``yes``/``no``/``on``/``off`` are booleans, ``0465`` octal and
``1:05`` a base-60 number: an admin's ``port: 0465`` became 309, ``archive_days: yes`` 1. Here only
``true``/``false`` (any one case) are booleans and ``0465`` is decimal, as in YAML 1.2 and what editors
show; ``yes``/``on`` stay text, which pydantic still reads as true for a yes/no key.

A file read on every SIGHUP must not take the daemon down: nesting is bounded (PyYAML recurses per
level), and so is what aliases repeat (nine anchors of nine aliases each are 387 million values once
expanded by the key walk or by pydantic, though the composed tree shares them). Both are refused with
the line to look at (``Refused``) before anything walks the tree.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # only a type here: relay-sendmail reads the listeners with this, without pydantic
    from relay.config.types import LinePath

MAX_DEPTH = 64  # a relay config nests 5 or 6 levels; PyYAML's recursion overflows near 300
MAX_ALIASED = 10_000  # values repeated by aliases in all: a shared upstream for 100 users is ~1,000

_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_NULL = "tag:yaml.org,2002:null"
_KEPT = ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:timestamp")  # << of an anchor; a date (expiry)

# YAML 1.2.2, 10.3.2 (the core schema): (tag, pattern, first characters); ints before floats ("587" is both)
_CORE: tuple[tuple[str, str, str], ...] = (
    (_NULL, r"~|null|Null|NULL|", "~nN"),
    (_BOOL, r"true|True|TRUE|false|False|FALSE", "tTfF"),
    (_INT, r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    (_FLOAT, r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
     "-+0123456789."),
)  # fmt: skip


class Refused(Exception):
    """The file is refused before it is walked: what is wrong and on which line (1-based)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _Loader(yaml.SafeLoader):
    """SafeLoader with the core schema's scalars and bounded nesting and aliases."""

    yaml_implicit_resolvers = {}  # noqa: RUF012 (PyYAML's own class-level table, filled once below)

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self._aliased = 0
        self._sizes: dict[int, int] = {}  # id of a composed collection -> its values once aliases are expanded

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        line = event.start_mark.line + 1 if event.start_mark is not None else 1
        if isinstance(event, yaml.AliasEvent):
            return self._alias(parent, index, event.anchor, line)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise Refused(line, (f"the values are nested more than {MAX_DEPTH} levels deep here (brackets or "
                                     "indentation): a relay config needs a few; look for [ or { repeated or never "
                                     "closed"))  # fmt: skip
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.CollectionNode):
            self._sizes[id(node)] = 1 + sum(self._size(child) for child in _children(node))
        return node

    def _alias(self, parent: yaml.Node | None, index: int, anchor: str | None, line: int) -> yaml.Node | None:
        node = super().compose_node(parent, index)
        self._aliased += self._size(node)
        if self._aliased > MAX_ALIASED:
            raise Refused(line, (f"with the alias *{anchor} on this line, the values that aliases repeat pass "
                                 f"{MAX_ALIASED:,} (aliases of aliases multiply): write the values out, or use "
                                 "fewer aliases"))  # fmt: skip
        return node

    def _size(self, node: yaml.Node | None) -> int:
        return self._sizes.get(id(node), 1)


def _children(node: yaml.CollectionNode) -> Iterator[yaml.Node]:
    for item in node.value:
        yield from item if isinstance(item, tuple) else (item,)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """``0o17`` octal, ``0x1f`` hex, anything else decimal (``0465`` is 465)."""
    value = str(loader.construct_scalar(node))
    base = {"0o": 8, "0x": 16}.get(value[:2], 10)
    try:
        return int(value[2:] if base != 10 else value, base)
    except ValueError:  # over Python's 4,300 digits
        raise yaml.constructor.ConstructorError(None, None, "this number is too long to be read", node.start_mark) from None


def _core_resolvers() -> None:
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items():
        for tag, pattern in resolvers:
            if tag in _KEPT:
                _Loader.yaml_implicit_resolvers.setdefault(first, []).append((tag, pattern))
    for tag, words, first in _CORE:
        _Loader.add_implicit_resolver(tag, re.compile(f"^(?:{words})$"), [*first, ""] if tag == _NULL else [*first])
    _Loader.add_constructor(_INT, _construct_int)


_core_resolvers()


def read_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """The composed tree (for line numbers) and the values of ``text``'s one document.

    Raises ``yaml.YAMLError`` for a syntax error (``yamlerrors.explain`` says it in words) and ``Refused``
    for a file too deep or with too many aliased values."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    except RecursionError:  # the depth bound should come first; never a traceback either way
        raise Refused(1, "the values are nested too deeply to be read (a relay config needs a few levels)") from None
    finally:
        loader.dispose()


def comment_cuts(node: yaml.Node | None, path: LinePath = ()) -> Iterator[tuple[LinePath, str]]:
    """Plain (unquoted) values that a `` #`` ends, where what follows looks like more of the value:
    ``from_name: Toimisto #2 Oy`` is ``Toimisto``, the rest a comment. (A comment set off as one, ``587  #note``
    or ``587 # note``, is taken as meant.)"""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield from comment_cuts(value, (*path, str(key.value)))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from comment_cuts(item, (*path, index))
    elif isinstance(node, yaml.ScalarNode) and node.style is None and node.value and _comment_follows(node):
        yield path, node.value


_GLUED_COMMENT = re.compile(r" #\S")  # one space: "Oy  #note", aligned, is meant as a comment


def _comment_follows(node: yaml.ScalarNode) -> bool:
    end = node.end_mark  # its buffer is the whole text PyYAML read
    return end.buffer is not None and _GLUED_COMMENT.match(end.buffer, end.pointer) is not None


# English and the seeds' languages, and what admins type in a hurry: a line under any such key is never
# shown (`salasana: a: b` was echoed word for word in a hint: Finnish for password)
_SECRET_WORDS = (
    "pass", "pwd", "secret", "token", "key", "credential", "kennwort", "geheim", "salasana", "losen", "lösen",
    "mdp", "contrase", "clave",
)


def may_hold_secret(name: str) -> bool:
    """A key (or key path) whose value is never echoed in an error or a hint: it may be a password."""
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def comment_warnings(text: str) -> list[tuple[LinePath, str]]:
    """``comment_cuts`` of ``text`` (a file that loads), said as a warning at each value's key."""
    node, _ = read_yaml(text)
    found = []
    for path, value in comment_cuts(node):
        read_as = "" if may_hold_secret(".".join(map(str, path))) else f"is read as {value!r}: "
        found.append((path, (f"{read_as}' #' starts a YAML comment, which leaves out the rest of the line; if it "
                             "belongs to the value, put the whole value in quotes (\"...\")")))  # fmt: skip
    return found


class SectionUnreadable(Exception):
    """A top-level key of a file that is not valid YAML cannot be read on its own either: why."""


_TOP_LEVEL_ITEM = re.compile(r"-(?:\s|$)")  # a "- " list item written at the top level's indentation


def read_section(text: str, key: str) -> dict[str, Any]:
    """``{key: value}`` of one top-level key of ``text``, read from that key's lines alone; ``{}`` when no
    line gives the key.

    Why: a file with a syntax error anywhere is refused whole (``read_yaml``), yet the daemon keeps running
    on its previous config, and a command that needs one setting of it (``relay-sendmail`` the listeners,
    ``relay queue`` the spool) must not stop working because of a quote missing in another section. The
    section is the key's line and the lines under it, up to the next line at the top level (a key or a
    ``---``), read by ``read_yaml`` with the same YAML 1.2 scalars and limits. ``SectionUnreadable`` when
    that cannot be told: the key on more than one line, or on an indented one (is it the top-level key
    written one space in?), or its own lines not valid YAML of that one key."""
    lines = text.splitlines(keepends=True)
    named = [number for number, line in enumerate(lines) if _names(line, key)]
    if not named:
        return {}
    if len(named) > 1 or _top_key(lines[named[0]]) != key:
        raise SectionUnreadable(f"{key}: is on more than one line or indented, so which one is meant cannot be told")
    start = named[0]
    end = next((at for at in range(start + 1, len(lines)) if _top_key(lines[at]) is not None), len(lines))
    try:
        data = read_yaml("".join(lines[start:end]))[1]
    except (yaml.YAMLError, Refused):
        raise SectionUnreadable(f"the {key}: section is not valid YAML either") from None
    if not isinstance(data, dict) or list(data) != [key]:
        raise SectionUnreadable(f"the {key}: section is not valid YAML either")
    return data


def _top_key(line: str) -> str | None:
    """The key a line at the top level starts (the text before its first ':', or its first word; ``---``
    for a document marker); ``None`` for a line inside a section: indented, blank, a comment or a ``- ``
    item."""
    if not line.strip() or line[:1].isspace() or line.startswith("#") or _TOP_LEVEL_ITEM.match(line):
        return None
    return re.split(r":|\s", line.lstrip("\ufeff"), maxsplit=1)[0].strip("'\"")


def _names(line: str, key: str) -> bool:
    """``line`` gives ``key``: at the top level (even without its ': '), or as a key at any indentation."""
    return _top_key(line) == key or re.match(rf"""\s*(?:-\s+)?(["']?){re.escape(key)}\1\s*:(?:\s|$)""", line) is not None


def top_level(text: str, key: str) -> dict[str, Any]:
    """``{key: value}`` of the file's top level (``{}`` without it): from the whole file when it is valid
    YAML, else from the key's own section."""
    try:
        data = read_yaml(text)[1]
    except (yaml.YAMLError, Refused):
        return read_section(text, key)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SectionUnreadable("the file is not a mapping of keys to values")
    return {key: data[key]} if key in data else {}
