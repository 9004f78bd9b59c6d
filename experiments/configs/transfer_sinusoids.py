r"""Transfer on sinusoids: pretrain one network on many sine tasks pooled (no
task id), then fine-tune on new sine tasks from K = 5 or 10 points.

    python -m experiments.main --config=experiments/configs/transfer_sinusoids.py \
        --workdir=/tmp/mtljax/transfer_sinusoids

Pretraining: ``sinusoids`` with ``transfer.source_tasks`` tasks, a multi_head
MLP with *shared* head (one network, no task descriptor: the pooled problem).
Fine-tuning: ``transfer.target_tasks`` new tasks (another seed) with K train
points each, as an ``independent`` model, so every new task is fine-tuned on
its own copy (initialised from the pooled network by broadcasting). For every
strategy of :data:`mtljax.transfer.STRATEGIES` and K, the test MSE (100 query
points per task, original units) averaged over the new tasks after each of the
first ``transfer.record_steps`` fine-tuning steps. Writes ``summary.json``
``{"results": {K: {STRATEGY: [mse after 0, 1, ... steps]}}, "distance": {K:
{STRATEGY: ||w - w0|| over the body, every task's copy}}, "l2sp_cv": {K:
{"alpha", "beta", "points"}}}`` and ``transfer_sinusoids.png``. Variant ``:quick``.

L2-SP (strategy ``l2sp``, decoupled): ``alpha``, ``beta`` chosen per K by
``transfer.l2sp_cv_folds``-fold cross-validation over ``transfer.l2sp_cv_grid``
on the K train points of the new tasks (validation MSE after the
``record_steps`` budget; 0 folds: the config's or the strategy's 0.01 each).
``l2sp_coupled`` is the coupled form at the default 0.01 each, for comparison.
"""

import ml_collections

from experiments.configs import common
from mtljax import transfer


# What --config=FILE:ARG accepts (listed by `python -m experiments.main --list`).
VARIANTS = ("", "quick")


def get_config(arg: str = ""):
  c = common.base_config()
  c.experiment = "transfer_sinusoids"
  c.data.name = "sinusoids"
  c.data.builder_config = "t100_n50_m50_s0"   # source: 100 tasks
  c.model.arch = "multi_head"
  c.model.heads = "shared"
  c.model.encoder = "mlp"
  c.model.hidden = (40, 40)
  c.sampling.tasks_per_step = 25
  c.sampling.examples_per_task = 10
  c.optim.lr = 1e-3
  c.total_steps = 4000
  c.steps_per_call = 100
  c.log_steps = 500
  c.eval_steps = 2000
  c.checkpoint_steps = 2000

  c.transfer = ml_collections.ConfigDict()
  c.transfer.target_tasks = 20
  c.transfer.target_seed = 1
  c.transfer.shots = (5, 10)        # K train points per new task
  c.transfer.strategies = transfer.STRATEGIES
  c.transfer.finetune_lr = 1e-2
  c.transfer.record_steps = 20      # query MSE after each of these steps
  c.transfer.probe_steps = 10       # lp_ft's linear-probe steps (out of record_steps)
  c.transfer.batch_mult = 4         # examples per step = batch_mult * K (i.i.d. draws)
  # L2-SP's alpha and beta by cross-validation on the K train points (0: off).
  # Decoupled, the pull shrinks w - w0 by lr * alpha per step (lr 1e-2 here):
  # alpha 90 is 0.9 per step (above 1/lr the pull overshoots w0); 0 in the
  # grid lets the selection turn it off.
  c.transfer.l2sp_cv_folds = 5
  c.transfer.l2sp_cv_grid = "l2sp_alpha=0,1,3,10,30,90;l2sp_beta=0,1,10"
  if arg == "quick":
    c.data.builder_config = "t30_n50_m50_s0"
    c.sampling.tasks_per_step = 10
    c.total_steps = 800
    c.log_steps = 400
    c.eval_steps = 800
    c.checkpoint_steps = 800
    c.transfer.target_tasks = 8
    c.transfer.record_steps = 10
    c.transfer.probe_steps = 5
    c.transfer.l2sp_cv_grid = "l2sp_alpha=0,3,30,90;l2sp_beta=0,10"
  elif arg:
    raise ValueError(f"transfer_sinusoids config: unknown variant {arg!r}; use '' or "
                     "'quick'.")
  return c
