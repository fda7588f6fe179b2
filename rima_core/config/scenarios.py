"""Scenario names: the main scenarios every split has and the missing-rate sweep's
``<family>@<rate>``, parsed in one place (:class:`Scenario`).

Defined beside the config because the names derive from the ``missing:`` section and every
scenario key (``train.selection_scenario``, ``tune.scenario``, ``promote.scenario``) is checked
against them when a config loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rima_core.config.checks import ConfigError

if TYPE_CHECKING:
    from rima_core.config.schema import MissingConfig

MAIN_SCENARIOS = ("complete", "fundus_missing", "oct_missing", "mixed")
# model selection and tuning may average a metric over the main scenarios
MEAN_SCENARIO = "mean"
# the families the missing-rate sweep runs (``fundus_missing@0.25``, ...)
SWEPT_FAMILIES = ("fundus_missing", "oct_missing")


@dataclass(frozen=True)
class Scenario:
    """A scenario name taken apart: ``fundus_missing@0.25`` is family ``fundus_missing`` at rate
    0.25; a main scenario has no rate."""

    family: str
    rate: float | None = None

    @classmethod
    def parse(cls, name: str) -> Scenario:
        """The scenario ``name`` stands for; :class:`ConfigError` naming it when it is neither a
        main scenario nor ``<swept family>@<rate in [0, 1]>``."""
        family, at, rate_text = str(name).partition("@")
        if not at:
            return cls(family)
        if family not in SWEPT_FAMILIES:
            raise ConfigError(f"scenario {name!r}: only {list(SWEPT_FAMILIES)} have a sweep")
        try:
            rate = float(rate_text)
        except ValueError:
            raise ConfigError(f"scenario {name!r}: {rate_text!r} is not a rate") from None
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"scenario {name!r}: the rate must be in [0, 1]")
        return cls(family, rate)

    @property
    def name(self) -> str:
        return self.family if self.rate is None else f"{self.family}@{self.rate:g}"

    @property
    def is_sweep(self) -> bool:
        return self.rate is not None


def is_sweep(name: str) -> bool:
    """Whether ``name`` is a sweep point (``<family>@<rate>``), not a main scenario; never raises
    (it sorts names read from files, which :meth:`Scenario.parse` checks where it matters)."""
    return "@" in str(name)


def scenario_names(cfg: MissingConfig) -> list[str]:
    """All scenarios in evaluation order (sweep duplicates dropped)."""
    names = list(MAIN_SCENARIOS)
    for family in SWEPT_FAMILIES:
        for rate in cfg.sweep:
            name = Scenario(family, float(rate)).name
            if name not in names:
                names.append(name)
    return names
