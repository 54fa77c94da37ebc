"""YAML file -> one frozen, typed ``Config``, with every error placed in the file.

``load_config`` either returns a ``Config`` or raises one ``ConfigError`` listing *all* problems at once,
each with its key path and line number, the way a compiler reports errors."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from relay.config.checks import _address_clashes, _references
from relay.config.models import Config
from relay.config.types import LinePath
from relay.config.yamlerrors import explain as explain_yaml_error
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
            message = f"{_TYPE_WORDS.get(err['type'], message)}, got {_given(err['input'])}"
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
    return any(word in str(part).lower() for part in loc for word in ("password", "secret", "token"))


def _given(value: Any) -> str:
    """The value the admin wrote, as the YAML gave it (``'587x'``), or what kind of thing it was."""
    if value is None:
        return "nothing (the key has no value)"
    if isinstance(value, Mapping):
        return "a section of keys"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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

def parse_config(text: str, *, file: str = "config") -> Config:
    """Parse and validate YAML text; raise ``ConfigError`` listing every problem found."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
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
    config: Config | None = None
    try:
        config = Config.model_validate({**data, "source": file})
    except ValidationError as exc:
        problems += _pydantic_problems(exc, lines, file)
    found = _references(data) + _address_clashes(data)
    problems += [ConfigProblem(_dotted(p), m, _line_for(p, lines), file) for p, m in found]
    if problems or config is None:
        raise ConfigError(sorted(problems, key=lambda p: p.line or 0))
    return config

def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the admin's YAML file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem("", f"cannot read {path}: {exc}", None, str(path))]) from None
    return parse_config(text, file=str(path))
