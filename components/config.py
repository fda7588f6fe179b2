"""Component that turns the pipeline's parameters into the run's one config file.

Every later task reads this file, so the whole run uses one resolved config, the first task
fails on a typo, and the KFP UI shows exactly which hyperparameters the run used.
"""

from kfp.dsl import Artifact, Output


def resolve_config(
    params_yaml: str,
    profile_yaml: str,
    data_source: str,
    disease: str,
    missing_rate: float,
    missing_mixed: list,
    missing_sweep: list,
    tune_trials: int,
    tune_workers: int,
    promote_metric: str,
    promote_scenario: str,
    promote_margin: float,
    promote_tolerance: float,
    register_min_metric: float,
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
    model_name: str,
    config: Output[Artifact],
) -> list:
    """params.yaml text <- profile text <- the typed pipeline parameters, validated.

    The signature is the config-setting rows of ``rima_core.pipeline.remote_config.RUN_PARAMETERS``
    (KFP reads a literal signature; tests/contracts/test_kfp_parameters.py checks the two agree).
    Returns the tuning fan-out: one worker index per parallel tune task (``tune.workers``).
    """
    arguments = dict(locals())  # first statement: exactly this task's parameters
    from rima_core.pipeline.remote_config import overrides_from_parameters, write_config
    from rima_core.pipeline.remote_config import resolve_config as resolve

    cfg = resolve(params_yaml, profile_yaml, overrides_from_parameters(arguments))
    write_config(cfg, config.path)
    config.metadata.update({"experiment": cfg.mlflow.experiment, "model": cfg.model.name})
    if cfg.tune.workers < 1:
        raise ValueError(f"tune.workers must be >= 1, got {cfg.tune.workers}")
    return list(range(cfg.tune.workers))
