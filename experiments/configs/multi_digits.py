r"""Two-task MultiMNIST-style digits (left digit, right digit) from scikit-learn.

    python -m experiments.main --config=experiments/configs/multi_digits.py \
        --workdir=/tmp/mtljax/multi_digits

Any architecture: ``--config.model.arch=independent|multi_head|concat|additive|
multiplicative``. Quick variant (under a minute on 2 CPU cores):
``--config=experiments/configs/multi_digits.py:quick``.

Expected (CNN, multi_head, 3000 steps, seed 0): test accuracy about 0.9 on
both tasks (chance 0.1); see BUILD_NOTES.md for measured numbers.
"""

from experiments.configs import common


# What --config=FILE:ARG accepts (listed by `python -m experiments.main --list`).
VARIANTS = ("", "quick")


def get_config(arg: str = ""):
  c = common.base_config()
  c.data.name = "multi_digits"
  c.model.arch = "multi_head"
  c.model.encoder = "cnn"
  c.model.channels = (16, 32)
  c.model.hidden = (128,)
  c.sampling.examples_per_task = 64
  c.optim.lr = 3e-3
  c.total_steps = 3000
  c.log_steps = 250
  c.eval_steps = 1000
  c.checkpoint_steps = 1000
  if arg == "quick":
    c.data.builder_config = "n3000_m600_s0"
    c.model.channels = (8, 16)
    c.model.hidden = (64,)
    c.total_steps = 400
    c.log_steps = 100
    c.eval_steps = 200
    c.checkpoint_steps = 200
  elif arg:
    raise ValueError(f"multi_digits config: unknown variant {arg!r}; use '' or 'quick'.")
  return c
