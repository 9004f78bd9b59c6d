r"""MMoE's synthetic correlation sweep (Ma et al., KDD 2018, section 3.2).

    python -m experiments.main --config=experiments/configs/mmoe_sweep.py \
        --workdir=/tmp/mtljax/mmoe_sweep

Two regression tasks whose label correlation is set by p in {1.0, 0.9, 0.8,
0.5}; for each p and data set (``sweep.data_seeds``: the generator's seed,
which also draws its sine parameters) the models ``shared_bottom``, ``omoe``,
``mmoe`` and ``independent`` train ``num_seeds`` initialisation seeds as one
vmapped program, with a similar parameter budget (8 experts of 16 units vs a
128-unit shared bottom vs two 64-unit networks; towers of 8 units), and report
the test MSE per task. Writes ``sweep.json`` as ``{p: {model: [test MSE per
run]}}`` (mean over the two tasks; per-task values and mean +- s.e. per data
set in ``summary.json``) and ``mmoe_sweep.png`` (test MSE vs p, mean +- s.e.).
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
  c.model.num_experts = 8
  c.model.tower = (8,)
  c.sampling.examples_per_task = 128
  c.optim.lr = 1e-3
  c.total_steps = 3000
  c.steps_per_call = 100
  c.log_steps = 1000
  c.eval_steps = c.checkpoint_steps = 3000

  c.sweep = ml_collections.ConfigDict()
  c.sweep.correlations = (1.0, 0.9, 0.8, 0.5)
  c.num_seeds = 20                # initialisation seeds per data set (one program)
  c.sweep.data_seeds = (0, 1, 2)  # data sets (generator seeds)
  c.sweep.models = ("shared_bottom", "omoe", "mmoe", "independent")
  c.sweep.num_train = 10_000
  c.sweep.num_test = 2_000
  c.sweep.expert_hidden = (16,)
  c.sweep.bottom_hidden = (128,)
  c.sweep.independent_hidden = (64,)
  if arg == "quick":
    c.sweep.correlations = (1.0, 0.5)
    c.sweep.data_seeds = (0,)
    c.num_seeds = 2
    c.sweep.num_test = 1_000
    c.total_steps = 600
    c.log_steps = c.eval_steps = c.checkpoint_steps = 600
  return c
