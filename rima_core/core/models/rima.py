"""RIMA: align fundus and OCT features with labeled optimal transport, stand in for a missing
modality with its translation from the present one, and fuse asymmetrically.

One training step (docs/method.md):

1. encode the present modalities (only the rows that have them; batch order is kept) and
   standardise each modality's features with running statistics (model buffers),
2. class-wise OT: a label-constrained entropic GW coupling ``T`` (n_f × n_o) between the
   standardised fundus features of eyes with a fundus photo and the standardised OCT features of
   eyes with an OCT volume (not necessarily the same eyes: the data may be unpaired), on
   detached float32 features; each side also holds the features of the last ``ot.bank_size``
   eyes of that modality from earlier batches of the epoch (targets only, see :meth:`_with_bank`),
3. translators ``g_fo`` / ``g_of`` trained with a cosine loss towards OT targets (barycentric
   projection of ``T``), in the standardised spaces,
4. feature-wise OT: ``T_v`` (d_o × d_f) given ``T``, kept as a running estimate in a buffer,
5. asymmetric fusion: OCT branch = MLP over [OCT, predicted OCT]; fundus branch = a transformer
   block over [fundus, OCT mapped by ``T_v``, predicted fundus]; classifier on both,
6. missing-modality paths trained on purpose: for every eye that has both modalities, the fusion
   is also run with the fundus replaced by its translation from the OCT and with the OCT
   replaced by its translation from the fundus; each such path gets cross-entropy and a
   consistency term towards the (detached) full prediction,
7. after training (not a training step): the weights ``path_weights`` with which a complete eye's
   prediction combines the log-probabilities of its three paths (full, fundus-only, OCT-only)
   are fitted on the validation split (:func:`rima_core.runs.calibration.calibrate_paths`).

Why standardise: encoder features are non-negative (ReLU/GELU outputs), so raw cosine similarity
between any two of them is high and a cosine loss is satisfied by matching the mean direction
alone; the squared-Euclidean costs of both OT problems are likewise dominated by the common
mean. Centred, unit-variance features make the translation loss and the feature coupling respond
to what differs between eyes.

Why cross-entropy does not train the translators: their job is to predict the other modality's
feature; if the classifier's gradient reached them they would become a second classifier and the
alignment (and ``T_v``, which is estimated from the same features) would stop meaning anything.
The encoders still receive cross-entropy through the translated features.

Why the explicit missing paths: with modality dropout alone only a small share of training eyes
(dropout rate × 1/2 per modality) ever takes a missing path, and the head learns to lean on the
stronger modality; a fused model that has the fundus then grades worse than a fundus-only model.

Why combine the paths for complete eyes: the full path sees both real modalities, and when one of
them is weak its encoder fits the training labels (a 3-D encoder memorises a few hundred volumes
easily), so on training data the weak modality looks reliable and the fusion leans on it; on new
eyes the full path then grades worse than its own fundus-only path. The two single-modality paths
are trained on purpose (step 6) and their errors differ, so a log-linear pool of the three
(a product of experts; with weights 0/1/1 it is the Bayes combination of two conditionally
independent views) is more accurate than any one of them. The weights must be fitted on eyes the
network did not train on (on training eyes the over-fitted full path would win), hence the
validation split, after model selection, like the temperature. Default ``(1, 0, 0)`` is the full
path alone, which is what training uses and what older models do.

Nothing is ever grouped by label, so row i of every tensor is eye i throughout (the authors'
release regrouped samples by label and fused translations with the wrong eye).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from rima_core.core import ot

from .common import (
    DEFAULT_PATH_WEIGHTS,
    MLP,
    PATHS,
    EyeModel,
    Inputs,
    ModelOutput,
    PathPooling,
    RunningStandardizer,
    build_encoders,
    checked_dropout,
    encode_present,
    zero_loss,
)
from .spec import RimaConfig

log = logging.getLogger(__name__)

OT_TARGETS = ("barycentric", "sample")
__all__ = ["DEFAULT_PATH_WEIGHTS", "OT_TARGETS", "PATHS", "RIMA"]


class OctBranch(nn.Module):
    """MLP over [OCT feature, OCT predicted from fundus] (both standardised)."""

    def __init__(self, d_o: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm_real = nn.LayerNorm(d_o)
        self.norm_pred = nn.LayerNorm(d_o)
        self.mlp = nn.Sequential(
            nn.Linear(2 * d_o, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.out_dim = hidden

    def forward(self, o: torch.Tensor, pred_o: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.norm_real(o), self.norm_pred(pred_o)], dim=1))


class FundusBranch(nn.Module):
    """One transformer block over three d_f tokens, mean-pooled.

    The tokens are [fundus feature, OCT feature in fundus space, fundus predicted from OCT]; a
    learned type embedding tells the block which is which (attention alone is order-blind).
    """

    def __init__(self, d_f: int, heads: int, dropout: float) -> None:
        super().__init__()
        if d_f % heads:
            raise ValueError(f"model.fundus_dim={d_f} must be divisible by model.heads={heads}")
        self.token_type = nn.Parameter(torch.randn(3, d_f) * 0.02)
        self.block = nn.TransformerEncoderLayer(
            d_model=d_f,
            nhead=heads,
            dim_feedforward=2 * d_f,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.norm = nn.LayerNorm(d_f)
        self.out_dim = d_f

    def forward(self, f: torch.Tensor, o_in_f: torch.Tensor, pred_f: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack([f, o_in_f, pred_f], dim=1) + self.token_type  # (B, 3, d_f)
        return self.norm(self.block(tokens).mean(dim=1))


class RIMA(PathPooling, EyeModel):
    """RIMA, its ablations and its OT controls (one class; the switches of its
    :class:`RimaConfig`):

    - ``class_ot=False`` (``rima_no_class_ot``): no GW. The translators' targets come from the
      *pairing* coupling (mass 1/n_pairs between the two features of each eye that has both
      modalities), i.e. plain paired regression; unpaired eyes get no translation loss. ``T_v``
      is still estimated, from that pairing, so only the class-wise OT is ablated.
    - ``feature_ot=False`` (``rima_no_feature_ot``): no ``T_v``. The OCT token of the fundus
      branch is a learned linear map d_o -> d_f instead, so the architecture (three tokens) and
      capacity stay comparable and only the OT estimate of the map is ablated.
    - ``missing_paths=False`` (``rima_no_missing_paths``): neither the explicit missing-modality
      paths nor modality dropout; the missing path is then trained only by the eyes that really
      lack a modality.
    - ``translators=False`` (``rima_no_translators``, with ``class_ot`` and ``feature_ot`` off):
      the control without any OT. No translators: a missing modality (in the data, dropped by
      modality dropout, or hidden on a complete eye's missing path) is a learned token per
      modality (``missing_fundus``, ``missing_oct``: parameters in the standardised feature
      space, trained by cross-entropy), and the fusion's "predicted" inputs are those tokens.
      No class-wise OT and no translation loss (the coupling's only use is the translators'
      targets). ``T_v`` is off as well, replaced by the learned linear map of
      ``rima_no_feature_ot``: estimated from the pairing it would still be an OT component,
      and the control is meant to measure what all the OT parts add together. Same encoders,
      standardisation, fusion (three tokens), path training and path pooling as ``rima``.
    - ``gw=False`` (``rima_flat_coupling``): the translators' targets come from the flat
      within-class coupling (:meth:`flat_coupling`: each row's mass spread evenly over the
      other side's rows of its class, with GW's class masses), so a fundus row's barycentric
      target is the mean of the batch's same-class OCT features and vice versa; ``T_v`` is
      estimated from that coupling. Everything else as ``rima``: what the GW structure adds
      beyond class means.
    """

    def __init__(self, cfg: RimaConfig, n_classes: int, *, pretrained: bool = True) -> None:
        super().__init__()
        if cfg.target not in OT_TARGETS:
            raise ValueError(f"ot.target must be one of {OT_TARGETS}, got {cfg.target!r}")
        d_f, d_o, hidden = cfg.fundus_dim, cfg.oct_dim, cfg.hidden_dim
        paths = cfg.missing_paths
        self.cfg = cfg
        self.class_ot = cfg.class_ot
        self.feature_ot = cfg.feature_ot
        self.translators = cfg.translators
        self.modality_dropout = checked_dropout(cfg.modality_dropout if paths else 0.0)
        self.path_weight = cfg.missing_path_weight if paths else 0.0
        self.consistency_weight = cfg.consistency_weight if paths else 0.0
        # the product full path needs single paths trained to stand alone (full_logits)
        self.product = cfg.full_path == "product" and paths

        self.fundus_encoder, self.oct_encoder = build_encoders(cfg, pretrained)
        self.fundus_stats = RunningStandardizer(d_f)
        self.oct_stats = RunningStandardizer(d_o)
        if cfg.translators:
            self.g_fo = MLP(d_f, hidden, d_o)  # standardised fundus -> standardised OCT
            self.g_of = MLP(d_o, hidden, d_f)  # standardised OCT -> standardised fundus
        else:  # rima_no_translators: a learned stand-in per modality (class docstring)
            self.missing_fundus = nn.Parameter(torch.randn(d_f) * 0.02)
            self.missing_oct = nn.Parameter(torch.randn(d_o) * 0.02)
        if cfg.feature_ot:
            # Initialised to the independent coupling 1/(d_o·d_f), the coupling of "no
            # knowledge"; the first OT estimate replaces it outright (_update_feature_coupling).
            self.register_buffer("T_v", torch.full((d_o, d_f), 1.0 / (d_o * d_f)))
            self.register_buffer("T_v_updates", torch.zeros((), dtype=torch.long))
            self.oct_to_fundus = None
        else:
            self.oct_to_fundus = nn.Linear(d_o, d_f, bias=False)
        self.fundus_branch = FundusBranch(d_f, cfg.heads, cfg.dropout)
        self.oct_branch = OctBranch(d_o, hidden, cfg.dropout)
        d_cat = self.fundus_branch.out_dim + self.oct_branch.out_dim
        self.head = nn.Sequential(
            nn.LayerNorm(d_cat), nn.Dropout(cfg.dropout), nn.Linear(d_cat, n_classes)
        )
        # fitted after training (module docstring, step 7); saved with the weights
        self.init_path_weights()
        # training-only memory of recent (features, labels) per modality (_with_bank)
        self.bank: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def train(self, mode: bool = True) -> RIMA:
        """Also empties the feature bank: it never holds features from before a validation, and
        an epoch that resumes from a checkpoint sees the bank an uninterrupted one saw."""
        self.bank = {}
        return super().train(mode)

    # ---------------------------------------------------------------------------------------
    # features and fusion

    def encode(
        self, fundus: torch.Tensor, oct: torch.Tensor, has_f: torch.Tensor, has_o: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised features of the present modalities (zeros where absent).

        In training the running statistics are first updated with this batch's present rows.
        """
        f = encode_present(self.fundus_encoder, fundus, has_f)
        o = encode_present(self.oct_encoder, oct, has_o)
        if self.training:
            self.fundus_stats.update(f[has_f])
            self.oct_stats.update(o[has_o])
        zf, zo = torch.zeros_like(f), torch.zeros_like(o)
        f = torch.where(has_f[:, None], self.fundus_stats(f), zf)
        o = torch.where(has_o[:, None], self.oct_stats(o), zo)
        return f, o

    def translate(self, translator: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``translator(x)`` with the translator's weights frozen for this call: the classifier's
        gradient reaches ``x`` (the encoders) but not the translator (module docstring)."""
        params = {k: v.detach() for k, v in translator.named_parameters()}
        return functional_call(translator, params, (x,))

    def oct_in_fundus_space(self, o: torch.Tensor) -> torch.Tensor:
        """Map standardised OCT features to fundus space with the feature coupling.

        Column-normalised ``T_v`` makes each fundus dimension j the T_v-weighted average of the
        OCT dimensions coupled to it (a barycentric projection in feature space); normalising by
        the actual column sums keeps it right when the Sinkhorn marginals are only approximately
        met.
        """
        if self.oct_to_fundus is not None:
            return self.oct_to_fundus(o)
        tv = self.T_v / self.T_v.sum(dim=0, keepdim=True).clamp_min(
            torch.finfo(self.T_v.dtype).tiny
        )
        return o @ tv.to(o.dtype)

    def fuse(
        self, f: torch.Tensor, o: torch.Tensor, has_f: torch.Tensor, has_o: torch.Tensor
    ) -> torch.Tensor:
        """Logits from standardised features; a missing modality is its translation.

        The "predicted" inputs are always translations; for an eye missing a modality they are
        the round trip through the other. Without translators (``rima_no_translators``) a
        missing modality and every "predicted" input are the learned missing-modality tokens.
        """
        if not self.translators:
            tok_f = self.missing_fundus.to(f.dtype).expand_as(f)
            tok_o = self.missing_oct.to(o.dtype).expand_as(o)
            f_used = torch.where(has_f[:, None], f, tok_f)
            o_used = torch.where(has_o[:, None], o, tok_o)
            z_f = self.fundus_branch(f_used, self.oct_in_fundus_space(o_used), tok_f)
            z_o = self.oct_branch(o_used, tok_o)
            return self.head(torch.cat([z_f, z_o], dim=1))
        f_used = torch.where(has_f[:, None], f, self.translate(self.g_of, o))
        pred_o = self.translate(self.g_fo, f_used)
        o_used = torch.where(has_o[:, None], o, pred_o)
        pred_f = self.translate(self.g_of, o_used)
        z_f = self.fundus_branch(f_used, self.oct_in_fundus_space(o_used), pred_f)
        z_o = self.oct_branch(o_used, pred_o)
        return self.head(torch.cat([z_f, z_o], dim=1))

    def single_paths(self, f: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the fundus-only and the OCT-only path of complete eyes ``f``, ``o``."""
        ones = torch.ones(f.shape[0], dtype=torch.bool, device=f.device)
        return self.fuse(f, o, ones, ~ones), self.fuse(f, o, ~ones, ones)

    def full_logits(
        self, head: torch.Tensor, fundus_only: torch.Tensor, oct_only: torch.Tensor
    ) -> torch.Tensor:
        """A complete eye's full-path logits from its fused head and its two single paths.

        ``model.full_path="head"`` (default): the fused head alone, as the paper and older
        models. ``"product"``: ``head + log p_fundus_only + log p_oct_only`` with the product
        held fixed (detached) in the full path's loss. The product of two single-modality
        predictions is the Bayes combination of conditionally independent views, and the
        fused head is trained to add what it misses; the single paths are trained by their own
        terms only, as with the head alone. Why it exists: with the head alone, validation
        pooling put weight 0 on the full path in 2 of 3 benchmark seeds (the head, fitted on
        training eyes where the memorised OCT looks reliable, graded new eyes worse than the
        product of its own single paths). Measured on the default phantom (3 seeds, selection on
        the pooled prediction), neither is better beyond noise; the benchmark compares them.
        """
        if not self.product:
            return head
        product = F.log_softmax(fundus_only.float(), dim=1) + F.log_softmax(oct_only.float(), dim=1)
        return (head.float() + product.detach()).to(head.dtype)

    def grade(self, x: Inputs) -> ModelOutput:
        stats: dict[str, float] = {}
        paired = x.has_f & x.has_o  # in the data, before modality dropout
        x = self.dropped(x, stats)
        has_f, has_o = x.has_f, x.has_o
        f, o = self.encode(x.fundus, x.oct, has_f, has_o)
        logits = self.fuse(f, o, has_f, has_o)
        both = has_f & has_o
        idx = both.nonzero().flatten()
        singles = None
        if self.product and idx.numel():
            singles = self.single_paths(f.index_select(0, idx), o.index_select(0, idx))
            full = self.full_logits(logits.index_select(0, idx), *singles)
            logits = logits.index_copy(0, idx, full)

        aux = zero_loss(f)
        if self.training and x.labels is not None:
            labels = x.labels.reshape(-1)
            if self.translators:
                aux = self._alignment(f, o, has_f, has_o, labels, stats)
            paired_share = float(paired.float().mean())  # a host sync: training only
            aux = aux + self._missing_paths(f, o, idx, paired_share, labels, logits, singles, stats)
        logits = self.pool_paths(f, o, both, logits)
        return ModelOutput(logits=logits, aux_loss=aux, stats=stats)

    # ---------------------------------------------------------------------------------------
    # complete eyes: the pooled paths (module docstring, step 7)

    def path_log_probs(self, f: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """(paths, B, K) log-probabilities of the paths in :data:`PATHS`, every row treated as
        complete (so only rows that have both modalities mean anything)."""
        ones = torch.ones(f.shape[0], dtype=torch.bool, device=f.device)
        fundus_only, oct_only = self.single_paths(f, o)
        logits = {
            "full": self.full_logits(self.fuse(f, o, ones, ones), fundus_only, oct_only),
            "fundus_only": fundus_only,
            "oct_only": oct_only,
        }
        return torch.stack([F.log_softmax(logits[p].float(), dim=1) for p in PATHS])

    def pool_paths(
        self, f: torch.Tensor, o: torch.Tensor, both: torch.Tensor, full_logits: torch.Tensor
    ) -> torch.Tensor:
        """``full_logits`` with the rows of complete eyes replaced by ``Σ_k w_k log p_k``.

        With the default weights (the full path alone) the logits are returned untouched, so
        training and older models compute exactly what they did before the pooling existed.
        """
        return self.pooled(
            full_logits,
            both,
            lambda idx: self.path_log_probs(f.index_select(0, idx), o.index_select(0, idx)),
        )

    @torch.no_grad()
    def complete_eye_log_probs(self, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(paths, n, K) path log-probabilities of the batch's complete eyes, and their rows;
        what :func:`rima_core.runs.calibration.calibrate_paths` fits the weights on."""
        f, o = self.encode(x.fundus, x.oct, x.has_f, x.has_o)
        idx = (x.has_f & x.has_o).nonzero().flatten()
        return self.path_log_probs(f.index_select(0, idx), o.index_select(0, idx)), idx

    # ---------------------------------------------------------------------------------------
    # training objectives

    def _missing_paths(
        self,
        f: torch.Tensor,
        o: torch.Tensor,
        idx: torch.Tensor,
        paired_share: float,
        labels: torch.Tensor,
        full_logits: torch.Tensor,
        singles: tuple[torch.Tensor, torch.Tensor] | None,
        stats: dict[str, float],
    ) -> torch.Tensor:
        """Cross-entropy + consistency of the fundus-only and OCT-only paths of complete eyes.

        The consistency term (KL of each path's prediction from the detached full prediction)
        teaches a path what the full model would say, not only the hard label.

        ``idx`` are the rows of the complete eyes (after modality dropout); ``singles`` their
        fundus-only and OCT-only logits when the full path already computed them.

        Both terms are means over the complete eyes (after modality dropout) times
        ``paired_share``, the share of the batch's eyes that have both modalities in the data.
        So each complete eye's paths weigh about as much as one eye's main cross-entropy (a
        mean over the whole batch), and the eyes modality dropout hid are compensated, as
        inverted dropout rescales; in a batch whose eyes all have both modalities the share is
        1 and the terms are the plain means. Without the share, a batch with 3 complete eyes of
        32 (mostly unpaired training data) gave those 3 eyes the weight of the whole batch's
        cross-entropy, and training stalled at chance for half the epoch budget.
        """
        if self.path_weight <= 0 or idx.numel() == 0:
            return zero_loss(f)
        f, o, y = f.index_select(0, idx), o.index_select(0, idx), labels.index_select(0, idx)
        target = F.log_softmax(full_logits.index_select(0, idx).detach().float(), dim=1)
        if singles is None:
            singles = self.single_paths(f, o)
        # a share of 1.0 multiplies exactly: an all-paired batch trains as before this weighting
        w_ce, w_kl = paired_share * self.path_weight, paired_share * self.consistency_weight
        total = zero_loss(f)
        for name, path_logits in zip(("fundus", "oct"), singles, strict=True):
            logp = F.log_softmax(path_logits.float(), dim=1)
            ce = F.nll_loss(logp, y)
            kl = F.kl_div(logp, target, log_target=True, reduction="batchmean")
            stats[f"path_ce_{name}_only"] = float(ce.detach())
            total = total + w_ce * ce + w_kl * kl
        return total

    def _alignment(
        self,
        f: torch.Tensor,
        o: torch.Tensor,
        has_f: torch.Tensor,
        has_o: torch.Tensor,
        labels: torch.Tensor,
        stats: dict[str, float],
    ) -> torch.Tensor:
        """Sample coupling -> translation losses (returned, weighted) and the ``T_v`` update."""
        idx_f = has_f.nonzero().flatten()
        idx_o = has_o.nonzero().flatten()
        if idx_f.numel() == 0 or idx_o.numel() == 0:
            stats["ot_skipped"] = 1.0
            return zero_loss(f)
        # The OT sees detached float32 features even under autocast: its kernels exponentiate
        # costs over epsilon, which half precision cannot represent.
        fd = f.detach().index_select(0, idx_f).float()
        od = o.detach().index_select(0, idx_o).float()
        device = f.device
        start = time.perf_counter()
        lf, lo = labels.index_select(0, idx_f), labels.index_select(0, idx_o)
        nf, no = fd.shape[0], od.shape[0]
        mix = self.cfg.pairing_mix
        class_ot = self.class_ot and mix < 1.0  # pairing_mix 1: rima_no_class_ot's coupling
        fa, lfa, oa, loa = fd, lf, od, lo  # what the coupling reaches: batch (+ bank)
        if class_ot and self.cfg.bank_size > 0:
            fa, lfa = self._with_bank("fundus", fd, lf)
            oa, loa = self._with_bank("oct", od, lo)
        with torch.autocast(device_type=device.type, enabled=False):
            if class_ot and not self.cfg.gw:
                T = self.flat_coupling(lfa, loa, fd.dtype)
            elif class_ot:
                T, info = ot.labeled_gw(fa, lfa, oa, loa, epsilon=self.cfg.gw_epsilon)
                stats["gw_iterations"] = float(info["iterations"])
                stats["gw_marginal_error"] = float(info["marginal_error"])
                stats["gw_converged"] = float(info["converged"])
            else:
                T = self._pairing_coupling(has_f, has_o, fd.dtype)
            if class_ot and mix > 0.0:
                T = self.mixed_coupling(T, self._pairing_coupling(has_f, has_o, fd.dtype), mix)
            has_mass = bool(T.sum() > 0)
            if has_mass and self.feature_ot:
                self._update_feature_coupling(oa, fa, T)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats["ot_seconds"] = time.perf_counter() - start
        if not has_mass:
            # No class shared by the two sides (or no paired eye): nothing to align to.
            stats["ot_skipped"] = 1.0
            return zero_loss(f)

        # Translator inputs are detached: the alignment loss trains the translators only, so it
        # cannot pull the encoders towards a collapsed, trivially-translatable embedding.
        loss_fo, rows_fo = self._translation_loss(self.g_fo, fd, oa, T[:nf])
        loss_of, rows_of = self._translation_loss(self.g_of, od, fa, T.T[:no])
        stats["translation_loss_fo"] = float(loss_fo.detach())
        stats["translation_loss_of"] = float(loss_of.detach())
        stats["ot_rows_aligned"] = (rows_fo + rows_of) / (fd.shape[0] + od.shape[0])
        return self.cfg.loss_weight * (loss_fo + loss_of)

    def _with_bank(
        self, modality: str, x: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (this batch's rows first) followed by the bank's rows, and the bank updated to
        the last ``ot.bank_size`` rows of both. Why: with few eyes of a class on one side of a
        batch (rare grades, scarcely paired data) the coupling's target for a row is one or two
        eyes' features, or nothing when the class is absent there; the bank gives every class
        several eyes on both sides. Its features are detached and slightly stale (earlier
        batches of this epoch), like a memory queue of contrastive learning."""
        old = self.bank.get(modality)
        if old is not None and old[0].shape[1:] == x.shape[1:]:
            xa, la = torch.cat([x, old[0]]), torch.cat([labels, old[1]])
        else:
            xa, la = x, labels
        keep = self.cfg.bank_size
        self.bank[modality] = (xa[:keep].detach(), la[:keep])
        return xa, la

    @staticmethod
    def mixed_coupling(T: torch.Tensor, pairing: torch.Tensor, mix: float) -> torch.Tensor:
        """``(1 - mix) T + mix P``: the class-wise coupling ``T`` (batch rows first, then the
        bank's) blended with the pairing coupling ``P`` of the batch's rows (``ot.pairing_mix``).

        Why: where pairing is scarce and grades are few per batch, the class-wise targets can
        be noisier than the few true partners (on unseen data the ablation without class-wise
        OT was sometimes better); a mixing weight lets validation, through tune, move between
        the paper's coupling (0) and the ablation's (1). Both have total mass 1, so the blend is
        again a coupling; a paired row's barycentric target becomes the mass-weighted mean of
        its class-wise target and its own partner. A batch without a paired eye keeps ``T``.
        """
        if not bool(pairing.sum() > 0):
            return T
        padded = F.pad(
            pairing, (0, T.shape[1] - pairing.shape[1], 0, T.shape[0] - pairing.shape[0])
        )
        return (1.0 - mix) * T + mix * padded.to(T.dtype)

    @staticmethod
    def _pairing_coupling(
        has_f: torch.Tensor, has_o: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """Mass 1/n_pairs between the fundus row and the OCT row of each eye that has both."""
        pos_f = torch.cumsum(has_f.long(), 0) - 1  # row of eye i among the encoded fundus rows
        pos_o = torch.cumsum(has_o.long(), 0) - 1
        paired = has_f & has_o
        T = torch.zeros(int(has_f.sum()), int(has_o.sum()), dtype=dtype, device=has_f.device)
        n_pairs = int(paired.sum())
        if n_pairs:
            T[pos_f[paired], pos_o[paired]] = 1.0 / n_pairs
        return T

    @staticmethod
    def flat_coupling(
        labels_f: torch.Tensor, labels_o: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """The flat within-class coupling (``rima_flat_coupling``): ``T_ij = p_i q_j / w_c``
        for rows i, j of one class c and 0 across classes, with the per-class balanced
        marginals ``p, q`` and class masses ``w_c`` that the GW coupling has
        (:func:`rima_core.core.ot.class_marginals`). It is the product coupling inside each class
        (GW's coupling as epsilon grows), so a row's barycentric target is the mean of the
        other side's rows of its class; a row whose class is absent there has no mass."""
        mask, p, q = ot.class_marginals(labels_f, labels_o, dtype=dtype)
        mask = mask.to(dtype)
        class_mass = (mask * q[None, :]).sum(dim=1, keepdim=True)  # w_c of row i's class
        T = mask * p[:, None] * q[None, :]
        return torch.where(class_mass > 0, T / class_mass.clamp_min(torch.finfo(dtype).tiny), 0)

    def translation_targets(
        self, T: torch.Tensor, tgt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """OT target of each source row with mass, and the indices of those rows.

        Target = barycentric projection ``T tgt / T1`` (``ot.target="barycentric"``) or one
        target row drawn from ``T``'s row (``"sample"``). Rows without mass (their class is
        absent on the other side) have no target.
        """
        mass = T.sum(dim=1)
        keep = (mass > 1e-6 * mass.max()).nonzero().flatten()
        Tk, mk = T.index_select(0, keep), mass.index_select(0, keep)
        if self.cfg.target == "sample":
            target = tgt.index_select(0, torch.multinomial(Tk / mk[:, None], 1).flatten())
        else:
            target = (Tk @ tgt) / mk[:, None]
        return target, keep

    def _translation_loss(
        self, translator: nn.Module, src: torch.Tensor, tgt: torch.Tensor, T: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """Cosine loss of ``translator(src)`` towards the OT target of each source row."""
        if not bool((T.sum(dim=1) > 0).any()):
            return zero_loss(src), 0
        target, keep = self.translation_targets(T, tgt)
        pred = translator(src.index_select(0, keep))
        loss = (1.0 - F.cosine_similarity(pred.float(), target, dim=1)).mean()
        return loss, int(keep.numel())

    @torch.no_grad()
    def _update_feature_coupling(self, od: torch.Tensor, fd: torch.Tensor, T: torch.Tensor) -> None:
        """Fold this batch's feature coupling into the running ``T_v``.

        The first estimate replaces the uniform initialisation (a bias correction: otherwise the
        uninformative start would dominate for ~1/(1-momentum) batches); later ones are averaged
        with ``ot.feature_momentum``. A convex combination of couplings with the same uniform
        marginals is again such a coupling.
        """
        tv = ot.feature_coupling(od, fd, T.T, epsilon=self.cfg.feature_epsilon)
        if not bool(torch.isfinite(tv).all()):
            log.warning("feature-wise OT returned non-finite values; T_v not updated this batch")
            return
        m = self.cfg.feature_momentum if int(self.T_v_updates) > 0 else 0.0
        self.T_v.mul_(m).add_(tv.to(self.T_v.dtype), alpha=1.0 - m)
        self.T_v_updates += 1
