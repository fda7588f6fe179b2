"""Compile the pipeline to the IR YAML that Kubeflow Pipelines (and ``kfp.Client``) reads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from kfp import compiler

from pipelines.rima_pipeline import ClusterOptions, build_pipeline
from rima_core.atomic import atomic_file
from rima_core.config import Config, ConfigError, deep_merge, load_config, parse_override
from rima_core.pipeline.remote_config import CONFIG_PARAMETERS, OPTUNA_STORAGE_ENV
from rima_core.redact import find_secrets

log = logging.getLogger(__name__)


def pipeline_arguments(
    params: str | Path | None = "params.yaml",
    profile: str | Path | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """The pipeline's parameter values for params.yaml (+ profile, + overrides).

    ``params_yaml``/``profile_yaml`` carry the files' text, so the pod needs no checkout; the
    typed parameters get the resolved values, so the KFP UI shows the real defaults and a typed
    parameter left unchanged at submit time changes nothing. One value per config-setting row
    of ``RUN_PARAMETERS``; ``register_min_metric`` is the gate the config resolves to (its
    chance level when ``promote.register_min_metric`` is unset), not the raw setting. The
    pipeline's own parameters (data location, ``auto_promote``) keep their embedded defaults.
    """
    cfg: Config = load_config(params, profile, overrides)  # fail here on a typo, not in the pod
    params_data: dict[str, Any] = {}
    if params is not None and Path(params).exists():
        params_data = yaml.safe_load(Path(params).read_text()) or {}
    profile_data: dict[str, Any] = {}
    if profile is not None:
        profile_data = yaml.safe_load(Path(profile).read_text()) or {}
    for text in overrides or []:  # --set rides on the profile so the pod resolves the same config
        profile_data = deep_merge(profile_data, parse_override(text))
    carried = {
        "params_yaml": one_line_yaml(params_data),
        "profile_yaml": one_line_yaml(profile_data) if profile_data else "",
    }
    derived = {"register_min_metric": _register_min_metric(cfg)}
    values = {p.name: p.config_value(cfg) for p in CONFIG_PARAMETERS}
    return {**carried, **values, **derived}


# Where a pod gets the credential a setting would otherwise carry (keys of the Kubernetes secret,
# all listed in rima_pipeline.SECRET_ENV_KEYS; tests check that).
CREDENTIAL_ENV: dict[str, tuple[str, ...]] = {
    "tune.storage": (OPTUNA_STORAGE_ENV,),
    "mlflow.tracking_uri": (
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
    ),
}
S3_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Prefix of the cluster options (--image, --gpu-node-selector) in check_no_credentials' names:
# they are written into the package as they are, so they are checked like the config.
CLUSTER_OPTIONS = "--"


def check_no_credentials(values: dict[str, Any], secret_name: str) -> None:
    """Refuse to compile a credential into the package.

    A compiled package is a plain file that is uploaded to the KFP server, shown in its UI and
    often committed; a password in a parameter default (a PostgreSQL ``tune.storage``, a
    ``https://user:pw@`` tracking URI, a presigned URL) would leak there. ``values`` is the
    resolved config (``Config.to_dict()``) or the pipeline arguments; the error names each
    offending key and the secret key the pod reads instead.
    """
    found = find_secrets(values)
    if not found:
        return
    hints = []
    for key in found:
        if key.startswith(CLUSTER_OPTIONS):
            hints.append(f"{key} (a cluster option: name the image or node without credentials)")
            continue
        env = CREDENTIAL_ENV.get(key.split("[", 1)[0], S3_CREDENTIAL_ENV)
        hints.append(f"{key} (put it in secret {secret_name!r} as {' / '.join(env)})")
    raise ConfigError(
        "refusing to compile a credential into the pipeline package: "
        + "; ".join(hints)
        + ". Remove it from params/profile/--set: pods read credentials from the Kubernetes "
        "secret as environment variables (python -m pipelines compile --secret NAME)"
    )


def _cluster_values(opts: ClusterOptions) -> dict[str, Any]:
    """The cluster options that are written into the package verbatim, by their CLI names."""
    from components.image import rima_image

    return {
        f"{CLUSTER_OPTIONS}image": rima_image(opts.image),
        **{f"{CLUSTER_OPTIONS}gpu-node-selector {k}": v for k, v in opts.gpu_node_selector.items()},
        **{f"{CLUSTER_OPTIONS}gpu-node-selector key {k}": k for k in opts.gpu_node_selector},
    }


def _register_min_metric(cfg: Config) -> float:
    """The registration threshold as the pipeline's (numeric) parameter default."""
    from rima_core.ops.registry import register_threshold

    threshold = register_threshold(cfg)
    if threshold is None:
        raise ConfigError(
            f"promote.metric {cfg.promote.metric!r} has no known chance level: set "
            "promote.register_min_metric for the pipeline's registration gate"
        )
    return threshold


def pod_local_tracking_uri(uri: str) -> bool:
    """True for a tracking URI that means a file inside each pod (``sqlite:``, ``file:``, a
    path): every task would log to its own throwaway store and ``register`` would not find the
    model ``train`` logged. A cluster needs an MLflow server (``http(s)://``) or a database."""
    from urllib.parse import urlparse

    if uri == "databricks" or uri.startswith("databricks://"):  # MLflow's hosted store
        return False
    return urlparse(uri).scheme in ("", "file", "sqlite")


def check_cluster_tracking(uri: str, allow_local: bool = False) -> None:
    """Refuse (or, with ``allow_local``, warn about) a pod-local MLflow tracking URI."""
    if not pod_local_tracking_uri(uri):
        return
    message = (
        f"mlflow.tracking_uri is {uri!r}, a file private to each pod: runs, the logged model and "
        "the registry would vanish with the pods. Compile with the cluster's server, e.g. "
        "--set mlflow.tracking_uri=http://mlflow.mlflow.svc:5000"
    )
    if not allow_local:
        raise ConfigError(message + " (or --allow-local-mlflow for a shared volume)")
    log.warning("%s; compiling anyway (--allow-local-mlflow)", message)


def one_line_yaml(data: dict[str, Any]) -> str:
    """``data`` as single-line flow YAML.

    kfp 2.17 copies string defaults into the package's header comment without escaping line
    breaks, so a multi-line default (a params file verbatim) makes the package invalid YAML.
    """
    text = yaml.safe_dump(data, default_flow_style=True, sort_keys=False, width=float("inf"))
    text = text.strip()
    if "\n" in text:
        raise ValueError("a parameter value contains a line break; it cannot be a KFP default")
    return text


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``dotted.key -> value`` (lists are values, compared whole)."""
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(_flat(value, dotted))
        else:
            out[dotted] = value
    return out


def uncommitted_params(params: str | Path) -> list[str] | None:
    """The dotted keys whose values in ``params`` differ from the file committed at ``HEAD``.

    ``None`` when there is nothing to compare with: the file is not in a git work tree, git is
    missing, or ``HEAD`` does not hold it (a new repository, a file never committed). A key set
    on one side only counts as differing; formatting and comments do not.
    """
    import subprocess

    path = Path(params).resolve()
    try:
        committed = subprocess.run(
            ["git", "show", f"HEAD:./{path.name}"],
            cwd=path.parent,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("params check skipped: git unavailable (%s)", exc)
        return None
    if committed.returncode != 0:  # not a repository, no commit yet, or not in HEAD
        log.debug("params check skipped: %s", committed.stderr.strip())
        return None
    try:
        before = _flat(yaml.safe_load(committed.stdout) or {})
        now = _flat(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        log.debug("params check skipped: %s", exc)
        return None
    return sorted(k for k in before.keys() | now.keys() if before.get(k, ...) != now.get(k, ...))


def warn_uncommitted_params(params: str | Path | None) -> list[str]:
    """Log a WARNING naming the keys of ``params`` that differ from the committed file.

    The compiled package's parameter defaults (and the params.yaml it carries) come from the
    file as it is on disk, so a cluster run would use values that are in no commit: nothing in
    git would say how that model was trained. Outside a git repository this says nothing.
    Returns the differing keys.
    """
    if params is None or not Path(params).is_file():
        return []
    keys = uncommitted_params(params)
    if keys:
        log.warning(
            "%s differs from the committed HEAD:%s in %s; the compiled pipeline's defaults use "
            "the uncommitted values (commit them so a cluster run can be traced to a commit)",
            params,
            Path(params).name,
            ", ".join(keys),
        )
    return keys or []


def compile_pipeline(
    out: str | Path,
    params: str | Path | None = "params.yaml",
    profile: str | Path | None = None,
    overrides: list[str] | None = None,
    options: ClusterOptions | None = None,
    allow_local_mlflow: bool = False,
) -> Path:
    """Write the pipeline package (IR YAML) to ``out`` atomically and return its path.

    A package is for a cluster, so a pod-local MLflow store is refused unless
    ``allow_local_mlflow`` (:func:`check_cluster_tracking`); ``run-local`` does not compile.
    A ``params`` file that differs from its committed version is compiled, with a WARNING
    naming the keys (:func:`warn_uncommitted_params`).
    """
    out = Path(out)
    arguments = pipeline_arguments(params, profile, overrides)
    warn_uncommitted_params(params)
    check_cluster_tracking(arguments["mlflow_tracking_uri"], allow_local_mlflow)
    opts = options or ClusterOptions()
    cfg = load_config(params, profile, overrides)
    check_no_credentials(cfg.to_dict(), opts.secret_name)  # names the config key
    check_no_credentials({"pipeline": arguments}, opts.secret_name)  # and any other way in
    check_no_credentials(_cluster_values(opts), opts.secret_name)  # image, node selector
    pipeline = build_pipeline(options)
    if out.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"{out}: the pipeline package must end in .yaml (or .json)")
    with atomic_file(out) as tmp:
        # kfp picks the format from the suffix, so compile to a same-suffixed file inside tmp's
        # directory and move it onto the temporary path
        staged = tmp.with_name(tmp.name + out.suffix)
        try:
            compiler.Compiler().compile(
                pipeline_func=pipeline, package_path=str(staged), pipeline_parameters=arguments
            )
            staged.replace(tmp)
        finally:
            staged.unlink(missing_ok=True)
    log.info("compiled the pipeline to %s", out)
    return out


def parameter_types(options: ClusterOptions | None = None) -> dict[str, str]:
    """The pipeline's parameter names and KFP types, read from a compiled package (the same
    source of truth ``submit`` checks run arguments against)."""
    import tempfile

    from pipelines.submit import package_parameters

    with tempfile.TemporaryDirectory(prefix="rima-kfp-") as tmp:
        package = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(
            pipeline_func=build_pipeline(options), package_path=str(package)
        )
        return package_parameters(package)
