r"""Omniglot's alphabets as tasks: each alphabet a classification task over its
own characters, on its own images (TFDS ``omniglot``, the family form).

    python -m experiments.main --config=experiments/configs/omniglot.py \
        --workdir=/tmp/mtljax/omniglot

``config.data.family='alphabet'`` makes each value of the ``alphabet``
feature a task (``alphabet_00`` .. ``alphabet_49``) and
``config.data.labels={'alphabet_char_id': 'classification'}`` its label (the
character within the alphabet; a plain integer feature, so the class count is
read from the data: the largest train label + 1, one head size for every
alphabet). TFDS's splits hold *different* alphabets (30 background, 20
evaluation), so the run reads both (``train_split='train+test'``) and holds out
20% of the images at random (``test_fraction``, fixed by ``split_seed``) as the
test split, every alphabet in both. With the network the first run downloads
and prepares the data into ``config.data.data_dir``; offline, ``tfds build
omniglot --file_format=array_record --data_dir=DIR`` elsewhere and pass
``--config.data.data_dir=DIR``. The 32,460 images (105x105x3) are read per
step (host pipeline). Variant ``:quick``: 10 sampled alphabets per step, 300
steps (a smoke run).
"""

from experiments.configs import common


# What --config=FILE:ARG accepts (listed by `python -m experiments.main --list`).
VARIANTS = ("", "quick")


def get_config(arg: str = ""):
  if arg not in VARIANTS:
    raise ValueError(f"omniglot config: unknown variant {arg!r}; use '' or 'quick'.")
  c = common.base_config()
  c.data.name = "omniglot"
  c.data.input_key = "image"
  c.data.family = "alphabet"
  c.data.labels = {"alphabet_char_id": "classification"}
  c.data.train_split = "train+test"
  c.data.test_split = ""
  c.data.test_fraction = 0.2
  c.model.arch = "multi_head"
  c.model.encoder = "cnn"
  c.model.channels = (16, 32, 64)
  c.model.hidden = (128,)
  c.sampling.tasks_per_step = 10    # of the 50 alphabets, uniformly
  c.sampling.examples_per_task = 32
  c.optim.lr = 1e-3
  c.total_steps = 10000
  c.log_steps = 500
  c.eval_steps = c.checkpoint_steps = 5000
  c.eval_batch_size = 256
  if arg == "quick":
    c.model.channels = (8, 16)
    c.model.hidden = (32,)
    c.total_steps = 300
    c.log_steps = 100
    c.eval_steps = c.checkpoint_steps = 300
  return c
