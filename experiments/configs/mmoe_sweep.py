r"""MMoE's synthetic correlation experiment with the paper's protocol (Ma et al.,
KDD 2018, sections 3.2-3.3).

    python -m experiments.main --config=experiments/configs/mmoe_sweep.py \
        --workdir=/tmp/mtljax/mmoe_sweep

Two regression tasks whose label correlation is set by p in {1.0, 0.9, 0.8,
0.5}, with the generator's sine parameters fixed (``sweep.sines_seed``; -1
draws them with each data seed, the old protocol). For each p and model
(``shared_bottom``, ``omoe``, ``mmoe``, ``independent``, ``cgc``, ``ple``,
``dselect_k``, ``mtan``): the learning rate
of ``sweep.lrs`` with the lowest cross-validated MSE (``sweep.cv_folds`` folds
of the first data set's train split), then ``len(sweep.data_seeds) x
num_seeds`` repetitions (data set d with initialisation seeds ``seed ..
seed + num_seeds - 1`` as one vmapped program; the same pairs for every
model). Sizes are parameter-matched to MMoE (``sweep.match_parameters``: the
shared bottom's width, the independent networks' first width, the expert
width of CGC / PLE / DSelect-k and MTAN's trunk width; the independent
networks are ``100 -> H -> 8 -> 1``, the towers' depth).

Writes ``sweep.json``: ``{P: {MODEL: {"train_loss_final": [per repetition],
"train_loss_curve": {"steps", "mean", "se"}, "test_mse": [per repetition]}}}``
(P as "1.0", "0.9", ...), ``summary.json`` (plus paired gaps MODEL - mmoe
for every other model but independent, learning rates, sizes, alpha/beta) and
``mmoe_sweep.png`` (training-loss curves, mean +- s.e., one panel per p).
Variant ``:quick``.
"""

import ml_collections

from experiments.configs import common


# What --config=FILE:ARG accepts (listed by `python -m experiments.main --list`).
VARIANTS = ("", "quick")


def get_config(arg: str = ""):
  if arg not in ("", "quick"):
    raise ValueError(f"mmoe_sweep config: unknown variant {arg!r}; use '' or 'quick'.")
  c = common.base_config()
  c.experiment = "mmoe_sweep"
  c.data.name = "mmoe_synthetic"
  c.model.encoder = "mlp"
  common.set_model_hparam(c, "num_experts", 8)  # mmoe, omoe, dselect_k; cgc / ple: shared
  common.set_model_hparam(c, "tower", (8,))     # every model's towers (independent: depth)
  c.sampling.examples_per_task = 128
  c.optim.lr = 1e-3
  c.total_steps = 3000
  c.steps_per_call = 100
  c.log_steps = 100               # the training-loss curve's points
  c.eval_steps = c.checkpoint_steps = 3000

  c.sweep = ml_collections.ConfigDict()
  c.sweep.correlations = (1.0, 0.9, 0.8, 0.5)
  c.sweep.sines_seed = 2          # fixed alpha, beta (generators.mmoe_sines); -1: per data seed
  c.num_seeds = 10                # initialisation seeds per data set (one program)
  c.sweep.data_seeds = tuple(range(10))  # 10 x 10 = 100 repetitions per (p, model)
  c.sweep.models = ("shared_bottom", "omoe", "mmoe", "independent", "cgc", "ple", "dselect_k",
                    "mtan")
  common.set_model_hparam(c, "task_experts", 1)  # cgc / ple: 8 shared experts + 1 per task
  c.model.ple.num_levels = 2
  c.model.dselect_k.k = 2         # dselect_k: static gates over the 8 experts
  c.sweep.num_train = 10_000
  c.sweep.num_test = 2_000
  c.sweep.expert_hidden = (16,)   # 8 experts of 16 units (the paper's setting)
  c.sweep.match_parameters = True  # bottom / independent widths matched to MMoE's count
  c.sweep.bottom_hidden = (113,)  # used when match_parameters is False
  c.sweep.independent_hidden = (64, 8)
  c.sweep.lrs = (1e-4, 1e-3, 1e-2)  # chosen per (p, model) by cross-validation
  c.sweep.cv_folds = 3
  if arg == "quick":
    c.sweep.correlations = (1.0, 0.5)
    c.sweep.data_seeds = (0, 1)
    c.num_seeds = 2
    c.sweep.num_test = 1_000
    c.sweep.lrs = (1e-3,)
    c.total_steps = 600
    c.eval_steps = c.checkpoint_steps = 600
  return c
