"""Multi-task objectives: how per-task losses (and gradients) become one update.

The lecture's objective is ``sum_i w_i L_i(theta, D_i)``; in a step it is taken
over the K sampled task slots: ``sum_k w[task_ids[k]] * L_k`` -- a *sum*, not a
mean, so a task's gradient is exactly its own weighted gradient (a single-task
run of the same task sees the same gradient).

**The interface.** Every method is an :class:`Objective`: what it needs the step
to linearise (``needs``: the weighted-sum gradient, per-slot shared gradients,
or per-slot representation gradients; :mod:`mtljax.jacobians`), a pure
``gradients(lin, inputs) -> Result`` (the value, the update's gradient, the new
state, measurements), an ``after_update`` hook (run after the optimizer step),
and its state and per-task parameters, whose keys are fixed by ``init_state`` /
``init_params``. :func:`make_objective` is the one place a method is chosen
by name; :data:`REGISTRY` maps the names of the objectives that are not a
gradient method's to factories whose keyword-only parameters are the method's
hyper-parameters (``mgda_ub`` and ``imtl`` take MGDA's and IMTL-G's,
``registry.HPARAMS_OF``), and every registered gradient method
(:data:`mtljax.gradients.REGISTRY`) is an objective too (:func:`methods`;
:func:`hyperparameters`, exposed as ``config.objective.NAME.PARAM``).

Methods (``config.objective.method``):

* ``fixed``: the weighted sum with fixed weights ``config.objective.weights``
  (a mapping task name -> weight; unnamed tasks weigh 1); one backward pass.
* loss weightings (``needs == "sum"``: each multiplies the fixed weights; the
  shared gradient is the pullback of ``d objective / d L``):

  - ``rlw`` (Lin et al. 2022): every step ``lambda = softmax(z)``, ``z ~ N(0, I_T)``;
    objective ``sum_k w lambda L_k`` (weights sum to 1 over the task set).
  - ``dwa`` (Liu et al. 2019): ``lambda_i = T softmax_i(r_i / tau)`` with
    ``r_i = Lbar_i(n-1) / Lbar_i(n-2)``, the ratio of task i's mean loss over the
    last two *windows* of ``window_steps`` steps (the paper's epochs);
    ``lambda = 1`` until two windows are complete. With task sampling, a task
    absent from a window keeps its previous mean, and a task not yet sampled
    before the window two back has ratio 1.
  - ``uncertainty`` (Kendall et al. 2018, in LibMTL's form for every task kind):
    ``sum_k w (L_k / (2 exp(s_t)) + s_t / 2)`` with learnable ``s = log sigma^2``,
    a per-task parameter at ``tasks/uncertainty/log_var`` (so unsampled tasks'
    ``s`` do not move). For fixed L the optimum is ``s = log L``.
  - ``min_max``: the worst sampled task, ``max_k w L_k`` (its subgradient).
  - ``famo`` (Liu et al. 2023, the authors' ``famo.py``): ``z = softmax(xi)``,
    ``D = L - L_min + 1e-8``, objective ``sum_k z log(D_k) / c`` with
    ``c = stop_gradient(sum_k z / D_k)``; the shared gradient is clipped to
    global norm ``max_norm`` (1.0; 0 disables); after the optimizer step
    the losses on the *same batch* give ``delta = log D_before - log D_after``
    and ``xi`` takes an Adam step (lr ``w_lr`` 0.025, L2 decay ``gamma`` 0.01
    added to the gradient, as torch's Adam does) on ``J_softmax(xi)^T delta``.
    Costs one extra forward pass per step.

* ``gradnorm`` (Chen et al. 2018, Algorithm 1): learnable task weights ``w``
  (init 1); the network trains on ``sum_k w_t L_k``; with
  ``G_i = w_i ||grad_W L_i||`` on the last shared layer ``W`` matching
  ``layer`` (a regex over ``shared/...``-relative paths; default the last
  dense kernel of the trunk or of the experts, ``experts/level_L/layer_J/kernel``
  for cgc), ``r_i = Ltilde_i / mean(Ltilde)`` where
  ``Ltilde_i = L_i / L_i(first step task i was sampled)``, the weights take an
  Adam step (``w_lr``) on ``grad_w sum_i |G_i - stop_gradient(mean(G) r_i^alpha)|``
  (``alpha`` 1.5), only for sampled tasks (one Adam state per task), and are
  then renormalised to sum to T.
* gradient combination, :data:`mtljax.gradients.REGISTRY`
  (``mgda``, ``pcgrad``, ``cagrad``, ``imtl_g``, ``nash_mtl``,
  ``aligned_mtl``, ``upgrad``, ``dualproj``, ``config`` (ConFIG), ``fairgrad``,
  ``krum``):
  the per-slot gradients of the *shared* parameters,
  ``G [K, ...]`` (row k is the gradient of ``w[task_ids[k]] L_k``), come from the
  step's one linearisation; the method turns their Gram matrix into weights
  ``beta`` and the direction is ``sum_k beta_k g_k`` (see :mod:`mtljax.gradients`
  for each method's scaling). Task-specific parameters get their own plain
  gradients (of the weighted sum).

  ``gram_path`` picks how the direction is formed: ``"jacobian"`` (default)
  combines the per-slot gradients ``[K, D]``; ``"accumulate"`` uses them only to
  reduce ``G G^T`` (each parameter's per-slot gradients are freed as the
  backward produces them), then gets the direction from one more backward of
  ``sum_k beta_k w L_k`` through the same linearisation -- every method here
  needs only ``G G^T``, so both paths give the same update in exact
  arithmetic. In float32 the spectral methods (``imtl_g``, ``config``,
  ``aligned_mtl``) resolve more on the Jacobian path: there they decompose
  the rows' triangular factor (:func:`mtljax.gradients.cosine_factor`,
  condition ``sqrt(cond(C))``) rather than the Gram matrix, and so stay exact
  on nearly opposite or nearly collinear gradients where ``accumulate`` flags
  ``converged=False``.
* ``mgda_ub`` (Sener & Koltun 2018, MGDA-UB): MGDA's weights from the per-slot
  gradients with respect to the shared representation ``Z`` (the output of the
  model's task-independent part), which needs every slot to see the same inputs
  (``config.sampling.shared_inputs=True``) and an architecture with a
  task-independent part (:attr:`mtljax.models.multitask.Model.encode`); then
  one backward of ``sum_k beta_k w L_k`` through the trunk.
* stateful and gradient-transforming methods (:mod:`.stateful`, arithmetic
  and objectives; each factory's docstring gives the recipe):
  ``gradvac`` (Wang et al. 2021: target cosines per task pair by EMA, state
  ``targets [T, T]``), ``graddrop`` (Chen et al. 2020: sign-purity dropout of
  the representation gradients; needs shared inputs like ``mgda_ub``),
  ``db_mtl`` (Lin et al. 2023), ``moco`` (Fernando et al. 2023) and
  ``excess_mtl`` (He et al. 2024), whose state holds per-task gradients
  ``[T, ...shared]`` (:func:`bind_shared`), ``imtl`` (Liu et al. 2021: IMTL-L's
  learned scales at ``tasks/imtl/log_scale`` with IMTL-G), the
  scalarisations ``gls`` (Chennupati et al. 2019, geometric mean) and ``stch``
  (Lin et al. 2024, smooth Tchebycheff with a warm-up for the nadir), and
  TorchJD's ``trimmed_mean`` (Yin et al. 2018: coordinate-wise, so it reads
  the per-slot gradients, not their Gram matrix) and ``cr_mogm`` (Zhou et al.
  2022: MGDA's weights smoothed across steps, state ``lambda [T]``).
* stochastic methods with double sampling (:mod:`.double_sampling`): ``modo``
  (Chen et al. 2023: ``lambda`` by projected SGD on ``J_1 J_2^T lambda``,
  the model along ``J_3^T lambda``) and ``sdmgrad`` (Xiao et al. 2023:
  direction-oriented MGDA regularised toward the mean gradient, its own
  projected-SGD inner solve). Each step reads three independent mini-batches
  of its tasks (:attr:`Objective.draws`; the step draws them,
  :func:`mtljax.data.sampling.sample_draws`), linearised as ``3 K`` slots.
* bilevel weighting (:mod:`.bilevel`): ``auto_lambda`` (Liu, Davison & Johns
  2022: ``lambda`` by Adam on the meta-gradient of the primary tasks' loss on
  a second batch through one look-ahead SGD step, exact by autodiff or the
  authors' finite difference). Two draws per step: the train and the meta
  batch, both from the training data as in the authors' trainers.
  ``moml`` (Ye et al. 2021, as LibMTL's trainer runs it: logits ``alpha``
  of softmax task weights take an Adam step along MGDA's min-norm
  combination of every task's exact hypergradient -- its outer-batch loss
  through one look-ahead SGD step on the inner batch; the model steps on a
  third batch). Three draws per step.
  ``forum`` (Ye et al. 2024, as LibMTL's trainer runs it: first order; the
  model and ``alpha`` move along ``sum_t lambda_t g_F_t / |g_F_t| + nu g_q``,
  ``g_q`` the gradient of the gap to a few inner SGD steps, the weights
  from LibMTL's QP and an EMA). Two draws per step.

**Slots a method needs.** :attr:`Objective.min_slots` (Krum's
``n_byzantine + 3``, the trimmed mean's ``2 trim_number + 1``) is checked by
the train step against ``sampling.tasks_per_step`` before anything is traced.

**State shaped like the parameters.** An objective whose state holds per-task
gradients declares ``init_shared_state(shared) -> dict`` instead of
``init_state``; :func:`bind_shared` fixes its shapes from the shared
parameters (a no-op for every other method), after which its state's keys and
shapes are fixed like any other's and the step checks them.

The package, one family a module: :mod:`.base` (the interface),
:mod:`.weightings` (loss weightings and scalarisations), :mod:`.gram`
(gradient methods in the step, MGDA-UB), :mod:`.gradnorm`, :mod:`.stateful`,
:mod:`.double_sampling`, :mod:`.bilevel` and :mod:`.registry`.
"""

from mtljax.objectives.base import bind_shared
from mtljax.objectives.base import Inputs
from mtljax.objectives.base import Objective
from mtljax.objectives.base import Result
from mtljax.objectives.gradnorm import gradnorm_init
from mtljax.objectives.gradnorm import gradnorm_update
from mtljax.objectives.gram import GRAM_PATHS
from mtljax.objectives.gram import gram_combiner
from mtljax.objectives.gram import without_absent_slots
from mtljax.objectives.registry import check_hyperparameters
from mtljax.objectives.registry import check_method
from mtljax.objectives.registry import hyperparameters
from mtljax.objectives.registry import make_objective
from mtljax.objectives.registry import methods
from mtljax.objectives.registry import needs
from mtljax.objectives.registry import REGISTRY
from mtljax.objectives.weightings import loss_weighting
from mtljax.objectives.weightings import rlw_weights
from mtljax.objectives.weightings import weighted_sum
