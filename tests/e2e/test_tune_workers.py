"""How the parallel tune tasks of one pipeline run share a study."""

from __future__ import annotations

import pytest

from rima_core.config import Config
from rima_core.runs import tune_workers as tw


def test_study_name_and_worker_seeds() -> None:
    cfg = Config()
    assert tw.study_name_for_run(cfg, "abc") == f"{cfg.tune.study_name}-abc"
    with pytest.raises(ValueError, match="run id"):
        tw.study_name_for_run(cfg, "")
    seeds = {tw.worker_config(Config(), w).tune.seed for w in range(3)}
    assert len(seeds) == 3
    with pytest.raises(ValueError):
        tw.worker_config(Config(), -1)
