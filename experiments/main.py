r"""Runs one mtljax experiment from a config file.

    python -m experiments.main --config=experiments/configs/multi_digits.py \
        --workdir=/tmp/mtljax/multi_digits [--config.model.arch=concat]

Several processes (hosts): add ``--coordinator=HOST:PORT --num_processes=N
--process_id=I`` to each process's command, or ``--distributed`` where the
cluster's environment says it (SLURM, Open MPI, TPU pods); the mesh then
spans every device of every process (BUILD_NOTES.md: a worked launch).

Config files define ``get_config(arg)``; ``--config=FILE:ARG`` passes ARG (e.g.
``quick``). Overrides of keys that do not exist fail (``lock_config``). Running
again with the same workdir resumes from its latest checkpoint.
"""

import importlib
import logging
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mtljax import checkpoint
from mtljax import sharding
from mtljax import train
from mtljax import workdir

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (get_config(arg)).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and outputs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", "", "Multi-process run: the coordinator's host:port (process 0's).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-process run: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-process run: this process's id.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-process run from the cluster's environment "
    "(SLURM, Open MPI, TPU pods: jax.distributed.initialize() with no arguments).")
flags.mark_flags_as_required(["config", "workdir"])
PREEMPTED_EXIT = 143  # 128 + SIGTERM: the run is not finished; rerun to resume
EXPERIMENTS = ("toy_pareto", "transfer_digits", "transfer_sinusoids", "mmoe_sweep",
               "multi_digits_archs", "exam")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  auto=_DISTRIBUTED.value)
  # mtljax's own progress at INFO (process 0 only); other libraries (Orbax) stay
  # at absl's default.
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  log = logging.getLogger("mtljax")
  log.setLevel(logging.INFO if sharding.is_primary() else logging.WARNING)
  log.addHandler(handler)
  log.propagate = False
  absl_logging.set_verbosity(absl_logging.WARNING)
  experiment = _CONFIG.value.get("experiment", "")
  try:
    if experiment:  # a multi-run experiment: experiments/<name>.py's run(config, workdir)
      if experiment not in EXPERIMENTS:
        raise app.UsageError(f"config.experiment={experiment!r} is not one of {EXPERIMENTS}.")
      importlib.import_module(f"experiments.{experiment}").run(_CONFIG.value, _WORKDIR.value)
    elif _CONFIG.value.get("cv", {}).get("folds", 0):
      from mtljax import cv  # pylint: disable=g-import-not-at-top
      cv.select_and_train(_CONFIG.value, _WORKDIR.value)
    else:
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.Preempted as e:  # SIGTERM: checkpoint saved; 128 + SIGTERM, no traceback
    log.warning("%s", e)
    sys.exit(PREEMPTED_EXIT)
  except (train.NonFiniteError, workdir.WorkdirError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if sharding.is_primary():
    print(f"summary: {_WORKDIR.value}/summary.json")


if __name__ == "__main__":
  app.run(main)
