"""How well ``relay check`` places and words YAML syntax errors: every line of a config mistyped the
common ways (one space more or less, a tab, a key without ``: ``, a value given a ``: ``).

    .venv/bin/python bench/yaml_advice.py [config.example.yaml]

For each kind of mistake, of the files PyYAML refuses: how often PyYAML's own mark is the mistyped line,
how often relay's advice names it (or the line after it), and how often the advice falls back to
PyYAML's words ("generic").
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable
from pathlib import Path

import yaml

from relay.config.yamlerrors import explain

Mistake = Callable[[str], "str | None"]


def _is_key_line(line: str) -> bool:
    return ": " in line and not line.lstrip().startswith("#")


MISTAKES: dict[str, Mistake] = {
    "one space more": lambda line: " " + line,
    "one space less": lambda line: line[1:] if line.startswith(" ") else None,
    "a tab": lambda line: "\t" + line.lstrip(" "),
    "no colon": lambda line: line.replace(": ", " ", 1) if _is_key_line(line) else None,
    "': ' in value": lambda line: line + ": x" if _is_key_line(line) and not line.rstrip().endswith(":") else None,
}


def measure(text: str) -> dict[tuple[str, str], int]:
    lines = text.splitlines()
    stats: dict[tuple[str, str], int] = collections.Counter()
    for name, mistake in MISTAKES.items():
        for index, line in enumerate(lines):
            changed = mistake(line) if line.strip() and not line.lstrip().startswith("#") else None
            if changed is None:
                continue
            mistyped = "\n".join([*lines[:index], changed, *lines[index + 1 :]]) + "\n"
            try:
                yaml.compose(mistyped, Loader=yaml.SafeLoader)
                continue
            except yaml.YAMLError as exc:
                advice = explain(exc, mistyped)
                mark = getattr(exc, "problem_mark", None)
                stats[name, "refused"] += 1
                stats[name, "pyyaml"] += mark is not None and mark.line == index
                stats[name, "relay"] += advice.line == index + 1
                stats[name, "relay or next"] += advice.line in (index + 1, index + 2)
                stats[name, "generic"] += "look at the indentation" in advice.message
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="config.example.yaml")
    stats = measure(Path(parser.parse_args().config).read_text(encoding="utf-8"))
    for name in MISTAKES:
        print(f"{name:15} refused {stats[name, 'refused']:4}  PyYAML's line right {stats[name, 'pyyaml']:4}  "
              f"relay's right {stats[name, 'relay']:4} (or the next {stats[name, 'relay or next']:4})  "
              f"generic {stats[name, 'generic']:3}")


if __name__ == "__main__":
    main()
