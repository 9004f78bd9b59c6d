r"""A family of sine regression tasks y = A sin(x - phi), one network conditioned
on the task id (concatenation) by default.

    python -m experiments.main --config=experiments/configs/sinusoids.py \
        --workdir=/tmp/mtljax/sinusoids

Ten of the 20 tasks are sampled uniformly per step. Quick variant:
``--config=experiments/configs/sinusoids.py:quick``.

Expected (concat MLP 40-40, 5000 steps): mean test MSE far below the mean
label variance A^2/2 (about 4.2); see BUILD_NOTES.md.
"""

from experiments.configs import common


# What --config=FILE:ARG accepts (listed by `python -m experiments.main --list`).
VARIANTS = ("", "quick")


def get_config(arg: str = ""):
  c = common.base_config()
  c.data.name = "sinusoids"
  c.model.arch = "concat"
  c.model.encoder = "mlp"
  c.model.hidden = (40, 40)
  common.set_model_hparam(c, "cond_layers", (0, 1))  # concat / additive / multiplicative
  c.sampling.tasks_per_step = 10
  c.sampling.examples_per_task = 25
  c.total_steps = 5000
  c.log_steps = 500
  c.eval_steps = 2500
  c.checkpoint_steps = 2500
  if arg == "quick":
    c.data.builder_config = "t8_n50_m50_s0"
    c.sampling.tasks_per_step = 4
    c.total_steps = 600
    c.log_steps = 200
    c.eval_steps = 300
    c.checkpoint_steps = 300
  elif arg:
    raise ValueError(f"sinusoids config: unknown variant {arg!r}; use '' or 'quick'.")
  return c
