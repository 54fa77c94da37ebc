"""The house rule, read from the imports (ast): one wing per pipeline stage, layered, no circles.

From the top: ``commands`` (the admin's tools), ``daemon`` (the lifecycle), ``intake`` (the SMTP face),
``queue`` (spool, scheduler), ``prepare`` (the pure middle), ``transports`` (one attempt at one
provider), ``config`` (the admin's file), and the modules every stage shares at the bottom. A module
imports its own wing and the wings below it, never one above; ``prepare`` does no I/O; ``transports``
knows nothing of the spool. Each failure names the offending import, so a planted back-import says
exactly what to move.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "relay"
RANKS = {"commands": 7, "daemon": 6, "intake": 5, "queue": 4, "prepare": 3, "transports": 2, "config": 1}
SHARED = 0  # envelope, errors, idn, replies, logs, maildrop, memo, systemd, __init__: what every stage shares
# what ``prepare`` may not import: each of these reaches a socket, a file, a process or the clock of a loop
IO_MODULES = {
    "asyncio", "os", "pathlib", "shutil", "socket", "ssl", "subprocess", "tempfile", "aiosmtpd", "aiosmtplib",
    "httpx", "relay.config.credentials", "relay.config.secretstore", "relay.config.load", "relay.config.warnings",
    "relay.config.spoolaccess",
}  # fmt: skip


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # what it imports, dotted (a module, or a module's attribute)
    line: int
    typing_only: bool = False  # under ``if TYPE_CHECKING:``: never run

    def __str__(self) -> str:
        path = self.module.replace(".", "/")
        return f"{path}.py:{self.line}: imports {self.target}"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = PACKAGE) -> Iterator[Import]:
    """Every import in the file, at any depth (a function-level import is an arrow too)."""
    module = module_name(path, root)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing = {
        id(inner) for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for stmt in node.body for inner in ast.walk(stmt)
    }  # fmt: skip
    for node in ast.walk(tree):
        only = id(node) in typing
        if isinstance(node, ast.Import):
            yield from (Import(module, alias.name, node.lineno, only) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield Import(module, node.module, node.lineno, only)
            yield from (Import(module, f"{node.module}.{alias.name}", node.lineno, only) for alias in node.names)


def all_imports(root: Path = PACKAGE) -> list[Import]:
    return [imp for path in sorted(root.rglob("*.py")) for imp in imports_of(path, root)]


def modules(root: Path = PACKAGE) -> set[str]:
    return {module_name(path, root) for path in root.rglob("*.py")}


def resolve(target: str, known: set[str]) -> str | None:
    """The relay module an import names (``relay.config.models.Config`` -> ``relay.config.models``)."""
    while target:
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


def wing(module: str) -> str:
    if module == "relay.__main__":  # ``python -m relay`` is the ``relay`` command
        return "commands"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANKS else "shared"


def rank(module: str) -> int:
    return RANKS.get(wing(module), SHARED)


def layer_violations(root: Path = PACKAGE) -> list[str]:
    known = modules(root)
    found: list[str] = []
    for imp in all_imports(root):
        target = resolve(imp.target, known)
        if target is None or target == imp.module or wing(target) == wing(imp.module) == "shared":
            continue
        where = f"{imp.module.replace('.', '/')}.py:{imp.line}: imports {target}"
        if wing(target) != wing(imp.module) and rank(target) >= rank(imp.module):
            found.append(f"{where}: {wing(imp.module)} may not import {wing(target)} (a higher or sideways layer)")
        if wing(imp.module) == "transports" and target == "relay.queue.spool":
            found.append(f"{where}: transports know nothing of the spool")
    return sorted(set(found))


def io_violations(root: Path = PACKAGE) -> list[str]:
    found = []
    for imp in all_imports(root):
        if wing(imp.module) != "prepare" or imp.typing_only:
            continue
        hit = next((m for m in IO_MODULES if imp.target == m or imp.target.startswith(m + ".")), None)
        if hit is not None:
            found.append(f"{imp}: prepare does no I/O ({hit})")
    for path in sorted((root / "prepare").rglob("*.py")) if (root / "prepare").exists() else ():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
                found.append(f"{module_name(path, root)}:{node.lineno}: calls open(): prepare does no I/O")
    return sorted(set(found))


def cycles(root: Path = PACKAGE) -> list[list[str]]:
    """Module-level import circles (function-level imports included: they are circles deferred)."""
    known = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in known}
    for imp in all_imports(root):
        target = resolve(imp.target, known)
        if target is not None and target != imp.module and not _is_parent(target, imp.module):
            graph[imp.module].add(target)
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def _is_parent(package: str, module: str) -> bool:
    """``relay.transports`` for ``relay.transports.smtp``: importing a submodule runs its package first,
    which is not an arrow of the code's own."""
    return module.startswith(package + ".")


def test_no_import_reaches_up_a_layer() -> None:
    assert layer_violations() == []


def test_prepare_does_no_io() -> None:
    assert io_violations() == []


def test_no_circles() -> None:
    assert cycles() == []


def test_every_module_sits_in_a_wing_or_is_shared() -> None:
    shared = sorted(m for m in modules() if wing(m) == "shared" and m != "relay")
    assert shared == ["relay.envelope", "relay.errors", "relay.idn", "relay.logs", "relay.maildrop", "relay.memo",
        "relay.osuser", "relay.replies",
        "relay.systemd",
    ]


# A planted back-import, in a copy of the tree: the rule test must fail, naming it.
PLANTS = [
    ("config/types.py", "from relay.prepare.settings import resolve\n", "config may not import prepare"),
    ("transports/smtp.py", "from relay.queue.spool import Spool\n", "transports know nothing of the spool"),
    ("queue/spool.py", "from relay.commands import cli\n", "queue may not import commands"),
    ("prepare/rewrite.py", "import socket\n", "prepare does no I/O (socket)"),
]


@pytest.mark.parametrize(("where", "line", "said"), PLANTS)
def test_a_planted_back_import_is_named(tmp_path: Path, where: str, line: str, said: str) -> None:
    import shutil

    copy = tmp_path / "relay"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / where
    target.write_text(target.read_text(encoding="utf-8") + line, encoding="utf-8")
    found = layer_violations(copy) + io_violations(copy)
    assert any(said in f and f.startswith(f"relay/{where}:") for f in found), found


def test_a_planted_circle_is_found(tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "relay"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "memo.py").write_text((copy / "memo.py").read_text(encoding="utf-8") + "from relay import errors\n")
    (copy / "errors.py").write_text((copy / "errors.py").read_text(encoding="utf-8") + "from relay import memo\n")
    assert any({"relay.memo", "relay.errors"} <= set(c) for c in cycles(copy))
