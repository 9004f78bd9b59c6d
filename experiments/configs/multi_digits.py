r"""Two-task MultiMNIST-style digits (left digit, right digit) from scikit-learn.

    python -m experiments.main --config=experiments/configs/multi_digits.py \
        --workdir=/tmp/mtljax/multi_digits

Any architecture: ``--config.model.arch=independent|multi_head|concat|additive|
multiplicative``. Quick variant (under a minute on 2 CPU cores):
``--config=experiments/configs/multi_digits.py:quick``.

Expected (CNN, multi_head, 3000 steps, seed 0): test accuracy about 0.9 on
both tasks (chance 0.1); see BUILD_NOTES.md for measured numbers.

``:vit`` (and ``:vit_quick``): the same tasks as patch classification with a
small Vision Transformer (``encoder="vit"``: 4x4 patches of the 12x16 canvases,
12 tokens and the class token, width 64, 2 blocks of 4 heads, MLP 128; the
quick variant: 1,000 steps of 64 examples) and
per-task linear heads on the class token (``multi_head``); Hugging Face
``ViTModel`` weights of these sizes load with ``--config.init_from=model.safetensors``.
Measured (seed 0, 2 CPU cores): ``:vit`` test accuracy 0.79 / 0.82 (left /
right) in about 2.5 minutes, ``:vit_quick`` 0.47 / 0.64 in under a minute.
"""

from experiments.configs import common


# What --config=FILE:ARG accepts (listed by `python -m experiments.main --list`).
VARIANTS = ("", "quick", "vit", "vit_quick")


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
  if arg in ("vit", "vit_quick"):
    c.model.encoder = "vit"
    c.model.patch_size = 4
    c.model.vit_width = 64
    c.model.vit_depth = 2
    c.model.vit_heads = 4
    c.model.vit_mlp_dim = 128
    c.sampling.examples_per_task = 128
    c.optim.lr = 1e-3
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 100
  if arg == "vit_quick":
    c.sampling.examples_per_task = 64
    c.total_steps = 1000
    c.log_steps = 250
    c.eval_steps = 500
    c.checkpoint_steps = 500
  elif arg == "quick":
    c.data.builder_config = "n3000_m600_s0"
    c.model.channels = (8, 16)
    c.model.hidden = (64,)
    c.total_steps = 400
    c.log_steps = 100
    c.eval_steps = 200
    c.checkpoint_steps = 200
  elif arg not in VARIANTS:
    raise ValueError(f"multi_digits config: unknown variant {arg!r}; use one of {VARIANTS}.")
  return c
