"""Glue between :mod:`rima_core.steps` and Kubeflow Pipelines artifacts.

A lightweight KFP component ships only its own function's source to the pod; anything it calls
must already be installed in the image. So the few things the components share — turning
pipeline parameters into a :class:`~rima_core.config.Config`, taking secrets from the pod's
environment, rendering step summaries as the Markdown/HTML the KFP UI displays — live here, in
the package, where they are unit-tested. Step logic does not: the components call
:mod:`rima_core.steps` for that. This module imports neither kfp nor mlflow.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from rima_core.atomic import write_text
from rima_core.config import Config, ConfigError, load_config

log = logging.getLogger(__name__)

# Environment variable (filled from the Kubernetes secret) holding the shared Optuna storage URL.
# A PostgreSQL URL carries a password, so it never travels as a pipeline parameter or artifact.
OPTUNA_STORAGE_ENV = "RIMA_OPTUNA_STORAGE"


def resolve_config(
    params_yaml: str,
    profile_yaml: str = "",
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the run's config exactly as the CLI would: params <- profile <- overrides.

    The pipeline carries params.yaml and the profile as text (the pod has no checkout), and its
    typed parameters as ``section.key -> value`` overrides; all three go through
    :func:`~rima_core.config.load_config` so a typo fails here, in the first task, with the
    schema's message.
    """
    override_texts = []
    for key, value in (overrides or {}).items():
        if key.count(".") != 1:
            raise ConfigError(f"pipeline override {key!r}: the key must be section.key")
        # JSON is a subset of YAML flow syntax, so parse_override reads the value back unchanged.
        override_texts.append(f"{key}={json.dumps(value)}")
    with tempfile.TemporaryDirectory(prefix="rima-config-") as tmp:
        params = Path(tmp) / "params_yaml.yaml"
        params.write_text(params_yaml if params_yaml.strip() else "{}\n")
        profile = None
        if profile_yaml.strip():
            profile = Path(tmp) / "profile_yaml.yaml"
            profile.write_text(profile_yaml)
        return load_config(params, profile, override_texts)


def config_yaml(cfg: Config) -> str:
    """The resolved config as params.yaml-shaped YAML (re-loadable with ``load_config``)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def write_config(cfg: Config, path: str | Path) -> None:
    write_text(path, config_yaml(cfg))


def load_task_config(path: str | Path) -> Config:
    """A task's config: the resolved file, plus what only the pod's environment may hold.

    The Optuna storage URL of a cluster run (PostgreSQL with a password) comes from the secret
    as ``RIMA_OPTUNA_STORAGE``; MLflow reads ``MLFLOW_TRACKING_*``/AWS variables itself.
    """
    cfg = load_config(path)
    storage = os.environ.get(OPTUNA_STORAGE_ENV)
    if storage:
        cfg.tune.storage = storage
    return cfg


def progress_callback(what: str, every_s: float = 10.0) -> Any:
    """An fsspec callback that logs a download's progress (files done of total) at most every
    ``every_s`` seconds and at the end: a few lines per step in a pod's log, not one per file
    (fsspec is imported lazily, hence the class inside)."""
    import time

    from fsspec.callbacks import Callback

    class Progress(Callback):
        def __init__(self) -> None:
            super().__init__()
            self._last = time.monotonic()

        def call(self, *args: Any, **kwargs: Any) -> None:
            now = time.monotonic()
            done = self.size is not None and self.value >= self.size
            if done or now - self._last >= every_s:
                self._last = now
                log.info("%s: %s of %s files", what, self.value, self.size or "?")

    return Progress()


def _tree_summary(uri: str, out: Path) -> dict[str, Any]:
    files = [p for p in out.rglob("*") if p.is_file()]
    return {"uri": uri, "files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def fetch_tree(uri: str, out: str | Path) -> dict[str, Any]:
    """Copy the raw data a cluster run names (``s3://bucket/prefix`` or a mounted path) to ``out``.

    S3 goes through s3fs (concurrent transfers, progress in the log). Credentials come from the
    pod's environment (the Kubernetes secret), never from parameters; the endpoint from
    ``AWS_ENDPOINT_URL[_S3]`` (read by botocore itself) or, for a MinIO/S3-compatible store
    already configured for MLflow, ``MLFLOW_S3_ENDPOINT_URL``. For the DVC-versioned data that
    ``dvc repro`` reads, use :func:`fetch_dvc`. The copy is atomic: a failed download leaves no
    half tree that ``prepare`` would read.
    """
    import shutil
    from urllib.parse import urlparse

    from rima_core.atomic import atomic_dir

    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"data source {uri!r}: no bucket")
        import s3fs

        endpoint = None
        if not (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")):
            endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        root = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
        keys = [k for k in fs.find(root) if not k.endswith("/")]
        if not keys:
            raise FileNotFoundError(f"data source {uri!r}: no objects under this prefix")
        with atomic_dir(out) as tmp:
            targets = [str(tmp / k[len(root) + 1 :]) for k in keys]
            for target in targets:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            fs.get(keys, targets, callback=progress_callback(f"fetching {uri}"))
        summary = _tree_summary(uri, Path(out))
        log.info("fetched %d files (%d bytes) from %s", summary["files"], summary["bytes"], uri)
        return summary
    if parsed.scheme in ("", "file"):
        src = Path(parsed.path if parsed.scheme == "file" else uri)
        if not src.is_dir():
            raise FileNotFoundError(f"data source {uri!r}: not a directory (in this pod)")
        with atomic_dir(out) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        return _tree_summary(uri, Path(out))
    raise ConfigError(
        f"data source {uri!r}: unsupported scheme {parsed.scheme!r} "
        "(use s3://bucket/prefix or a path mounted into the pod)"
    )


def fetch_dvc(repo: str, path: str, out: str | Path, rev: str = "") -> dict[str, Any]:
    """Download ``path`` of the DVC project ``repo`` (a Git URL or a local clone) at ``rev``
    from its DVC remote: the same versioned data ``dvc repro`` reads at that commit.

    Goes through :class:`dvc.api.DVCFileSystem`, so the remote, its endpoint and the file hashes
    come from the repository's own ``.dvc/config`` and ``.dvc`` files at ``rev``; only
    credentials come from the pod's environment (``AWS_*`` from the secret). A path that DVC
    does not track, or a remote that lacks the data, is an error, and nothing is written.
    """
    from dvc.api import DVCFileSystem

    from rima_core.atomic import atomic_dir

    where = f"{repo}@{rev or 'HEAD'}:{path}"
    fs = DVCFileSystem(repo, rev=rev or None)
    try:
        if not fs.isdir(path):
            raise FileNotFoundError(f"DVC data {where}: not a directory in that revision")
        with atomic_dir(out) as tmp:
            fs.get(
                path.rstrip("/") + "/", str(tmp), recursive=True, callback=progress_callback(where)
            )
            if not any(p.is_file() for p in Path(tmp).rglob("*")):
                raise FileNotFoundError(f"DVC data {where}: no files")
    finally:
        fs.close()
    summary = {**_tree_summary(where, Path(out)), "rev": rev or "HEAD"}
    log.info("fetched %d files (%d bytes) from %s", summary["files"], summary["bytes"], where)
    return summary


def study_name_for_run(cfg: Config, run_id: str) -> str:
    """The Optuna study a pipeline run's tune tasks share: ``<tune.study_name>-<run id>``.

    Each run tunes afresh in a long-lived shared storage, while a retried worker (same run id)
    resumes the same study instead of starting another.
    """
    if not run_id:
        raise ValueError("a pipeline run id is needed to name the shared study")
    return f"{cfg.tune.study_name}-{run_id}"


def worker_config(cfg: Config, worker: int) -> Config:
    """The config of parallel tune worker ``worker`` (one pod each, one process per pod).

    Each pod runs the tuner with one process, which seeds its sampler as if it were worker 0;
    pods starting together would then propose the same points. Offsetting the seed by
    ``1000 * worker`` gives them the streams the tuner's own multi-process mode gives its
    processes.
    """
    if worker < 0:
        raise ValueError(f"tune worker index must be >= 0, got {worker}")
    cfg.tune.seed = cfg.tune.seed + 1000 * worker
    return cfg


def artifact_metadata(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A step's summary as artifact metadata: JSON values (lists and mappings stay structured in
    the KFP UI); anything else (paths) as its string."""
    return json.loads(json.dumps(dict(summary), default=str))


def flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{scenario: {metric: v}}`` -> ``{"scenario/metric": v}``, numeric finite values only.

    KFP's Metrics artifact is a flat name -> number map; a NaN (e.g. AUC of a one-class split)
    would make the UI drop the whole artifact, so it is left out (and logged).
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, name))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, int | float):
            if math.isfinite(float(value)):
                out[name] = float(value)
            else:
                log.info("metric %s=%r is not finite; left out of the KFP metrics", name, value)
    return out


def primary_metric(metrics: Mapping[str, Mapping[str, Any]], scenario: str, metric: str) -> float:
    """The promotion policy's metric from ``metrics.json`` — the pipeline's registration gate."""
    if scenario not in metrics:
        raise KeyError(f"metrics.json has no scenario {scenario!r}; it has {sorted(metrics)}")
    row = metrics[scenario]
    if metric not in row:
        raise KeyError(f"metrics.json[{scenario!r}] has no metric {metric!r}; it has {sorted(row)}")
    value = row[metric]
    if value is None or not math.isfinite(float(value)):
        raise ValueError(f"metrics.json[{scenario!r}][{metric!r}] is {value}: cannot gate on it")
    return float(value)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


def summary_markdown(title: str, summary: Mapping[str, Any]) -> str:
    """A step's JSON summary as Markdown: a status line, list-valued keys as bullet lists,
    everything else as a key/value table. Shown by the KFP UI's Markdown visualisation."""
    lines = [f"# {title}", ""]
    if "success" in summary:
        lines += [f"**{'PASSED' if summary['success'] else 'FAILED'}**", ""]
    scalars = {k: v for k, v in summary.items() if k != "success" and not isinstance(v, list)}
    if scalars:
        lines += ["| key | value |", "| --- | --- |"]
        pipe = "\\|"  # a literal | would end the Markdown cell
        lines += [f"| {k} | {_cell(v).replace('|', pipe)} |" for k, v in scalars.items()]
        lines.append("")
    for key, value in summary.items():
        if isinstance(value, list):
            lines += [f"## {key} ({len(value)})", ""]
            lines += [f"- {_cell(v)}" for v in value] or ["- (none)"]
            lines.append("")
    return "\n".join(lines)


def _md_cell(value: Any) -> str:
    return "-" if value is None else _cell(value).replace("|", "\\|")


def promotion_markdown(result: Mapping[str, Any]) -> str:
    """The promote step's result (:func:`rima_core.registry.promote`) for the KFP UI: the
    decision and its reason, then challenger vs champion per scenario as a Markdown table (the
    primary scenario in bold), then the policy — never raw JSON lines."""
    decision = "PROMOTED" if result.get("promoted") else "KEPT the champion"
    if result.get("dry_run"):
        decision = f"dry run: would {result.get('decision')}"
    before = result.get("champion_before")
    lines = [
        f"# Promotion of {result.get('model_name')} version {result.get('challenger')}",
        "",
        f"**{decision}** — {result.get('reason', '')}",
        "",
        f"Champion before: {('v' + str(before)) if before else '(none)'}; "
        f"after: v{result.get('champion_after') or '-'}",
        "",
    ]
    rows = result.get("table") or []
    if rows:
        lines += [
            f"| scenario | champion | challenger | change ({result.get('metric')}) | status |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for row in rows:
            name = _md_cell(row.get("scenario"))
            if row.get("primary"):
                name = f"**{name}** (primary)"
            change = row.get("improvement")
            lines.append(
                f"| {name} | {_md_cell(row.get('champion'))} | {_md_cell(row.get('challenger'))} "
                f"| {'-' if change is None else f'{change:+.4f}'} | {_md_cell(row.get('status'))} |"
            )
        lines.append("")
    shown = {"model_name", "challenger", "champion_before", "champion_after", "table", "reason"}
    policy = {k: v for k, v in result.items() if k not in shown and not isinstance(v, list | dict)}
    lines += ["| policy | value |", "| --- | --- |"]
    lines += [f"| {k} | {_md_cell(v)} |" for k, v in policy.items()]
    return "\n".join(lines) + "\n"


def _html_table(data: Mapping[str, Any], corner: str) -> str:
    """A mapping of mappings as a row x column table; a flat mapping as key/value rows."""
    if data and all(isinstance(v, Mapping) for v in data.values()):
        names: list[str] = []
        for row in data.values():
            names += [n for n in row if n not in names]
        head = "".join(f"<th>{html.escape(str(n))}</th>" for n in names)
        rows = [
            f"<tr><th>{html.escape(str(key))}</th>"
            + "".join(f"<td>{html.escape(_cell(row.get(n, '')))}</td>" for n in names)
            + "</tr>"
            for key, row in data.items()
        ]
        return f"<table><tr><th>{html.escape(corner)}</th>{head}</tr>{''.join(rows)}</table>"
    rows = [
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_cell(v))}</td></tr>"
        for k, v in data.items()
    ]
    return f"<table>{''.join(rows)}</table>"


def html_report(
    title: str, tables: Mapping[str, Mapping[str, Any]], images: Iterable[str | Path] = ()
) -> str:
    """A report for the KFP UI's HTML viewer: titled tables, then the plots inline.

    The UI renders an HTML artifact in a sandboxed iframe without access to sibling files, so
    the PNGs are embedded as data URIs.
    """
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for name, data in tables.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(_html_table(data, corner=name))
    for image in images:
        path = Path(image)
        data_uri = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<h2>{html.escape(path.stem)}</h2>")
        parts.append(f"<img alt='{html.escape(path.name)}' src='data:image/png;base64,{data_uri}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def confusion_matrix(path: str | Path, class_names: list[str]) -> list[list[int]]:
    """Counts of (actual, predicted) from the evaluation's ``confusion.csv`` (one row per eye,
    class names as values), as the matrix ``ClassificationMetrics.log_confusion_matrix`` takes:
    row = actual class, column = predicted class, in ``class_names`` order."""
    path = Path(path)
    index = {name: i for i, name in enumerate(class_names)}
    matrix = [[0] * len(class_names) for _ in class_names]
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"actual", "predicted"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns actual,predicted; got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                matrix[index[row["actual"]]][index[row["predicted"]]] += 1
            except KeyError as exc:
                raise ValueError(
                    f"{path}:{line}: class {exc.args[0]!r} is not one of {class_names}"
                ) from exc
    return matrix
