"""Data layer: source loaders, the Arrow store, validation, missing-modality masks, torch data.

``open_store`` and ``Store`` are resolved lazily: the CLI imports ``rima_core.core.data.types`` on
every invocation and should not pay for pyarrow and pandas just to print ``--help``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rima_core.core.data.store import Store, open_store

__all__ = ["Store", "open_store"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rima_core.core.data import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
