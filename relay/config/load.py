"""YAML file -> one frozen, typed ``Config``, with every error placed in the file.

``load_config`` either returns a ``Config`` or raises one ``ConfigError`` listing *all* problems at once,
each with its key path and line number, the way a compiler reports errors."""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from relay.config.checks import _address_clashes, _references
from relay.config.models import Config
from relay.config.types import (
    DEFAULT_SPOOL,
    RELATIVE_TO,
    LinePath,
    config_folder,
    described,
    from_config_folder,
)
from relay.config.yamlerrors import explain as explain_yaml_error
from relay.config.yamlread import Refused, SectionUnreadable, may_hold_secret, read_yaml, top_level
from relay.errors import ConfigError, ConfigProblem


def _yaml_lines(node: yaml.Node, path: LinePath, lines: dict[LinePath, int], dups: list[LinePath]) -> None:
    """Walk the composed YAML tree and remember where every key path starts (1-based lines)."""
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                dups.append((*path, key))
            seen.add(key)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _yaml_lines(value_node, (*path, key), lines, dups)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _yaml_lines(item, (*path, index), lines, dups)

def _dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out

def _line_for(path: LinePath, lines: Mapping[LinePath, int]) -> int | None:
    for cut in range(len(path), -1, -1):
        if path[:cut] in lines:
            return lines[path[:cut]]
    return None

def _pydantic_problems(exc: ValidationError, lines: Mapping[LinePath, int], file: str) -> list[ConfigProblem]:
    problems = []
    for err in exc.errors(include_url=False):
        # pydantic adds the union member or validator name to loc; keep only real keys of the file
        # (a key of the file is kept even when it looks like a tag, e.g. an upstream named "upstream-eu")
        loc: LinePath = ()
        for part in err["loc"]:
            if isinstance(part, int) or (*loc, part) in lines or not _is_pydantic_tag(part):
                loc = (*loc, part)
        message = err["msg"].removeprefix("Value error, ")
        if err["type"].startswith("ip_v"):  # one message, not one per member of the IP union
            message = "not an IP address or network (such as 192.168.10.23 or 192.168.10.0/24)"
        elif err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see config.example.yaml for every key)"
        elif err["type"] == "missing":
            message = "required key is missing"
        elif err["type"] not in _OWN_WORDS and not _secret_key(loc):
            message = f"{_TYPE_WORDS.get(err['type'], message)}, got {described(err['input'])}"
        problems.append(ConfigProblem(_dotted(loc), message, _line_for(loc, lines), file))
    return _dedupe(problems)


# pydantic's words for a value of the wrong type, said as an admin would; the value given is echoed after them
_TYPE_WORDS = {
    "int_parsing": "expected a whole number", "int_type": "expected a whole number",
    "int_from_float": "expected a whole number", "float_parsing": "expected a number", "float_type": "expected a number",
    "bool_parsing": "expected true or false", "bool_type": "expected true or false",
    "string_type": "expected text (a number or true/false is text when put in quotes)",
    "dict_type": "expected a section of keys (key: value lines indented under it)",
    "list_type": "expected a list", "tuple_type": "expected a list",
}  # fmt: skip
_OWN_WORDS = {"value_error", "assertion_error", "missing", "extra_forbidden"}  # relay's messages say it already


def _secret_key(loc: LinePath) -> bool:
    """A key whose value is never echoed, even when it is of the wrong type (it may be a secret)."""
    return may_hold_secret(".".join(map(str, loc)))


def _is_pydantic_tag(part: str) -> bool:
    return part.startswith("upstream-") or ("[" in part and "]" in part)

def _dedupe(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    seen: set[tuple[str, str]] = set()
    out = []
    for p in problems:
        if (p.path, p.message) not in seen:
            seen.add((p.path, p.message))
            out.append(p)
    return out

def parse_config(text: str, *, file: str = "config", relative_to: str | None = None) -> Config:
    """Parse and validate YAML text; raise ``ConfigError`` listing every problem found. ``relative_to``:
    the folder a relative path in it is taken from (the file's own, when it was read from a file)."""
    try:
        node, data = read_yaml(text)
    except Refused as exc:
        raise ConfigError([ConfigProblem("", f"refused: {exc.message}", exc.line, file)]) from None
    except yaml.YAMLError as exc:  # in words that say what to change, on the line to change
        advice = explain_yaml_error(exc, text)
        raise ConfigError([ConfigProblem(advice.path, f"not valid YAML: {advice.message}", advice.line, file)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem("", "the file must be a mapping of keys to values", 1, file)])
    lines: dict[LinePath, int] = {}
    dups: list[LinePath] = []
    if node is not None:
        _yaml_lines(node, (), lines, dups)
    problems = [
        ConfigProblem(_dotted(p), "key given twice; the second would silently win", lines.get(p), file) for p in dups
    ]
    booleans = _booleans_as_numbers(data)
    config: Config | None = None
    try:
        context = {RELATIVE_TO: relative_to} if relative_to is not None else None
        config = Config.model_validate({**data, "source": file}, context=context)
    except ValidationError as exc:  # not pydantic's word on the 0 or 1 it made of a boolean: said once, below
        said = {_dotted(p) for p, _ in booleans}
        problems += [p for p in _pydantic_problems(exc, lines, file) if p.path not in said]
    found = _references(data) + _address_clashes(data) + booleans
    problems += [ConfigProblem(_dotted(p), m, _line_for(p, lines), file) for p, m in found]
    if problems or config is None:
        raise ConfigError(sorted(problems, key=lambda p: p.line or 0))
    return config


def _booleans_as_numbers(data: Any) -> list[tuple[LinePath, str]]:
    """``port: true`` is an error, not port 1: pydantic's lax mode reads a boolean as 0 or 1 for a number."""
    found = []
    for path, value in _booleans(data):
        kind = _number_kind(Config, path)
        if kind is not None:
            found.append((path, f"{kind}, got {str(value).lower()}"))
    return found


def _booleans(data: Any, path: LinePath = ()) -> Iterator[tuple[LinePath, bool]]:
    if isinstance(data, bool):
        yield path, data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _booleans(value, (*path, str(key)))
    elif isinstance(data, list):
        for index, item in enumerate(data):
            yield from _booleans(item, (*path, index))


def _number_kind(annotation: Any, path: LinePath) -> str | None:
    """What the models expect at ``path`` when it is a number and not a boolean ("expected a whole number"),
    else None: the annotations followed key by key (a model's field, a dict's value, a list's item)."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in args if arg is not type(None)]
        kinds = [_number_kind(arg, path) for arg in members]
        return kinds[0] if kinds and all(kind == kinds[0] for kind in kinds) else None
    if not path:
        return {int: _TYPE_WORDS["int_type"], float: _TYPE_WORDS["float_type"]}.get(annotation)
    key, rest = path[0], path[1:]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(key))
        return _number_kind(field.annotation, rest) if field is not None else None
    if origin is dict and len(args) == 2:
        return _number_kind(args[1], rest)
    if origin in (list, tuple) and args and isinstance(key, int):
        return _number_kind(args[0], rest)
    return None


MAX_BYTES = 1024 * 1024  # a relay config is a few KiB; example with every key commented: about 40 KiB


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the admin's YAML file."""
    return parse_config(read_config_text(path), file=str(path), relative_to=config_folder(path))


def read_config_text(path: str | os.PathLike[str]) -> str:
    """The file's text, read no further than ``MAX_BYTES``: ``/dev/zero`` or a log named by mistake must not
    fill the daemon's memory on a reload."""
    try:
        with open(path, "rb") as stream:
            raw = stream.read(MAX_BYTES + 1)
    except OSError as exc:
        raise _unreadable(path, str(exc)) from None
    if len(raw) > MAX_BYTES:
        raise _unreadable(path, f"it is larger than {MAX_BYTES >> 20} MiB, which no relay config is (is it the right file?)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:  # Notepad's "ANSI": say which line and what to do, not the codec's words
        line = raw.count(b"\n", 0, exc.start) + 1
        words = (f"byte 0x{raw[exc.start]:02x} is not UTF-8 text: save the file as UTF-8 (it was saved in another "
                 "encoding, such as Windows' ANSI or Latin-1)")  # fmt: skip
        raise ConfigError([ConfigProblem("", words, line, str(path))]) from None


def _unreadable(path: str | os.PathLike[str], why: str) -> ConfigError:
    return ConfigError([ConfigProblem("", f"cannot read {path}: {why}", None, str(path))])


def lenient_spool_dir(path: str | os.PathLike[str]) -> Path | None:
    """``spool_dir`` of a config that does not load, as the file gives it (relay's default when it gives
    none); ``None`` when that cannot be told: the file unreadable, its ``spool_dir:`` lines not valid YAML,
    or the value no path.

    For ``relay queue``, which needs nothing else: a file with errors is refused at a reload and the
    daemon keeps running on its previous config, which is exactly when the admin must see and manage the
    queue (Postfix's mailq works with a bad main.cf). A schema error elsewhere leaves the parsed value; a
    YAML error, the ``spool_dir:`` section read alone (``read_section``)."""
    try:
        text = read_config_text(path)
        given = top_level(text, "spool_dir")
    except (ConfigError, SectionUnreadable):
        return None
    value = given.get("spool_dir", DEFAULT_SPOOL)
    return from_config_folder(value, path) if isinstance(value, str) and value.strip() else None


