"""The figures of issue 18 (architecture), read from the source with `ast`:

- top-level modules of kb/ beside its subpackages;
- import cycles between first-party modules (module-level imports only);
- first-party imports inside functions;
- the longest functions, and those over 60 lines on the search and chat paths;
- parameters without a type annotation (self and cls aside).

    .venv/bin/python .ci/architecture_report.py [--root DIR] [--top 15]
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("kb", "search", "chat")
HOT_PATHS = ("search/", "chat/")


def python_files(root: Path) -> list[Path]:
    files = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "migrations" in path.parts or "management" in path.parts:
                continue
            files.append(path)
    return files


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def first_party(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def imported_modules(node: ast.AST, known: set[str], current: str) -> list[str]:
    """First-party modules an import statement names (a `from package import module` counts)."""
    names = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = current.split(".")[: -node.level] if node.level else []
            base = ".".join([*package, base] if base else package)
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            names.append(candidate if candidate in known else base)
    return [name for name in names if first_party(name)]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


@dataclass
class Figures:
    kb_top_modules: list[str]
    cycles: list[list[str]]
    hidden_cycles: list[list[str]]
    inner_imports: list[str]
    functions: list[tuple[int, str]]  # (lines, "path:line name"), longest first
    untyped: int
    imports: dict[str, set[str]]  # module -> first-party modules it imports (anywhere)

    def over(self, lines: int, prefixes: tuple[str, ...] = ("",)) -> list[tuple[int, str]]:
        return [
            (n, where) for n, where in self.functions if n > lines and where.startswith(prefixes)
        ]


def architecture_figures(root: Path) -> Figures:
    files = python_files(root)
    modules = {module_name(root, path): path for path in files}
    known = set(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    # Imports inside functions: the cycles they hide show when they are counted too.
    hidden: dict[str, set[str]] = {name: set() for name in modules}
    inner_imports = []
    functions = []
    untyped = 0
    for name, path in modules.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source, filename=str(path))
        for node in tree.body:
            for target in imported_modules(node, known, name):
                if target != name:
                    graph[name].add(target)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            functions.append((length, f"{path.relative_to(root)}:{node.lineno} {node.name}"))
            arguments = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            untyped += sum(
                1 for a in arguments if a.annotation is None and a.arg not in {"self", "cls"}
            )
            for inner in ast.walk(node):
                if not isinstance(inner, (ast.Import, ast.ImportFrom)):
                    continue
                targets = imported_modules(inner, known, name)
                if not targets:
                    continue
                hidden[name].update(t for t in targets if t != name)
                # Allowed when a comment on the line, or in the comments and imports just
                # above it, says which cycle it breaks.
                above = inner.lineno - 1
                while above > 0 and lines[above - 1].strip().startswith(("#", "from ", "import ")):
                    above -= 1
                context = " ".join(lines[above: inner.lineno]).lower()
                if "cycle" not in context:
                    inner_imports.append(f"{path.relative_to(root)}:{inner.lineno}")
    functions.sort(reverse=True)
    return Figures(
        kb_top_modules=sorted(p.stem for p in (root / "kb").glob("*.py") if p.stem != "__init__"),
        cycles=strongly_connected(graph),
        hidden_cycles=strongly_connected({name: graph[name] | hidden[name] for name in graph}),
        inner_imports=inner_imports,
        functions=functions,
        untyped=untyped,
        imports={name: graph[name] | hidden[name] for name in graph},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    figures = architecture_figures(Path(args.root))
    print(f"kb/ top-level modules: {len(figures.kb_top_modules)}")
    print(f"first-party import cycles: {len(figures.cycles)}")
    for cycle in figures.cycles:
        print("  " + " <-> ".join(cycle))
    print(f"cycles once imports inside functions count: {len(figures.hidden_cycles)}")
    for cycle in figures.hidden_cycles:
        print("  " + " <-> ".join(cycle))
    print("first-party imports inside functions (no comment naming a cycle): "
          f"{len(figures.inner_imports)}")
    print(f"functions over 80 lines: {len(figures.over(80))}")
    hot = figures.over(60, HOT_PATHS)
    print(f"functions over 60 lines on the search and chat paths: {len(hot)}")
    for length, where in hot:
        print(f"  {length:4d} {where}")
    print(f"longest {args.top} functions:")
    for length, where in figures.functions[: args.top]:
        print(f"  {length:4d} {where}")
    print(f"untyped parameters: {figures.untyped}")


if __name__ == "__main__":
    main()
