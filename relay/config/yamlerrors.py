"""PyYAML's syntax errors -> what an admin should change, on the line to change.

PyYAML describes its own state ("mapping values are not allowed here", "expected <block end>, but
found '<block mapping start>'") and stops where it noticed the trouble, often a line after the mistake.
``explain`` turns the common mistakes in a hand-edited config into advice: a tab (use spaces), a value
holding ``: `` (quote it), a line indented deeper or shallower than its neighbours, a key without
``: ``, an unclosed quote or bracket, a value starting with a character YAML reserves.

Some advice shows the line as it should be written. Never a line whose key may hold a secret (nor the
line under such a key, where a pasted password lands): the error goes to the terminal, to a pasted
ticket and, on a reload, to the daemon's log, so there the advice says what to change in words.

Indentation is judged by ``_Outline``, a small reader of block-style YAML (what relay configs are):
it follows the indentation of keys and list items line by line and reports the first line that does
not fit. It runs only after PyYAML has refused the file, and gives up on anything it does not follow
(a flow collection or a quoted value across lines), leaving the other advice or PyYAML's own words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from relay.config.types import CONTROL_NAMES
from relay.config.yamlread import may_hold_secret

_KEY = re.compile(r"""(?:"[^"]*"|'[^']*'|[^\s#'"\[\]{},&*!|>%@`-][^#]*?|-[^\s#][^#]*?)\s*:(?=\s|$)""")
_BLOCK_SCALAR = re.compile(r"[|>][-+0-9]*\s*(#.*)?$")  # a value that opens a literal (|) or folded (>) block
_COMMENT = re.compile(r"\s+#.*$")
_DOCUMENT_MARKER = re.compile(r"(?:---|\.\.\.)(?:\s|$)")
_PROPERTIES = re.compile(r"(?:[&!]\S*\s*)+")  # an anchor (&name) or a tag before a block that follows


@dataclass(frozen=True)
class Explained:
    """Advice for one YAML syntax error: the 1-based line to change and what to do there."""

    line: int | None
    message: str
    path: str = ""  # the key path of that line, when the lines above it tell


@dataclass
class _Level:
    """Where the keys (``map``) or the ``- `` items (``seq``) of one open block start."""

    indent: int
    kind: str  # "map" or "seq"
    line: int  # the first line at this level
    key: str  # its first key, or "-" for a list
    current: str = ""  # the key seen last at this level (a map)
    index: int = -1  # the item seen last (a list)


def explain(exc: yaml.YAMLError, text: str) -> Explained:
    """What to change for ``exc``, raised while reading ``text``; PyYAML's own words if no advice fits."""
    lines = text.splitlines()
    line, message = _unacceptable(exc, text) if isinstance(exc, yaml.reader.ReaderError) else _advice(exc, lines, reveal=True)
    known = line is not None and line <= len(lines) and "\t" not in _leading(lines[line - 1])
    path = _Outline(lines).path_of(line) if line is not None and known else ""  # a tab: no telling
    if line is not None and _secret_line(lines, line, path):
        line, message = _advice(exc, lines, reveal=False)
    return Explained(line, message, path)


def _unacceptable(exc: yaml.reader.ReaderError, text: str) -> tuple[int | None, str]:
    """A control character YAML refuses anywhere in the file (an ESC pasted into a signature): PyYAML names
    only its offset in the text, which no admin can find. The line, and what to do; never the line's text."""
    if not isinstance(exc.character, int) or not 0 <= exc.position <= len(text):
        return None, str(exc)
    line = text.count("\n", 0, exc.position) + 1
    name = CONTROL_NAMES.get(exc.character)
    shown = f"\\x{exc.character:02x}" + (f" ({name})" if name else "")
    return line, (f"the control character {shown} cannot be in a YAML file (most editors do not show it): delete "
                  f"it, or, if it is meant, write it as {shown.split()[0]} inside a double-quoted value")


def _secret_line(lines: list[str], line: int, path: str) -> bool:
    """Line ``line`` may hold a secret: its key or key path says so, or it comes right under such a key
    left without a value (``password_file:``), where a password pasted on its own line lands."""
    above = next((text for text in reversed(lines[: line - 1]) if text.strip() and not text.lstrip().startswith("#")), "")
    opened = _line_key(above) if _COMMENT.sub("", above).rstrip().endswith(":") else ""
    here = lines[line - 1] if line <= len(lines) else ""
    return any(may_hold_secret(name) for name in (path, _line_key(here), opened))


def _line_key(source: str) -> str:
    """What a line's key would be: the text before its first ':' or, without one, its first word."""
    body = source.strip().removeprefix("- ").lstrip("{[ ")
    return re.split(r":|\s", body, maxsplit=1)[0].strip("'\"")


def _advice(exc: yaml.YAMLError, lines: list[str], *, reveal: bool) -> tuple[int | None, str]:
    """(line, advice): the specific cases first, the indentation reader next, PyYAML's words last.

    ``reveal``: the advice may show the line as it should be written (not for a secret's line)."""
    problem = str(getattr(exc, "problem", "") or exc)
    context = str(getattr(exc, "context", "") or "")
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return None, problem
    line = mark.line + 1
    source = lines[mark.line] if mark.line < len(lines) else ""
    if "'\\t'" in problem:
        return line, _tab(source, mark.column)
    ended = problem.startswith("expected '<document start>'") and any(map(_DOCUMENT_MARKER.match, lines[: mark.line]))
    if context.startswith("expected a single document") or ended:
        return line, ("a second YAML document starts here: relay reads one; remove the --- or ... line that ends "
                      "the first, and keep every key in one document")  # fmt: skip
    unclosed = _unclosed(problem, context, getattr(exc, "context_mark", None), lines)
    if unclosed is not None:
        return unclosed
    try:
        misfit = _Outline(lines, reveal=reveal).first_misfit(until=line)
    except _Lost:
        misfit = None
    if misfit is not None:
        return misfit.line, misfit.message
    simple_key = getattr(exc, "context_mark", None)
    if context == "while scanning a simple key" and simple_key is not None and simple_key.line < len(lines):
        return simple_key.line + 1, _missing_colon(lines[simple_key.line].strip(), reveal=reveal)
    colon = _colon_in_value(source, mark.column, reveal=reveal) if problem == "mapping values are not allowed here" else None
    if colon:
        return line, colon
    starts = re.search(r"found character '(.)' that cannot start any token", problem)
    tag = problem.startswith("could not determine a constructor for the tag")
    if starts or tag or problem.startswith("found undefined alias"):
        char = starts.group(1) if starts else ("!" if tag else "*")
        return line, f'a value cannot start with {char} unless it is in quotes: put the value in quotes ("...")'
    if "expected <block end>, but found '<scalar>'" in problem and re.search(r"""["']""", source):
        return line, ("text follows the closing quote of a value: put the whole value in quotes, and write a \" "
                      "inside double quotes as \\\" (or use single quotes)")  # fmt: skip
    words = " ".join(part for part in (context, problem) if part)
    if not reveal:  # PyYAML quotes what it found ('S' of a secret, a tag, an alias): not those
        words = re.sub(r"'(?!<)[^']*'", "a character", words)  # PyYAML's '<block end>' and such stay
    return line, f"{words} (look at the indentation and the quotes of this line and the one above)"


def _leading(source: str) -> str:
    return source[: len(source) - len(source.lstrip())]


def _tab(source: str, column: int) -> str:
    where = "the indentation of this line" if not source[:column].strip() else f"column {column + 1} of this line"
    return f"a tab in {where}: YAML takes spaces only (use spaces, not tabs)"


def _unclosed(problem: str, context: str, mark: yaml.Mark | None, lines: list[str]) -> tuple[int, str] | None:
    """A quote or a bracket that is never closed: the line where it was opened, not the end of the file."""
    if mark is None:
        return None
    line = mark.line + 1
    if context == "while scanning a quoted scalar":
        quote = lines[mark.line][mark.column] if mark.line < len(lines) and mark.column < len(lines[mark.line]) else '"'
        # an earlier line with an odd number of quotes is where it began: YAML read its value on over the
        # lines below, to the next quote (a later signature: "" closed it and opened the one reported)
        earlier = next((n for n, text in enumerate(lines[: mark.line]) if _COMMENT.sub("", text).count(quote) % 2), None)
        line = earlier + 1 if earlier is not None else line
        return line, f"the value's opening {quote} has no closing {quote}: end the value with {quote} on this line"
    flow = re.match(r"while parsing a flow (sequence|mapping)", context)
    if flow and problem.startswith("expected ','"):
        opener, closer = ("[", "]") if flow.group(1) == "sequence" else ("{", "}")
        advice = f"the {opener} opened on this line is not closed: end it with {closer} on the same line"
        return line, f"{advice} (an item holding ': ' must be in quotes)"
    return None


def _colon_in_value(source: str, column: int, *, reveal: bool) -> str | None:
    """``from_name: Puuseppä Oy: Laskutus``: a key, then a value holding ': ' that YAML takes as a second key."""
    key = _KEY.match(source.strip().removeprefix("- "))
    if key is None or source.find(":") >= column:
        return None
    name, value = source.strip().split(":", 1)
    said = f"the value of {name.removeprefix('- ')} contains ': ', which YAML reads as another key: put the value in quotes"
    if not reveal:
        return f"{said} (\"...\"; '...' if it holds a \" or a \\)"
    value = _COMMENT.sub("", value).strip()
    quoted = f'"{value}"' if '"' not in value and "\\" not in value else "'" + value.replace("'", "''") + "'"
    return f"{said}, as in  {name.strip()}: {quoted}"


def _missing_colon(source: str, *, reveal: bool) -> str:
    opener = source[:1]
    if opener in ("{", "[") and source.count(opener) > source.count("}" if opener == "{" else "]"):
        closer = "}" if opener == "{" else "]"
        return f"the {opener} opened on this line is not closed: end it with {closer} on the same line"
    said = "this line has no ': ' between its key and its value"
    if not reveal:
        key = _line_key(source)
        if ":" in source:
            return f"{said}: put a space after the ':' that follows {key}"
        where = f"right after {key}" if " " in source.strip() else "after the key, before its value"
        return f"{said}: put ': ' {where} (key: value)"
    if ":" in source:
        fixed = re.sub(r":(?=\S)", ": ", source, count=1)
    else:
        fixed = re.sub(r"\s+", ": ", source, count=1) if " " in source else source + ":"
    return f"{said}: write it as  {fixed}"


class _Outline:
    """Follows the block structure of a YAML text by indentation (see the module docstring)."""

    def __init__(self, lines: list[str], *, reveal: bool = True) -> None:
        self.lines = lines
        self.reveal = reveal  # the advice may show a line as it should be written
        self.levels: list[_Level] = []
        self.opens = False  # the last line was a key without a value (or a bare -): a deeper block may follow
        self._step: int | None = None

    def first_misfit(self, *, until: int) -> Explained | None:
        """The first line up to ``until`` (1-based) whose indentation does not fit the lines above it."""
        previous = number = 0
        while number < min(until, len(self.lines)):
            number += 1
            raw = self.lines[number - 1]
            body = _COMMENT.sub("", raw).strip() if not raw.lstrip().startswith("#") else ""
            if not body or _DOCUMENT_MARKER.match(raw):  # --- or ...: where a document starts or ends, no key
                continue
            if _hard(body):
                raise _Lost
            indent = len(raw) - len(raw.lstrip(" "))
            if raw[indent : indent + 1] == "\t":
                return Explained(number, _tab(raw, indent))
            misfit = self._place(number, indent, body, previous)
            if misfit is not None:
                return misfit
            value = body.split(":", 1)[1].strip() if _KEY.match(body.removeprefix("- ")) else ""
            self.opens = body.endswith(":") or body == "-" or bool(_PROPERTIES.fullmatch(value))
            if _BLOCK_SCALAR.match(value):
                skipped = self._block_text(number, indent)
                if isinstance(skipped, Explained):
                    return skipped if skipped.line is not None and skipped.line <= until else None
                number = skipped
                self.opens = False
            previous = number
        return None

    def path_of(self, number: int) -> str:
        """The key path (``company.from_name``, ``listeners[0].port``) of line ``number``, as far as the
        lines above it tell; "" when they cannot."""
        try:
            if self.first_misfit(until=number - 1) is not None:
                return ""
        except _Lost:
            return ""
        raw = self.lines[number - 1] if number <= len(self.lines) else ""
        body, indent = raw.strip(), len(raw) - len(raw.lstrip(" "))
        dash = body.startswith("-")
        levels = [level for level in self.levels if level.indent <= indent]
        if len(levels) > 1 and not dash and levels[-1].kind == "seq" and levels[-2].indent == levels[-1].indent:
            levels.pop()  # a list written at its key's indentation: a key there ends it
        last = levels[-1] if levels else None
        if last is not None and (last.indent == indent and (last.kind == "map" or dash)):
            levels.pop()  # a sibling of that level's key, not inside it
        elif last is not None and last is self.levels[-1] and last.kind == "map" and not self.opens:
            levels.pop()  # deeper under a key that has its value: meant as its sibling
        parts = [f"[{level.index}]" if level.kind == "seq" else level.current for level in levels]
        key = _KEY.match(body.removeprefix("- ").strip())
        if key:
            parts.append(_key_name(key.group()).rstrip(":"))
        return "".join(part if part.startswith("[") or not i else "." + part for i, part in enumerate(parts))

    def _place(self, number: int, indent: int, body: str, previous: int) -> Explained | None:
        """Fit one line into the open levels: a new deeper block, the same level, or back to an outer one."""
        dash = body == "-" or body.startswith("- ")
        top = self.levels[-1] if self.levels else None
        deeper = top is None or indent > top.indent
        if top is None or (self.opens and (deeper or (indent == top.indent and dash and top.kind == "map"))):
            self.levels.append(_Level(indent, "seq" if dash else "map", number, "-" if dash else _key_name(body)))
        elif deeper:
            if not _KEY.match(body):  # a plain value continued on a deeper line: valid YAML
                return None
            item = self.lines[previous - 1].strip()[1:].strip() if top.kind == "seq" else ""
            if item and not _KEY.match(_COMMENT.sub("", item)):  # "- address 127.0.0.1", then its keys
                return Explained(previous, _missing_colon(_COMMENT.sub("", item), reveal=self.reveal))
            odd = self._odd_level(top, self.levels[-2] if len(self.levels) > 1 else None, indent, number)
            if odd is not None:
                return odd
            return Explained(number, f"this line is indented deeper than the one above (line {previous}), which "
                                     f"already has a value: indent it by {_spaces(top.indent)}, like {top.key} on "
                                     f"line {top.line}")  # fmt: skip
        else:
            inner = None
            while self.levels and self.levels[-1].indent > indent:
                inner = self.levels.pop()
            if not dash and len(self.levels) > 1 and self.levels[-1].kind == "seq" and self.levels[-2].indent == indent:
                self.levels.pop()  # a list written at its key's indentation ends at the next key
            outer = self.levels[-1] if self.levels else None
            if outer is None or outer.indent != indent or (outer.kind == "seq" and not dash):
                odd = self._odd_level(inner, outer, indent, number) if inner is not None and inner.kind == "map" else None
                if odd is None and outer is not None and outer.indent < indent and outer.kind == "map":
                    odd = self._odd_level(outer, self.levels[-2] if len(self.levels) > 1 else None, indent, number)
                return odd or Explained(number, _shallower(previous, inner, outer))
        if dash:
            self._item(number, indent, body)
            return None
        if not _KEY.match(body):
            return Explained(number, _missing_colon(body, reveal=self.reveal))
        self.levels[-1].current = _key_name(body).rstrip(":")
        return None

    def _odd_level(self, level: _Level, parent: _Level | None, indent: int, number: int) -> Explained | None:
        """The first key of a section indented unlike the file's other sections, when the line that does not
        fit ``level`` (at ``indent``) is indented the usual way: that first key is the one to move."""
        usual = (parent.indent + self.step) if parent is not None else 0
        if indent != usual or level.indent == usual or (parent is not None and parent.kind != "map"):
            return None
        under = f"also under {parent.key}" if parent is not None else "also a top-level key"
        return Explained(level.line, f"this line is indented by {_spaces(level.indent)}, but line {number}, {under}, "
                                     f"by {_spaces(usual)} (as this file indents): indent it by {_spaces(usual)}")  # fmt: skip

    @property
    def step(self) -> int:
        """How many spaces this file indents a section by (the most common step; 2 if none)."""
        if self._step is None:
            steps: dict[int, int] = {}
            last = None
            for raw in self.lines:
                if raw.strip() and not raw.lstrip().startswith("#"):
                    depth = len(raw) - len(raw.lstrip(" "))
                    if last is not None and depth > last:
                        steps[depth - last] = steps.get(depth - last, 0) + 1
                    last = depth
            self._step = max(steps, key=lambda k: (steps[k], -k)) if steps else 2
        return self._step

    def _item(self, number: int, indent: int, body: str) -> None:
        """``- key: value`` opens the item's own mapping where its key starts."""
        self.levels[-1].index += 1
        content = body[1:].lstrip()
        if content and _KEY.match(content):
            name = _key_name(content)
            self.levels.append(_Level(indent + len(body) - len(content), "map", number, name, name.rstrip(":")))

    def _block_text(self, number: int, indent: int) -> int | Explained:
        """Skip the text of a ``key: |`` block (its lines are deeper than the key); the last line it takes."""
        first = None
        first_line = at = number
        while at < len(self.lines):
            raw = self.lines[at]
            if raw.strip():
                depth = len(raw) - len(raw.lstrip(" "))
                if first is None and depth <= indent:
                    if _KEY.match(raw.strip().removeprefix("- ")) or raw.strip() == "-":
                        break  # an empty block: the next key follows
                    return Explained(at + 1, f"the text of the block started on line {number} (|) must be indented "
                                             f"deeper than its key: indent it by {_spaces(indent + 2)}")  # fmt: skip
                if first is not None and indent < depth < first:
                    return Explained(at + 1, f"this line is indented shallower than the text above it, which ends "
                                             f"the block started on line {number} (|): indent it by "
                                             f"{_spaces(first)} like line {first_line}")  # fmt: skip
                if first is None:
                    first, first_line = depth, at + 1
                if depth < first:
                    break
            at += 1
        return at


class _Lost(Exception):
    """The outline cannot follow this text (a quote or a bracket open across lines)."""


def _spaces(count: int) -> str:
    return f"{count} space" + ("" if count == 1 else "s")


def _shallower(previous: int, inner: _Level | None, outer: _Level | None) -> str:
    here = f"this line is indented shallower than the one above (line {previous}) but lines up with no key above it"
    if inner is not None and inner.kind == "map" and outer is not None and outer.kind == "seq":
        where = f"to stay in the list item of line {inner.line}"
        return f"{here}: {where}, indent it by {_spaces(inner.indent)} like {inner.key}"
    choices = [f"{_spaces(level.indent)} (like {level.key} on line {level.line})" for level in (inner, outer) if level]
    return f"{here}: indent it by " + " or by ".join(choices)


def _key_name(body: str) -> str:
    return body.split(":", 1)[0].strip() + ":"


def _hard(body: str) -> bool:
    """A line this reader does not follow: a quote or a flow bracket left open for the next line."""
    plain = re.sub(r""""(?:[^"\\]|\\.)*"|'(?:[^']|'')*'""", "", body)
    if plain.count('"') % 2 or (plain.count("'") and re.search(r"(^|[:\-\[,{]\s*)'", plain)):
        return True
    return plain.count("[") != plain.count("]") or plain.count("{") != plain.count("}")
