"""Imports sit at the top of a module, unless importing there would cost start-up time a caller
does not need, pull in an optional dependency, or close an import cycle.

A function-level import is allowed only for one of those reasons, each decided here from the
code: the package is :data:`HEAVY` (benchmarks/startup.py measures each one; `rima --help` must
not pay for torch or MLflow) or :data:`OPTIONAL`; or the imported ``rima_core`` module would, at
module level, bring in a heavy package this module does not already bring in; or it imports this
module back. Anything else is written at the top, where a reader looks for a module's
dependencies.
"""

from __future__ import annotations

import ast
import functools

from tests.import_graph import ROOT, module_name, module_path, statement_names

# Top-level packages whose import costs a noticeable fraction of a second or more on their own
# (benchmarks/results/startup.md); a command that does not use them must not import them.
HEAVY = frozenset(
    {
        "boto3",
        "dvc",
        "great_expectations",
        "kfp",
        "matplotlib",
        "mlflow",
        "nibabel",
        "optuna",
        "pandas",
        "pyarrow",
        "s3fs",
        "scipy",
        "sklearn",
        "sqlalchemy",
        "torch",
    }
)
# Installed only by some extras or by the user (pretrained backbones, PostgreSQL, readers).
OPTIONAL = frozenset({"monai", "res2net", "psycopg2", "PIL", "fsspec", "pydicom"})


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(module: str) -> list[str]:
    path = module_path(module)
    if path is None:
        return []
    out: list[str] = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            out += statement_names(node, module)
        elif isinstance(node, ast.Try) or (
            isinstance(node, ast.If) and not _is_type_checking(node)
        ):
            out += [n for s in node.body if isinstance(s, ast.Import | ast.ImportFrom)
                    for n in statement_names(s, module)]  # fmt: skip
    return out


@functools.cache
def _loads(module: str) -> frozenset[str]:
    """Everything importing ``module`` loads at module level: our modules (with their parent
    packages) and the top-level names of the others."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        if parts[0] == "rima_core":
            todo += [".".join(parts[:i]) for i in range(1, len(parts))]
            todo += _top_level_imports(m)
    ours = {m for m in seen if m.startswith("rima_core")}
    return frozenset(ours | {m.split(".")[0] for m in seen if not m.startswith("rima_core")})


def _why_lazy(importer: str, imported: str) -> str | None:
    top = imported.split(".")[0]
    if top in HEAVY:
        return "heavy"
    if top in OPTIONAL:
        return "optional"
    if top != "rima_core":
        return None
    if importer in _loads(imported):
        return "cycle"
    if (_loads(imported) & HEAVY) - _loads(importer):
        return "brings in " + ", ".join(sorted((_loads(imported) & HEAVY) - _loads(importer)))
    return None


@functools.cache
def _bound_eagerly(module: str) -> frozenset[str] | None:
    """The names ``module`` binds at module level, if it also has a module-level ``__getattr__``
    (PEP 562) that resolves other names only when asked; None without one."""
    path = module_path(module)
    if path is None:
        return None
    tree = ast.parse(path.read_text())
    if not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body):
        return None
    bound = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
             if isinstance(t, ast.Name)}  # fmt: skip
    bound |= {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    for n in tree.body:
        if isinstance(n, ast.Import | ast.ImportFrom):
            bound |= {(a.asname or a.name).split(".")[0] for a in n.names}
    return frozenset(bound)


def _why_lazy_node(importer: str, node: ast.Import | ast.ImportFrom) -> str | None:
    if isinstance(node, ast.ImportFrom) and not node.level and node.module:
        eager = _bound_eagerly(node.module)
        if eager is not None and any(
            a.name not in eager and module_path(f"{node.module}.{a.name}") is None
            for a in node.names
        ):
            return "a name its package imports only when asked (module __getattr__)"
    return next((r for n in statement_names(node, importer) if (r := _why_lazy(importer, n))), None)


def lazy_imports_without_reason() -> list[str]:
    found = []
    for path in sorted((ROOT / "rima_core").rglob("*.py")):
        module = module_name(path)
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                if _why_lazy_node(module, node) is None:
                    rel = path.relative_to(ROOT)
                    names = ", ".join(statement_names(node, module))
                    found.append(f"{rel}:{node.lineno} ({fn.name}): {names}")
    return found


def test_function_level_imports_have_a_reason() -> None:
    found = lazy_imports_without_reason()
    assert not found, "move these imports to the top of their module:\n" + "\n".join(found)


def test_the_reasons_are_computed_not_assumed() -> None:
    """The rule tells a heavy import, a cycle and a light import apart."""
    assert _why_lazy("rima_core.pipeline.cli", "torch") == "heavy"
    assert _why_lazy("rima_core.pipeline.cli", "json") is None
    assert _why_lazy("rima_core.pipeline.cli", "rima_core.runs.train") is not None  # torch
    assert _why_lazy("rima_core.runs.train", "rima_core.config") is None
