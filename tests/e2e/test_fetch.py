"""Fetching a run's raw data into a pod: a mounted path or an S3 prefix (moto on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rima_core.config import ConfigError
from rima_core.core.data import fetch
from tests.servers import S3_ENV, moto_server


def test_fetch_tree_copies_a_local_directory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.npz").write_bytes(b"123")
    out = tmp_path / "raw"
    summary = fetch.fetch_tree(str(src), out)
    assert summary["files"] == 1 and (out / "a" / "x.npz").read_bytes() == b"123"
    assert fetch.fetch_tree(src.as_uri(), tmp_path / "raw2")["bytes"] == 3
    with pytest.raises(FileNotFoundError, match="not a directory"):
        fetch.fetch_tree(str(tmp_path / "nope"), tmp_path / "raw3")
    with pytest.raises(ConfigError, match="unsupported scheme 'gs'"):
        fetch.fetch_tree("gs://bucket/x", tmp_path / "raw4")
    assert not (tmp_path / "raw3").exists()


def test_fetch_tree_downloads_an_s3_prefix_over_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    with moto_server(tmp_path / "moto") as server:
        for key, value in S3_ENV.items():
            monkeypatch.setenv(key, value)
        for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(key, raising=False)
        # the endpoint as a cluster secret gives it to MLflow: MLFLOW_S3_ENDPOINT_URL
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", server.url)
        client = boto3.client("s3", endpoint_url=server.url)
        client.create_bucket(Bucket="data")
        client.put_object(Bucket="data", Key="fv/v1/Synthetic/a.npz", Body=b"abc")
        client.put_object(Bucket="data", Key="fv/v1/ReadMe/info.json", Body=json.dumps({}))
        client.put_object(Bucket="data", Key="fv/v10/other.npz", Body=b"not this one")
        out = tmp_path / "raw"
        summary = fetch.fetch_tree("s3://data/fv/v1", out)
        assert summary["files"] == 2
        assert (out / "Synthetic" / "a.npz").read_bytes() == b"abc"
        assert not (out / "other.npz").exists()  # prefix v1 does not match v10
        with pytest.raises(FileNotFoundError, match="no objects"):
            fetch.fetch_tree("s3://data/missing", tmp_path / "none")
        assert not (tmp_path / "none").exists()
