"""From a config to the objects of a run: checks, data, model, objective,
optimizer, initial state, train and eval steps.

Every function here turns config fields into explicit arguments of the
library (so a notebook can skip it). Nothing here is compiled. The other
modules that read an ``ml_collections.ConfigDict`` are the run-level ones: the
loop (:mod:`mtljax.train`), cross-validation (:mod:`mtljax.cv`: overrides per
grid point), transfer (:mod:`mtljax.transfer`: a strategy's config),
single-task baselines (:mod:`mtljax.measure`: their configs and cache keys)
and the TensorBoard config text. The library below them (gradients,
objectives, jacobians, steps, models, optim, sharding, data) takes explicit
arguments, and its errors name those arguments; here each library call that
reads a config section is wrapped in :func:`mtljax.errors.config_section`, so
a wrong value is a :class:`~mtljax.errors.ConfigError` that starts with its
config path (``config.objective.cagrad.c must be in [0, 1), got 2``), the one
error type ``experiments/main.py`` prints as one line.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtljax import checkpoint as ckpt_lib
from mtljax import errors
from mtljax import jacobians
from mtljax import objectives
from mtljax import optim
from mtljax import params as params_lib
from mtljax import precision
from mtljax import pretrained
from mtljax import schedules
from mtljax import sharding
from mtljax import steps
from mtljax import tasks as tasks_lib
from mtljax import transfer
from mtljax.data import loading
from mtljax.data import pipeline
from mtljax.data import sampling
from mtljax.data import specs as specs_lib
from mtljax.data import task_data
from mtljax.data import tfds_access
from mtljax.dense import augment as dense_augment
from mtljax.dense import metrics as dense_metrics
from mtljax.models import branching
from mtljax.models import multitask
from mtljax.models import parts as parts_lib
from mtljax.models.backbones import vit as vit_lib

logger = logging.getLogger("mtljax")
ConfigError = errors.ConfigError  # what every config check here raises


# ----------------------------------------------------------------------------
# Checks that need no data.
# ----------------------------------------------------------------------------


def _positive_int(config, path):
  value = config
  for part in path.split("."):
    value = value[part]
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
    raise ConfigError(f"config.{path} must be a positive integer, got {value!r}.")
  return int(value)


def _one_of(field: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f"config.{field}={value!r} is not one of {tuple(allowed)}.")


def _in_range(field: str, value, lo, hi, lo_open=False, hi_open=True, note="") -> None:
  """``value`` a finite number in the interval (brackets as written)."""
  ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
      value, bool) and math.isfinite(value)
  ok = ok and (value > lo if lo_open else value >= lo) and (
      hi is None or (value < hi if hi_open else value <= hi))
  if not ok:
    interval = (f"{'(' if lo_open else '['}{lo}, {'inf)' if hi is None else hi}"
                f"{'' if hi is None else (')' if hi_open else ']')}")
    raise ConfigError(f"config.{field} must be a number in {interval}{note}, got {value!r}.")


def _positive_ints(field: str, values) -> None:
  if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
             for v in values):
    raise ConfigError(f"config.{field} must be positive integers, got {tuple(values)!r}.")


def _model_arguments(m) -> dict:
  """``config.model`` as :func:`mtljax.models.multitask.make_model`'s ``trunk``
  (the fields at ``config.model.*``) and ``hparams`` (``config.model.<arch>``,
  absent: the defaults)."""
  trunk = multitask.Trunk(**{k: m[k] for k in multitask.TRUNK_FIELDS if k in m})
  section = m.get(m.arch, None)
  return {"trunk": trunk, "hparams": multitask.make_hparams(
      m.arch, **(section.to_dict() if section is not None else {}))}


def _validate_model(m) -> None:
  """``config.model``: the architecture's name, no unknown key in it or in an
  architecture's section, and the chosen architecture's values (those that
  need no input shape)."""
  _one_of("model.arch", m.arch, multitask.archs())
  sections = {a for a in multitask.archs() if multitask.hyperparameters(a)}
  known = {"arch"} | set(multitask.TRUNK_FIELDS) | sections
  unknown = sorted(set(m) - known)
  if unknown:
    raise ConfigError(f"config.model: unknown key(s) {unknown}; keys are {sorted(known)} (an "
                      "architecture's hyper-parameters live under config.model.<arch>, e.g. "
                      "config.model.mmoe.num_experts).")
  for arch in sorted(set(m) & sections):
    unknown = sorted(set(m[arch]) - set(multitask.hyperparameters(arch)))
    if unknown:
      raise ConfigError(f"config.model.{arch}: unknown hyper-parameter(s) {unknown}; {arch!r} "
                        f"takes {sorted(multitask.hyperparameters(arch))}.")
  with errors.config_section("model"):
    multitask.checked_arguments(m.arch, **_model_arguments(m))


def _validate_optim_numbers(o) -> None:
  _in_range("optim.b1", o.b1, 0, 1)
  _in_range("optim.b2", o.b2, 0, 1)
  _in_range("optim.eps", o.eps, 0, None, lo_open=True)
  _in_range("optim.weight_decay", o.weight_decay, 0, None)
  _in_range("optim.momentum", o.momentum, 0, 1)
  _in_range("optim.end_lr_factor", o.end_lr_factor, 0, None)
  _in_range("optim.stlr_cut_frac", o.stlr_cut_frac, 0, 1, lo_open=True)
  _in_range("optim.stlr_ratio", o.stlr_ratio, 1, None)
  if not isinstance(o.warmup_steps, (int, np.integer)) or o.warmup_steps < 0:
    raise ConfigError(f"config.optim.warmup_steps must be an integer >= 0, got "
                      f"{o.warmup_steps!r}.")


def _validate_cv(config) -> None:
  """``config.cv`` (k-fold selection, :mod:`mtljax.cv`) when it is on."""
  cv = config.get("cv", None)
  if cv is None or not cv.folds:
    return
  if not isinstance(cv.folds, (int, np.integer)) or isinstance(cv.folds, bool) or \
      cv.folds < 2:
    raise ConfigError(f"config.cv.folds must be 0 (off) or an integer >= 2, got {cv.folds!r}.")
  _one_of("cv.metric", cv.metric, sorted(tasks_lib.METRIC_DIRECTIONS))
  if not all(isinstance(v, (int, float)) and v > 0 and math.isfinite(v) for v in cv.lr):
    raise ConfigError(f"config.cv.lr must be positive numbers (() = config.optim.lr), got "
                      f"{tuple(cv.lr)!r}.")
  _positive_ints("cv.steps", cv.steps)


def _validate_weights(config) -> None:
  """``config.objective.weights``: every value a finite number >= 0 (the task
  names are checked against the data's spec: :func:`check_tasks_before_loading`)."""
  for name, value in config.objective.weights.items():
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool) and math.isfinite(value) and value >= 0
    if not ok:
      raise ConfigError(f"config.objective.weights.{name} must be a finite number >= 0, got "
                        f"{value!r}.")


def check_weights(config, names) -> None:
  """``config.objective.weights`` against the run's task names ``names``: no
  unknown task, and not every task's weight 0 (it would train nothing)."""
  weights = config.objective.weights.to_dict()
  unknown = sorted(set(weights) - set(names))
  if unknown:
    raise ConfigError(f"config.objective.weights: unknown task(s) {unknown} for data set "
                      f"{config.data.name!r}; its tasks are {list(names)}.")
  if names and all(weights.get(n, 1.0) == 0 for n in names):
    raise ConfigError(f"config.objective.weights: every task's weight is 0 ({list(names)}): "
                      "nothing would train; give at least one task a weight > 0.")


def _check_objective_values(config) -> None:
  """The chosen method's hyper-parameter values (``cagrad.c`` in [0, 1), ...),
  checked by building it for a stand-in task count (the run builds it again
  for the data's): ``config.data.tasks``' count, else the length of a
  per-task hyper-parameter (``famo.min_losses``), else 2; and the slots a step
  has, where the config says, against the fewest the method takes
  (:attr:`mtljax.objectives.Objective.min_slots`). Nothing is traced."""
  lengths = [len(v) for v in objective_hparams(config).values()
             if isinstance(v, (tuple, list)) and v]
  obj = objective_from_config(config, len(config.data.tasks) or (lengths[0] if lengths else 2))
  # The slots a step has, where the config says (else the step checks, once
  # the data set's task count is known): Krum and the trimmed mean need several.
  slots = config.sampling.tasks_per_step or len(config.data.tasks)
  if slots and slots < obj.min_slots:
    raise ConfigError(
        f"config.objective.method={obj.name!r} with {objective_hparams(config)} needs at "
        f"least {obj.min_slots} task slots per step, got config.sampling.tasks_per_step="
        f"{config.sampling.tasks_per_step}"
        + (f" (all {slots} of config.data.tasks)" if not config.sampling.tasks_per_step
           else "") + ".")


def _validate_data(config) -> None:
  """``config.data``'s names and numbers; the data set's name itself is
  checked against the catalog by :func:`data_from_config`, before loading
  (tests and notebooks build runs on data of their own)."""
  d, s = config.data, config.sampling
  if not d.name:
    raise ConfigError("config.data.name is empty.")
  with errors.config_section("data", d):
    parts = tfds_access.source_names(d.name)
  if not isinstance(d.max_train_examples, (int, np.integer)) or d.max_train_examples < 0:
    raise ConfigError(f"config.data.max_train_examples must be an integer >= 0 (0 = all), got "
                      f"{d.max_train_examples!r}.")
  tasks = tuple(d.tasks)
  if not all(isinstance(t, str) and t for t in tasks) or len(set(tasks)) != len(tasks):
    raise ConfigError(f"config.data.tasks must be distinct task names (() = all), got "
                      f"{tasks!r}.")
  if tasks and s.tasks_per_step > len(tasks) and not s.replace:
    raise ConfigError(f"config.sampling.tasks_per_step={s.tasks_per_step} must be in [1, "
                      f"{len(tasks)}] (or 0 = all tasks) when sampling tasks without "
                      f"replacement: config.data.tasks keeps {len(tasks)}.")
  for key, kind in (d.get("labels", None) or {}).items():
    _one_of(f"data.labels[{key!r}]", kind, specs_lib.LABEL_KINDS)
  if d.data_dir and os.path.exists(d.data_dir) and not os.path.isdir(d.data_dir):
    raise ConfigError(f"config.data.data_dir={d.data_dir!r} is a file, not a directory.")
  if not isinstance(d.get("family", ""), str):
    raise ConfigError(f"config.data.family must be a feature name or '', got {d.family!r}.")
  for key in ("download", "normalize_labels"):
    if not isinstance(d.get(key, False), bool):
      raise ConfigError(f"config.data.{key} must be True or False, got {d[key]!r}.")
  local = any(p in tfds_access.LOCAL_FILES for p in parts)
  for key in ("root", "label_folder"):
    if not isinstance(d.get(key, ""), str):
      raise ConfigError(f"config.data.{key} must be a string, got {d[key]!r}.")
    if d.get(key, "") and not local:
      raise ConfigError(f"config.data.{key}={d[key]!r} applies to the data sets of "
                        f"preprocessed files ({', '.join(tfds_access.LOCAL_FILES)}), not to "
                        f"{d.name!r}.")
  if d.get("classes", 0) and not local:
    raise ConfigError(f"config.data.classes={d.classes!r} applies to the data sets of "
                      f"preprocessed files ({', '.join(tfds_access.LOCAL_FILES)}), not to "
                      f"{d.name!r}.")
  with errors.config_section("data", d):
    ops = dense_augment.parse_ops(d.get("augment", ""))
  scales = d.get("augment_scales", dense_augment.SCALES)
  if ops and not (isinstance(scales, (tuple, list)) and scales and all(
      isinstance(s, (int, float)) and not isinstance(s, bool) and np.isfinite(s) and s >= 1
      for s in scales)):
    raise ConfigError(f"config.data.augment_scales={scales!r}: give one or more finite "
                      "scales >= 1 (a crop is 1/scale of the image).")
  if local and not d.get("root", ""):
    raise ConfigError(f"config.data.root is empty: data set {d.name!r} is read from its "
                      "preprocessed files; set it to the directory holding train/ and val/ "
                      "(the README says where the files come from).")
  with errors.config_section("data", d):
    data_options(config)["split_spec"].check()
  _one_of("data.pipeline", d.get("pipeline", "auto"), pipeline.PIPELINES)
  if len(parts) > 1 and d.get("pipeline", "auto") == "host":
    raise ConfigError(f"config.data.pipeline='host' reads one data set's records; "
                      f"config.data.name={d.name!r} joins {len(parts)}: use 'device' or "
                      "'auto'.")
  if not d.get("device_budget_mb", 0.0) >= 0:
    raise ConfigError(f"config.data.device_budget_mb must be >= 0 (0 = a quarter of the "
                      f"device's memory; 4096 MiB on CPU), got {d.device_budget_mb}.")
  for key in ("workers", "prefetch"):
    if key in d:
      _positive_int(config, f"data.{key}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every name and count that needs no data, before anything loads."""
  m, s, o = config.model, config.sampling, config.optim
  _one_of("sampling.task_sampler", s.task_sampler, sampling.SAMPLERS)
  if s.tasks_per_step < 0:
    raise ConfigError(f"config.sampling.tasks_per_step must be >= 0 (0 = all tasks), "
                      f"got {s.tasks_per_step}.")
  _positive_int(config, "sampling.examples_per_task")
  if s.task_sampler == "temperature" and not (s.temperature > 0 and
                                               math.isfinite(s.temperature)):
    raise ConfigError(f"config.sampling.temperature must be a finite number > 0 (1 = "
                      f"proportional), got {s.temperature}.")
  _validate_model(m)
  _one_of("optim.name", o.name, optim.OPTIMIZERS)
  _validate_optim_numbers(o)
  if not (o.lr > 0 and math.isfinite(o.lr)):
    raise ConfigError(f"config.optim.lr must be a finite number > 0, got {o.lr}.")
  _one_of("on_nonfinite", config.get("on_nonfinite", "stop"), steps.NONFINITE_POLICIES)
  _one_of("dense_convention", config.get("dense_convention", "exact"),
          dense_metrics.CONVENTIONS)
  _one_of("precision", config.get("precision", "float32"), precision.PRECISIONS)
  _one_of("optim.schedule", o.schedule, schedules.SCHEDULES)
  with errors.config_section("optim", o):
    optim.parse_rules(o.rules)  # raises on bad syntax, regexes, settings
  if o.layerwise_decay and not 0 < o.layerwise_decay <= 1:
    raise ConfigError(f"config.optim.layerwise_decay must be in (0, 1] (ULMFiT: 1/2.6), got "
                      f"{o.layerwise_decay}.")
  for key in ("frozen_depth", "unfreeze_every"):
    if o[key] < 0:
      raise ConfigError(f"config.optim.{key} must be >= 0, got {o[key]}.")
  for key in ("tensorboard", "plots"):
    if not isinstance(config.get(key, True), bool):
      raise ConfigError(f"config.{key} must be True or False, got {config[key]!r}.")
  if config.tag_lr < 0 or config.tag_groups < 1:
    raise ConfigError(f"config.tag_lr must be >= 0 and config.tag_groups >= 1, got "
                      f"{config.tag_lr}, {config.tag_groups}.")
  if config.l2sp_alpha < 0 or config.l2sp_beta < 0:
    raise ConfigError("config.l2sp_alpha and config.l2sp_beta must be >= 0.")
  _one_of("l2sp_mode", config.get("l2sp_mode", "decoupled"), transfer.L2SP_MODES)
  if config.init_from and not os.path.isdir(config.init_from):
    if not os.path.isfile(config.init_from):
      raise ConfigError(f"config.init_from={config.init_from!r} is neither a run's directory "
                        "nor a weights file.")
    if config.model.encoder not in parts_lib.RESNETS + parts_lib.VITS:
      raise ConfigError(f"config.init_from={config.init_from!r} is a file: torchvision ResNet "
                        f"weights or a Hugging Face ViT, which initialise config.model.encoder "
                        f"one of {parts_lib.RESNETS + parts_lib.VITS}, not "
                        f"{config.model.encoder!r}.")
    if (config.model.encoder in parts_lib.RESNETS
        and config.model.get("normalization", "batch") != "batch"):
      raise ConfigError(f"config.init_from={config.init_from!r} holds a torchvision ResNet "
                        "with batch norm; config.model.normalization must be 'batch'.")
  with errors.config_section("objective", config.objective):
    objectives.check_method(config.objective.method)
  known = {"method", "weights", "gram_path", "slot_backwards"} | set(objectives.methods())
  unknown = sorted(set(config.objective) - known)
  if unknown:
    raise ConfigError(f"config.objective: unknown key(s) {unknown}; keys are {sorted(known)} "
                      "(a method's hyper-parameters live under config.objective.<method>, e.g. "
                      "config.objective.dwa.window_steps).")
  for method in set(config.objective) & set(objectives.methods()):
    with errors.config_section("objective", config.objective):
      objectives.check_hyperparameters(method, config.objective[method].to_dict())
  _validate_weights(config)
  _one_of("objective.gram_path", config.objective.gram_path, objectives.GRAM_PATHS)
  _check_objective_values(config)
  _one_of("objective.slot_backwards", config.objective.get("slot_backwards", "auto"),
          jacobians.SLOT_BACKWARDS)
  for key in ("total_steps", "steps_per_call", "log_steps", "eval_steps",
              "checkpoint_steps", "eval_batch_size"):
    _positive_int(config, key)
  _validate_data(config)
  _validate_cv(config)
  if config.data.get("pipeline", "auto") == "host":  # (with "auto": known once data is opened)
    if num_seeds(config) > 1:
      raise ConfigError(f"config.num_seeds={num_seeds(config)} trains seeds side by side on "
                        "data held on the device; with the host pipeline "
                        "(config.data.pipeline='host') run one seed per job, or set "
                        "config.data.pipeline='device'.")
    if config.get("cv", None) is not None and config.cv.folds:
      raise ConfigError("config.cv: cross-validation trains every fold x learning rate as one "
                        "program over the train split held on the device; with the host "
                        "pipeline (config.data.pipeline='host') set config.data.pipeline='device' "
                        "or select hyper-parameters on a subset "
                        "(config.data.max_train_examples).")
  if config.eval_train and jax.process_count() > 1 and \
      config.data.get("pipeline", "auto") != "device":
    raise ConfigError("config.eval_train with several processes needs "
                      "config.data.pipeline='device' (on the host pipeline each process "
                      "holds only its shard of the train split).")
  placement = placement_from_config(config)  # mesh sizes, rules' axis names
  with errors.config_section("mesh", ("seed",)):
    placement.check_seeds(num_seeds(config))


# ----------------------------------------------------------------------------
# Config -> objects.
# ----------------------------------------------------------------------------


def data_options(config) -> dict:
  """``config.data`` as :func:`mtljax.data.loading.load`'s keyword arguments."""
  d = config.data
  labels = d.get("labels", None)
  return dict(
      data_dir=d.data_dir or None, builder_config=d.builder_config,
      task_names=tuple(d.tasks), max_train_examples=d.max_train_examples or None,
      input_key=d.get("input_key", "image"),
      label_keys=labels.to_dict() if labels is not None else {},
      family=d.get("family", ""), normalize_labels=d.get("normalize_labels", True),
      split_spec=tfds_access.Splits(d.get("train_split", "train"),
                                    d.get("test_split", "test"),
                                    d.get("test_fraction", 0.0), d.get("split_seed", 0)),
      download=bool(d.get("download", False)),
      local=tfds_access.LocalFiles(os.path.expanduser(d.get("root", "")),
                                   d.get("classes", 0), d.get("label_folder", "")))


def check_tasks_before_loading(config, opened) -> None:
  """What the data's metadata already says about ``config.data.tasks`` and
  ``config.sampling.tasks_per_step`` (``opened``:
  :func:`mtljax.data.loading.describe_all`, or :func:`~mtljax.data.loading.open_all`),
  before anything is downloaded or a record read."""
  d, s = config.data, config.sampling
  specs = [specs_lib.prefixed(sp, part) if len(opened) > 1 else sp
           for part, _, _, sp in opened]
  if all(sp.split_key is None for sp in specs):
    names = [c.task.name for sp in specs for c in sp.columns]
    unknown = [n for n in d.tasks if n not in names]
    if unknown:
      raise ConfigError(f"config.data.tasks: unknown task(s) {unknown} for data set "
                        f"{d.name!r}; its tasks are {names}.")
    check_weights(config, [n for n in names if not d.tasks or n in d.tasks])
  k = s.tasks_per_step
  if not k or s.replace or d.tasks:  # (a count of config.data.tasks: validate_config)
    return
  bounds = [specs_lib.task_count_bound(part, features, sp, d.builder_config)
            for part, features, _, sp in opened]
  if any(n is None for n, _ in bounds):
    return
  n = sum(b for b, _ in bounds)
  if k > n:
    why = "; ".join(f"{part}: {w}" if len(opened) > 1 else w
                    for (part, *_), (_, w) in zip(opened, bounds))
    raise ConfigError(f"config.sampling.tasks_per_step={k} must be in [1, {n}] (or 0 = all "
                      f"tasks) when sampling tasks without replacement: data set {d.name!r} "
                      f"has at most {n} tasks ({why}).")


def data_from_config(config) -> task_data.MultiTaskData:
  """The run's data, on the device path or the host pipeline
  (``config.data.pipeline``; ``auto`` decides from the inputs' size, the log
  says which and why). The name, the spec and the task counts are checked on
  the data's metadata, before any record is read; a wrong value raises a
  :class:`~mtljax.errors.ConfigError` under ``config.data``."""
  with errors.config_section("data", config.data):
    try:
      return _load_data(config)
    except OSError as e:  # an unwritable or unusable data directory: what to do
      where = config.data.data_dir or tfds_access.default_data_dir()
      raise errors.DataError(
          f"data set {config.data.name!r} cannot be prepared or read in {where!r} "
          f"({errors.os_reason(e) or e}): set config.data.data_dir (or $MTLJAX_DATA_DIR) to a "
          "writable directory.") from e


def _load_data(config) -> task_data.MultiTaskData:
  d = config.data
  kwargs = data_options(config)
  opened = loading.open_all(  # the specs and task counts checked before any download
      d.name, check=lambda described: check_tasks_before_loading(config, described),
      **{k: kwargs[k] for k in ("data_dir", "builder_config", "input_key", "label_keys",
                                "family", "split_spec", "download", "local")})
  kwargs = {k: kwargs[k] for k in ("builder_config", "task_names", "max_train_examples",
                                   "input_key", "label_keys", "normalize_labels")}
  kind = d.get("pipeline", "auto")
  if len(opened) > 1:  # (validate_config refuses "host")
    logger.info("Data pipeline: device (%d data sets; the host pipeline reads one).",
                len(opened))
    return loading.load(d.name, opened=opened, **kwargs)
  ((_, features, sources, spec),) = opened
  budget = d.get("device_budget_mb", 0.0)
  kind, why = pipeline.choose(kind, pipeline.input_bytes(features, sources, spec), budget,
                              jax.process_count())
  if kind == "device":
    data = loading.load(d.name, opened=opened, **kwargs)
    padded = sum(split["x"].nbytes + sum(  # a dense task's labels are as large as its inputs
        y.nbytes for g, y in split["y"].items() if data.taskset.group_task(g).dense)
                 for split in (data.train, data.test))
    if d.get("pipeline", "auto") != "auto" or padded <= (budget or
                                                         pipeline.default_budget_mb()) * 2**20:
      logger.info("Data pipeline: device (%s).", why)
      return data
    kind, why = "host", (f"the device layout, each input source padded to the longest, "
                         f"is {padded / 2**20:.1f} MiB: over the budget")
  logger.info("Data pipeline: host (%s).", why)
  index, count = placement_from_config(config).data_shard()
  return pipeline.load(d.name, sources=sources, features=features, spec=spec,
                       shard_index=index, shard_count=count, **kwargs)


def model_from_config(config, taskset, input_shape) -> multitask.Model:
  """``config.model.arch`` with the trunk's fields (``config.model.*``) and its
  hyper-parameters (``config.model.<arch>``); a wrong value raises
  ``config.model: <the library's message>``."""
  m = config.model
  with errors.config_section("model"):
    model = multitask.make_model(m.arch, taskset, input_shape, **_model_arguments(m))
  return precision.mixed(model, config.get("precision", "float32"))


def objective_hparams(config) -> dict:
  """The chosen method's hyper-parameters: ``config.objective.<method>``."""
  o = config.objective
  section = o.get(o.method, None)
  return section.to_dict() if section is not None else {}


def objective_from_config(config, num_tasks: int) -> objectives.Objective:
  o = config.objective
  with errors.config_section("objective", o):
    return objectives.make_objective(o.method, num_tasks, gram_path=o.gram_path,
                                     **objective_hparams(config))


def layer_groups(model: multitask.Model, objective: objectives.Objective, params
                 ) -> tuple[tuple[str, str], ...]:
  """The model's layer groups, the objective's per-task parameters (if any)
  joining the top group."""
  groups = list(model.layer_groups)
  if objective.name in params["tasks"]:
    name, rx = groups[-1]
    groups[-1] = (name, rf"{rx}|^tasks/{objective.name}/")
  return tuple(groups)


def rules_from_config(config, groups, param_names) -> tuple:
  """``config.optim.rules`` followed by the generated frozen-depth, layer-wise
  decay and gradual-unfreezing rules over the layer groups ``groups``; those
  need every parameter (``param_names``) in a group."""
  o = config.optim
  rules = optim.parse_rules(o.rules)
  if o.frozen_depth or o.layerwise_decay or o.unfreeze_every:
    optim.check_layer_groups(groups, param_names)
  generated = ()
  if o.frozen_depth:
    rules = rules + optim.frozen_depth_rules(groups, o.frozen_depth)
  if o.layerwise_decay:
    generated = optim.layerwise_decay_rules(groups, o.layerwise_decay)
  if o.unfreeze_every:
    generated = optim.gradual_unfreezing_rules(groups, o.unfreeze_every, generated)
  if o.frozen_depth and not generated:  # the unfrozen groups train with the defaults
    generated = (optim.Rule(".*"),)
  return rules + generated


def _decoupled_l2sp(config) -> optim.DecoupledL2SP | None:
  """Decoupled L2-SP's optimizer term (:mod:`mtljax.transfer`), or None."""
  if not (config.init_from and (config.l2sp_alpha or config.l2sp_beta)
          and config.get("l2sp_mode", "decoupled") == "decoupled"):
    return None
  kind = transfer.l2sp_kind(config.init_dont_load.split(";"), config.objective.method)
  return optim.DecoupledL2SP(float(config.l2sp_alpha), float(config.l2sp_beta), kind)


class LrSchedule(NamedTuple):
  """A learning rate the log reports: its metrics key, its schedule of the
  update count (None: a frozen group) and the global step the count starts at
  (a group unfrozen at step s counts from s)."""
  key: str
  schedule: Callable | None
  start: int


def optimizer_from_config(config, groups=None, param_names=()
                          ) -> tuple[Any, tuple[LrSchedule, ...]]:
  """:func:`_optimizer`, a wrong value raising under ``config.optim``."""
  with errors.config_section("optim", config.optim):
    return _optimizer(config, groups, param_names)


def _optimizer(config, groups, param_names) -> tuple[Any, tuple[LrSchedule, ...]]:
  """The optimizer and the schedules it applies (built once here: the loop
  logs them, :func:`mtljax.train.learning_rates`). A
  :class:`mtljax.optim.RuledOptimizer` when the config has parameter rules,
  layer-wise decay, gradual unfreezing or frozen depth (``groups``, the layer
  groups of :func:`layer_groups`, and the parameters' slash paths are then
  needed), with one schedule per rule (``optim/lr/rule<i>``: its names in the
  log's rule listing and its optax labels); else an optax optimizer and
  ``optim/lr``."""
  o = config.optim
  kwargs = dict(b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                momentum=o.momentum)
  l2sp = _decoupled_l2sp(config)
  if o.rules or o.layerwise_decay or o.unfreeze_every or o.frozen_depth or l2sp:
    if groups is None:
      raise ValueError("optimizer_from_config: parameter rules need the layer groups.")
    rules = rules_from_config(config, groups, param_names) or (optim.Rule(".*"),)
    tx = optim.make_ruled_optimizer(
        o.name, rules, lr=o.lr, total_steps=config.total_steps,
        schedule=o.schedule, warmup_steps=o.warmup_steps, end_lr_factor=o.end_lr_factor,
        stlr_cut_frac=o.stlr_cut_frac, stlr_ratio=o.stlr_ratio, l2sp=l2sp, **kwargs)
    return tx, tuple(LrSchedule(f"optim/lr/rule{i}", fn, r.unfreeze_at)
                     for i, (r, fn) in enumerate(zip(tx.rules, tx.schedules)))
  schedule = schedules.make_schedule(o.schedule, o.lr, config.total_steps,
                                     warmup_steps=o.warmup_steps,
                                     end_lr_factor=o.end_lr_factor, cut_frac=o.stlr_cut_frac,
                                     ratio=o.stlr_ratio)
  # A constant rate goes to optax as the number (its schedule is for the log).
  tx = optim.make_optimizer(o.name, lr=o.lr if o.schedule == "constant" else schedule,
                            **kwargs)
  return tx, (LrSchedule("optim/lr", schedule, 0),)


def placement_from_config(config) -> sharding.Placement:
  """The mesh and sharding rules of ``config.mesh`` (all devices on the data
  axis without one); a wrong size or rule raises under ``config.mesh``."""
  m = config.get("mesh", None)
  if m is None:
    return sharding.Placement(sharding.make_mesh())
  with errors.config_section("mesh", m):
    rules = sharding.parse_rules(m.get("rules", ""))
    return sharding.Placement(sharding.make_mesh(m.get("data", -1), m.get("task", 1),
                                                 seed=m.get("seed", 1)), rules)


def num_seeds(config) -> int:
  """``config.num_seeds`` (default 1): seeds ``seed .. seed + N - 1`` trained
  side by side as one vmapped program."""
  n = config.get("num_seeds", 1)
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
    raise ConfigError(f"config.num_seeds must be a positive integer, got {n!r}.")
  return int(n)


def steps_per_call(config) -> int:
  """``config.steps_per_call`` lowered to divide every interval (one shape of
  call: one compile)."""
  spc = int(config.steps_per_call)
  for key in ("total_steps", "log_steps", "eval_steps", "checkpoint_steps"):
    spc = math.gcd(spc, int(config[key]))
  return spc


# ----------------------------------------------------------------------------
# A whole run's objects.
# ----------------------------------------------------------------------------


class Run(NamedTuple):
  """Everything a training run needs, built from a config and its data."""
  model: multitask.Model
  objective: objectives.Objective
  tx: Any
  state: steps.TrainState  # with rng (the run's seed); N seeds: stacked
  train_fn: Callable
  eval_fn: Callable
  steps_per_call: int
  init_report: dict | None
  placement: sharding.Placement
  state_shardings: Any    # the state's shardings (the state is placed with them)
  num_seeds: int = 1      # > 1: state leaves [N, ...]; train_fn/eval_fn vmapped over them
  # The host pipeline's batches (data too large for the device): train_fn then
  # takes a batch, eval_fn a chunk (mtljax.steps.make_chunk_eval_step).
  batches: pipeline.Batches | None = None
  lr_schedules: tuple[LrSchedule, ...] = ()  # the optimizer's, as the log reports them


def read_source(config) -> tuple[dict, int]:
  """``(tree, step)`` of the checkpoint ``config.init_from`` names (``tree``:
  its ``params`` and ``model_state``, None when the source has none); a
  missing or unusable one is a :class:`~mtljax.errors.ConfigError` under that key.

  A file is a torchvision ResNet state dict (``.pth``/``.pt``/``.safetensors``/
  ``.npz``; :mod:`mtljax.pretrained`, ImageNet weights) for the ResNet encoder
  of ``config.model.encoder``: its parameters and batch statistics as the
  shared trunk's (``shared/trunk``, copied into every task's trunk by
  ``independent``), step 0. Everything else of fine-tuning applies as to a
  run's checkpoint: ``init_dont_load``, L2-SP toward the loaded values,
  layer-wise rates and unfreezing by the stage names.

  With ``config.model.encoder="vit"`` the file is a Hugging Face ViT
  (``ViTModel`` / ``ViTForImageClassification`` safetensors or torch file,
  its ``config.json`` beside it; :func:`mtljax.pretrained.import_hf_vit`):
  the encoder's parameters as ``shared/trunk``; the checkpoint's sizes must
  equal ``config.model``'s ViT settings (:func:`check_vit_sizes`)."""
  with errors.config_section("init_from", catch=(ValueError, FileNotFoundError,
                                                 errors.CheckpointError)):
    if os.path.isfile(config.init_from) and config.model.encoder in parts_lib.VITS:
      v, cfg = pretrained.import_hf_vit(config.init_from, heads=config.model.vit_heads)
      check_vit_sizes(config.init_from, cfg, config.model)
      grid = tuple(int(n) // int(cfg["patch_size"]) for n in cfg["image_size"])
      return {"params": {"shared": {"trunk": v["params"]}}, "model_state": None,
              "vit_grid": grid}, 0
    if os.path.isfile(config.init_from):
      depth = int(config.model.encoder[len("resnet"):])
      v = pretrained.import_torchvision_resnet(config.init_from, depth)
      return {"params": {"shared": {"trunk": v["params"]}},
              "model_state": {"shared": {"trunk": v["batch_stats"]}}}, 0
    tree, step = ckpt_lib.read_tree(config.init_from)
    if "params" not in tree:
      raise ValueError(f"path={config.init_from!r}: checkpoint step {step} holds no "
                       "'params'.")
    return {"params": tree["params"], "model_state": tree.get("model_state") or None}, step


# A Hugging Face ViT config's sizes -> the config.model fields that must equal them.
_VIT_SIZES = (("hidden_size", "vit_width"), ("num_hidden_layers", "vit_depth"),
              ("num_attention_heads", "vit_heads"), ("intermediate_size", "vit_mlp_dim"),
              ("patch_size", "patch_size"), ("layer_norm_eps", "vit_eps"))


def check_vit_sizes(path: str, cfg: dict, model_config) -> None:
  """Raises one ``ValueError`` line naming every ``config.model`` ViT size
  that differs from the checkpoint's (``cfg``: :func:`mtljax.pretrained.vit_config`)."""
  bad = [f"config.model.{ours}={model_config[ours]!r} (checkpoint {theirs}={cfg[theirs]!r})"
         for theirs, ours in _VIT_SIZES
         if not np.isclose(float(cfg[theirs]), float(model_config[ours]), rtol=1e-6, atol=0)]
  if bad:
    raise ValueError(f"{path} is a ViT of other sizes: {'; '.join(bad)}; set them to the "
                     "checkpoint's.")


def fit_vit_grid(path: str, source: dict, grid: tuple[int, int]) -> dict:
  """``source`` (:func:`read_source` of a ViT file, whose ``vit_grid`` is its
  ``config.json``'s patch grid) with its position embeddings resized to the
  model's patch ``grid`` when the two differ (another image size:
  :func:`mtljax.models.backbones.vit.resample_position_embeddings`, Hugging
  Face's and timm's bicubic resize, logged); as it is otherwise."""
  src = tuple(source["vit_grid"])
  if src == tuple(grid):
    return source
  trunk = source["params"]["shared"]["trunk"]
  pos = vit_lib.resample_position_embeddings(trunk["embeddings"]["position_embeddings"], src,
                                             grid)
  logger.info("%s: position embeddings resized from the checkpoint's %dx%d patch grid to "
              "the model's %dx%d (bicubic, as Hugging Face's interpolate_pos_encoding).",
              path, *src, *grid)
  trunk = {**trunk, "embeddings": {**trunk["embeddings"], "position_embeddings": pos}}
  return {**source, "params": {**source["params"], "shared": {
      **source["params"]["shared"], "trunk": trunk}}}


def vit_grid(config, input_shape) -> tuple[int, int]:
  """The ViT encoder's patch grid on inputs of ``input_shape`` (H, W[, C])."""
  p = int(config.model.patch_size)
  return int(input_shape[0]) // p, int(input_shape[1]) // p


def _initial_state(config, model, objective, tx, state: steps.TrainState, source=None,
                   input_shape=None) -> tuple[steps.TrainState, Callable | None, dict]:
  """The state after ``config.init_from`` (fine-tuning) and the L2-SP penalty.
  ``source``: ``read_params(config.init_from)`` when already read (N seeds
  read the checkpoint once); ``input_shape``: the data's (a ViT file's
  position embeddings are resized to its patch grid)."""
  if not config.init_from:
    if config.l2sp_alpha or config.l2sp_beta:
      raise ConfigError("config.l2sp_alpha/l2sp_beta pull parameters toward pretrained "
                        "values: set config.init_from.")
    return state, None, None
  source, source_step = source or read_source(config)
  dont_load = [p for p in config.init_dont_load.split(";") if p]
  with errors.config_section("init_from"):
    if "vit_grid" in source:
      source = fit_vit_grid(config.init_from, source, vit_grid(config, input_shape))
    params, report = ckpt_lib.load_params(state.params, source["params"], dont_load)
    if state.model_state is not None and source["model_state"] is not None:
      # The batch statistics of the loaded layers come with them (the same
      # paths and dont_load patterns): eval mode reads them from the start.
      # LTB's sampler (key, clock) stays the run's own.
      model_state, _ = ckpt_lib.load_params(state.model_state, source["model_state"],
                                            dont_load + [branching.SAMPLER_STATE])
      state = state._replace(model_state=model_state)
  if not report["loaded"] and not config.get("init_allow_nothing_loaded", False):
    raise ConfigError(
        f"config.init_from={config.init_from!r} (step {source_step}) loads none of this "
        f"model's parameters (left fresh by config.init_dont_load: "
        f"{len(report['fresh_dont_load'])}, not in the checkpoint: "
        f"{len(report['fresh_missing'])}): the run would train from scratch. Fix "
        "config.init_from or config.init_dont_load, or set "
        "config.init_allow_nothing_loaded=True to start so anyway.")
  init_report = {"from": config.init_from, "step": source_step, **report}
  logger.info("init_from %s (step %d): loaded %d, fresh (dont_load) %s, fresh (missing) "
              "%s, unused %s.", config.init_from, source_step, len(report["loaded"]),
              report["fresh_dont_load"], report["fresh_missing"], report["unused"])
  state = state._replace(
      params=params, opt_state=optim.init_state(tx, params, steps.task_rows(model, objective)))
  penalty = None
  if isinstance(tx, optim.RuledOptimizer) and tx.l2sp is not None:
    # Decoupled: in the optimizer, anchored at the loaded values by init_state.
    transfer.check_l2sp_loaded(tx.l2sp.kind, report)
  elif config.l2sp_alpha or config.l2sp_beta:
    # The objective's own parameters (uncertainty's log sigma^2) are not the
    # model's: L2-SP neither pulls nor decays them.
    def model_only(tree):
      return {"shared": tree["shared"],
              "tasks": {k: v for k, v in tree["tasks"].items() if k != objective.name}}
    inner = transfer.l2sp_penalty(model_only(ckpt_lib.loaded_mask(params, report)),
                                  config.l2sp_alpha, config.l2sp_beta)
    penalty = lambda p, anchor: inner(model_only(p), model_only(anchor))
    state = state._replace(anchor=jax.tree.map(jnp.copy, params))
  return state, penalty, init_report


def build_run(config: ml_collections.ConfigDict, data: task_data.MultiTaskData,
              eval_split: str = "test", placement: sharding.Placement | None = None
              ) -> Run:
  """The model, objective, optimizer, initial state (loaded from
  ``config.init_from`` when set, placed on the mesh), train step and eval step
  of a run on ``data``; nothing is compiled. The eval step is sized for
  ``data.<eval_split>``, and only its shape is read. ``placement``: the mesh
  and rules (default: ``config.mesh``)."""
  validate_config(config)
  if placement is None:
    placement = placement_from_config(config)
  ts = data.taskset
  s = config.sampling
  with errors.config_section("sampling", s):
    probs = sampling.task_probabilities(s.task_sampler, data.num_train, s.temperature)
    if s.shared_inputs:
      sampling.check_shared_inputs(data.train, ts.names)
  check_weights(config, ts.names)  # (tasks named by a split key: known only now)
  weights = tasks_lib.task_weights(ts, config.objective.weights.to_dict())
  spc = steps_per_call(config)
  logger.info("Data %s: %d tasks %s, input shape %s, train sizes %s, groups %s.",
              data.name, len(ts), list(ts.names), data.input_shape,
              data.num_train.tolist(), list(ts.groups))
  model = model_from_config(config, ts, data.input_shape)
  objective = objective_from_config(config, len(ts))
  shapes = jax.eval_shape(lambda r: steps.init_train_state(
      model, optax.set_to_zero(), r, objective), jax.random.key(0)).params
  groups = layer_groups(model, objective, shapes)
  tx, lr_schedules = optimizer_from_config(
      config, groups, [n for n, _ in params_lib.flatten_with_names(shapes)])
  if isinstance(tx, optim.RuledOptimizer):
    for line in tx.describe(shapes):
      logger.debug("optim rule: %s", line)
  init = jax.jit(lambda r: steps.init_train_state(model, tx, r, objective))
  n_seeds = num_seeds(config)

  source = read_source(config) if config.init_from else None

  def seed_state(seed):  # seed s: initialised from key(s + 1), sampling from key(s)
    state = init(jax.random.key(seed + 1))
    state, penalty, init_report = _initial_state(config, model, objective, tx, state, source,
                                                 data.input_shape)
    state = state._replace(rng=jax.random.key_data(jax.random.key(seed)))
    return state, penalty, init_report
  state, penalty, init_report = seed_state(config.seed)
  if n_seeds > 1:  # seeds seed, seed + 1, ...: one stacked state, one vmapped program
    others = [seed_state(config.seed + i)[0] for i in range(1, n_seeds)]
    state = jax.tree.map(lambda *a: jnp.stack(a), state, *others)
  host = data.readers is not None
  if host and n_seeds > 1:
    raise ConfigError(f"config.num_seeds={n_seeds} trains seeds side by side on data held on "
                      "the device (each seed draws its own batches); with the host pipeline "
                      "run one seed per job, or set config.data.pipeline='device'.")
  # One sampler: the step draws with it, and the host pipeline reads its draws.
  sampler = sampling.make_sampler(ts, probs, s.tasks_per_step or len(ts), s.examples_per_task,
                                  s.replace, s.shared_inputs, draws=objective.draws)
  with errors.config_section("data", config.data):
    augment = steps.dense_augmenter(ts, config.data.get("augment", ""),
                                    tuple(config.data.get("augment_scales",
                                                          dense_augment.SCALES)))
  with errors.config_section("", config):  # its messages name config sections
    train_fn = steps.make_train_step(
        model, tx, objective, sampler, weights=weights, steps_per_call=spc, seed=config.seed,
        penalty=penalty, tag_lr=config.tag_lr,
        slot_backwards=config.objective.get("slot_backwards", "auto"), placement=placement,
        on_nonfinite=config.get("on_nonfinite", "stop"), host_batches=host, augment=augment)
  batches = None
  if host:
    index, count = placement.data_shard()
    batches = pipeline.Batches(data, sampler, config.seed, steps_per_call=spc,
                               shard_index=index, shard_count=count)
    eval_fn = steps.make_chunk_eval_step(model, label_mean=data.label_mean,
                                         label_std=data.label_std,
                                         dense_convention=config.get("dense_convention",
                                                                     "exact"),
                                         shared_inputs=bool(s.shared_inputs))
  else:
    eval_fn = steps.make_eval_step(model, label_mean=data.label_mean,
                                   label_std=data.label_std,
                                   num_examples=data.split(eval_split)["x"].shape[1],
                                   batch_size=config.eval_batch_size,
                                   dense_convention=config.get("dense_convention", "exact"),
                                   shared_inputs=bool(s.shared_inputs))
  if n_seeds > 1:  # on a mesh with a seed axis, each device group runs its seeds
    spmd = placement.seed_axis
    train_fn = jax.vmap(train_fn, in_axes=(0, None), spmd_axis_name=spmd)
    eval_fn = jax.vmap(eval_fn, in_axes=(0, None, 0), spmd_axis_name=spmd)
  state_shardings = placement.state(state, lead=int(n_seeds > 1), seeds=n_seeds > 1)
  state = sharding.place(state, state_shardings)
  logger.info("Mesh %s on %d %s device(s).", dict(placement.mesh.shape),
              placement.mesh.size, jax.default_backend())
  for line in sharding.describe(state_shardings.params):
    logger.debug("sharding %s", line)
  return Run(model, objective, tx, state, train_fn, eval_fn, spc, init_report, placement,
             state_shardings, n_seeds, batches, lr_schedules)
