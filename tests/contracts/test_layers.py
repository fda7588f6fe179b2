"""The library's folders are layers: a module imports only from its own layer or lower ones,
so each folder can be read knowing only what is below it (rima_core/core/__init__.py lists the
order). Imports inside functions count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.import_graph import ROOT, imports, module_name

# lowest first; the shared utilities sit below everything
LAYERS = {
    "rima_core.config": 0,
    "rima_core.atomic": 0,
    "rima_core.progress": 0,
    "rima_core.redact": 0,
    "rima_core.core": 1,
    "rima_core.tracking": 2,
    "rima_core.runs": 3,
    "rima_core.ops": 4,
    "rima_core.pipeline": 5,
}


# The one upward import, and why it stays: model.name is checked when a config loads (before any
# data step runs) against the model registry's own names, never a copy of them; lazily, since the
# registry needs torch.
ALLOWED = {"rima_core.config.schema -> rima_core.core.models.spec"}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "rima_core").rglob("*.py"))}


def test_every_module_belongs_to_a_layer() -> None:
    strays = [m for m in _modules() if m != "rima_core" and _layer(m) is None]
    assert not strays, f"put these in a layer folder (or add the folder to LAYERS): {strays}"


def test_no_module_imports_from_a_higher_layer() -> None:
    upward = []
    for module, path in _modules().items():
        own = _layer(module)
        if own is None:
            continue
        for dep in imports(ast.parse(path.read_text()), module):
            layer = _layer(dep)
            if layer is not None and layer > own and f"{module} -> {dep}" not in ALLOWED:
                upward.append(f"{module} -> {dep}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))
