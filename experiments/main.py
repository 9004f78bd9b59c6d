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

import difflib
import glob
import importlib
import logging
import math
import os
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mtljax import errors
from mtljax import sharding
from mtljax import train

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
_LIST = flags.DEFINE_bool(
    "list", False, "Print the configs and their variants, architectures and objectives with "
    "their hyper-parameters, encoders, heads and fine-tuning strategies, and exit.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config (file + overrides) and exit.")
PREEMPTED_EXIT = 143  # 128 + SIGTERM: the run is not finished; rerun to resume
INTERRUPTED_EXIT = 130  # 128 + SIGINT: a Ctrl-C (a checkpoint saved) or two (stopped at once)
EXPERIMENTS = ("toy_pareto", "transfer_digits", "transfer_sinusoids", "mmoe_sweep",
               "multi_digits_archs", "exam")


_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def print_catalog(out=sys.stdout) -> None:
  """What ``--list`` prints: every name a config may use."""
  from mtljax import objectives, transfer  # pylint: disable=g-import-not-at-top
  from mtljax.models import multitask  # pylint: disable=g-import-not-at-top
  print("configs (--config=experiments/configs/NAME.py[:VARIANT]):", file=out)
  for path in sorted(glob.glob(os.path.join(_CONFIG_DIR, "*.py"))):
    name = os.path.basename(path)[:-3]
    if name in ("__init__", "common"):
      continue
    module = importlib.import_module(f"experiments.configs.{name}")
    shown = ", ".join(repr(v) for v in getattr(module, "VARIANTS", ("",)))
    print(f"  {name:<22} variants: {shown}", file=out)
  print("architectures (config.model.arch; hyper-parameters as config.model.ARCH.NAME):",
        file=out)
  for arch in multitask.archs():
    shown = ", ".join(f"{k}={v!r}" for k, v in multitask.hyperparameters(arch).items()) or "-"
    print(f"  {arch:<14} {shown}", file=out)
  shown = ", ".join(f"{k}={v!r}" for k, v in multitask.trunk_defaults().items())
  print(f"trunk, every architecture's (config.model.NAME): {shown}", file=out)
  print(f"encoders (config.model.encoder): {', '.join(multitask.ENCODERS)}", file=out)
  print("  per-pixel (dense tasks only), with the architectures built for each:", file=out)
  for encoder, built in multitask.DENSE_ARCHS.items():
    print(f"    {encoder:<10} {', '.join(built)}", file=out)
  others = [a for a in multitask.archs()
            if not any(a in built for built in multitask.DENSE_ARCHS.values())]
  print(f"    (not on any per-pixel encoder: {', '.join(others)})", file=out)
  print(f"heads (config.model.heads): {', '.join(multitask.HEADS)}", file=out)
  print("objectives (config.objective.method; hyper-parameters as "
        "config.objective.METHOD.NAME):", file=out)
  for method in objectives.methods():
    hp = objectives.hyperparameters(method)
    shown = ", ".join(f"{k}={v!r}" for k, v in hp.items()) or "-"
    print(f"  {method:<12} {shown}", file=out)
  print(f"fine-tuning strategies (transfer experiments): {', '.join(transfer.STRATEGIES)}",
        file=out)


# ``--config.objective.weights.TASK=W`` (the task names are the data's, so the
# config cannot declare them): gathered into one dict override before parsing.
_WEIGHT_FLAG = re.compile(r"^--config\.objective\.weights\.([^=]+)=(.+)$")


def _weight(text: str):
  """A weight flag's value: a finite number as a float, anything else as the
  string given (the config check refuses it, naming the key and the value)."""
  try:
    value = float(text)
  except ValueError:
    return text
  return value if math.isfinite(value) else text


def _gather_weight_flags(argv: list[str]) -> list[str]:
  weights, rest = {}, []
  for arg in argv:
    m = _WEIGHT_FLAG.match(arg)
    if m:
      weights[m.group(1)] = _weight(m.group(2))
    else:
      rest.append(arg)
  if weights:
    rest.append(f"--config.objective.weights={weights!r}")
  return rest


def _config_keys(argv: list[str]) -> set[str] | None:
  """Every dotted key (leaves and sections) of the config file named in
  ``argv``, or None when it cannot be loaded."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  path, _, arg = spec.partition(":")
  try:
    loader = importlib.util.spec_from_file_location("_mtljax_config", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None
  keys = set()

  def walk(node, prefix):
    for k, v in node.items():
      keys.add(prefix + k)
      if isinstance(v, dict):
        walk(v, prefix + k + ".")
  walk(config.to_dict(), "")
  return keys


def _nearest(key: str, keys: set[str]) -> list[str]:
  """Up to three valid keys near ``key``: similar spelling, or the same
  section with a last part that abbreviates it (``learning_rate`` ~ ``lr``)."""
  section, _, last = key.rpartition(".")
  initials = "".join(w[0] for w in last.split("_") if w)

  def score(k):
    s, _, l = k.rpartition(".")
    abbreviation = s == section and l == initials
    return max(difflib.SequenceMatcher(None, key, k).ratio(), 1.0 if abbreviation else 0.0)
  ranked = sorted(keys, key=score, reverse=True)
  return [k for k in ranked[:3] if score(k) >= 0.5]


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with one line for a ``--config.KEY`` that does not
  exist (naming the key and the nearest valid keys) instead of a traceback."""
  argv = _gather_weight_flags(argv)
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is not None and not os.path.isfile(spec.partition(":")[0]):
    print(f"error: --config={spec}: no such config file {spec.partition(':')[0]!r} "
          "(--list shows the configs).", file=sys.stderr)
    sys.exit(2)
  sys.argv[:] = argv  # config_flags reads its overrides from sys.argv too
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    keys = _config_keys(argv)
    for arg in argv:
      m = re.match(r"^--config\.([^=]+)", arg)
      if keys is not None and m and m.group(1) not in keys:
        near = _nearest(m.group(1), keys)
        hint = f"; nearest valid keys: {', '.join(near)}" if near else ""
        print(f"error: --config.{m.group(1)}: no such config key{hint} "
              "(--print_config shows them all).", file=sys.stderr)
        sys.exit(2)
    print(f"error: {type(e).__name__}: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
    sys.exit(2)


def format_config(config) -> str:
  """What ``--print_config`` prints: the config as YAML a reader would write
  (tuples as plain lists, inline: ``hidden: [64, 64]``; no
  ``!!python/tuple`` tags or ``&id001`` anchors)."""
  import yaml  # pylint: disable=g-import-not-at-top

  def plain(node):
    if isinstance(node, dict):
      return {k: plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
      return [plain(v) for v in node]
    return node

  class Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):
      return True
  Dumper.add_representer(list, lambda d, v: d.represent_sequence(
      "tag:yaml.org,2002:seq", v, flow_style=True))
  return yaml.dump(plain(config.to_dict()), Dumper=Dumper, default_flow_style=False,
                   sort_keys=True)


def fail(e: errors.UserError) -> None:
  """The one handler of the errors a user can act on: ``error: <message>`` as
  one line (the traceback too with ``-v``), then exit with the error type's
  status (:attr:`mtljax.errors.UserError.exit_code`: 2 for a config value, 1
  otherwise). Without ``-v``, the errors that finalizers raise while the
  process tears down a run stopped half-way (Orbax's coroutines: "Exception
  ignored in ...", screens of them after an unreadable checkpoint) are not
  printed after the line."""
  verbose = flags.FLAGS["verbosity"].present
  if verbose:
    traceback.print_exception(e)
  message = " ".join(str(e).split())  # one line, whatever the message holds
  print(f"error: {message}", file=sys.stderr)
  if not verbose:
    sys.unraisablehook = lambda unraisable: None
  sys.exit(e.exit_code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _LIST.value:
    print_catalog()
    return
  try:  # loaded on first use: a config file that fails to load is one line too
    config = _CONFIG.value
  except Exception as e:  # pylint: disable=broad-except
    fail(errors.ConfigError(f"--config: {errors.os_reason(e) or f'{type(e).__name__}: {e}'}"))
  if config is None:
    raise app.UsageError("--config is required (--list shows the configs).")
  if _PRINT_CONFIG.value:
    print(format_config(config), end="")
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required.")
  if not flags.FLAGS["verbosity"].present:  # other libraries' chatter only when asked (-v 0)
    # TFDS's per-run warnings; Orbax's logged tracebacks of a failed save (the
    # failure itself is the one-line error).
    absl_logging.set_verbosity(absl_logging.FATAL)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" at start
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  auto=_DISTRIBUTED.value)
  # mtljax's own progress at INFO (process 0 only); with -v 1 also its details
  # (every parameter's shape, optimizer rules, shardings) at DEBUG. Other
  # libraries' messages (TFDS's per-run warnings) only with --verbosity / -v.
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  log = logging.getLogger("mtljax")
  debug = flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1  # -v 1: the details
  log.setLevel(logging.DEBUG if debug else logging.INFO if sharding.is_primary()
               else logging.WARNING)
  log.addHandler(handler)
  log.propagate = False
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
  except train.Preempted as e:  # SIGTERM/Ctrl-C: checkpoint saved; 128 + signal, no traceback
    log.warning("%s", e)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:  # a second Ctrl-C (or one before the run's handler is set)
    if flags.FLAGS["verbosity"].present:
      traceback.print_exc()
    print("error: interrupted: stopped at once, without saving (the last checkpoint in the "
          "workdir is kept; rerun the same command to resume from it).", file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT)
  except errors.UserError as e:
    fail(e)
  if sharding.is_primary():
    print(f"summary: {_WORKDIR.value}/summary.json")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
