"""``rima check-repro``: workspace numbers against a commit's, in a throwaway git + DVC repo
(real ``git``): equal, inside the committed bootstrap interval, outside it, a missing file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from rima_core.pipeline.cli import main
from tests.git_helpers import git

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

DVC_YAML = """\
stages:
  train:
    cmd: "true"
    outs:
      - models/rima/model.pt
      - models/rima/history.csv:
          cache: false
    metrics:
      - models/rima/headline.json:
          cache: false
  evaluate:
    cmd: "true"
    deps:
      - models/rima/model.pt
    outs:
      - reports/eval/scores.csv
    metrics:
      - reports/eval/headline.json:
          cache: false
"""

TRAIN = {"best_epoch": 12, "epochs_run": 15, "val": {"qwk": 0.835, "ece": 0.0946}}
EVAL = {
    "complete": {"qwk": 0.8874, "auc": 0.9579},
    "mixed": {"qwk": 0.8456, "es_auc/race": 0.8736},
}
# the real columns; test-split intervals for the scenarios / metrics above
SCORES = """\
split,scenario,metric,value,ci_low,ci_high,n_boot,n
val,complete,qwk,0.86,0.79,0.91,1000,120
test,complete,qwk,0.8874,0.83,0.93,1000,120
test,complete,auc,0.9579,0.93,0.98,1000,120
test,mixed,qwk,0.8456,0.78,0.90,1000,120
"""


def _write(root: Path, path: str, text: str | bytes) -> None:
    file = root / path
    file.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        file.write_bytes(text)
    else:
        file.write_text(text)


def _md5(root: Path, path: str) -> str:
    return hashlib.md5((root / path).read_bytes()).hexdigest()


def _lock(root: Path) -> str:
    model, scores = _md5(root, "models/rima/model.pt"), _md5(root, "reports/eval/scores.csv")
    return f"""\
schema: '2.0'
stages:
  train:
    cmd: 'true'
    outs:
    - path: models/rima/model.pt
      hash: md5
      md5: {model}
  evaluate:
    cmd: 'true'
    deps:
    - path: models/rima/model.pt
      hash: md5
      md5: {model}
    outs:
    - path: reports/eval/scores.csv
      hash: md5
      md5: {scores}
"""


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A committed pipeline result: metrics files, scores.csv, a model, dvc.yaml/dvc.lock."""
    from dvc.repo import Repo

    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q")
    Repo.init(str(root)).close()
    _write(root, "dvc.yaml", DVC_YAML)
    _write(root, "models/rima/headline.json", json.dumps(TRAIN, indent=2))
    _write(root, "reports/eval/headline.json", json.dumps(EVAL, indent=2))
    _write(root, "reports/eval/scores.csv", SCORES)
    _write(root, "models/rima/model.pt", b"model bytes")
    _write(root, "models/rima/history.csv", "epoch,val/mean/qwk\n1,0.5\n")
    _write(root, "dvc.lock", _lock(root))
    # as in the project: cached outputs are not in git (dvc.lock has their md5)
    _write(root, ".gitignore", "/models/rima/model.pt\n/reports/eval/scores.csv\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "results")
    monkeypatch.chdir(root)
    return root


def _rerun(root: Path, eval_changes: dict, train_changes: dict | None = None) -> None:
    """A rerun on "another processor": another model and some numbers moved."""
    data = json.loads(json.dumps(EVAL))
    for key, value in eval_changes.items():
        scenario, metric = key.split(".", 1)
        data[scenario][metric] = value
    _write(root, "reports/eval/headline.json", json.dumps(data, indent=2))
    train = {**TRAIN, **(train_changes or {})}
    _write(root, "models/rima/headline.json", json.dumps(train, indent=2))
    _write(root, "models/rima/model.pt", b"other model bytes")
    _write(root, "models/rima/history.csv", "epoch,val/mean/qwk\n1,0.51\n")


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Exit status and what it printed; no params.yaml here: the embedded defaults."""
    code = main(["check-repro", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_byte_equal_results_are_reproduced_exactly(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _check(capsys)
    assert code == 0
    assert "reproduced exactly" in out
    assert "->" not in out  # no number listed: none differs


def test_numbers_inside_the_committed_intervals_are_within_tolerance(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # test QWK moves by 0.02 (inside [0.83, 0.93]); ES-AUC has no interval: abs tolerance;
    # the selected epoch moves by one: listed, not judged
    _rerun(repo, {"complete.qwk": 0.8674, "mixed.es_auc/race": 0.86}, {"best_epoch": 11})
    code, out = _check(capsys)
    assert code == 0, out
    assert "reproduced within tolerance on another processor" in out
    assert "reports/eval/headline.json:complete.qwk: 0.8874 -> 0.8674  within tolerance" in out
    assert "inside the committed 95 % interval [0.83, 0.93]" in out
    assert "reports/eval/headline.json:mixed.es_auc/race" in out and "repro.abs_tolerance" in out
    assert "models/rima/headline.json:best_epoch: 12 -> 11  informational" in out
    # why: same inputs, another model, and this processor's facts
    assert "models/rima/model.pt: md5" in out and _md5(repo, "models/rima/model.pt") in out
    assert "torch_cpu_capability=" in out
    assert "other committed outputs that differ (not judged): models/rima/history.csv" in out


def test_a_number_outside_its_interval_is_not_reproduced(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _rerun(repo, {"mixed.qwk": 0.70})  # below the committed [0.78, 0.90]
    code, out = _check(capsys)
    assert code == 1, out
    assert "NOT reproduced: 1 outside tolerance (reports/eval/headline.json:mixed.qwk)" in out
    assert "outside the committed 95 % interval [0.78, 0.9]" in out


def test_json_output_and_exit_status(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _rerun(repo, {"mixed.qwk": 0.70})
    code = main(["--json", "check-repro"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1
    assert summary["reproduced"] is False
    assert [n["name"] for n in summary["numbers"]] == ["reports/eval/headline.json:mixed.qwk"]


def test_the_abs_tolerance_comes_from_params(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _rerun(repo, {}, {"val": {"qwk": 0.80, "ece": 0.0946}})  # no interval: |0.035| vs 0.05
    assert _check(capsys)[0] == 0
    code, out = _check(capsys, "--set", "repro.abs_tolerance=0.01")
    assert code == 1
    assert "models/rima/headline.json:val.qwk" in out and "beyond repro.abs_tolerance" in out


def test_committed_intervals_come_from_the_dvc_cache(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The rerun's scores.csv has other intervals; the committed run's are in the DVC cache."""
    from dvc.repo import Repo

    committed = _md5(repo, "reports/eval/scores.csv")
    with Repo(str(repo)) as dvc_repo:
        cached = Path(dvc_repo.cache.local.oid_to_path(committed))
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(SCORES)
    _write(repo, "reports/eval/scores.csv", SCORES.replace("0.83,0.93", "0.87,0.90"))
    _rerun(repo, {"complete.qwk": 0.8674})  # inside the committed interval, not the new one
    code, out = _check(capsys)
    assert code == 0, out
    assert "DVC cache" in out
    # without the cache (a fresh clone, no remote) the workspace's intervals stand in, said so
    cached.unlink()
    code, out = _check(capsys)
    assert code == 1, out
    assert "this run's intervals stand in" in out
    assert "outside this run's 95 % interval [0.87, 0.9]" in out


def test_a_missing_file_is_named(
    repo: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    (repo / "reports/eval/headline.json").unlink()
    code, _ = _check(capsys)
    assert code == 2
    assert "reports/eval/headline.json: not in the workspace" in caplog.text
    # a metrics file the workspace's dvc.yaml lists but the commit lacks
    _write(repo, "reports/eval/headline.json", json.dumps(EVAL))
    _write(repo, "dvc.yaml", DVC_YAML.replace("reports/eval/headline.json", "reports/eval/h2.json"))
    _write(repo, "reports/eval/h2.json", json.dumps(EVAL))
    caplog.clear()
    code, _ = _check(capsys)
    assert code == 2
    assert "reports/eval/h2.json: not in HEAD" in caplog.text


def test_changed_inputs_are_named(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _rerun(repo, {"complete.qwk": 0.8674})
    lock = (repo / "dvc.lock").read_text()
    model = _md5(repo, "models/rima/model.pt")
    # the workspace's lock records the evaluate stage run on the new model
    head = lock.split("  evaluate:")[0]
    tail = lock.split("  evaluate:")[1]
    first = tail.split("md5: ", 1)
    tail = first[0] + "md5: " + model + "\n" + first[1].split("\n", 1)[1]
    (repo / "dvc.lock").write_text(head + "  evaluate:" + tail)
    code, out = _check(capsys)
    assert code == 0, out
    assert "inputs that differ from HEAD's dvc.lock: evaluate: models/rima/model.pt" in out
    assert "within tolerance with changed inputs" in out


def test_flat_metric_names_find_their_intervals(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Headline files keyed ``<split>/<scenario>/<metric>`` (``@`` spelt ``_at_``)."""
    flat = {"test/complete/qwk": 0.8874, "test/fundus_missing_at_0.5/qwk": 0.80}
    scores = SCORES + "test,fundus_missing@0.5,qwk,0.80,0.74,0.86,1000,120\n"
    _write(repo, "reports/eval/headline.json", json.dumps(flat))
    _write(repo, "reports/eval/scores.csv", scores)
    _write(repo, "dvc.lock", _lock(repo))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "flat names")
    _write(
        repo,
        "reports/eval/headline.json",
        json.dumps({**flat, "test/fundus_missing_at_0.5/qwk": 0.75}),
    )
    code, out = _check(capsys)
    assert code == 0, out
    assert "test/fundus_missing_at_0.5/qwk: 0.8 -> 0.75  within tolerance" in out
    assert "[0.74, 0.86]" in out


def test_renamed_keys_are_one_line_per_file(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    renamed = {**EVAL, "complete": {"test/complete/qwk": 0.8874, "auc": 0.9579}}
    _write(repo, "reports/eval/headline.json", json.dumps(renamed))
    code, out = _check(capsys)
    assert code == 1, out
    assert "reports/eval/headline.json (keys): 1 keys not here -> 1 new keys  DIFFERENT" in out
    assert "renamed metrics?" in out
    assert "complete.auc" not in out  # the keys both have are compared as usual: equal
