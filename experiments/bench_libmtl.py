r"""mtljax's dense step against LibMTL's on the same model and shapes (issue 26):
LibMTL's NYUv2 HPS model (ResNet-50 dilated to output stride 8, three DeepLab
heads, batch norm, Adam), equal weighting and two gradient methods (PCGrad;
MGDA on the shared parameters, LibMTL's ``rep_grad=False``), one pinned CPU
thread each (``taskset`` to one core; XLA without its thread pool, torch with
``set_num_threads(1)``).

    python -m experiments.bench_libmtl --peer_python=/path/to/venv/bin/python \
        --size=64x80 --batch=2

``--peer_python``: a virtual environment outside the project with torch,
torchvision, scipy and LibMTL (``pip install LibMTL --no-deps``), which runs
``scripts/bench_libmtl_peer.py``. mtljax's side is
``experiments.bench_dense_step`` (same model, shapes and losses; its step
samples its batch from the split, LibMTL's reads a fixed one). The two run as
alternating processes (LibMTL's methods around mtljax's); each reports the
median of its timed steps after a warm-up step. Prints ms/step per method and
the ratio LibMTL / mtljax (> 1: mtljax faster).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

_PEER = flags.DEFINE_string("peer_python", "", "Python of the venv with torch and LibMTL.")
_SIZE = flags.DEFINE_string("size", "64x80", "HxW.")
_BATCH = flags.DEFINE_integer("batch", 2, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 4, "Timed steps per method and side.")
_CORE = flags.DEFINE_integer("core", 1, "The CPU core both sides are pinned to.")

# mtljax method -> LibMTL weighting.
METHODS = {"fixed": "EW", "pcgrad": "PCGrad", "mgda": "MGDA"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pinned(cmd: list[str], env=None) -> subprocess.CompletedProcess:
  return subprocess.run(["taskset", "-c", str(_CORE.value), *cmd], cwd=ROOT, env=env,
                        capture_output=True, text=True, check=True)


def libmtl(weighting: str) -> float:
  out = _pinned([_PEER.value, "scripts/bench_libmtl_peer.py", f"--weighting={weighting}",
                 f"--size={_SIZE.value}", f"--batch={_BATCH.value}",
                 f"--steps={_STEPS.value}", "--threads=1"])
  return statistics.median(json.loads(line)["ms"] for line in out.stdout.splitlines()
                           if line.startswith("{"))


def mtljax() -> dict[str, float]:
  env = {**os.environ, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false "
         "intra_op_parallelism_threads=1", "JAX_PLATFORMS": "cpu"}
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "rows.json")
    _pinned([sys.executable, "-m", "experiments.bench_dense_step", "--encoder=resnet50",
             f"--size={_SIZE.value}", f"--batch={_BATCH.value}",
             f"--methods={','.join(METHODS)}", "--calls=1", f"--rounds={_STEPS.value}",
             f"--json={path}"], env=env)
    with open(path) as f:
      return {r["method"]: r["ms_per_step"] for r in json.load(f)["rows"]}


def main(argv):
  del argv
  if not _PEER.value:
    raise app.UsageError("--peer_python: the venv with torch and LibMTL (outside the project).")
  got = {"libmtl": {}}
  got["libmtl"]["fixed"] = libmtl(METHODS["fixed"])
  got["mtljax"] = mtljax()
  for m in ("pcgrad", "mgda"):
    got["libmtl"][m] = libmtl(METHODS[m])
  print(f"ResNet-50 OS8 + 3 DeepLab heads, {_SIZE.value}, B={_BATCH.value}, one pinned thread")
  print(f"{'method':10} {'LibMTL ms':>10} {'mtljax ms':>10} {'LibMTL/mtljax':>14}")
  for m in METHODS:
    a, b = got["libmtl"][m], got["mtljax"][m]
    print(f"{m:10} {a:10.0f} {b:10.0f} {a / b:14.2f}")
  print(f"{'plain JAX':10} {'':10} {got['mtljax']['plain']:10.0f}")


if __name__ == "__main__":
  app.run(main)
