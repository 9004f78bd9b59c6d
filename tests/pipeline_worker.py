"""One process of a two-process host-pipeline run (tests/test_pipeline.py
starts two, with 4 fake CPU devices each, on localhost).

    python tests/pipeline_worker.py COORDINATOR PROCESS_ID OUT_DIR WORKDIR

Writes ``OUT_DIR/p{PROCESS_ID}.json``: the train records this process holds,
the inputs its first calls read and those of its own records, their task ids, the label statistics and
task sizes it uses; then trains a few steps of the host pipeline on the global
mesh of 8 (a shared ``WORKDIR``) and adds the final loss; then the same run on
a mesh with ``data=1`` (both processes replicas of one data shard).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mtljax import sharding  # noqa: E402  (before any other jax call)

coordinator, pid, out_dir, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sharding.initialize_distributed(coordinator, 2, pid)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import helpers  # noqa: E402

from mtljax import build  # noqa: E402
from mtljax import train  # noqa: E402
from mtljax.data import tfds_access  # noqa: E402

config = helpers.small_sinusoids_config(**{"data.pipeline": "auto", "mesh.data": 4,
                                           "mesh.task": 2, "total_steps": 10,
                                           "steps_per_call": 5, "log_steps": 5,
                                           "eval_steps": 10, "checkpoint_steps": 10})
data = build.data_from_config(config)
run = build.build_run(config, data)
split = data.train
held = sorted({int(r) for t, n in enumerate(split["n"])
               for r in split["records"][split["source"][t], :n]})
# What the reader really read: the inputs of its first calls' batches, and the
# inputs of the records this process holds, read straight from the data source.
source = data.readers["train"].source
held_x = sorted({float(r["x"][0]) for r in tfds_access.read_records(source, held)})
read_x, ids = set(), []
for c in range(3):
  batch = run.batches.call(c)
  read_x |= {float(v) for v in np.asarray(batch["x"]).ravel()}
  ids.extend(np.asarray(batch["task_ids"]).tolist())
summary = train.train_and_evaluate(config, workdir)
# A mesh whose data axis lies inside each process (data=1): both processes are
# replicas of one data shard, read the whole split and feed the same examples.
replicas = helpers.with_overrides(config, {"mesh.data": 1, "mesh.task": 8})
replica_summary = train.train_and_evaluate(replicas, workdir + "_replicas")
out = {"held": held, "held_x": held_x, "read_x": sorted(read_x), "task_ids": ids,
       "label_mean": data.label_mean.tolist(), "label_std": data.label_std.tolist(),
       "num_train": np.asarray(data.num_train).tolist(),
       "pipeline": summary["data_pipeline"]["pipeline"],
       "loss": summary["tasks"][data.taskset.names[0]]["mse"],
       "processes": jax.process_count(), "devices": jax.device_count(),
       "replica_tasks": replica_summary["tasks"]}
with open(os.path.join(out_dir, f"p{pid}.json"), "w") as f:
  json.dump(out, f)
