"""Gradient-combination methods as pure, jittable functions of gradient rows.

The rows are usually task gradients (the train step's per-slot gradients of
the shared parameters), but nothing assumes so: instance-wise risk
minimisation (:mod:`mtljax.instance_wise`) passes one row per example. Every
method here returns an update direction ``d = sum_j beta_j g_j`` whose
weights ``beta`` are computable from the Gram matrix ``K = G G^T`` alone
(``G [T, D]``: one row per task gradient of the shared parameters). So each
method is written once as ``NAME_weights(K, [rng | factor,] *, hyper-parameters) ->
(beta, info)`` and exposed as ``NAME(G, [rng,] *, hyper-parameters) -> (d, beta,
info)``, where ``G`` is a ``[T, D]`` matrix or a pytree whose leaves have a
leading task axis (``K`` is then summed over leaves, never materialising the
concatenated Jacobian). ``info`` is a dict of scalars that says whether an
iterative solver converged (no method silently degrades to another; a caller
decides what to do with ``converged == False``).

:data:`REGISTRY` holds one :class:`GramMethod` record per method (what its
weight function takes besides ``K``; its hyper-parameters, the weight
function's keyword-only parameters, ``config.objective.NAME.PARAM``);
:func:`direction` runs any of them by name, and each has a public function of
the same name generated from its record. The train step's objectives
(:mod:`mtljax.objectives`) are built from the registry. Adding a gradient
method is one weight function and one record.

The package, one concept a module: :mod:`.algebra` (Gram and cosine
matrices, the cosine factor), :mod:`.solvers` (simplex, min-norm, box QPs,
Jacobi), the method families :mod:`.min_norm` (MGDA, CAGrad),
:mod:`.projections` (PCGrad), :mod:`.equal_cosine` (IMTL-G, ConFIG),
:mod:`.alpha_fair` (Nash-MTL, FairGrad), :mod:`.aligned` (Aligned-MTL),
:mod:`.dual_cone` (UPGrad, DualProj), :mod:`.robust` (Krum), and :mod:`.registry`.

Solvers run in JAX on the device, on the cosine matrix ``C`` of the gradients
(:func:`cosine_gram`: ``K = diag(n) C diag(n)``) where the method allows, so
that gradients whose norms differ by 100x cost no float32 precision: exact
support / active-set enumeration for the small QPs at small T (MGDA's min-norm
point; UPGrad's and DualProj's dual-cone projections; CAGrad's dual, face by
face in closed form), Wolfe's active-set
algorithm (MGDA) or FISTA (the dual-cone QPs; CAGrad's dual, on the simplex)
beyond, damped Newton (Nash-MTL, FairGrad), Jacobi eigenpairs (Aligned-MTL),
a spectral pseudo-inverse of ``C`` (IMTL-G, ConFIG). Every ``converged`` test
is relative (to the optimum's scale, plus float rounding).

Scaling conventions (stated per method, as the papers' code does them):

* ``mgda``: ``beta`` on the simplex (sums to 1): ``d`` is the min-norm point of
  the convex hull of the gradients (Sener & Koltun 2018, no normalisation).
* ``mgda_ub``: MGDA's solver applied to ``G_Z [T, ...]``, the task gradients
  with respect to the shared *representation* ``Z = f(x; theta^sh)`` of one
  batch that every task labels (Sener & Koltun 2018, section 3.3, the upper
  bound ``||dZ/dtheta^sh|| ||grad_Z L||``); ``d`` is then a direction in
  ``Z``-space, which the train step back-propagates once through the trunk.
* ``pcgrad``: ``d = sum_i g_i^PC`` (a *sum* over tasks, Yu et al. 2020).
* ``cagrad``: ``d = (g0 + c ||g0|| g_w / ||g_w||) / (1 + c^2)`` with ``g0`` the
  *mean* gradient (Liu et al. 2021, official code's ``rescale=1``).
* ``imtl_g``: ``beta`` sums to 1 (Liu et al. 2021, IMTL-G).
* ``nash_mtl``: ``beta`` solves ``K beta = 1 / beta`` (Navon et al. 2022); no
  normalisation.
* ``aligned_mtl``: ``beta = 1^T B`` with ``B = sigma_min V Lambda^{-1/2} V^T``
  (Senushkin et al. 2023, uniform task weights).
* ``upgrad``: ``beta = sum_i w^(i)``, the projections of ``g_i / T`` onto the
  dual cone (Quinton & Rey 2024, TorchJD's mean weighting); ``dualproj``: the
  projection of the mean.
* ``config``: ``d = (sum_i g_i . u) u`` with ``u`` the unit equal-cosine
  direction (Liu et al. 2024, the code's ``ProjectionLength``).
* ``fairgrad``: ``beta = T w`` with ``(K w)_i = w_i^{-1/alpha}`` (Ban & Ji 2024,
  the code's ``n_tasks`` factor).
* ``krum``: ``beta = 1/m`` on the ``m = n_selected`` rows of lowest Krum score
  (Blanchard et al. 2017; TorchJD's ``Krum``): ``d`` is one row (``m = 1``) or
  the mean of ``m``, on the rows' own scale. It needs ``T >= n_byzantine + 3``
  rows (:attr:`GramMethod.min_rows`).

Not every method is a function of ``K``: TorchJD's ``TrimmedMean`` is
coordinate-wise, so it is an objective that reads the rows themselves
(:func:`mtljax.objectives.stateful.trimmed_mean`), as GradDrop is.
"""

from mtljax.gradients.algebra import combine
from mtljax.gradients.algebra import cosine_factor
from mtljax.gradients.algebra import cosine_gram
from mtljax.gradients.algebra import gram
from mtljax.gradients.aligned import aligned_mtl_weights
from mtljax.gradients.alpha_fair import fairgrad_weights
from mtljax.gradients.alpha_fair import nash_mtl_weights
from mtljax.gradients.dual_cone import dualproj_weights
from mtljax.gradients.dual_cone import upgrad_weights
from mtljax.gradients.equal_cosine import config_weights
from mtljax.gradients.equal_cosine import imtl_g_weights
from mtljax.gradients.min_norm import cagrad_weights
from mtljax.gradients.min_norm import mgda_weights
from mtljax.gradients.projections import pcgrad_orders
from mtljax.gradients.projections import pcgrad_weights
from mtljax.gradients.robust import krum_weights
from mtljax.gradients.robust import pairwise_sq_distances
from mtljax.gradients.registry import direction
from mtljax.gradients.registry import get
from mtljax.gradients.registry import GramMethod
from mtljax.gradients.registry import public_function
from mtljax.gradients.registry import register
from mtljax.gradients.registry import reserve
from mtljax.gradients.registry import REGISTRY
from mtljax.gradients.solvers import jacobi_eigh
from mtljax.gradients.solvers import jacobi_factor_eigh
from mtljax.gradients.solvers import largest_eigenvalue
from mtljax.gradients.solvers import min_norm_active_set
from mtljax.gradients.solvers import min_norm_exact
from mtljax.gradients.solvers import minimize_on_simplex
from mtljax.gradients.solvers import project_simplex

# One public function per registered method: ``NAME(grads, [rng,] *, **hp)``.
mgda = public_function(REGISTRY["mgda"])
pcgrad = public_function(REGISTRY["pcgrad"])
cagrad = public_function(REGISTRY["cagrad"])
imtl_g = public_function(REGISTRY["imtl_g"])
nash_mtl = public_function(REGISTRY["nash_mtl"])
aligned_mtl = public_function(REGISTRY["aligned_mtl"])
upgrad = public_function(REGISTRY["upgrad"])
dualproj = public_function(REGISTRY["dualproj"])
config = public_function(REGISTRY["config"])
fairgrad = public_function(REGISTRY["fairgrad"])
krum = public_function(REGISTRY["krum"])
mgda_ub = public_function(REGISTRY["mgda"], "mgda_ub", rows="rep_grads", doc=(
    "MGDA-UB (Sener & Koltun 2018, sec. 3.3): MGDA's min-norm weights on the task "
    "gradients with respect to the shared representation ``rep_grads`` (``[T, B, F]``, "
    "``[T, D]`` or a pytree with task axis 0). Returns ``(d_Z, beta [T], info)``, "
    "``d_Z`` a direction in representation space."))
