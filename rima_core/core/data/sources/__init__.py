"""Source formats -> :class:`~rima_core.core.data.types.RawCase` (contract: docs/interfaces.md).

Each source module exposes ``scan(root, disease="auto") -> ScanResult`` (cheap listing, raises
``SourceError`` for a tree of another format) and ``load(ref, disease) -> RawCase`` (decodes one
eye, picklable for worker processes, raises ``CaseError``). Modules are imported lazily so
``detect_source`` on one format never pays for another format's imports.

Plug-in formats (modules outside this package) must be registered before anything imports
them: as a ``rima.sources`` entry point of an installed package, or listed in ``data.plugins``.
A name that is neither is refused without being imported (importing is running: a module such
as ``venv.__main__`` acts on import), and a registered module without callable ``scan`` and
``load`` is refused before any file is read.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection
from pathlib import Path
from types import ModuleType

from rima_core.config import registered_plugins, source_refusal
from rima_core.core.data.sources._common import ScanResult
from rima_core.core.data.types import SourceError

__all__ = [
    "ALIASES",
    "SOURCES",
    "ScanResult",
    "detect_source",
    "get_source",
    "load_plugin",
    "registered_plugins",
]

# name -> (module, layout test). Checked in this order by detect_source: the RIMA and GAMMA
# layouts are recognised by their label sheets, FairVision by npz files in split folders.
SOURCES: dict[str, tuple[str, str]] = {
    "rima": ("rima_core.core.data.sources.rima_folders", "is_rima"),
    "gamma": ("rima_core.core.data.sources.gamma", "is_gamma"),
    "fairvision": ("rima_core.core.data.sources.fairvision", "is_fairvision"),
}
# Other names a source is known by (accepted wherever a source name is).
ALIASES = {"rima_folders": "rima", "harvard": "fairvision", "synthetic": "fairvision"}


def get_source(name: str) -> ModuleType:
    """The loader module for ``name`` (fairvision | gamma | rima); it has ``scan`` and ``load``."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SOURCES:
        raise SourceError(f"unknown source {name!r}; expected one of {sorted(SOURCES)} or auto")
    return importlib.import_module(SOURCES[key][0])


def load_plugin(name: str, plugins: Collection[str] | None = None) -> ModuleType:
    """The plug-in source module ``name``: an entry-point name or a dotted module path.

    ``plugins`` is the allow-list (``data.plugins``); with it, a module path that is neither
    listed nor a ``rima.sources`` entry point is refused without being imported. ``None`` means
    the caller's own code chose the module (a Python call such as ``prepare_store(module_path,
    ...)``), which registers it. After the import, ``scan`` and ``load`` must be callables.
    """
    reason = source_refusal(name, plugins)
    if reason:
        raise SourceError(f"source {name!r}: {reason}")
    module_path = registered_plugins().get(name, name)
    try:
        module = importlib.import_module(module_path)
    except ImportError as exc:
        raise SourceError(f"source module {module_path!r} cannot be imported: {exc}") from exc
    if not all(callable(getattr(module, f, None)) for f in ("scan", "load")):
        raise SourceError(f"source module {module_path!r} must define scan() and load()")
    return module


def detect_source(root: str | Path) -> str:
    """Which format ``root`` holds; ``SourceError`` listing the layouts looked for if none fits."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: no such directory")
    for name, (module, test) in SOURCES.items():
        if getattr(importlib.import_module(module), test)(root):
            return name
    raise SourceError(
        f"{root}: no known source layout. Expected one of: "
        "FairVision (<root>/<Disease>/<Training|Validation|Test>/data_XXXXX.npz), "
        "GAMMA (<root>/training/multi-modality_images/<id>/ + glaucoma_grading_training_GT.xlsx), "
        "RIMA folders (<root>/train.xlsx + <root>/Image/<id>/)"
    )
