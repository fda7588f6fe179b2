"""Optimal transport for RIMA: label-constrained entropic Gromov-Wasserstein + the feature step.

Why it is written directly in torch rather than calling OTT or POT: the OT step runs on every
training batch, on the training device, on detached features. The authors' route (OTT-JAX called
eagerly, numpy round trips, the feature Sinkhorn solved twice in float64) costs ~10 s per batch
on a CPU; the same math here costs a fraction of a second, and never leaves the device except for
a convergence test every few iterations (see ``benchmarks/speed.py``).

API (shaped like POT's)
-----------------------
Solvers: :func:`sinkhorn` (entropic OT for a given cost, POT's ``ot.sinkhorn`` convention),
:func:`labeled_gw` (label-constrained entropic GW), :func:`feature_coupling` (the co-OT feature
step). Each takes ``log``: with ``log=True`` it returns ``(T, log_dict)``, the dict holding at
least ``SOLVER_LOG_KEYS``. Costs and marginals: :func:`scaled_sqdist`, :func:`feature_cost`,
:func:`class_marginals`; :func:`gw_energy` evaluates a coupling. Inputs are torch tensors or numpy
arrays; results come back in the caller's type, device and dtype.

Resources are explicit. *Threads:* every solver takes ``num_threads``; by default problems of
at most ``SMALL_PROBLEM_ENTRIES`` entries (labeled GW at batch sizes) run on one thread and
larger ones (the feature step) on torch's current count — see
:func:`resources._thread_policy` for why, and for the caveat that ``torch.set_num_threads`` is
process-global (restored on exit).
*Memory:* the feature step keeps its two large scratch matrices in a :class:`Workspace`
(``DEFAULT_WORKSPACE`` unless the caller passes one). There is no other module state.

Conventions (shared by both solvers)
------------------------------------
*Cost scaling.* Every cost matrix is divided by its maximum, so its entries lie in [0, 1].
*Epsilon.* ``epsilon`` is relative to the maximum of the scaled cost, i.e. the Gibbs kernel is
``exp(-C / (epsilon * max C_scaled)) = exp(-C / epsilon)`` on the max-scaled cost: a value of
5e-3 means the same amount of blur whatever the scale of the features. For GW the kernel of each
outer step is built from the linearised cost ``L(T) = C_x² p 1ᵀ + 1 qᵀ C_z² − 2 C_x T C_zᵀ``
(the square-loss decomposition of Peyré et al. 2016); with max-scaled ``C_x, C_z`` and a coupling
of mass 1, ``L(T)`` again lies in [0, 1]. This is OTT's convention (OTT linearises with
``L(T)``); POT's entropic GW builds its kernel from the *gradient* ``2 L(T)``, so POT's
``epsilon`` equals ``2 * epsilon`` here — and, for ``entropic_fused_gromov_wasserstein`` with
weight ``alpha`` (kernel ``exp(-(2 alpha L(T) + (1 - alpha) M) / epsilon_pot)``),
``epsilon_pot = 2 * alpha * epsilon``. The tests check this against POT to ~1e-11 in float64.
For the feature step the kernel is ``exp(-M / epsilon)`` on the max-scaled cost, exactly POT's
``ot.sinkhorn(a, b, M, reg=epsilon)``.

Class masses (labeled GW)
-------------------------
Mass may only move between samples of the same label, and the problem is solved *jointly* over
all classes with the 0/1 same-label mask in the kernel. (One GW problem per class is a different
problem: it drops the cross-class terms of the GW energy.) The two sides generally have
different class counts, so uniform marginals would be infeasible; instead each class ``c``
present on both sides receives a total mass ``w_c`` on each side, spread uniformly over that
class's samples. A class present on one side only gets zero mass (its rows or columns of ``T``
are exactly zero). ``class_mass="share"`` (default) sets ``w_c`` to the mean of the class's
share among the shared-class samples of ``x`` and of ``z`` — it reduces to uniform marginals when
both sides have the same class proportions; ``class_mass="uniform"`` gives every shared class
the same mass.

Numerics
--------
Float32 is enough. Before the single ``exp`` the log-kernel is shifted by its row maxima and then
its column maxima (equivalently the cost by row minima, then column minima), so every kernel
entry lies in (0, 1] with a 1 in every row and column and the scaling form of Sinkhorn neither
overflows nor loses a row. When the scalings leave ``[1/L, L]`` (small epsilon: the optimal
duals lie many epsilon away from that shift) they are absorbed into the kernel, which is rebuilt
(stabilised Sinkhorn, Schmitzer 2019). Only if the iterates still stop being finite is the solve
repeated with log-domain updates (``logsumexp`` with ``-inf`` on masked entries), which cannot
produce NaN — but cost an ``exp`` over the whole matrix per iteration. Masked entries of the
kernel are exact zeros, so cross-label mass is exactly 0.0.

Speed of the feature step (6144 × 2048 at the paper's shapes) is memory traffic: the cost is one
matrix product of augmented factors, the shift and scaling are done in place, the exponent is
floored just above float underflow (``exp`` of underflowing arguments takes a slow path), the
two large scratch matrices are reused across calls (:class:`Workspace`), and the Sinkhorn
updates are over-relaxed (``relax``), which halves the iterations there. On the CPU, large
matrices are allocated through numpy (transparent huge pages, :func:`resources._empty`), and
the kernel's ``exp`` and column minima use numpy's faster single-pass routines.

Stopping rules
--------------
Every Sinkhorn solve stops when the L1 error of *both* marginals of its iterate is <= its
tolerance (:func:`kernel._sinkhorn_kernel`), tested every ``check_every`` iterations: by
default on the CPU every iteration for large problems and every 3rd for small ones (a test costs
a few vector ops there), every 5-10 on an accelerator, where each is a host sync
(:func:`options._check_interval`).
The defaults are what a training step needs, no tighter: couplings within L1 1e-3 of their
marginals and a GW energy within 2 % of a tight solve (``labeled_gw``: ``tol = inner_tol =
1e-3``; measured within 0.1 % of a float64 solve to 1e-10 at the paper's and the default
shapes, see ``benchmarks/results/ot_speed.md``). Pass tighter tolerances for exact class
masses.

Layout
------
One module per part, each importing only the ones above it: ``inputs`` (conversion and
validation, :class:`OTInputError`), ``resources`` (scratch memory and threads), ``costs``
(distances, class marginals, the GW energy), ``kernel`` (Sinkhorn on a shifted log-kernel, the
core all solvers share), ``options`` (the option checks and defaults of every solver), then the
solvers: ``entropic`` (:func:`sinkhorn`), ``gw`` (:func:`labeled_gw`), ``features``
(:func:`feature_coupling`). Import from the package: it re-exports the API below.
"""

from __future__ import annotations

from .costs import CLASS_MASS_RULES, class_marginals, gw_energy, scaled_sqdist
from .entropic import sinkhorn
from .features import _feature_log_kernel, feature_cost, feature_coupling
from .gw import _gw_inputs, _gw_problem, labeled_gw
from .inputs import ArrayLike, OTInputError
from .kernel import _build_kernel, _solve
from .options import (
    CHECK_EVERY_ACCELERATOR,
    CHECK_EVERY_CPU,
    CHECK_EVERY_CPU_SMALL,
    SOLVER_LOG_KEYS,
    _check_interval,
)
from .resources import (
    DEFAULT_WORKSPACE,
    HUGE_PAGE_BYTES,
    SMALL_PROBLEM_ENTRIES,
    Workspace,
    _col_min,
    _empty,
    _exp_,
    _thread_policy,
    clear_workspace,
)

__all__ = [
    "CHECK_EVERY_ACCELERATOR",
    "CHECK_EVERY_CPU",
    "CHECK_EVERY_CPU_SMALL",
    "CLASS_MASS_RULES",
    "DEFAULT_WORKSPACE",
    "HUGE_PAGE_BYTES",
    "SMALL_PROBLEM_ENTRIES",
    "SOLVER_LOG_KEYS",
    "ArrayLike",
    "OTInputError",
    "Workspace",
    "class_marginals",
    "clear_workspace",
    "feature_cost",
    "feature_coupling",
    "gw_energy",
    "labeled_gw",
    "scaled_sqdist",
    "sinkhorn",
]

# Not API: the parts benchmarks/speed.py times one by one and the tests check directly, kept
# under the names they had when this package was one module (``rima_core.core.ot._empty``).
__all__ += [
    "_build_kernel",
    "_check_interval",
    "_col_min",
    "_empty",
    "_exp_",
    "_feature_log_kernel",
    "_gw_inputs",
    "_gw_problem",
    "_solve",
    "_thread_policy",
]
