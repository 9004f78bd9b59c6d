"""One process of a two-process check (tests/test_catalog.py starts two on
localhost): each holds its own shard of a family's train split, as on the
host pipeline, and lays it out with :func:`mtljax.data.task_data.build_task_data`.

    python tests/catalog_worker.py COORDINATOR PROCESS_ID

Prints one JSON line: this process's id, the process count, its shard's own
class count (train max + 1) and the family's class count it got.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtljax import sharding  # noqa: E402  (before any other jax call)

coordinator, pid = sys.argv[1], int(sys.argv[2])
sharding.initialize_distributed(coordinator, 2, pid)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mtljax import tasks as tasks_lib  # noqa: E402
from mtljax.data import specs  # noqa: E402
from mtljax.data import task_data  # noqa: E402

spec = specs.DataSpec("x", (specs.TaskColumn(
    tasks_lib.Task("f_", "classification", 2), "y", classes_from_data=True),), split_key="f")
# Process 0's shard has classes up to 3, process 1's up to 6.
labels = np.asarray([[0, 1, 2, 3], [0, 6, 1, 2]][pid], np.int64)
split = {"x": np.zeros((4, 2), np.float32), "y": labels, "f": np.asarray([0, 1, 0, 1])}
data = task_data.build_task_data("fam", spec, {"train": split, "test": split})
print(json.dumps({"pid": pid, "processes": jax.process_count(),
                  "own": int(labels.max()) + 1,
                  "counts": sorted({t.num_classes for t in data.taskset})}))
