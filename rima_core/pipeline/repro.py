"""``rima check-repro``: do the workspace's pipeline results reproduce the committed ones?

On the processor that recorded a commit, a rerun is byte-identical. On another processor
torch's CPU kernels round differently (another ISA, another thread count), the model's bytes
change and the test QWK moves by a few hundredths; byte identity across processors cannot be
promised. This check tells such rounding from a real change:

- the numbers compared are those of the DVC metrics files (the ``metrics:`` outputs of
  ``dvc.yaml``, resolved by DVC), workspace against ``git show <rev>:<file>``;
- a number is *reproduced* when equal to the committed one, *within tolerance* when it lies
  inside the committed run's bootstrap interval for the same split / scenario / metric (the
  ``value, ci_low, ci_high`` rows of the evaluation's ``scores.csv``), or, for a float without
  such an interval, within ``repro.abs_tolerance`` of the committed value; *different*
  otherwise;
- integers (selected epoch, epochs run, trial counts) and keys matching
  ``repro.informational`` (the tuned values: search choices, judged through the metrics they
  lead to) are listed but not judged: rounding may move the selected epoch by one and the
  metrics say whether that mattered.

The committed ``scores.csv`` is a DVC-cached output (its md5 is in the committed ``dvc.lock``);
it is read from the local DVC cache, else the DVC remote. Where neither has it (a fresh clone
without a remote), the workspace run's intervals stand in: same eyes, same bootstrap seed, so the
widths match and "the committed value lies inside the new interval" is the same test.

Exit status (``rima check-repro``): 0 reproduced (exactly or within tolerance), 1 not
reproduced, 2 a file to compare is missing (named).
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import math
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rima_core.config import Config
from rima_core.tracking.metric_names import scored

EXACT, WITHIN, DIFFERENT, INFO = "reproduced", "within tolerance", "DIFFERENT", "informational"


@dataclass
class Comparison:
    """One number of a metrics file: committed vs workspace, and the verdict."""

    name: str  # <file>:<key.path>
    committed: Any
    now: Any
    verdict: str
    why: str = ""


@dataclass
class Report:
    rev: str
    comparisons: list[Comparison] = field(default_factory=list)
    other_files: list[tuple[str, bool]] = field(default_factory=list)  # (path, identical)
    model: tuple[str, str | None, str | None] | None = None  # path, committed md5, workspace md5
    changed_inputs: list[str] = field(default_factory=list)  # "stage: dep/param, ..."
    interval_source: str = ""
    ci_label: str = "the committed 95 %"  # whose intervals: the committed run's, or this run's
    abs_tolerance: float = 0.0

    @property
    def exact(self) -> bool:
        files_equal = all(same for _, same in self.other_files)
        return files_equal and all(c.verdict == EXACT for c in self.comparisons)

    @property
    def reproduced(self) -> bool:
        return not any(c.verdict == DIFFERENT for c in self.comparisons)


class ReproError(FileNotFoundError):
    """A file to compare is missing in the workspace or in the committed revision."""


# --- reading the committed and the workspace versions -----------------------------------------


def git_show(rev: str, path: str, root: Path) -> bytes:
    """``git show <rev>:<path>`` (path relative to ``root``), or :class:`ReproError`."""
    git = shutil.which("git")
    if git is None:
        raise ReproError("check-repro needs git on PATH")
    proc = subprocess.run(
        [git, "show", f"{rev}:./{path}"], cwd=root, capture_output=True, check=False
    )
    if proc.returncode != 0:
        reason = proc.stderr.decode(errors="replace").strip().splitlines()
        raise ReproError(
            f"{path}: not in {rev} ({reason[-1] if reason else 'git show failed'}); "
            "check-repro compares the workspace with committed results"
        )
    return proc.stdout


def read_workspace(path: str, root: Path) -> bytes:
    file = root / path
    if not file.is_file():
        raise ReproError(
            f"{path}: not in the workspace (run the pipeline first: bash scripts/run_pipeline.sh)"
        )
    return file.read_bytes()


def dvc_outputs(root: Path) -> list[dict[str, Any]]:
    """Every output of the workspace's ``dvc.yaml`` (templating resolved by DVC): path, stage,
    whether it is a metrics file, whether it is cached."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return [
            {
                "path": str(out.def_path),
                "stage": stage.addressing,
                "metric": bool(out.metric),
                "cached": bool(out.use_cache),
            }
            for stage in repo.index.stages
            for out in stage.outs
        ]


def _cache_path(root: Path, md5: str) -> Path | None:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        path = Path(repo.cache.local.oid_to_path(md5))
    return path if path.is_file() else None


def _lock_stages(text: bytes | str) -> dict[str, Any]:
    data = yaml.safe_load(text) or {}
    return data.get("stages", {}) if isinstance(data, dict) else {}


def _lock_md5(stages: dict[str, Any], path: str) -> str | None:
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") == path:
                return out.get("md5")
    return None


def committed_scores(
    rev: str, path: str, root: Path, committed_lock: dict[str, Any]
) -> tuple[bytes, str, bool]:
    """The committed evaluation's ``scores.csv``, where it came from, and whether it is the
    committed one: the DVC cache by the md5 in ``<rev>:dvc.lock`` (``committed_lock``), the DVC
    remote, else the workspace's (see the module doc)."""
    md5 = _lock_md5(committed_lock, path)
    if md5 is None:
        raise ReproError(f"{path}: not an output in {rev}:dvc.lock")
    workspace = root / path
    if workspace.is_file():
        data = workspace.read_bytes()
        if hashlib.md5(data).hexdigest() == md5:
            return data, f"{path} of {rev} (the workspace's is identical)", True
    cached = _cache_path(root, md5)
    if cached is not None:
        return cached.read_bytes(), f"{path} of {rev} (md5 {md5[:8]}…, DVC cache)", True
    try:  # the DVC remote (the md5 check: only the committed version counts)
        import dvc.api

        data = dvc.api.read(path, repo=str(root), rev=rev, mode="rb")
        if hashlib.md5(data).hexdigest() == md5:
            return data, f"{path} of {rev} (md5 {md5[:8]}…, via dvc.api: DVC remote)", True
    except Exception:  # no remote, or the remote lacks it: the workspace's intervals stand in
        pass
    return (
        read_workspace(path, root),
        f"{path} of the workspace: {rev}'s (md5 {md5[:8]}…) is neither in the DVC cache nor on "
        "a DVC remote; this run's intervals stand in (same eyes, same bootstrap seed)",
        False,
    )


def intervals(text: bytes) -> dict[tuple[str, str, str], tuple[float, float]]:
    """``(split, scenario, metric) -> (ci_low, ci_high)`` from a ``scores.csv``."""
    rows = csv.DictReader(io.StringIO(text.decode()))
    wanted = {"split", "scenario", "metric", "ci_low", "ci_high"}
    if not wanted <= set(rows.fieldnames or []):
        raise ReproError(f"scores.csv: expected columns {sorted(wanted)}, got {rows.fieldnames}")
    out = {}
    for row in rows:
        try:
            low, high = float(row["ci_low"]), float(row["ci_high"])
        except ValueError:
            continue
        if not (math.isnan(low) or math.isnan(high)):
            out[(row["split"], row["scenario"], row["metric"])] = (low, high)
    return out


# --- comparing numbers -------------------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists to ``a.b.0.c -> leaf`` (a flat file's keys stay as they are)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def interval_names(
    cis: dict[tuple[str, str, str], tuple[float, float]], default_split: str
) -> dict[str, tuple[float, float]]:
    """Each interval under the names a metrics file may give its number: the flat
    ``<split>/<scenario>/<metric>`` of the metric-name scheme (``test/complete/qwk``), and the
    nested ``<scenario>.<metric>`` / ``<split>.<scenario>.<metric>`` of headline files written
    before it (the bare scenario form for ``evaluate.split`` only)."""
    out: dict[str, tuple[float, float]] = {}
    for (split, scenario, metric), ci in cis.items():
        out[scored(split, scenario, metric)] = ci
        out[f"{split}.{scenario}.{metric}"] = ci
        if split == default_split:
            out[f"{scenario}.{metric}"] = ci
    return out


def judge(
    name: str,
    committed: Any,
    now: Any,
    ci: tuple[float, float] | None,
    abs_tolerance: float,
    informational: bool,
    ci_label: str = "the committed 95 %",
) -> Comparison:
    if _same(committed, now):
        return Comparison(name, committed, now, EXACT)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (committed, now))
    if committed is None or now is None:
        where = "workspace" if now is None else "committed results"
        return Comparison(name, committed, now, DIFFERENT, f"not in the {where}")
    if not numbers:
        return Comparison(name, committed, now, DIFFERENT, "not a number")
    if informational or (isinstance(committed, int) and isinstance(now, int)):
        return Comparison(
            name, committed, now, INFO, "not judged (count/epoch or repro.informational)"
        )
    if ci is not None:
        low, high = ci
        inside = low <= now <= high
        return Comparison(
            name,
            committed,
            now,
            WITHIN if inside else DIFFERENT,
            f"{'inside' if inside else 'outside'} {ci_label} interval [{low:.4g}, {high:.4g}]",
        )
    inside = abs(now - committed) <= abs_tolerance
    return Comparison(
        name,
        committed,
        now,
        WITHIN if inside else DIFFERENT,
        f"{'within' if inside else 'beyond'} repro.abs_tolerance ±{abs_tolerance:g} (no interval)",
    )


def compare_metrics(
    name: str,
    committed: Any,
    now: Any,
    cis: dict[tuple[str, str, str], tuple[float, float]],
    cfg: Config,
    ci_label: str,
) -> list[Comparison]:
    old, new = flatten(committed), flatten(now)
    named = interval_names(cis, cfg.evaluate.split)
    out = []
    gone, added = [k for k in old if k not in new], [k for k in new if k not in old]
    if gone or added:  # renamed or restructured: one line for the file, not one per key

        def some(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

        out.append(
            Comparison(
                f"{name} (keys)",
                f"{len(gone)} keys not here",
                f"{len(added)} new keys",
                DIFFERENT,
                f"the file's keys changed (renamed metrics?): gone {some(gone) or '-'}; "
                f"new {some(added) or '-'}",
            )
        )
    for key in [k for k in old if k in new]:
        info = any(fnmatch.fnmatchcase(key, p) for p in cfg.repro.informational)
        out.append(
            judge(
                f"{name}:{key}",
                old.get(key),
                new.get(key),
                named.get(key),
                cfg.repro.abs_tolerance,
                info,
                ci_label,
            )
        )
    return out


# --- why: inputs, model, processor -------------------------------------------------------------


def changed_inputs(committed_lock: dict[str, Any], workspace_lock: dict[str, Any]) -> list[str]:
    """Per stage, the deps and params whose recorded hashes/values differ between the
    committed ``dvc.lock`` and the workspace's (what the workspace run was run with)."""
    out = []
    for stage, entry in workspace_lock.items():
        before = committed_lock.get(stage)
        if before is None:
            out.append(f"{stage}: new stage")
            continue
        old_deps = {d.get("path"): d.get("md5") for d in before.get("deps", [])}
        new_deps = {d.get("path"): d.get("md5") for d in entry.get("deps", [])}
        names = sorted(
            p for p in old_deps.keys() | new_deps.keys() if old_deps.get(p) != new_deps.get(p)
        )
        old_params = flatten(before.get("params", {}))
        new_params = flatten(entry.get("params", {}))
        names += sorted(
            k.split(".", 1)[-1]
            for k in old_params.keys() | new_params.keys()
            if not _same(old_params.get(k), new_params.get(k))
        )
        if names:
            out.append(f"{stage}: {', '.join(names)}")
    return out


def processor_facts() -> dict[str, Any]:
    """What decides how torch's CPU kernels round: the ISA torch dispatches to, its threads,
    the processor model, and the variables that pin them."""
    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if not model and shutil.which("lscpu"):
        proc = subprocess.run(["lscpu"], capture_output=True, text=True, check=False)
        for line in proc.stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    facts: dict[str, Any] = {
        "cpu": model or platform.processor() or platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS"):
        if os.environ.get(var):
            facts[var] = os.environ[var]
    return facts


# --- the check ----------------------------------------------------------------------------------


def check(root: str | Path, cfg: Config, rev: str = "HEAD") -> Report:
    """Compare the workspace's committed pipeline results with ``rev``'s (module doc)."""
    root = Path(root)
    outs = dvc_outputs(root)
    metrics = [o["path"] for o in outs if o["metric"]]
    if not metrics:
        raise ReproError("dvc.yaml: no metrics outputs to compare")
    level = cfg.evaluate.ci_level * 100
    report = Report(rev=rev, abs_tolerance=cfg.repro.abs_tolerance)
    scores_path = f"{cfg.evaluate.out_dir}/scores.csv"
    committed_lock = _lock_stages(git_show(rev, "dvc.lock", root))
    scores, report.interval_source, committed = committed_scores(
        rev, scores_path, root, committed_lock
    )
    whose = "the committed" if committed else "this run's"
    report.ci_label = f"{whose} {level:.0f} %"
    cis = intervals(scores)
    for path in metrics:
        old = json.loads(git_show(rev, path, root))
        new = json.loads(read_workspace(path, root))
        report.comparisons += compare_metrics(path, old, new, cis, cfg, report.ci_label)
    # the other committed outputs (plot tables, reports): same bytes or not, not judged
    for out in outs:
        if out["cached"] or out["metric"]:
            continue
        target = root / out["path"]
        files = sorted(f for f in target.rglob("*") if f.is_file()) if target.is_dir() else [target]
        for file in files:
            if not file.is_file():
                continue
            path = file.relative_to(root).as_posix()
            try:
                old_bytes = git_show(rev, path, root)
            except ReproError:
                continue  # not committed (e.g. a record only some runs write)
            report.other_files.append((path, old_bytes == file.read_bytes()))
    lock_file = root / "dvc.lock"
    workspace_lock = _lock_stages(lock_file.read_text()) if lock_file.is_file() else {}
    report.changed_inputs = changed_inputs(committed_lock, workspace_lock)
    model = f"{cfg.train.out_dir}/model.pt"
    model_file = root / model
    report.model = (
        model,
        _lock_md5(committed_lock, model),
        hashlib.md5(model_file.read_bytes()).hexdigest() if model_file.is_file() else None,
    )
    return report


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def render(report: Report, facts: dict[str, Any] | None = None) -> list[str]:
    """The report as lines: one per number that is not equal, the files, why, the verdict."""
    lines = []
    shown = [c for c in report.comparisons if c.verdict != EXACT]
    for c in shown:
        why = f" ({c.why})" if c.why else ""
        lines.append(f"  {c.name}: {_fmt(c.committed)} -> {_fmt(c.now)}  {c.verdict}{why}")
    changed_files = [p for p, same in report.other_files if not same]
    if changed_files:
        lines.append(
            f"  other committed outputs that differ (not judged): {', '.join(changed_files)}"
        )
    if report.model is not None:
        path, old, new = report.model
        if old == new:
            lines.append(f"  {path}: md5 {old} as in {report.rev}")
        else:
            lines.append(
                f"  {path}: md5 {old or '(not in dvc.lock)'} in {report.rev}, "
                f"{new or '(missing)'} here"
            )
    if report.changed_inputs:
        lines.append(
            f"  inputs that differ from {report.rev}'s dvc.lock: "
            + "; ".join(report.changed_inputs)
        )
    elif not report.exact:
        lines.append(f"  inputs (code, params, data) as in {report.rev}'s dvc.lock")
    if facts and not report.exact:
        lines.append("  this processor: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    if shown and any(c.why.startswith(("inside", "outside")) for c in shown):
        lines.append(f"  intervals from {report.interval_source}")
    lines.append(verdict_line(report))
    return lines


def verdict_line(report: Report) -> str:
    differ = [c for c in report.comparisons if c.verdict != EXACT]
    judged = [c for c in differ if c.verdict != INFO]
    same_inputs = not report.changed_inputs
    if report.exact:
        return f"check-repro: reproduced exactly ({len(report.comparisons)} numbers, {report.rev})"
    if not differ:
        return (
            f"check-repro: reproduced: every number as in {report.rev}; other committed "
            "outputs differ (above)"
        )
    if report.reproduced:
        where = "on another processor" if same_inputs else "with changed inputs (above)"
        by_ci = sum(1 for c in judged if c.why.startswith("inside"))
        by_abs = len(judged) - by_ci
        extra = f", {by_abs} without one within ±{report.abs_tolerance:g}" if by_abs else ""
        info = len(differ) - len(judged)
        extra += f"; {info} counts/epochs differ (not judged)" if info else ""
        return (
            f"check-repro: reproduced within tolerance {where}: {len(judged)} numbers differ, "
            f"{by_ci} inside {report.ci_label} intervals{extra}"
        )
    bad = [c.name for c in report.comparisons if c.verdict == DIFFERENT]
    shown = bad[:6] + ([f"{len(bad) - 6} more"] if len(bad) > 6 else [])
    if same_inputs:
        cause = (
            "same inputs, different results: on the processor that recorded "
            f"{report.rev} this is a real change; on another one, more than rounding"
        )
    else:
        cause = "the inputs changed (above)"
    names = ", ".join(shown)
    return f"check-repro: NOT reproduced: {len(bad)} outside tolerance ({names}); {cause}"
