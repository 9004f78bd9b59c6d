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
``summary.json`` also holds ``"distance"`` ``{STRATEGY: {SHOTS: ||w - w0||
over the body}}`` (w0 the pretrained values) and ``"l2sp_cv"``.

L2-SP (strategy ``l2sp``, decoupled): ``alpha``, ``beta`` chosen per shot count
by ``transfer.l2sp_cv_folds``-fold cross-validation over
``transfer.l2sp_cv_grid`` on the target's train images (validation loss after
``finetune_steps``; 0 folds: the config's or the strategy's 0.01 each);
``l2sp_coupled`` is the coupled form at the default 0.01 each.

``:source=multi_digits`` (experiment 3: fine-tuning from the shared trunk of a
multi-task model): pretrain the two-task ``multi_digits`` model (left and right
digit of overlaid pairs, every digit 0-9, multi-head), then fine-tune on single
digits 5-9 placed on the same 12x16 canvas (``digits`` ``..._canvas``). Combine
with ``quick`` as ``:source=multi_digits,quick``.
"""

import ml_collections

from experiments.configs import common
from mtljax import transfer


# What --config=FILE:ARG accepts (listed by `python -m experiments.main --list`).
VARIANTS = ("", "quick", "source=multi_digits", "source=multi_digits,quick")


def get_config(arg: str = ""):
  opts = dict(a.split("=", 1) if "=" in a else (a, True) for a in arg.split(",") if a)
  unknown = set(opts) - {"quick", "source"}
  if unknown or opts.get("source", "digits") not in ("digits", "multi_digits"):
    raise ValueError(f"transfer_digits config: unknown variant {arg!r}; use '', 'quick', "
                     "'source=multi_digits' or 'source=multi_digits,quick'.")
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
  # L2-SP by cross-validation (0 folds: off). Decoupled, the pull shrinks
  # w - w0 by lr * alpha per step (lr 1e-3 on the body): alpha 100 is 0.1.
  c.transfer.l2sp_cv_folds = 4
  c.transfer.l2sp_cv_grid = "l2sp_alpha=0,1,10,100;l2sp_beta=0,1,10"
  c.transfer.source = opts.get("source", "digits")
  c.transfer.canvas = False
  if c.transfer.source == "multi_digits":  # pretrain on overlaid pairs of all digits
    c.data.name = "multi_digits"
    c.data.builder_config = "default"
    c.transfer.canvas = True
    # The source heads (10 classes, two tasks) cannot be kept for a 5-class task.
    c.transfer.strategies = tuple(x for x in transfer.STRATEGIES if x != "head_kept")
    c.model.channels = (16, 32)
    c.total_steps = 2000
    c.eval_steps = c.checkpoint_steps = 1000
  if opts.get("quick"):
    c.total_steps = 300
    c.eval_steps = 300
    c.checkpoint_steps = 300
    c.transfer.shots = (5, 0)
    c.transfer.finetune_steps = 200
    c.transfer.probe_steps = 100
    c.transfer.l2sp_cv_grid = "l2sp_alpha=0,1,10,100;l2sp_beta=0,1"
    if c.transfer.source == "multi_digits":
      c.data.builder_config = "n3000_m600_s0"
      c.model.channels = (8, 16)
  return c
