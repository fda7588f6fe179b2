"""Baselines on the same encoders as RIMA, so a comparison isolates the method, not the backbone.

- ``fundus_only`` / ``oct_only``: one encoder and a head. An eye without that modality still
  gets a prediction (every model must grade every valid eye, or scenario metrics would be computed
  on different eyes): its feature is a single learned "missing" embedding, so the prediction for
  such an eye is the model's learned prior, which is what a single-modality model can honestly
  offer there.
- ``late_fusion_zero``: both encoders, features concatenated, zeros for a missing modality.
- ``late_fusion_dropout``: the same, trained with modality dropout so it sees zeros in training
  even when the training set is complete.
- ``imputation``: a missing modality's features regressed from the present one's, then late
  fusion (the imputation family the paper argues against).
- ``imputation_paths``: the same, with RIMA's explicit missing-path training (every complete
  eye also graded from each modality plus the other's imputed feature, with cross-entropy and a
  consistency term), so the comparison with RIMA isolates the OT alignment and the asymmetric
  fusion rather than the path training.
- ``distillation``: a complete-data teacher and single-modality students trained jointly by
  online distillation (the knowledge-distillation family the paper argues against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import (
    MLP,
    EyeModel,
    Inputs,
    ModelOutput,
    RunningStandardizer,
    build_encoders,
    checked_dropout,
    encode_present,
    modality_encoder,
    zero_loss,
)
from .spec import RimaConfig


class SingleModality(EyeModel):
    """Grade from one modality; a learned embedding stands in where that modality is missing."""

    def __init__(
        self, cfg: RimaConfig, n_classes: int, modality: str, *, pretrained: bool = True
    ) -> None:
        super().__init__()
        self.modality = modality
        self.encoder = modality_encoder(cfg, modality, pretrained)
        dim = self.encoder.out_dim
        self.missing = nn.Parameter(torch.randn(dim) * 0.02)
        self.head = MLP(dim, cfg.hidden_dim, n_classes, cfg.dropout)

    def grade(self, x: Inputs) -> ModelOutput:
        images, present = (x.fundus, x.has_f) if self.modality == "fundus" else (x.oct, x.has_o)
        feats = encode_present(self.encoder, images, present)
        feats = torch.where(present[:, None], feats, self.missing.to(feats.dtype))
        logits = self.head(feats)
        return ModelOutput(
            logits, zero_loss(logits), {"missing_fraction": float((~present).float().mean())}
        )


class LateFusion(EyeModel):
    """Concatenate both features (zeros for a missing one) and classify."""

    def __init__(
        self,
        cfg: RimaConfig,
        n_classes: int,
        *,
        modality_dropout: float = 0.0,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        self.modality_dropout = checked_dropout(modality_dropout)
        self.fundus_encoder, self.oct_encoder = build_encoders(cfg, pretrained)
        self.head = MLP(cfg.fundus_dim + cfg.oct_dim, cfg.hidden_dim, n_classes, cfg.dropout)

    def grade(self, x: Inputs) -> ModelOutput:
        stats: dict[str, float] = {}
        f, o = self.encode_both(self.dropped(x, stats))  # zeros where absent or dropped
        logits = self.head(torch.cat([f, o], dim=1))
        return ModelOutput(logits, zero_loss(logits), stats)


def _standardised(stats: RunningStandardizer, x: torch.Tensor) -> torch.Tensor:
    """``x`` centred per dimension by the running mean and divided by one pooled scale (the root
    of the mean running variance): one scale, so a unit with near-zero variance so far cannot
    blow up when it wakes; :func:`_raw` is the inverse."""
    return (x - stats.mean.to(x.dtype)) * torch.rsqrt(stats.var.mean() + stats.eps).to(x.dtype)


def _raw(stats: RunningStandardizer, z: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_standardised`: a prediction back in the raw space the head reads."""
    return z * torch.sqrt(stats.var.mean() + stats.eps).to(z.dtype) + stats.mean.to(z.dtype)


def _unexplained_share(
    pred: torch.Tensor, target: torch.Tensor, population: torch.Tensor
) -> torch.Tensor:
    """MSE of ``pred`` against ``target`` divided by the mean squared norm per dimension of
    ``population`` (every standardised row of the batch that has the target modality): about 1
    for a regressor that predicts the running mean, however far the encoders have moved since
    the running statistics last caught up (early in training they lag by many batch spreads)."""
    scale = population.detach().float().pow(2).mean().clamp_min(1e-6)
    return F.mse_loss(pred.float(), target.float()) / scale


class Imputation(EyeModel):
    """Fill in the missing modality's *features* with a learned regressor, then late fusion.

    The imputation family the paper argues against: ``imp_fo`` (fundus -> OCT features) and
    ``imp_of`` (OCT -> fundus) are MLPs regressed (MSE) on the eyes that have both modalities
    (all of them: modality dropout only hides a feature from the head, so in training both
    features of such an eye are encoded). Inputs and targets are detached, so the regression
    never shapes the encoders, and the head reads the imputed feature detached as well, so
    cross-entropy never turns the regressors into classifiers. The head (concat + MLP) is
    trained with modality dropout (``model.modality_dropout``) so it sees imputed features in
    training even when the training data are complete.

    The regressors work in standardised feature spaces (running statistics, the same in training
    and at inference; :func:`_standardised`): ``imp_fo`` maps standardised fundus features to
    standardised OCT features and its output is mapped back to the raw OCT space the head reads.
    The loss is the unexplained share (:func:`_unexplained_share`), about 1 for a regressor that
    predicts the mean whatever the encoders' feature scale. Earlier versions regressed raw
    features: dividing the MSE by the paired rows' variance blew up with few complete eyes in a
    batch; dividing by all rows' variance still started at about 1 + mean²/variance, because
    encoder features are non-negative with a mean far above their spread (10²–10⁴ in the first
    epoch of the benchmark runs), so the regression dominated the global gradient clip and
    stalled the network. Batch statistics in training (BatchNorm's rule) stalled the head in
    the tests: the imputed features then move with every batch.

    ``train_paths=True`` (``imputation_paths``) adds RIMA's missing-path terms with RIMA's
    weights (``model.missing_path_weight``, ``model.consistency_weight``): for every eye that
    has both modalities, the head also grades [fundus, imputed OCT] and [imputed fundus, OCT],
    each with cross-entropy and a KL term towards the detached full prediction, times the
    complete eyes' share of the batch (as RIMA weighs them).
    """

    def __init__(
        self,
        cfg: RimaConfig,
        n_classes: int,
        *,
        train_paths: bool = False,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        d_f, d_o, hidden = cfg.fundus_dim, cfg.oct_dim, cfg.hidden_dim
        self.modality_dropout = checked_dropout(cfg.modality_dropout)
        self.path_weight = cfg.missing_path_weight if train_paths else 0.0
        self.consistency_weight = cfg.consistency_weight if train_paths else 0.0
        self.fundus_encoder, self.oct_encoder = build_encoders(cfg, pretrained)
        self.fundus_stats = RunningStandardizer(d_f)
        self.oct_stats = RunningStandardizer(d_o)
        self.imp_fo = MLP(d_f, hidden, d_o)  # standardised fundus -> standardised OCT
        self.imp_of = MLP(d_o, hidden, d_f)  # standardised OCT -> standardised fundus
        self.head = MLP(d_f + d_o, hidden, n_classes, cfg.dropout)

    def grade(self, x: Inputs) -> ModelOutput:
        f, o = self.encode_both(x)
        if self.training:
            self.fundus_stats.update(f[x.has_f])
            self.oct_stats.update(o[x.has_o])
        zf, zo = (
            _standardised(self.fundus_stats, f.detach()),
            _standardised(self.oct_stats, o.detach()),
        )
        zo_hat, zf_hat = self.imp_fo(zf), self.imp_of(zo)  # standardised predictions
        aux = zero_loss(f)
        stats: dict[str, float] = {}
        both = x.has_f & x.has_o
        # The regressors learn from every real pair, before modality dropout hides one side
        # from the head (the dropped feature is only a detached regression target).
        if self.training and int(both.sum()) >= 2:
            loss_fo = _unexplained_share(zo_hat[both], zo[both], zo[x.has_o])
            loss_of = _unexplained_share(zf_hat[both], zf[both], zf[x.has_f])
            aux = loss_fo + loss_of
            stats["imputation_loss_fo"] = float(loss_fo.detach())
            stats["imputation_loss_of"] = float(loss_of.detach())
        pred_o, pred_f = _raw(self.oct_stats, zo_hat), _raw(self.fundus_stats, zf_hat)
        x = self.dropped(x, stats)
        has_f, has_o = x.has_f, x.has_o
        pred_f, pred_o = pred_f.detach().to(f.dtype), pred_o.detach().to(o.dtype)
        f_in = torch.where(has_f[:, None], f, pred_f)
        o_in = torch.where(has_o[:, None], o, pred_o)
        logits = self.head(torch.cat([f_in, o_in], dim=1))
        stats["imputed_fraction"] = float((~(has_f & has_o)).float().mean())
        if self.training and self.path_weight > 0 and x.labels is not None and bool(both.any()):
            aux = aux + self._missing_paths(f, o, pred_f, pred_o, both, x.labels, stats)
        return ModelOutput(logits, aux, stats)

    def _missing_paths(
        self,
        f: torch.Tensor,
        o: torch.Tensor,
        pred_f: torch.Tensor,
        pred_o: torch.Tensor,
        both: torch.Tensor,
        labels: torch.Tensor,
        stats: dict[str, float],
    ) -> torch.Tensor:
        """Cross-entropy + KL towards the full prediction of each imputed path of the complete
        eyes (the real pairs, before modality dropout), as RIMA trains its missing paths."""
        share = float(both.float().mean())  # paired share of the batch, weighed as RIMA does
        f, o, pred_f, pred_o = f[both], o[both], pred_f[both], pred_o[both]
        y = labels.reshape(-1)[both]
        target = F.log_softmax(self.head(torch.cat([f, o], dim=1)).detach().float(), dim=1)
        total = zero_loss(f).float()
        for name, feats in (("fundus", (f, pred_o)), ("oct", (pred_f, o))):
            logp = F.log_softmax(self.head(torch.cat(feats, dim=1)).float(), dim=1)
            ce = F.nll_loss(logp, y)
            kl = F.kl_div(logp, target, log_target=True, reduction="batchmean")
            stats[f"path_ce_{name}_only"] = float(ce.detach())
            total = total + share * self.path_weight * ce + share * self.consistency_weight * kl
        return total


class Distillation(EyeModel):
    """A complete-data teacher and two single-modality students on shared encoders.

    The distillation family the paper argues against: the teacher (an MLP on both features)
    answers when an eye has both modalities; otherwise the student of the present modality (an
    MLP on that modality's features) answers. Training is *online* distillation, in one run of
    the ordinary engine (a two-stage teacher-then-student schedule would need the engine to
    run twice): the returned logits are the routed ones, so the engine's cross-entropy trains
    the teacher on complete eyes and each student on the eyes that only have its modality; on
    complete eyes the students additionally get, in ``aux_loss``, ``(1 - alpha)`` times
    cross-entropy plus ``alpha * T^2`` times KL towards the teacher's detached, temperature-
    softened prediction (Hinton et al.'s weighting; ``T = 2``, ``alpha = 0.5``).
    """

    temperature = 2.0
    alpha = 0.5

    def __init__(self, cfg: RimaConfig, n_classes: int, *, pretrained: bool = True) -> None:
        super().__init__()
        d_f, d_o, hidden = cfg.fundus_dim, cfg.oct_dim, cfg.hidden_dim
        self.fundus_encoder, self.oct_encoder = build_encoders(cfg, pretrained)
        self.teacher = MLP(d_f + d_o, hidden, n_classes, cfg.dropout)
        self.student_f = MLP(d_f, hidden, n_classes, cfg.dropout)
        self.student_o = MLP(d_o, hidden, n_classes, cfg.dropout)

    def grade(self, x: Inputs) -> ModelOutput:
        f, o = self.encode_both(x)
        has_f, has_o, labels = x.has_f, x.has_o, x.labels
        both = has_f & has_o
        teacher = self.teacher(torch.cat([f, o], dim=1))
        stud_f = self.student_f(f)
        stud_o = self.student_o(o)
        logits = torch.where(both[:, None], teacher, torch.where(has_f[:, None], stud_f, stud_o))
        stats = {"teacher_fraction": float(both.float().mean())}
        aux = zero_loss(logits)
        if self.training and bool(both.any()):
            t = self.temperature
            target = F.log_softmax(teacher[both].detach().float() / t, dim=1)
            kd = zero_loss(logits).float()
            ce = zero_loss(logits).float()
            for student in (stud_f[both].float(), stud_o[both].float()):
                log_p = F.log_softmax(student / t, dim=1)
                kd = kd + F.kl_div(log_p, target, log_target=True, reduction="batchmean")
                if labels is not None:
                    ce = ce + F.cross_entropy(student, labels[both])
            # per-batch mean over all eyes, like the engine's CE, so the weights are comparable
            share = both.float().mean()
            aux = share * (self.alpha * t * t * kd + (1.0 - self.alpha) * ce)
            stats["distill_kl"] = float(kd.detach())
            stats["student_ce"] = float(ce.detach())
        return ModelOutput(logits, aux, stats)
