"""Data-side components: fetch the raw data, prepare, validate, simulate-missing.

Thin wrappers: each reads the run's resolved config and calls the matching
:mod:`rima_core.pipeline.steps` function with its artifacts' paths. All four are deterministic in
their inputs, so the pipeline caches them (the fetch keyed on the URI: point runs at immutable,
versioned prefixes, or submit with caching off).
"""

from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Output


def fetch_raw(
    config: Input[Artifact],
    data_source_uri: str,
    data_dvc_repo: str,
    data_dvc_rev: str,
    raw: Output[Dataset],
):
    """The run's raw data, from the first of:

    - ``data_dvc_repo`` (a Git URL of this project, ``data_dvc_rev`` a commit/tag/branch, empty =
      its default branch): ``data.raw_dir`` at that revision from the project's DVC remote, the
      same versioned data ``dvc repro`` reads there;
    - ``data_source_uri`` (``s3://bucket/prefix`` or a path mounted into the pod);
    - neither: the embedded synthetic phantom (FairVision layout) generated from the config.

    One task rather than ``dsl.If`` + ``dsl.OneOf`` over producers: kfp.local cannot resolve an
    artifact ``OneOf``, and the pipeline must run locally unchanged.
    """
    from rima_core.core.data.fetch import fetch_dvc, fetch_tree
    from rima_core.pipeline import steps
    from rima_core.pipeline.remote_config import load_task_config
    from rima_core.pipeline.reports import artifact_metadata

    cfg = load_task_config(config.path)
    if data_dvc_repo:
        summary = fetch_dvc(data_dvc_repo, cfg.data.raw_dir, raw.path, rev=data_dvc_rev)
    elif data_source_uri:
        summary = fetch_tree(data_source_uri, raw.path)
    else:
        summary = {"uri": "synthetic", **steps.synth(raw.path, cfg)}
    raw.metadata.update(artifact_metadata(summary))


def prepare(config: Input[Artifact], raw: Input[Dataset], store: Output[Dataset]):
    """Raw source tree -> Arrow store + Parquet manifest."""
    from rima_core.pipeline import steps
    from rima_core.pipeline.remote_config import load_task_config
    from rima_core.pipeline.reports import artifact_metadata

    summary = steps.prepare(raw.path, store.path, load_task_config(config.path))
    store.metadata.update(artifact_metadata(summary))


def validate(
    config: Input[Artifact],
    store: Input[Dataset],
    report: Output[Artifact],
    summary: Output[Markdown],
):
    """Great Expectations over the store; a violation fails the task and so the run."""
    from rima_core.pipeline import steps
    from rima_core.pipeline.remote_config import load_task_config
    from rima_core.pipeline.reports import summary_markdown

    result = steps.validate(store.path, report.path, load_task_config(config.path))
    with open(summary.path, "w") as fh:
        fh.write(summary_markdown("Data validation", result))
    if not result["success"]:
        failures = "\n".join(f"  - {f}" for f in result["failures"])
        raise RuntimeError(f"validation failed ({len(result['failures'])}):\n{failures}")


def simulate_missing(
    config: Input[Artifact],
    store: Input[Dataset],
    masks: Output[Dataset],
    stats: Output[Metrics],
):
    """Seeded availability masks for every split and missing-modality scenario."""
    from rima_core.pipeline import steps
    from rima_core.pipeline.remote_config import load_task_config
    from rima_core.pipeline.reports import mask_metrics

    summary = steps.simulate_missing(store.path, masks.path, load_task_config(config.path))
    for name, value in mask_metrics(summary).items():
        stats.log_metric(name, value)
