r"""Cityscapes (7- or 19-class segmentation and depth at 128x256) from MTAN's
preprocessed files, which the user downloads (README: "Dense prediction"):

    python -m experiments.main --config=experiments/configs/cityscapes.py \
        --config.data.root=/data/cityscapes --workdir=/tmp/mtljax/cityscapes

``--config.data.classes=19`` reads ``label_19``; ``--config.data.label_folder=label``
LibMTL's copy. The training set-up of the scenes config (a fully convolutional
multi_head; any objective).
"""

from experiments.configs import scenes

VARIANTS = ("",)


def get_config(arg: str = ""):
  if arg:
    raise ValueError(f"cityscapes config: unknown variant {arg!r}; it has none.")
  c = scenes.get_config("full")
  c.data.name, c.data.builder_config, c.data.classes = "cityscapes_mtan", "", 7
  c.sampling.examples_per_task = 64  # MTAN's Cityscapes batch size
  c.optim.lr = 1e-4
  c.eval_batch_size = 64
  return c
