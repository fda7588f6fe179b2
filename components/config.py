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

    Returns the tuning fan-out: one worker index per parallel tune task (``tune.workers``).
    """
    from rima_core.kfp_support import resolve_config as resolve
    from rima_core.kfp_support import write_config

    cfg = resolve(
        params_yaml,
        profile_yaml,
        {
            "data.source": data_source,
            "data.disease": disease,
            "missing.rate": missing_rate,
            "missing.mixed": missing_mixed,
            "missing.sweep": missing_sweep,
            "tune.n_trials": tune_trials,
            "tune.workers": tune_workers,
            "promote.metric": promote_metric,
            "promote.scenario": promote_scenario,
            "promote.margin": promote_margin,
            "promote.tolerance": promote_tolerance,
            "promote.register_min_metric": register_min_metric,
            "mlflow.tracking_uri": mlflow_tracking_uri,
            "mlflow.experiment": mlflow_experiment,
            "mlflow.model_name": model_name,
        },
    )
    write_config(cfg, config.path)
    config.metadata.update({"experiment": cfg.mlflow.experiment, "model": cfg.model.name})
    if cfg.tune.workers < 1:
        raise ValueError(f"tune.workers must be >= 1, got {cfg.tune.workers}")
    return list(range(cfg.tune.workers))
