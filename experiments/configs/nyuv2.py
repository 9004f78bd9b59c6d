r"""NYUv2 (13-class segmentation, depth, surface normals; 795 train / 654 test
images at 288x384) from MTAN's preprocessed files, which the user downloads
(README: "Dense prediction"):

    python -m experiments.main --config=experiments/configs/nyuv2.py \
        --config.data.root=/data/nyuv2 --workdir=/tmp/mtljax/nyuv2

The training set-up of the scenes config (a fully convolutional multi_head;
any objective), on NYUv2's files: checked and prepared once into
``config.data.data_dir``. The field's backbones (ResNet-dilated + ASPP,
SegNet, MTAN) are not selectable here yet.
"""

from experiments.configs import scenes

VARIANTS = ("",)


def get_config(arg: str = ""):
  if arg:
    raise ValueError(f"nyuv2 config: unknown variant {arg!r}; it has none.")
  c = scenes.get_config("full")
  c.data.name, c.data.builder_config = "nyuv2_mtan", ""
  c.sampling.examples_per_task = 8  # LibMTL's NYUv2 batch size
  c.optim.lr = 1e-4                 # LibMTL's NYUv2 Adam learning rate
  c.eval_batch_size = 16
  return c
