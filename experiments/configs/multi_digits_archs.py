r"""Every architecture on multi_digits against single-task baselines (Δm%).

    python -m experiments.main --config=experiments/configs/multi_digits_archs.py \
        --workdir=/tmp/mtljax/multi_digits_archs

The multi_digits setup (CNN encoder, same budget for everyone) with
``model.arch`` in ``archs``; the single-task baselines (one ``independent``
run, cached) give each run's Δm% (positive = better than single-task). Every
run also evaluates its train split at eval steps, so overfitting is shown:
``archs.png`` plots Δm per architecture and train vs test accuracy per task
over training. Writes ``summary.json`` ``{"delta_m": {ARCH: value},
"per_task": {ARCH: {TASK: {METRIC: signed % change}}}, "tasks": {ARCH: test
metrics}, "baselines": ..., "convention": ...}``. Variant ``:quick``.
"""

from experiments.configs import common
from experiments.configs import multi_digits


ARCHS = ("independent", "multi_head", "concat", "additive", "multiplicative", "soft",
         "cross_stitch", "shared_bottom", "omoe", "mmoe", "cgc", "ple", "dselect_k", "mtan",
         "ltb")


# What --config=FILE:ARG accepts (listed by `python -m experiments.main --list`).
VARIANTS = ("", "quick")


def get_config(arg: str = ""):
  if arg not in ("", "quick"):
    raise ValueError(f"multi_digits_archs config: unknown variant {arg!r}; use '' or "
                     "'quick'.")
  c = multi_digits.get_config(arg)
  c.experiment = "multi_digits_archs"
  c.archs = ARCHS
  c.baselines = True
  c.eval_train = True
  c.eval_steps = c.log_steps  # train/test curves at every log step
  common.set_model_hparam(c, "num_experts", 4)  # mmoe, omoe, dselect_k; cgc / ple: shared
  common.set_model_hparam(c, "task_experts", 1)  # cgc / ple
  c.model.ple.num_levels = 2
  c.model.dselect_k.k = 2       # dselect_k: 2 of the 4 experts per task once saturated
  common.set_model_hparam(c, "tower", (32,))     # every architecture with towers
  c.model.soft.lambda_ = 1e-3
  # LTB: LibMTL's NYUv2 schedule (200 epochs: tau 10 / sqrt(epoch + 1), two
  # warm-up epochs) laid over the run's steps.
  c.model.ltb.epoch_steps = max(1, c.total_steps // 200)
  return c
