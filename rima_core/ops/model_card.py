"""A short Markdown model card for a registered version, built from evaluate's outputs.

A registry version is what a clinical team is asked to trust, so its page says, in one screen:
which data (and its content hash), which classes, how it was trained and selected, the headline
metrics per missing-modality scenario with bootstrap intervals, how it does per demographic
group (ES-AUC), how well calibrated it is, what it is for and what it does when a modality is
missing. Everything is read from files the pipeline wrote (``model.pt``, ``train_summary.json``,
the evaluation folder); nothing is typed in by hand, so the card cannot drift from the numbers.

MLflow keeps 5000 characters of a description: the card stays compact (the full tables are the
evaluation's CSV artifacts; the whole card is also logged as ``model_card.md``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from rima_core.config import Config, is_sweep
from rima_core.ops.serving import model_file

log = logging.getLogger(__name__)

MAX_CHARS = 4500  # room for the promotion decision appended to the description (5000 in all)
CARD_FILES = ("scores.csv", "subgroups.csv", "equity.csv", "calibration.csv", "eval_summary.json")
HEADLINE = ("qwk", "auc", "accuracy")

INTENDED_USE = (
    "Research use: grading disease severity from a fundus photograph and/or an OCT volume of one "
    "eye, to study robustness to a missing modality. Not a medical device and not validated for "
    "clinical decisions; outputs are class probabilities for review by a clinician."
)
MISSING_MODALITY = (
    "An eye needs at least one modality. With only a fundus or only an OCT the model still "
    "grades the eye (missing modalities are part of training); the `fundus_missing` / "
    "`oct_missing` rows above show what that costs. A request with neither is refused."
)


DEFINITIONS = (
    "How to read: QWK (quadratic weighted kappa) is the agreement of predicted and true grades, "
    "distant errors costing more (1 perfect, 0 chance); AUC separates each grade from the rest "
    "(1 perfect, 0.5 chance); ECE is the mean gap between the stated confidence and the "
    "accuracy (0 = calibrated); ES-AUC is the AUC discounted by its spread over groups."
)
PATHS_MEANING = (
    "A complete eye has three paths: `full` fuses both modalities, `fundus_only` / `oct_only` "
    "grade it from one modality with the other's translation standing in; the weights say how "
    "much each path's log-probabilities count (0: not used)."
)


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n``: per-grade sensitivities are small-count
    proportions, where the normal approximation leaves [0, 1]."""
    from scipy.stats import norm

    if n == 0:
        return float("nan"), float("nan")
    z = float(norm.ppf(0.5 + level / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def per_grade_lines(
    predictions: pd.DataFrame | None, class_names: list[str], level: float
) -> list[str]:
    """Sensitivity and specificity of each grade with Wilson intervals, from one scenario's
    per-eye predictions (``label``, ``pred``); nothing when they are absent."""
    if predictions is None or not {"label", "pred"} <= set(predictions.columns):
        return []
    y, pred = predictions["label"].to_numpy(), predictions["pred"].to_numpy()
    lines = ["| grade | n | sensitivity | specificity |", "|---|---|---|---|"]
    for c, name in enumerate(class_names):
        pos, neg = y == c, y != c
        tp, tn = int((pred[pos] == c).sum()), int((pred[neg] != c).sum())
        cells = []
        for k, n in ((tp, int(pos.sum())), (tn, int(neg.sum()))):
            lo, hi = wilson_interval(k, n, level)
            cells.append(f"{_num(k / n if n else float('nan'))} [{_num(lo)}, {_num(hi)}]")
        lines.append(f"| {name} | {int(pos.sum())} | {cells[0]} | {cells[1]} |")
    return lines


def pooling_lines(pooling: dict[str, Any] | None, val: str) -> list[str]:
    """How a complete eye's prediction combines the model's paths (train_summary.json's
    ``path_pooling``, written by RIMA training); nothing for a model without paths."""
    if not pooling:
        return []
    weights = " / ".join(f"{p} {_num(w)}" for p, w in pooling.get("weights", {}).items())
    if not pooling.get("fitted"):
        return [
            f"- Complete eyes: path weights left at {weights} ({pooling.get('n_eyes', '?')} "
            f"complete {val} eyes were too few to fit them)."
        ]
    return [
        f"- Complete eyes: the prediction pools the model's paths with weights {weights}, "
        f"fitted on {pooling.get('n_eyes', '?')} complete {val} eyes (NLL "
        f"{_num(pooling.get('nll_before'))} → {_num(pooling.get('nll_after'))}). "
        + PATHS_MEANING
        + alternatives_sentence(
            pooling.get("nll_alternatives"), pooling.get("weights", {}).get("full"), val
        )
    ]


def alternatives_sentence(
    alternatives: dict[str, float] | None, full_weight: float | None, val: str
) -> str:
    """Why the weights are what they are: each path's own validation NLL and that of the single
    paths pooled without the full path (calibration.path_alternatives)."""
    if not alternatives:
        return ""
    alone = ", ".join(f"{p} {_num(v)}" for p, v in alternatives.items() if p != "singles")
    full, singles = alternatives.get("full"), alternatives.get("singles")
    verdict = ""
    if full is not None and singles is not None:
        better = "better than" if full < singles else "no better than"
        verdict = (
            f" The full path alone is {better} the two single paths pooled "
            f"({_num(full)} vs {_num(singles)})."
        )
        if full_weight == 0:
            verdict += (
                " Its weight of 0 means that, on these eyes, the single paths' product already "
                "carries what the fusion learned."
            )
    return f" Each path alone on those {val} eyes, NLL after its own scaling: {alone}.{verdict}"


def has_card_inputs(eval_dir: str | Path) -> bool:
    """Whether ``eval_dir`` holds every table the card is built from."""
    return all((Path(eval_dir) / f).is_file() for f in CARD_FILES)


def _num(v: Any, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–"
    return f"{round(f, digits) + 0.0:.{digits}f}" if math.isfinite(f) else "–"  # no "-0.000"


def _with_ci(scores: pd.DataFrame, split: str, scenario: str, metric: str) -> str:
    row = scores[
        (scores["split"] == split) & (scores["scenario"] == scenario) & (scores["metric"] == metric)
    ]
    if row.empty:
        return "–"
    r = row.iloc[0]
    return f"{_num(r['value'])} [{_num(r['ci_low'])}, {_num(r['ci_high'])}]"


def _spec(model_dir: Path) -> dict[str, Any]:
    import torch

    blob = torch.load(model_file(model_dir), map_location="cpu", weights_only=True)
    return dict(blob.get("spec", {})) if isinstance(blob, dict) else {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_card_inputs(model_dir: Path, eval_dir: Path) -> dict[str, Any]:
    """Everything the card is built from, read once: the model's spec, the training and
    evaluation summaries and evaluate's tables (the card never types a number in by hand)."""
    return {
        "spec": _spec(model_dir),
        "train": _read_json(model_dir / "train_summary.json"),
        "summary": _read_json(eval_dir / "eval_summary.json"),
        "scores": pd.read_csv(eval_dir / "scores.csv"),
        "subgroups": pd.read_csv(eval_dir / "subgroups.csv", keep_default_na=False, na_values=[""]),
        "equity": pd.read_csv(eval_dir / "equity.csv"),
        "calib": pd.read_csv(eval_dir / "calibration.csv"),
    }


def _data_lines(
    spec: dict[str, Any],
    summary: dict[str, Any],
    cfg: Config,
    data_hash: str | None,
    model_uri: str | None,
) -> list[str]:
    """The title and the Data section: what the model was trained on, as the evaluation recorded
    it (the config's values only where an older evaluation did not record them)."""
    data = summary.get("data") or {}
    source = data.get("source") or cfg.data.source
    disease = data.get("disease") or cfg.data.disease
    data_hash = data_hash or data.get("content_hash")
    name = cfg.mlflow.model_name
    lines = [f"# Model card: {name} ({spec.get('name', '?')})", ""]
    if model_uri:
        lines += [f"Logged model `{model_uri}`.", ""]
    provenance = (
        "Synthetic phantom generated by the pipeline: no patients, no personal data."
        if source == "synthetic" or disease == "synthetic"
        else f"Eyes of the `{source}` source (disease `{disease}`)."
    )
    return [
        *lines,
        "## Data",
        f"- {provenance}",
        f"- Source `{source}` / disease `{disease}`; store content hash "
        f"`{data_hash or 'unknown'}`.",
        f"- Classes (grade order): {', '.join(spec.get('class_names') or []) or '?'}.",
        f"- Inputs: fundus {spec.get('fundus_shape')} (H, W, C), OCT {spec.get('oct_shape')} "
        "(D, H, W).",
        "",
    ]


def _training_lines(train: dict[str, Any], cfg: Config, test: str, val: str) -> list[str]:
    """The Training and selection section: how the weights were chosen, and that the reported
    split was never selected on."""
    return [
        "## Training and selection",
        f"- {train.get('epochs_run', '?')} epochs (best {train.get('best_epoch', '?')}), trained "
        f"under `{train.get('train_scenario', cfg.missing.train_scenario)}` masks; weights "
        f"selected on {train.get('selection_split', 'val')} "
        f"{train.get('selection_metric', cfg.train.selection_metric)} "
        f"(`{train.get('selection_scenario', cfg.train.selection_scenario)}`).",
        f"- Promotion decides on the {val} split ({cfg.promote.metric}, `{cfg.promote.scenario}`);"
        f" the {test} split below is reported, never selected on.",
        *pooling_lines(train.get("path_pooling"), val),
        "",
    ]


def _metrics_lines(
    scores: pd.DataFrame,
    summary: dict[str, Any],
    cfg: Config,
    scenarios: list[str],
    main: list[str],
    level: float,
) -> list[str]:
    """The Metrics table: one row per main scenario with bootstrap intervals on the reported
    split and the selection split's QWK beside it (the sweep points stay in rate_curve.csv)."""
    test, val = summary.get("split", "test"), summary.get("selection_split", "val")
    boot = summary.get("bootstrap", {})
    lines = [
        f"## Metrics ({test} split, {level:.0%} bootstrap interval over eyes, "
        f"{boot.get('resamples', cfg.evaluate.bootstrap)} resamples)",
        f"| scenario | n | QWK | AUC | accuracy | {val} QWK |",
        "|---|---|---|---|---|---|",
    ]
    n_eyes = summary.get("n_eyes", {})
    for s in main:
        cells = [_with_ci(scores, test, s, m) for m in HEADLINE]
        val_qwk = scores[
            (scores["split"] == val) & (scores["scenario"] == s) & (scores["metric"] == "qwk")
        ]["value"]
        lines.append(
            f"| {s} | {n_eyes.get(s, '?')} | {' | '.join(cells)} | "
            f"{_num(val_qwk.iloc[0]) if len(val_qwk) else '–'} |"
        )
    if len(main) < len(scenarios):
        lines.append("Each missing rate from 0 to 1: `rate_curve.csv` of the evaluation.")
    return lines


def _grade_lines(
    eval_dir: Path, spec: dict[str, Any], test: str, headline: str, level: float
) -> list[str]:
    """The per-grade table of the headline scenario (when its predictions were saved), then the
    definitions a reader needs for every number above."""
    preds_file = eval_dir / "predictions" / f"{headline}.parquet"
    grade_table = per_grade_lines(
        pd.read_parquet(preds_file) if preds_file.is_file() else None,
        list(spec.get("class_names") or []),
        level,
    )
    lines: list[str] = []
    if grade_table:
        lines += ["", f"Per grade ({test}, `{headline}`, {level:.0%} Wilson interval):", ""]
        lines += grade_table
    return [*lines, "", DEFINITIONS]


def _subgroup_lines(
    equity: pd.DataFrame, subgroups: pd.DataFrame, cfg: Config, test: str, headline: str
) -> list[str]:
    """The Subgroups section: ES-AUC per attribute and the per-group table of the headline
    scenario, limited to ``evaluate.equity_attributes`` when the store has any of them."""
    eq = equity[equity["scenario"] == headline]
    lines = ["", f"## Subgroups ({test}, `{headline}`)"]
    if eq.empty:
        lines.append("The store has no demographic attributes: no subgroup analysis.")
        return lines
    es = ", ".join(f"{r.attribute} {_num(r.es_auc)}" for r in eq.itertuples())
    lines += [
        f"ES-AUC = AUC / (1 + Σ|AUC − AUC_group|): {es}.",
        "",
        "| attribute | group | n | AUC | QWK | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    wanted = [a for a in cfg.evaluate.equity_attributes if a in set(eq["attribute"])]
    table = subgroups[
        (subgroups["scenario"] == headline) & subgroups["attribute"].isin(wanted or eq["attribute"])
    ]
    for r in table.itertuples():
        lines.append(
            f"| {r.attribute} | {r.group} | {r.n} | {_num(r.auc)} | {_num(r.qwk)} | "
            f"{_num(r.accuracy)} |"
        )
    lines.append("Groups with n < 30 are shown with their n: read their numbers with care.")
    return lines


def _calibration_lines(
    calib: pd.DataFrame,
    spec: dict[str, Any],
    main: list[str],
    split_names: tuple[str, str],
    headline: str,
) -> list[str]:
    """The Calibration section: which temperatures were fitted, ECE and NLL before and after on
    the headline scenario, and per main scenario when there are several; ``split_names`` is
    ``(reported split, selection split)``."""
    test, val = split_names
    c = calib[(calib["split"] == test) & (calib["scenario"] == headline)]
    lines = ["", "## Calibration"]
    if c.empty:
        lines.append("No calibration report.")
        return lines
    r = c.iloc[0]
    temps = spec.get("temperatures") or {}
    fitted = (
        "one temperature per availability pattern, "
        + " / ".join(f"{p} T = {_num(t)}" for p, t in temps.items())
        if temps
        else f"one temperature T = {_num(r['temperature'])} for every eye"
    )
    lines.append(
        f"Probabilities are calibrated with {fitted}, fitted on the {val} split after "
        f"training (an eye gets its pattern's). {test}, `{headline}`: ECE "
        f"{_num(r['ece_before'])} → {_num(r['ece_after'])}, NLL {_num(r['nll_before'])} → "
        f"{_num(r['nll_after'])}."
    )
    per = calib[(calib["split"] == test) & calib["scenario"].isin(main)]
    if len(per) > 1:
        lines += ["", "| scenario | ECE | NLL |", "|---|---|---|"]
        lines += [
            f"| {q.scenario} | {_num(q.ece_after)} | {_num(q.nll_after)} |"
            for q in per.itertuples()
        ]
    return lines


def _closing_lines(spec: dict[str, Any]) -> list[str]:
    """How the grade is decoded from the probabilities, then the fixed Intended use and Missing
    modalities sections."""
    decoding = spec.get("decoding", "argmax")
    return [
        "",
        "The grade is "
        + (
            "the grade of least expected quadratic cost under the calibrated probabilities "
            "(ordinal decoding)."
            if decoding == "ordinal"
            else "the most probable grade (argmax); `qwk_ordinal` in the metrics scores the "
            "ordinal decoding (least expected quadratic cost) beside it."
        ),
        "",
        "## Intended use",
        INTENDED_USE,
        "",
        "## Missing modalities",
        MISSING_MODALITY,
    ]


def build_model_card(
    model_dir: str | Path,
    eval_dir: str | Path,
    cfg: Config,
    data_hash: str | None = None,
    model_uri: str | None = None,
) -> str:
    """The Markdown card of the model in ``model_dir`` evaluated in ``eval_dir``."""
    model_dir, eval_dir = Path(model_dir), Path(eval_dir)
    inputs = _read_card_inputs(model_dir, eval_dir)
    spec, summary = inputs["spec"], inputs["summary"]
    test, val = summary.get("split", "test"), summary.get("selection_split", "val")
    scenarios = list(summary.get("scenarios", pd.unique(inputs["scores"]["scenario"])))
    # one row per scenario; the missing-rate sweeps (``kind@rate``) are rate_curve.csv's
    main = [s for s in scenarios if not is_sweep(s)] or scenarios
    headline = summary.get("equity_headline_scenario", cfg.promote.scenario)
    level = float(summary.get("bootstrap", {}).get("level", cfg.evaluate.ci_level))

    lines = [
        *_data_lines(spec, summary, cfg, data_hash, model_uri),
        *_training_lines(inputs["train"], cfg, test, val),
        *_metrics_lines(inputs["scores"], summary, cfg, scenarios, main, level),
        *_grade_lines(eval_dir, spec, test, headline, level),
        *_subgroup_lines(inputs["equity"], inputs["subgroups"], cfg, test, headline),
        *_calibration_lines(inputs["calib"], spec, main, (test, val), headline),
        *_closing_lines(spec),
    ]
    card = "\n".join(lines) + "\n"
    if len(card) > MAX_CHARS:
        log.info("model card: %d characters; the description keeps the first 5000", len(card))
    return card
