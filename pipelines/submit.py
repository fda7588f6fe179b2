"""Submit a compiled pipeline package to a Kubeflow Pipelines endpoint with ``kfp.Client``.

Authentication, in kfp's own order: a bearer token from ``KF_PIPELINES_TOKEN`` (e.g. a
Dex/OIDC or service-account token of a multi-user Kubeflow), else whatever ``kfp.Client``
finds itself (in-cluster service account, the current kube config context). The host defaults
to ``KF_PIPELINES_ENDPOINT``. Tokens are never accepted on the command line (shell history,
``ps``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

TOKEN_ENV = "KF_PIPELINES_TOKEN"
ENDPOINT_ENV = "KF_PIPELINES_ENDPOINT"


@dataclass
class Submission:
    """Everything a submit needs, validated before any network call."""

    package: Path
    experiment: str
    host: str | None = None
    namespace: str | None = None
    run_name: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    enable_caching: bool | None = None
    service_account: str | None = None
    wait_s: int = 0  # > 0: block until the run ends (or this many seconds pass)
    token: str | None = field(default=None, repr=False)


def package_parameters(package: str | Path) -> dict[str, str]:
    """Name -> KFP type (``STRING``, ``NUMBER_INTEGER``, ...) of a compiled package's inputs."""
    path = Path(package)
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{path}: no pipeline package (run `python -m pipelines compile`)"
        ) from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not a pipeline package: {exc}") from exc
    spec = docs[0] if docs and isinstance(docs[0], dict) else {}
    try:
        params = spec["root"]["inputDefinitions"]["parameters"]
    except KeyError as exc:
        raise ValueError(f"{path}: not a compiled KFP pipeline (no root input parameters)") from exc
    return {name: p["parameterType"] for name, p in params.items()}


_CASTS = {
    "STRING": lambda v: v if isinstance(v, str) else str(v),
    "NUMBER_INTEGER": int,
    "NUMBER_DOUBLE": float,
    "BOOLEAN": bool,
    "LIST": list,
    "STRUCT": dict,
}


def parse_arguments(pairs: list[str], types: dict[str, str]) -> dict[str, Any]:
    """``name=value`` strings -> typed run arguments, checked against the package's inputs.

    Values are parsed as YAML (``tune_workers=4``, ``missing_sweep=[0, 0.5, 1]``,
    ``auto_promote=false``); a STRING parameter keeps the text verbatim, so an S3 URI or a
    number-looking experiment name is never mangled.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        name, eq, raw = pair.partition("=")
        if not eq or not name:
            raise ValueError(f"run argument {pair!r} is not of the form name=value")
        if name not in types:
            raise ValueError(
                f"run argument {name!r}: the pipeline has no such parameter; it has {sorted(types)}"
            )
        kind = types[name]
        if kind == "STRING":
            out[name] = raw
            continue
        value = yaml.safe_load(raw)
        if kind == "BOOLEAN" and not isinstance(value, bool):
            raise ValueError(f"run argument {name!r}: expected true/false, got {raw!r}")
        if kind == "NUMBER_INTEGER" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"run argument {name!r}: expected an integer, got {raw!r}")
        if kind == "NUMBER_DOUBLE" and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            raise ValueError(f"run argument {name!r}: expected a number, got {raw!r}")
        if kind == "LIST" and not isinstance(value, list):
            raise ValueError(f"run argument {name!r}: expected a list like [a, b], got {raw!r}")
        if kind == "STRUCT" and not isinstance(value, dict):
            raise ValueError(f"run argument {name!r}: expected a mapping, got {raw!r}")
        out[name] = _CASTS.get(kind, lambda v: v)(value)
    return out


def build_submission(
    package: str | Path,
    experiment: str,
    host: str | None = None,
    namespace: str | None = None,
    run_name: str | None = None,
    argument_pairs: list[str] | None = None,
    enable_caching: bool | None = None,
    service_account: str | None = None,
    wait_s: int = 0,
    env: dict[str, str] | None = None,
) -> Submission:
    """Validate the request (package, typed arguments, experiment) and pick up the token/host."""
    env = dict(os.environ if env is None else env)
    if not experiment:
        raise ValueError("an experiment name is required (--experiment)")
    if wait_s < 0:
        raise ValueError(f"--wait must be >= 0 seconds, got {wait_s}")
    types = package_parameters(package)
    return Submission(
        package=Path(package),
        experiment=experiment,
        host=host or env.get(ENDPOINT_ENV) or None,
        namespace=namespace,
        run_name=run_name,
        arguments=parse_arguments(argument_pairs or [], types),
        enable_caching=enable_caching,
        service_account=service_account,
        wait_s=wait_s,
        token=env.get(TOKEN_ENV) or None,
    )


def submit(sub: Submission) -> dict[str, Any]:
    """Create the run; returns its id, the UI link (when the host is known) and, with
    ``wait_s``, its final state (a run that does not succeed raises)."""
    import kfp

    client = kfp.Client(
        host=sub.host, namespace=sub.namespace or "kubeflow", existing_token=sub.token
    )
    result = client.create_run_from_pipeline_package(
        str(sub.package),
        arguments=sub.arguments,
        run_name=sub.run_name,
        experiment_name=sub.experiment,
        namespace=sub.namespace,
        enable_caching=sub.enable_caching,
        service_account=sub.service_account,
    )
    run_id = result.run_id
    log.info("submitted run %s to experiment %s", run_id, sub.experiment)
    out: dict[str, Any] = {"run_id": run_id, "experiment": sub.experiment}
    if sub.host:
        out["url"] = f"{sub.host.rstrip('/')}/#/runs/details/{run_id}"
    if sub.wait_s:
        log.info("waiting up to %d s for run %s", sub.wait_s, run_id)
        run = client.wait_for_run_completion(run_id, timeout=sub.wait_s)
        out["state"] = str(run.state)
        if out["state"] != "SUCCEEDED":
            raise RuntimeError(f"run {run_id} ended {out['state']}: {out.get('url', '')}")
    return out
