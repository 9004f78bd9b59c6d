"""Runs mtljax cases in a process of its own (tests/test_sharding.py starts it
with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set before jax is
imported) and writes what they produced for the test to compare.

    python tests/mesh_worker.py OUT_DIR CASES_JSON

``CASES_JSON``: ``[{"name", "kind", "config", "overrides"[, "check_shardings",
"workdir"]}]`` (cases naming the same ``workdir`` resume one another);
``kind`` is ``train`` (``train_and_evaluate``: final parameters and batch statistics, metrics.jsonl
rows, and with ``check_shardings`` the compiled step's shardings), ``cv`` (``cross_validate``'s scores) or
``transfer`` (``transfer_sinusoids.mse_curve`` from a pretrained run) or
``error`` (the ``ValueError`` message building the run raises, or None).
"""

import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/helpers.py

import jax  # noqa: E402
import numpy as np  # noqa: E402

import helpers  # noqa: E402

from mtljax import build  # noqa: E402
from mtljax import checkpoint as ckpt_lib  # noqa: E402
from mtljax import cv  # noqa: E402
from mtljax import params as params_lib  # noqa: E402
from mtljax import sharding  # noqa: E402
from mtljax import train  # noqa: E402


def _config(case):
  module, _, arg = case["config"].partition(":")
  c = importlib.import_module(f"experiments.configs.{module}").get_config(arg)
  return helpers.with_overrides(c, case.get("overrides", {}))


def _compiled_shardings(config, workdir):
  """The compiled step's input and output shardings, as spec strings by path."""
  data = build.data_from_config(config)
  run = build.build_run(config, data)
  pl = run.placement
  train_sh = pl.data(data.train, len(data.taskset))
  step = sharding.jit_train_step(run.train_fn, run.state_shardings, train_sh, pl)
  compiled = step.lower(run.state, sharding.place(data.train, train_sh)).compile()
  ins, outs = compiled.input_shardings[0], compiled.output_shardings
  def specs(tree):
    return {n: str(getattr(s, "spec", s)) for n, s in params_lib.flatten_with_names(tree)}
  return {"in_state": specs(ins[0]), "in_data": specs(ins[1]), "out_state": specs(outs[0]),
          "want_state": specs(run.state_shardings), "want_data": specs(train_sh),
          "mesh": dict(pl.mesh.shape)}


def main(out_dir, cases):
  os.makedirs(out_dir, exist_ok=True)
  for case in cases:
    c = _config(case)
    name, kind = case["name"], case["kind"]
    workdir = os.path.join(out_dir, "work", case.get("workdir", name))
    result = {"devices": jax.device_count()}
    if kind == "train":
      summary = train.train_and_evaluate(c, workdir)
      tree, _ = ckpt_lib.read_tree(workdir)  # the parameters and the batch statistics
      saved = {"params": tree["params"], "model_state": tree.get("model_state") or {}}
      np.savez(os.path.join(out_dir, f"{name}.npz"),
               **{n: np.asarray(v) for n, v in params_lib.flatten_with_names(saved)})
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        result["metrics"] = [json.loads(line) for line in f]
      result["tasks"] = summary["tasks"]
      result["compilations"] = summary["train_step_compilations"]
      if case.get("check_shardings"):
        result["shardings"] = _compiled_shardings(c, workdir)
    elif kind == "cv":
      data = build.data_from_config(c)
      import dataclasses  # pylint: disable=g-import-not-at-top
      sel = cv.cross_validate(c, dataclasses.replace(data, test=None))
      result["scores"] = [p["fold_scores"] for p in sel["points"]]
    elif kind == "transfer":
      from experiments import transfer_sinusoids as exp  # pylint: disable=g-import-not-at-top
      from mtljax import transfer  # pylint: disable=g-import-not-at-top
      pre = os.path.join(workdir, "pretrain")
      from experiments import common  # pylint: disable=g-import-not-at-top
      train.train_and_evaluate(common.run_config(c, "transfer"), pre)
      target = exp.target_config(c, int(c.transfer.shots[0]))
      data = build.data_from_config(target)
      ft = transfer.apply_strategy(target, "full_ft", source=pre)
      curve, _ = exp.mse_curve(ft, data, int(c.transfer.record_steps))
      result["curve"] = curve
    elif kind == "error":  # a bad mesh: the message, raised before anything compiles
      try:
        build.validate_config(c)
        build.build_run(c, build.data_from_config(c))
        result["error"] = None
      except ValueError as e:
        result["error"] = str(e)
    else:
      raise ValueError(f"unknown kind {kind!r}")
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
      json.dump(result, f)


if __name__ == "__main__":
  main(sys.argv[1], json.loads(sys.argv[2]))
