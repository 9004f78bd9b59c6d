"""The command line: one-line errors a person can act on, --list,
--print_config, per-task weights by dotted key, and the progress line."""

import os
import re
import subprocess
import sys

import pytest

from experiments import main as main_lib
from mtljax import objectives
from mtljax import train
from mtljax.models import multitask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "--config=experiments/configs/sinusoids.py:quick"


def _main(*args):
  return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_an_unknown_override_key_is_one_line_with_the_nearest_keys(tmp_path):
  r = _main(CONFIG, f"--workdir={tmp_path}", "--config.optim.learning_rate=1e-3")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith("error: --config.optim.learning_rate: no such config key; "
                             "nearest valid keys: optim.lr")


def test_per_task_weights_by_dotted_key_and_print_config():
  r = _main(CONFIG, "--print_config", "--config.objective.weights.sine_00=2",
            "--config.objective.weights.sine_03=0.5")
  assert r.returncode == 0, r.stderr
  text = r.stdout
  assert "weights:\n    sine_00: 2.0\n    sine_03: 0.5" in text
  assert "total_steps: 600" in text  # the resolved config, and no run (no workdir given)


def test_a_bad_config_value_is_one_line_naming_the_allowed_values(tmp_path):
  r = _main(CONFIG, f"--workdir={tmp_path}", "--config.data.max_train_examples=-5")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "error: config.data.max_train_examples must be an integer >= 0" in r.stderr


def test_list_names_every_config_architecture_objective_and_strategy():
  r = _main("--list")
  assert r.returncode == 0, r.stderr
  out = r.stdout
  configs = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments", "configs"))
                   if f.endswith(".py") and f not in ("__init__.py", "common.py"))
  for name in configs:
    assert f"\n  {name} " in out, name
  assert "'protocol=nashmtl'" in out and "'source=multi_digits'" in out
  assert "architectures (config.model.arch; hyper-parameters as config.model.ARCH.NAME):\n" in out
  for arch in multitask.archs():
    hp = multitask.hyperparameters(arch)
    shown = ", ".join(f"{k}={v!r}" for k, v in hp.items()) or "-"
    assert f"\n  {arch:<14} {shown}\n" in out, arch
  assert ("encoder='mlp', hidden=(128, 128), channels=(16, 32), heads='auto', "
          "output_stride=8, normalization='batch', conv_impl='auto', patch_size=4, "
          "vit_width=64, vit_depth=4, vit_heads=4, vit_mlp_dim=128, vit_eps=1e-12\n") in out
  assert "  per-pixel (dense tasks only), with the architectures built for each:\n" in out
  assert "\n    resnet50   multi_head, independent, mtan, cross_stitch, ltb\n" in out
  assert "\n    (not on any per-pixel encoder: " in out and "mmoe" in out
  assert "\n    segnet     multi_head, independent, mtan\n" in out
  assert f"encoders (config.model.encoder): {', '.join(multitask.ENCODERS)}\n" in out
  assert f"heads (config.model.heads): {', '.join(multitask.HEADS)}\n" in out
  for method in objectives.methods():
    hp = objectives.hyperparameters(method)
    line = next(l for l in out.splitlines() if l.strip().startswith(method + " "))
    for k in hp:
      assert f"{k}=" in line, (method, k)
  assert "lp_ft" in out and "gradual_unfreezing" in out


def test_nearest_keys_know_abbreviations_and_spelling():
  keys = {"optim", "optim.lr", "optim.name", "model", "model.arch", "model.hidden"}
  assert main_lib._nearest("optim.learning_rate", keys)[0] == "optim.lr"
  assert main_lib._nearest("model.archh", keys)[0] == "model.arch"


def test_the_progress_line_has_no_nan_before_a_rate_exists():
  p = train._Progress(total=100, first=0)
  first = p.line(10, 1.0)  # the first call has not returned yet
  assert "nan" not in first and "first call (compiling)" in first
  p.tick(10)               # the first call (with compilation) returned
  assert "first call" in p.line(10, 1.0)
  p.tick(20)
  later = p.line(20, 0.5)
  assert "steps/s | ETA" in later and "nan" not in later


@pytest.mark.parametrize("args, missing", [(["--workdir=/tmp/x"], "--config"),
                                           ([CONFIG], "--workdir")])
def test_missing_config_or_workdir_is_a_usage_error(args, missing):
  r = _main(*args)
  assert r.returncode != 0
  assert f"{missing} is required" in r.stderr


_TFDS_PER_RUN = ("Using custom data configuration", "has no dataset_info.json")


@pytest.mark.slow
def test_a_run_is_quiet_unless_asked_and_its_progress_has_rates_from_the_second_call(tmp_path):
  budget = ["--config.total_steps=60", "--config.steps_per_call=20", "--config.log_steps=20",
            "--config.eval_steps=60", "--config.checkpoint_steps=60"]
  r = _main(CONFIG, f"--workdir={tmp_path}", *budget)
  assert r.returncode == 0, r.stderr
  progress = [l for l in r.stderr.splitlines() if "] step " in l]
  assert [l.split("] step ")[1].split()[0] for l in progress] == ["20/60", "40/60", "60/60"]
  assert progress[0].endswith("| first call (compiling) | ETA after the next call")
  for line in progress[1:]:  # a rate and an ETA from the first timed call on
    rate = line.split(" | ", 1)[1]
    assert re.fullmatch(r"\d+\.\d steps/s \| ETA \d\d:\d\d:\d\d", rate), line
  assert "nan" not in r.stderr.lower() and "ETA ?" not in r.stderr
  assert "Parameters: " in r.stderr and "param " not in r.stderr  # the count, not the list
  assert not [w for w in _TFDS_PER_RUN if w in r.stderr + r.stdout], r.stderr
  # -v 1 (asked): every parameter's shape and the other libraries' warnings.
  r = _main(CONFIG, f"--workdir={tmp_path}", *budget, "-v", "1")  # resumes at the end
  assert r.returncode == 0, r.stderr
  params = [l for l in r.stderr.splitlines() if " param " in l]
  assert params and all(re.search(r"param \S+ +\(\d+(, \d+)*,?\)$", l) for l in params)
  assert _TFDS_PER_RUN[0] in r.stderr, r.stderr  # (the other one: on generation only)


def test_library_errors_name_their_arguments_and_build_names_the_config_path(tmp_path):
  """A library function's error names its own argument; the same error raised
  where build reads the config is a ConfigError under the config path (a
  message that starts with a key of the section reads as that key's path)."""
  import helpers  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mtljax import build, checkpoint, errors  # pylint: disable=g-import-not-at-top
  from mtljax import gradients, sharding  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError) as e:
    gradients.cagrad_weights(jnp.eye(2), c=2.0)
  assert str(e.value) == "cagrad.c must be in [0, 1), got 2.0."
  assert not isinstance(e.value, errors.ConfigError)
  config = helpers.small_sinusoids_config(**{"objective.method": "cagrad",
                                             "objective.cagrad.c": 2.0})
  with pytest.raises(errors.ConfigError) as e:
    build.objective_from_config(config, 3)
  assert str(e.value) == "config.objective.cagrad.c must be in [0, 1), got 2.0."
  with pytest.raises(ValueError, match=r"^data=0 must be a positive size"):
    sharding.make_mesh(0, 1)
  config = helpers.small_sinusoids_config(**{"mesh.data": 0})
  with pytest.raises(errors.ConfigError, match=r"^config\.mesh\.data=0 must be a positive"):
    build.placement_from_config(config)
  # A fine-tuning source with no checkpoint: the library's FileNotFoundError
  # names its path argument; build reports it under config.init_from.
  empty = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"^path='.*': no checkpoint in"):
    checkpoint.read_params(empty)
  config = helpers.small_sinusoids_config(init_from=empty)
  with pytest.raises(errors.ConfigError,
                     match=r"^config\.init_from: path='.*': no checkpoint in"):
    build.read_source(config)
  with pytest.raises(errors.ConfigError, match=r"^config\.optim: stlr: cut_frac must be"):
    with errors.config_section("optim", config.optim):
      from mtljax import schedules  # pylint: disable=g-import-not-at-top
      schedules.make_schedule("slanted_triangular", 1e-3, 100, cut_frac=2.0)


def test_print_config_is_plain_yaml_a_reader_would_write():
  import helpers  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import yaml  # pylint: disable=g-import-not-at-top
  config = helpers.small_sinusoids_config(**{"objective.weights": {"sine_00": 2.0}})
  text = main_lib.format_config(config)
  assert "!!" not in text and "&id" not in text and "*id" not in text
  assert "\n  hidden: [16, 16]\n" in text and "\n  tasks: []\n" in text
  assert "\n  weights:\n    sine_00: 2.0\n" in text
  # It reads back as the config (tuples as lists).
  assert yaml.safe_load(text) == json.loads(json.dumps(config.to_dict()))
