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
- ``distillation``: a complete-data teacher trained first on the complete training eyes, then
  frozen, and single-modality students with their own encoders distilled from it (the
  knowledge-distillation family the paper argues against; two stages, rima_core/runs/train.py).
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
    PathPooling,
    RunningStandardizer,
    build_encoders,
    checked_dropout,
    encode_present,
    modality_encoder,
    zero_loss,
)
from .spec import RimaConfig


class SingleModality(EyeModel):
    """Grade from one modality; a learned embedding stands in where that modality is missing.

    The encoder's features are standardised per dimension with running statistics (``stats``,
    as RIMA does) before the head. The small CNNs end in GroupNorm -> ReLU -> global average
    pooling, so at initialisation every eye's feature vector is mostly the same vector: after
    the head's LayerNorm the part that differs between eyes was ~12 % of the vector's scale in
    the collapsed benchmark runs (seed 8), and the head trained at chance for 5-6 epochs, long
    enough for early stopping to end some runs there (complete-eye test QWK 0.24-0.49).
    Centring each dimension removes the common vector, as RIMA's and the imputation
    baselines' standardisers do, so the head sees what differs between eyes from the first step.
    Models saved before the standardiser existed load without it (``stats`` = identity).
    """

    def __init__(
        self, cfg: RimaConfig, n_classes: int, modality: str, *, pretrained: bool = True
    ) -> None:
        super().__init__()
        self.modality = modality
        self.encoder = modality_encoder(cfg, modality, pretrained)
        dim = self.encoder.out_dim
        self.missing = nn.Parameter(torch.randn(dim) * 0.02)
        self.head = MLP(dim, cfg.hidden_dim, n_classes, cfg.dropout)
        self.stats: nn.Module = RunningStandardizer(dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # a model saved before the standardiser existed read the raw features: keep doing so
        # (load_state_dict visits the children after this call, so the swap takes effect)
        if prefix + "stats.mean" not in state_dict:
            self.stats = nn.Identity()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def grade(self, x: Inputs) -> ModelOutput:
        images, present = (x.fundus, x.has_f) if self.modality == "fundus" else (x.oct, x.has_o)
        feats = encode_present(self.encoder, images, present)
        if self.training and isinstance(self.stats, RunningStandardizer):
            self.stats.update(feats[present])
        feats = self.stats(feats)
        feats = torch.where(present[:, None], feats, self.missing.to(feats.dtype))
        logits = self.head(feats)
        return ModelOutput(
            logits, zero_loss(logits), {"missing_fraction": float((~present).float().mean())}
        )


class LateFusion(EyeModel):
    """Concatenate both features (zeros for a missing one) and classify.

    Each feature is standardised per dimension with running statistics before the head, as in
    :class:`SingleModality` and for the same reason (raw features share one large common vector
    and the head trained at chance for epochs on some seeds); a missing or dropped modality is
    then the zero vector of the *standardised* space, i.e. the training mean. Models saved
    before the standardisers existed load without them (raw features, as they were trained).
    """

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
        self.fundus_stats: nn.Module = RunningStandardizer(cfg.fundus_dim)
        self.oct_stats: nn.Module = RunningStandardizer(cfg.oct_dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # a model saved before the standardisers existed read the raw features: keep doing so
        if prefix + "fundus_stats.mean" not in state_dict:
            self.fundus_stats, self.oct_stats = nn.Identity(), nn.Identity()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def grade(self, x: Inputs) -> ModelOutput:
        stats: dict[str, float] = {}
        x = self.dropped(x, stats)
        f, o = self.encode_both(x)
        if self.training and isinstance(self.fundus_stats, RunningStandardizer):
            self.fundus_stats.update(f[x.has_f])
            self.oct_stats.update(o[x.has_o])
        zero = torch.zeros((), dtype=f.dtype, device=f.device)
        f = torch.where(x.has_f[:, None], self.fundus_stats(f).to(f.dtype), zero)
        o = torch.where(x.has_o[:, None], self.oct_stats(o).to(f.dtype), zero)
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


class Imputation(PathPooling, EyeModel):
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

    Path pooling, as RIMA's (models/rima.py, step 7): a complete eye has the same three paths,
    full, fundus + imputed OCT, imputed fundus + OCT (what an eye missing a modality gets), and
    after training its prediction may pool their log-probabilities with the weights
    ``path_weights`` fitted on validation (:func:`rima_core.runs.calibration.calibrate_paths`,
    ``train.pool_paths``), so a comparison with RIMA does not credit RIMA with the pooling.
    Default ``(1, 0, 0)``: the full path alone, what training and older models use.
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
        self.init_path_weights()  # fitted after training (class docstring)
        # the head reads standardised features (SingleModality's docstring says why); models
        # saved before this read raw ones and keep doing so (_load_from_state_dict)
        self.register_buffer("head_standardised", torch.ones((), dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        state_dict.setdefault(prefix + "head_standardised", torch.zeros((), dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _fuse(self, f: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The head on [fundus, OCT] features (real or imputed, raw space)."""
        if bool(self.head_standardised):
            f, o = self.fundus_stats(f).to(f.dtype), self.oct_stats(o).to(f.dtype)
        return self.head(torch.cat([f, o], dim=1))

    def imputed(self, f: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The imputed fundus and OCT features (raw space, detached) of every row."""
        zf = _standardised(self.fundus_stats, f.detach())
        zo = _standardised(self.oct_stats, o.detach())
        pred_o = _raw(self.oct_stats, self.imp_fo(zf)).detach().to(o.dtype)
        pred_f = _raw(self.fundus_stats, self.imp_of(zo)).detach().to(f.dtype)
        return pred_f, pred_o

    def path_log_probs(
        self, f: torch.Tensor, o: torch.Tensor, pred_f: torch.Tensor, pred_o: torch.Tensor
    ) -> torch.Tensor:
        """(paths, B, K) log-probabilities of the paths in ``PATHS``, every row treated as
        complete: [fundus, OCT], [fundus, imputed OCT], [imputed fundus, OCT]."""
        inputs = ((f, o), (f, pred_o), (pred_f, o))
        return torch.stack([F.log_softmax(self._fuse(*p).float(), dim=1) for p in inputs])

    @torch.no_grad()
    def complete_eye_log_probs(self, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(paths, n, K) path log-probabilities of the batch's complete eyes, and their rows."""
        f, o = self.encode_both(x)
        idx = (x.has_f & x.has_o).nonzero().flatten()
        f, o = f.index_select(0, idx), o.index_select(0, idx)
        return self.path_log_probs(f, o, *self.imputed(f, o)), idx

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
        logits = self._fuse(f_in, o_in)
        stats["imputed_fraction"] = float((~(has_f & has_o)).float().mean())
        if self.training and self.path_weight > 0 and x.labels is not None and bool(both.any()):
            aux = aux + self._missing_paths(f, o, pred_f, pred_o, both, x.labels, stats)
        logits = self.pooled(
            logits,
            has_f & has_o,
            lambda i: self.path_log_probs(*(t.index_select(0, i) for t in (f, o, pred_f, pred_o))),
        )
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
        target = F.log_softmax(self._fuse(f, o).detach().float(), dim=1)
        total = zero_loss(f).float()
        for name, feats in (("fundus", (f, pred_o)), ("oct", (pred_f, o))):
            logp = F.log_softmax(self._fuse(*feats).float(), dim=1)
            ce = F.nll_loss(logp, y)
            kl = F.kl_div(logp, target, log_target=True, reduction="batchmean")
            stats[f"path_ce_{name}_only"] = float(ce.detach())
            total = total + share * self.path_weight * ce + share * self.consistency_weight * kl
        return total


class DistillTeacher(EyeModel):
    """The complete-data teacher of :class:`Distillation`: its own two encoders, each feature
    standardised with running statistics (as :class:`SingleModality` does, and for the same
    reason), and an MLP on both. Trained first, alone, on the complete training eyes
    (rima_core/runs/train.py), then frozen; it only ever grades eyes that have both modalities."""

    def __init__(self, cfg: RimaConfig, n_classes: int, *, pretrained: bool = True) -> None:
        super().__init__()
        self.fundus_encoder, self.oct_encoder = build_encoders(cfg, pretrained)
        self.fundus_stats = RunningStandardizer(cfg.fundus_dim)
        self.oct_stats = RunningStandardizer(cfg.oct_dim)
        self.head = MLP(cfg.fundus_dim + cfg.oct_dim, cfg.hidden_dim, n_classes, cfg.dropout)

    def grade(self, x: Inputs) -> ModelOutput:
        f, o = self.encode_both(x)
        if self.training:
            self.fundus_stats.update(f[x.has_f])
            self.oct_stats.update(o[x.has_o])
        logits = self.head(torch.cat([self.fundus_stats(f), self.oct_stats(o)], dim=1))
        return ModelOutput(logits, zero_loss(logits), {})


class DistillStudent(nn.Module):
    """A single-modality student of :class:`Distillation`: its own encoder (never shared with
    the teacher), standardised features and an MLP head. Rows without the modality get
    meaningless logits; the router never uses them."""

    def __init__(
        self, cfg: RimaConfig, n_classes: int, modality: str, *, pretrained: bool = True
    ) -> None:
        super().__init__()
        self.encoder = modality_encoder(cfg, modality, pretrained)
        self.stats = RunningStandardizer(self.encoder.out_dim)
        self.head = MLP(self.encoder.out_dim, cfg.hidden_dim, n_classes, cfg.dropout)

    def forward(self, images: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        feats = encode_present(self.encoder, images, present)
        if self.training:
            self.stats.update(feats[present])
        return self.head(self.stats(feats))


class Distillation(EyeModel):
    """Knowledge distillation for missing modalities, as the literature does it (the family the
    paper argues against).

    Two stages, both run by ``rima_core.runs.train.train`` with the ordinary engine:

    1. the **teacher** (:class:`DistillTeacher`, its own encoders) is trained alone on the
       training eyes that have both modalities, selected on the complete validation eyes, then
       frozen (:meth:`freeze_teacher`: no gradient, eval mode from then on);
    2. the **students** (:class:`DistillStudent`, one per modality, each with its own encoder)
       are trained on every training eye: on an eye that has both modalities each student gets
       ``(1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T)`` (Hinton et al.; the KL
       of the temperature-softened predictions, ``alpha = model.distill_alpha``, ``T =
       model.distill_temperature``, chosen on validation by the benchmark), on an eye with one
       modality that modality's student gets plain CE.

    Inference routes: the teacher grades an eye with both modalities, the student of the
    present modality any other eye. The returned logits are the routed ones in training too,
    so the engine's cross-entropy is the students' CE on single-modality eyes and a constant
    (the frozen teacher's) on complete eyes; the students' terms on complete eyes are in
    ``aux_loss``, a mean over the batch's eyes like the engine's CE.
    """

    def __init__(self, cfg: RimaConfig, n_classes: int, *, pretrained: bool = True) -> None:
        super().__init__()
        self.alpha = float(cfg.distill_alpha)
        self.temperature = float(cfg.distill_temperature)
        if not 0.0 <= self.alpha <= 1.0 or not self.temperature > 0:
            raise ValueError(
                f"model.distill_alpha must be in [0, 1] and model.distill_temperature > 0, got "
                f"{self.alpha} and {self.temperature}"
            )
        self.teacher = DistillTeacher(cfg, n_classes, pretrained=pretrained)
        self.student_f = DistillStudent(cfg, n_classes, "fundus", pretrained=pretrained)
        self.student_o = DistillStudent(cfg, n_classes, "oct", pretrained=pretrained)
        self.teacher_frozen = False

    def freeze_teacher(self) -> None:
        """Stage 2: the teacher's weights stop training and it stays in eval mode."""
        self.teacher_frozen = True
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> Distillation:
        super().train(mode)
        if self.teacher_frozen:
            self.teacher.eval()
        return self

    def grade(self, x: Inputs) -> ModelOutput:
        has_f, has_o, labels = x.has_f, x.has_o, x.labels
        both = has_f & has_o
        # the teacher reads only the complete eyes (the other rows' logits are never used)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.teacher_frozen):
            teacher = self.teacher.grade(Inputs(x.fundus, x.oct, both, both, None)).logits
        stud_f = self.student_f(x.fundus, has_f)
        stud_o = self.student_o(x.oct, has_o)
        teacher = teacher.to(stud_f.dtype)
        routed = torch.where(has_f[:, None], stud_f, stud_o.to(stud_f.dtype))
        logits = torch.where(both[:, None], teacher, routed)
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
                    ce = ce + F.cross_entropy(student, labels.reshape(-1)[both])
            # per-batch mean over all eyes, like the engine's CE, so the weights are comparable
            share = both.float().mean()
            aux = share * (self.alpha * t * t * kd + (1.0 - self.alpha) * ce)
            stats["distill_kl"] = float(kd.detach())
            stats["student_ce"] = float(ce.detach())
        return ModelOutput(logits, aux, stats)


class OnlineDistillation(EyeModel):
    """The former ``distillation`` (before the two-stage protocol of :class:`Distillation`):
    kept only so that models saved with it still load (``load_model`` picks it by the state
    dict's keys). A complete-data teacher and two single-modality students on shared encoders.

    The teacher (an MLP on both features)
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
