"""kb/settings.py is the only module that reads the environment, and README's configuration
table lists every variable it reads."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ROOT / "kb" / "settings.py"
PACKAGES = ("kb", "search", "chat")
ENV_HELPERS = {"env_str", "env_bool", "env_int", "env_float", "env_list"}
# Reads that configure nothing, with the reason. Keyed by variable, not by module, so that
# moving the code that reads one keeps it allowed. Writes (os.environ.setdefault, pop,
# assignment) and whole copies for a child's environment ({**os.environ}) are not reads.
NOT_CONFIGURATION = {
    "PYTHONPATH": "kb.ingestion extends it in the environment of the PDF reader's child process",
}
# os.environ methods that read it; the others (setdefault, pop, update, copy) write it or
# hand a copy to a child process.
READING_METHODS = {"get", "items", "keys", "values"}


def expand(cell: str) -> set[str]:
    """`KB_BUDGET_{GLOBAL,USER}_DAILY_TOKENS` names each variable the braces stand for."""
    match = re.search(r"\{([^}]*)\}", cell)
    if not match:
        return {cell}
    return {name for option in match.group(1).split(",")
            for name in expand(cell[:match.start()] + option + cell[match.end():])}


def _is_environ(node: ast.AST) -> bool:
    """`os.environ`, or `environ` imported from os."""
    if isinstance(node, ast.Attribute):
        return node.attr == "environ" and isinstance(node.value, ast.Name) and node.value.id == "os"
    return isinstance(node, ast.Name) and node.id == "environ"


def _literal(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def environment_reads(tree: ast.AST) -> list[tuple[int, str | None]]:
    """(line, variable) of each read of the environment; the variable is None when the code
    does not name it with a literal (a loop over os.environ, a computed name)."""
    reads: list[tuple[int, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            getenv = (isinstance(func, ast.Attribute) and func.attr == "getenv"
                      and isinstance(func.value, ast.Name) and func.value.id == "os") or (
                isinstance(func, ast.Name) and func.id == "getenv")
            method = (isinstance(func, ast.Attribute) and _is_environ(func.value)
                      and func.attr in READING_METHODS)
            if getenv or method:
                reads.append((node.lineno, _literal(node.args[0]) if node.args else None))
        elif (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load)
              and _is_environ(node.value)):
            reads.append((node.lineno, _literal(node.slice)))
        elif isinstance(node, ast.Compare) and any(
            isinstance(op, (ast.In, ast.NotIn)) and _is_environ(right)
            for op, right in zip(node.ops, node.comparators, strict=True)
        ):
            reads.append((node.lineno, _literal(node.left)))
    return reads


def settings_variables() -> set[str]:
    """Every variable kb/settings.py reads by name, through its env_* helpers or directly."""
    tree = ast.parse(SETTINGS.read_text())
    names = {name for _, name in environment_reads(tree) if name}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ENV_HELPERS):
            name = _literal(node.args[0]) if node.args else None
            if name:
                names.add(name)
    return names


def test_no_module_but_settings_reads_the_environment():
    """Configuration is read in kb/settings.py alone (README: "read in one place")."""
    outside = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == SETTINGS:
                continue
            for line, name in environment_reads(ast.parse(path.read_text(), str(path))):
                if name not in NOT_CONFIGURATION:
                    outside.append(
                        f"{path.relative_to(ROOT)}:{line} reads {name or 'the environment'}")
    assert outside == [], "read these in kb/settings.py and use the setting instead"


def test_the_check_sees_each_way_of_reading_the_environment():
    """Reads are found however they are written; writes and a child's copy are not reads."""
    code = """
import os
from os import environ, getenv
a = os.environ.get("A")
b = os.environ["B"]
c = "C" in os.environ
d = getenv("D")
e = environ.get("E", "")
f = os.getenv("F")
os.environ.setdefault("W1", "1")
os.environ["W2"] = "2"
child = {**os.environ, "W3": "3"}
"""
    assert sorted(name for _, name in environment_reads(ast.parse(code))) == [
        "A", "B", "C", "D", "E", "F"]


def test_every_setting_is_in_the_readme_table():
    read = settings_variables()
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("## How a request flows")]
    listed: set[str] = set()
    for cell in re.findall(r"`([A-Z][A-Z0-9_{},]+(?:\.\.\.[A-Z_]+)?)`", table):
        listed |= expand(cell)
    # "`KB_BUDGET_{...}_DAILY_TOKENS` / `..._DAILY_COST_USD`": the second shares the prefix.
    for row in re.findall(r"`([A-Z_]+)\{([^}]*)\}_[A-Z_]+` / `\.\.\.(_[A-Z_]+)`", table):
        listed |= {f"{row[0]}{option}{row[2]}" for option in row[1].split(",")}
    assert read, "no environment reads found in kb/settings.py"
    assert sorted(read - listed) == []
