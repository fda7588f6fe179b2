"""The project's own import graph, read from source (``ast``): which ``rima_core`` modules a
module imports, at module level or inside functions, and everything reachable from a start set.

Shared by the tests that check a hash or a dependency list covers the code a step runs
(``test_dvc_pipeline``: DVC stage deps; ``test_benchmark_code``: the benchmark's protocol id).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_path(module: str) -> Path | None:
    """The file of ``module`` (its ``__init__.py`` for a package), or None."""
    base = ROOT / Path(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def module_name(path: Path) -> str:
    """The dotted name of the module in ``path`` (a package's ``__init__.py`` is the package)."""
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def statement_names(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """Absolute names one import statement in ``module`` loads: ``import a.b`` -> ``a.b``;
    ``from .x import y`` -> the package ``x`` resolves to, and ``x.y`` when that is a module."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".")
        path = module_path(module)
        if path is None or path.name != "__init__.py":
            package = package[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names if module_path(f"{base}.{a.name}")]


def imports(tree: ast.AST, module: str) -> set[str]:
    """``rima_core`` modules imported anywhere in ``tree`` (module or function level)."""
    return {
        n
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for n in statement_names(node, module)
        if n.startswith("rima_core") and module_path(n)
    }


def closure(start: set[str]) -> set[str]:
    """Every module reachable from ``start`` that has a file here, parent packages included
    (importing a module runs its packages' ``__init__`` too)."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        module = todo.pop()
        path = module_path(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += imports(ast.parse(path.read_text()), module)
    return seen
