"""YAML file -> one frozen, typed ``Config``, with every error placed in the file.

``load_config`` either returns a ``Config`` or raises one ``ConfigError`` listing *all* problems at once,
each with its key path and line number, the way a compiler reports errors."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml
from pydantic import (
    ValidationError,
)

from relay.config.checks import _address_clashes, _references
from relay.config.models import Config
from relay.config.types import LinePath
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
        problems.append(ConfigProblem(_dotted(loc), message, _line_for(loc, lines), file))
    return _dedupe(problems)

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
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError([ConfigProblem("", f"not valid YAML: {getattr(exc, 'problem', exc)}", line, file)]) from None
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
