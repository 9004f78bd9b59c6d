r"""CelebA's 40 binary face attributes as 40 tasks on shared inputs (TFDS
``celeb_a``), one CNN trunk with a head per attribute.

    python -m experiments.main --config=experiments/configs/celeba.py \
        --workdir=/tmp/mtljax/celeba

The data set comes from the TFDS catalog: with the network, the first run
downloads and prepares it into ``config.data.data_dir`` (default
``$MTLJAX_DATA_DIR``, else ``~/.cache/mtljax/tensorflow_datasets``); offline,
prepare it elsewhere (``tfds build celeb_a --file_format=array_record
--data_dir=DIR``) and pass ``--config.data.data_dir=DIR``. Its 162,770 train
images (218x178x3) do not fit the device path: ``config.data.pipeline='auto'``
reads them per step (the host pipeline).

Tasks are named after the features (``attributes.Smiling``). Some attributes
only: ``--config.data.tasks="('attributes.Smiling','attributes.Male')"``, or
name the label features and their kinds,
``--config.data.labels="{'attributes/Smiling': 'binary'}"``. Variant
``:quick`` trains on 2,000 examples for 200 steps (a smoke run, not a result).
"""

from experiments.configs import common


# What --config=FILE:ARG accepts (listed by `python -m experiments.main --list`).
VARIANTS = ("", "quick")


def get_config(arg: str = ""):
  if arg not in VARIANTS:
    raise ValueError(f"celeba config: unknown variant {arg!r}; use '' or 'quick'.")
  c = common.base_config()
  c.data.name = "celeb_a"
  c.data.input_key = "image"
  # () labels: every bool feature (the 40 attributes/...) is a binary task.
  c.model.arch = "multi_head"
  c.model.encoder = "cnn"
  c.model.channels = (16, 32, 64)
  c.model.hidden = (128,)
  c.sampling.tasks_per_step = 0      # every attribute every step
  c.sampling.shared_inputs = True    # one batch of faces, labelled for every attribute
  c.sampling.examples_per_task = 64
  c.optim.lr = 1e-3
  c.total_steps = 20000
  c.steps_per_call = 50
  c.log_steps = 500
  c.eval_steps = 5000
  c.checkpoint_steps = 5000
  c.eval_batch_size = 256
  if arg == "quick":
    c.data.max_train_examples = 2000
    c.model.channels = (8, 16)
    c.model.hidden = (32,)
    c.total_steps = 200
    c.log_steps = 50
    c.eval_steps = c.checkpoint_steps = 200
  return c
