"""Transfer learning: fine-tuning strategies as config, L2-SP, and the pieces
the transfer experiments share.

A fine-tuning run is an ordinary run with ``config.init_from=DIR`` (another
run's workdir): its parameters are loaded by slash path
(:func:`mtljax.checkpoint.load_params`) except those matching
``config.init_dont_load`` (regexes, ``;``-separated), which keep their fresh
initial values -- typically the new task's head. The source run's data is never
read.

Strategies (:data:`STRATEGIES`, :func:`apply_strategy` edits a config):

* ``scratch``: no ``init_from`` (the baseline).
* ``full_ft``: everything trains (with the fine-tuning run's own, typically
  smaller, learning rate).
* ``linear_probe``: only the head trains (every other parameter frozen).
* ``lp_ft``: a linear probe, then full fine-tuning from the probed head
  (Kumar et al. 2022); two runs, see :func:`lp_ft_stages`.
* ``layerwise_decay``: ``lr * decay^(L - l)`` per layer group (ULMFiT 1/2.6).
* ``gradual_unfreezing``: one layer group unfrozen from the top every N steps.
* ``head_kept``: full fine-tuning keeping the pretrained head (shapes must
  match: the same output size).
* ``l2sp``: full fine-tuning with ``alpha/2 ||w - w0||^2`` on the loaded
  parameters and ``beta/2 ||w||^2`` on the fresh ones (Li et al. 2018), in
  ``config.l2sp_mode``'s form (default decoupled, below);
* ``l2sp_coupled``: the same in the coupled form (the penalty in the loss).

``l2sp`` and ``l2sp_coupled`` keep ``config.l2sp_alpha`` / ``l2sp_beta`` when
set, else take 0.01 each (:data:`L2SP_DEFAULT`). Their effect depends on
the network, the learning rate and the number of steps (in transfer_sinusoids
0.01 changes nothing measurable), so the transfer experiments choose them by
cross-validation on the target's train split (:func:`l2sp_cv_config`).

L2-SP's two forms (``config.l2sp_mode``, :data:`L2SP_MODES`):

* ``"decoupled"`` (the default): after the optimizer's scaling (Adam's), the
  update gets ``- lr (alpha (w - w0))`` on loaded parameters and ``- lr beta w``
  on fresh ones, as AdamW decouples weight decay (Loshchilov & Hutter 2019);
  ``lr`` is the parameter's scheduled, rule-multiplied learning rate
  (:class:`mtljax.optim.DecoupledL2SP`). Under SGD without momentum this *is*
  the paper's update; under Adam it keeps the paper's regulariser (the same
  pull on every coordinate), where the coupled penalty's gradient is divided
  by Adam's per-coordinate scale -- on a fresh head ``beta w / sqrt(v)`` is
  close to ``sign(w)`` for any ``beta`` while the loss gradient is small.
* ``"coupled"``: the penalty is added to the loss (:func:`l2sp_penalty`, via
  :func:`mtljax.steps.add_penalties`) and its gradient goes through the
  optimizer with the loss's: the paper's objective, logged as ``train/penalty``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtljax import params as params_lib

STRATEGIES = ("scratch", "full_ft", "linear_probe", "lp_ft", "layerwise_decay",
              "gradual_unfreezing", "head_kept", "l2sp", "l2sp_coupled")
HEAD = r"heads/"  # the dont_load / trainable pattern of a model's heads
L2SP_MODES = ("decoupled", "coupled")
L2SP_DEFAULT = 0.01  # alpha and beta of the l2sp strategies when the config sets neither


def l2sp_penalty(loaded_mask, alpha: float, beta: float):
  """``penalty(params, anchor)``: ``alpha/2 sum ||w - w0||^2`` over loaded
  leaves plus ``beta/2 sum ||w||^2`` over fresh ones (``loaded_mask``: a tree of
  Python bools like ``params``)."""
  def penalty(params, anchor):
    def one(is_loaded, w, w0):
      if is_loaded:
        return 0.5 * alpha * jnp.sum(jnp.square(w - w0))
      return 0.5 * beta * jnp.sum(jnp.square(w))
    return sum(jax.tree.leaves(jax.tree.map(one, loaded_mask, params, anchor)))
  return penalty


def l2sp_kind(dont_load, objective_name: str):
  """``kind(path)`` of decoupled L2-SP (:class:`mtljax.optim.DecoupledL2SP`):
  ``"fresh"`` for a parameter matching a ``dont_load`` regex (``re.search``, as
  :func:`mtljax.checkpoint.load_params`), ``"loaded"`` for any other, ``None``
  for the objective's own parameters (``tasks/<objective_name>/...``, not the
  model's). Parameters missing from the checkpoint are checked for after
  loading (:func:`check_l2sp_loaded`)."""
  patterns = [re.compile(p) for p in dont_load if p]
  own = f"tasks/{objective_name}/"

  def kind(path: str):
    if path.startswith(own):
      return None
    return "fresh" if any(p.search(path) for p in patterns) else "loaded"
  return kind


def check_l2sp_loaded(kind, report: dict) -> None:
  """Raises unless ``kind`` calls ``"loaded"`` exactly the parameters loading
  loaded (``report``: :func:`mtljax.checkpoint.load_params`'s)."""
  missing = [n for n in report["fresh_missing"] if kind(n) == "loaded"]
  if missing:
    raise ValueError(f"decoupled L2-SP (config.l2sp_mode='decoupled') pulls every parameter "
                     f"not matching config.init_dont_load toward its loaded value, but "
                     f"{missing} are not in the checkpoint: add them to config.init_dont_load "
                     "(fresh: beta decay) or use config.l2sp_mode='coupled'.")


def apply_strategy(config: ml_collections.ConfigDict, strategy: str, *, source: str,
                   unfreeze_every: int = 0, head_lr_mult: float = 1.0
                   ) -> ml_collections.ConfigDict:
  """A copy of ``config`` set up for ``strategy`` from the run at ``source``
  (``lp_ft`` gives its *first* stage; see :func:`lp_ft_stages`).

  ``head_lr_mult`` multiplies the head's learning rate (a rule ``heads/``
  placed before any other), e.g. to train a fresh head faster than the
  pretrained body; 1.0 adds no rule.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy {strategy!r} is not one of {STRATEGIES}.")
  c = ml_collections.ConfigDict(config.to_dict())
  if strategy == "scratch":
    c.init_from = ""
    return c
  c.init_from = source
  c.init_dont_load = "" if strategy == "head_kept" else HEAD
  head_rule = f"{HEAD}:lr_mult={head_lr_mult:g}"
  if strategy in ("linear_probe", "lp_ft"):
    c.optim.rules = f"{head_rule};.*:frozen"
  elif head_lr_mult != 1.0:
    # A catch-all keeps every other parameter at lr x1 unless generated rules
    # (layer-wise decay, unfreezing) follow, which then must cover the rest.
    generated = strategy in ("layerwise_decay", "gradual_unfreezing")
    c.optim.rules = head_rule if generated else f"{head_rule};.*:"
  if strategy == "layerwise_decay":
    c.optim.layerwise_decay = c.optim.layerwise_decay or 1.0 / 2.6
  elif strategy == "gradual_unfreezing":
    c.optim.unfreeze_every = unfreeze_every or max(1, c.total_steps // 4)
  elif strategy in ("l2sp", "l2sp_coupled"):
    if not (c.l2sp_alpha or c.l2sp_beta):
      c.l2sp_alpha = c.l2sp_beta = L2SP_DEFAULT
    if strategy == "l2sp_coupled":
      c.l2sp_mode = "coupled"
  return c


def l2sp_cv_config(config: ml_collections.ConfigDict, *, folds: int, grid: str,
                   metric: str) -> ml_collections.ConfigDict:
  """``config`` (an ``l2sp`` run from :func:`apply_strategy`) set up for
  :func:`mtljax.cv.cross_validate` over ``grid`` (``"l2sp_alpha=...;l2sp_beta=..."``)
  with ``folds`` folds of its train split, scored by validation ``metric``
  after its ``total_steps``, at its learning rate."""
  if folds < 2:
    raise ValueError(f"L2-SP cross-validation needs folds >= 2, got {folds}.")
  keys = {part.partition("=")[0].strip() for part in grid.split(";") if part.strip()}
  if not keys or not keys <= {"l2sp_alpha", "l2sp_beta"}:
    raise ValueError(f"L2-SP cross-validation grid {grid!r} must set l2sp_alpha and/or "
                     "l2sp_beta only (e.g. 'l2sp_alpha=0,1,10;l2sp_beta=0,1').")
  c = ml_collections.ConfigDict(config.to_dict())
  c.cv.folds, c.cv.grid, c.cv.metric = folds, grid, metric
  c.cv.lr, c.cv.steps = (), (c.total_steps,)
  return c


def body_distance(params, source) -> float:
  """``||w - w0||`` over the parameters outside the heads that the pretrained
  ``source`` holds (by slash path; a per-task stack ``tasks/P`` against a
  source ``shared/P``, every row): how far fine-tuning moved the body."""
  src = dict(params_lib.flatten_with_names(source))
  total = 0.0
  for name, w in params_lib.flatten_with_names(params):
    if re.search(HEAD, name):
      continue
    w0 = src.get(name, src.get("shared/" + name[len("tasks/"):]) if name.startswith(
        "tasks/") else None)
    if w0 is None:
      continue
    total += float(np.sum(np.square(np.asarray(w, np.float64) - np.asarray(w0, np.float64))))
  return float(np.sqrt(total))


def lp_ft_stages(config, *, source: str, probe_workdir: str, probe_steps: int,
                 head_lr_mult: float = 1.0):
  """The two configs of LP-FT: a linear probe from ``source`` for
  ``probe_steps``, then full fine-tuning from the probe's run (head kept)."""
  probe = apply_strategy(config, "lp_ft", source=source, head_lr_mult=head_lr_mult)
  probe.total_steps = probe_steps
  for key in ("log_steps", "eval_steps", "checkpoint_steps", "steps_per_call"):
    probe[key] = min(probe[key], probe_steps)
  ft = apply_strategy(config, "full_ft", source=probe_workdir, head_lr_mult=head_lr_mult)
  ft.init_dont_load = ""  # keep the probed head
  return probe, ft
