r"""Two tasks from two catalog data sets: MNIST digits and Fashion-MNIST
clothes, each on its own inputs (``config.data.name='mnist+fashion_mnist'``),
one shared MLP or CNN trunk with a head per task.

    python -m experiments.main --config=experiments/configs/mnist_fashion.py \
        --workdir=/tmp/mtljax/mnist_fashion

Data sets joined by ``+`` each bring their tasks, named ``SOURCE_TASK``
(``mnist_label``, ``fashion_mnist_label``), with their own inputs (the inputs
must have one shape: both are 28x28x1). With the network, the first run
downloads and prepares both into ``config.data.data_dir``; offline, prepare
them elsewhere (``tfds build mnist fashion_mnist --file_format=array_record
--data_dir=DIR``) and pass ``--config.data.data_dir=DIR``. Several data sets
load on the device path (2 x 70,000 images, 440 MB as float32). Variant
``:quick``: 5,000 examples per task, 300 steps.
"""

from experiments.configs import common


# What --config=FILE:ARG accepts (listed by `python -m experiments.main --list`).
VARIANTS = ("", "quick")


def get_config(arg: str = ""):
  if arg not in VARIANTS:
    raise ValueError(f"mnist_fashion config: unknown variant {arg!r}; use '' or 'quick'.")
  c = common.base_config()
  c.data.name = "mnist+fashion_mnist"
  c.data.input_key = "image"
  c.data.labels = {"label": "classification"}
  c.data.pipeline = "device"
  c.model.arch = "multi_head"
  c.model.encoder = "cnn"
  c.model.channels = (16, 32)
  c.model.hidden = (128,)
  c.sampling.tasks_per_step = 0     # both tasks every step, each on its own batch
  c.sampling.examples_per_task = 64
  c.optim.lr = 1e-3
  c.total_steps = 5000
  c.log_steps = 250
  c.eval_steps = c.checkpoint_steps = 2500
  if arg == "quick":
    c.data.max_train_examples = 5000
    c.model.channels = (8, 16)
    c.model.hidden = (64,)
    c.total_steps = 300
    c.log_steps = 100
    c.eval_steps = c.checkpoint_steps = 300
  return c
