r"""Dense scene understanding on the bundled rendered scenes: semantic
segmentation (7 classes), depth and surface normals of one image, the tasks
and metrics of NYUv2 (mtljax/data/scenes.py renders them with exact ground
truth; nothing is downloaded).

    python -m experiments.main --config=experiments/configs/scenes.py:quick \
        --workdir=/tmp/mtljax/scenes_quick

Any objective (``--config.objective.method=mgda``, ``pcgrad``, ``uw``...);
``--config.baselines=True`` adds single-task baselines and Δm over all
nine metrics. The model is a small fully convolutional multi_head
(``encoder='fcn'``: 3x3 convolutions at full resolution, then per-pixel
layers and linear per-pixel heads), sized for a CPU; the field's backbones
(ResNet-dilated + ASPP, SegNet, MTAN) are issue 26's. Metrics are exact over
the test split (``dense_convention='exact'``; ``libmtl`` / ``mtan`` give the
published code's numbers).

Variants: ``quick`` (64x80 scenes, 2,000 train / 500 test, a few hundred steps:
minutes on 2 CPU cores), ``full`` (128x160 scenes), ``resnet`` (the quick
scenes with LibMTL's NYUv2 model: a dilated ResNet-18 at output stride 8, one
DeepLab ASPP head per task, batch norm, batch 8; from scratch, so Adam at
1e-3 rather than LibMTL's fine-tuning 1e-4 (ImageNet weights:
``mtljax.pretrained``); ``--config.model.encoder=resnet50`` is LibMTL's
default depth, which wants a GPU), ``mtan`` (the quick scenes with the MTAN
paper's model: attention over a SegNet of widths (16, 32, 64, 64, 64), a
quarter of the paper's; ``--config.model.channels='(64, 128, 256, 512, 512)'`` and
``--config.model.arch=multi_head`` for the paper's SegNet "split").
"""

from experiments.configs import common

VARIANTS = ("", "quick", "full", "resnet", "mtan")


def get_config(arg: str = ""):
  c = common.base_config()
  c.data.name = "scenes"
  c.model.arch = "multi_head"
  c.model.encoder = "fcn"
  c.model.channels = (32, 32, 32)
  c.model.hidden = (32,)
  c.sampling.examples_per_task = 16
  c.sampling.shared_inputs = True  # one batch of images labelled for every task (as NYUv2)
  c.optim.lr = 3e-3
  c.eval_batch_size = 50  # dense: a chunk of 50 images per task slot (memory)
  if arg in ("", "quick", "resnet", "mtan"):
    c.data.builder_config = "quick"
    c.total_steps = 600
    c.steps_per_call = 50
    c.log_steps = 100
    c.eval_steps = 300
    c.checkpoint_steps = 300
    if arg == "resnet":
      c.model.encoder = "resnet18"
      c.model.output_stride = 8
      c.sampling.examples_per_task = 8
      c.optim.lr = 1e-3  # from scratch (LibMTL's 1e-4 fine-tunes ImageNet weights)
      c.total_steps, c.steps_per_call, c.log_steps = 400, 20, 100
      c.eval_steps = c.checkpoint_steps = 200
    if arg == "mtan":
      c.model.arch = "mtan"
      c.model.encoder = "segnet"
      c.model.channels = (16, 32, 64, 64, 64)
      c.model.mtan.tower = ()
      c.sampling.examples_per_task = 8
      c.optim.lr = 1e-3  # the MTAN code's Adam 1e-4, x10 for a short run
      c.total_steps, c.steps_per_call, c.log_steps = 400, 20, 100
      c.eval_steps = c.checkpoint_steps = 200
  elif arg == "full":
    c.data.builder_config = "full"
    c.model.channels = (32, 64, 64, 64)
    c.model.hidden = (64,)
    c.total_steps = 3000
    c.log_steps = 250
    c.eval_steps = 1000
    c.checkpoint_steps = 1000
  else:
    raise ValueError(f"scenes config: unknown variant {arg!r}; use one of {VARIANTS}.")
  return c
