"""The missing-modality benchmark's incomplete training regime (benchmarks/missing_modality.py):
its rates decide how many training eyes stay paired, and they are part of the protocol, so runs
of another pairing share never mix into a results file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmarks.missing_modality import (
    incomplete_train_rows,
    parse_args,
    protocol_dir,
)
from rima_core.config import MissingConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def _manifest(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "case_id": [f"eye{i:03d}" for i in range(n)],
            "split": ["train"] * n,
            "has_fundus": [True] * n,
            "has_oct": [True] * n,
        }
    )


@pytest.mark.parametrize(("rates", "paired"), [((0.25, 0.25), 50), ((0.45, 0.45), 10)])
def test_rates_set_how_many_training_eyes_stay_paired(
    rates: tuple[float, float], paired: int
) -> None:
    rows = incomplete_train_rows(_manifest(100), MissingConfig(seed=0), rates)
    f, o = rows["has_fundus"].to_numpy(), rows["has_oct"].to_numpy()
    assert (f & o).sum() == paired
    assert ((~f).sum(), (~o).sum()) == (round(100 * rates[0]), round(100 * rates[1]))
    assert not (~f & ~o).any()  # an eye never loses both


def test_rates_are_part_of_the_protocol(tmp_path: Path) -> None:
    base = load_config(str(ROOT / "params.yaml"))
    default = protocol_dir(parse_args(["--work", str(tmp_path)]), base)
    explicit = parse_args(["--work", str(tmp_path), "--incomplete-rates", "0.25", "0.25"])
    unpaired = parse_args(["--work", str(tmp_path), "--incomplete-rates", "0.45", "0.45"])
    assert protocol_dir(explicit, base) == default  # the default keeps earlier results valid
    assert protocol_dir(unpaired, base) != default
    with pytest.raises(SystemExit):
        parse_args(["--incomplete-rates", "0.6", "0.6"])  # an eye would lose both
