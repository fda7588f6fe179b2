"""Fetch a pipeline run's raw data into a pod: an S3 prefix, a mounted path, or the project's
DVC-versioned data at a revision.

Credentials and endpoints come from the pod's environment (the Kubernetes secret), never from
pipeline parameters; every copy is atomic, so a failed download leaves no half tree that
``prepare`` would read.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rima_core.atomic import atomic_dir
from rima_core.config import ConfigError

log = logging.getLogger(__name__)


def progress_callback(what: str, every_s: float = 10.0) -> Any:
    """An fsspec callback that logs a download's progress (files done of total) at most every
    ``every_s`` seconds and at the end: a few lines per step in a pod's log, not one per file
    (fsspec is imported lazily, hence the class inside)."""

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
