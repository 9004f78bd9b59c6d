r"""Two regression tasks with controlled correlation p (Ma et al., KDD 2018).

    python -m experiments.main --config=experiments/configs/mmoe_synthetic.py \
        --workdir=/tmp/mtljax/mmoe_synthetic --config.data.builder_config=p0.5

Quick variant: ``--config=experiments/configs/mmoe_synthetic.py:quick``.

Expected (multi_head MLP, p=0.9, 3000 steps): test MSE well below each task's
label variance (the ``mse`` of predicting the train mean); see BUILD_NOTES.md.
"""

from experiments.configs import common


# What --config=FILE:ARG accepts (listed by `python -m experiments.main --list`).
VARIANTS = ("", "quick")


def get_config(arg: str = ""):
  c = common.base_config()
  c.data.name = "mmoe_synthetic"
  c.data.builder_config = "p0.9"
  c.model.arch = "multi_head"
  c.model.encoder = "mlp"
  c.model.hidden = (64, 32)
  c.sampling.examples_per_task = 128
  c.total_steps = 3000
  c.log_steps = 250
  c.eval_steps = 1000
  c.checkpoint_steps = 1000
  if arg == "quick":
    # Fewer examples overfit: with 2,000 the test MSE exceeds the label variance.
    c.data.builder_config = "p0.9_n10000_m1000_s0"
    c.total_steps = 1000
    c.log_steps = 250
    c.eval_steps = 500
    c.checkpoint_steps = 500
  elif arg:
    raise ValueError(f"mmoe_synthetic config: unknown variant {arg!r}; use '' or 'quick'.")
  return c
