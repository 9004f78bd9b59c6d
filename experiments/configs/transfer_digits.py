r"""Transfer on handwritten digits: pretrain on digits 0-4, fine-tune on 5-9.

    python -m experiments.main --config=experiments/configs/transfer_digits.py \
        --workdir=/tmp/mtljax/transfer_digits

One pretraining run (digits 0-4, every train image), then for every shot count
(1, 5, 10 train images per class, and all) and every strategy of
:data:`mtljax.transfer.STRATEGIES` a fine-tuning run on digits 5-9 that reads
only the pretrained checkpoint (never the 0-4 data), plus training from scratch
with the same budget. Writes ``summary.json`` as ``{"results": {STRATEGY:
{SHOTS: test accuracy}}}`` (``SHOTS`` "1", "5", "10", "all") and
``transfer_digits.png``. Variant ``:quick`` (fewer steps and shot counts).
"""

import ml_collections

from experiments.configs import common
from mtljax import transfer


def get_config(arg: str = ""):
  c = common.base_config()
  c.experiment = "transfer_digits"
  c.data.name = "digits"
  c.data.builder_config = "c01234"
  c.model.arch = "multi_head"
  c.model.encoder = "cnn"
  c.model.channels = (16,)
  c.model.hidden = (64,)
  c.sampling.examples_per_task = 32
  c.optim.lr = 3e-3
  c.total_steps = 1000  # pretraining
  c.steps_per_call = 50
  c.log_steps = 100
  c.eval_steps = 500
  c.checkpoint_steps = 500

  c.transfer = ml_collections.ConfigDict()
  c.transfer.target_classes = "56789"
  c.transfer.shots = (1, 5, 10, 0)  # 0 = every train image
  c.transfer.strategies = transfer.STRATEGIES
  c.transfer.finetune_steps = 300
  c.transfer.finetune_lr = 1e-3      # smaller than pretraining's
  c.transfer.head_lr_mult = 3.0      # the fresh head at pretraining's rate
  c.transfer.probe_steps = 100       # lp_ft: linear-probe steps before fine-tuning
  c.transfer.shots_seed = 0
  if arg == "quick":
    c.total_steps = 300
    c.eval_steps = 300
    c.checkpoint_steps = 300
    c.transfer.shots = (5, 0)
    c.transfer.finetune_steps = 200
    c.transfer.probe_steps = 100
  elif arg:
    raise ValueError(f"transfer_digits config: unknown variant {arg!r}; use '' or 'quick'.")
  return c
