"""Defaults shared by every config; each config file overrides what it needs."""

import ml_collections

from mtljax import objectives
from mtljax.models import multitask


def set_model_hparam(c: ml_collections.ConfigDict, name: str, value, archs=None) -> None:
  """Sets ``config.model.<arch>.<name> = value`` for every architecture in
  ``archs`` (default: all) that takes ``name`` (``tower``: every architecture
  with per-task towers); raises when none does."""
  chosen = [a for a in (archs or multitask.archs()) if name in multitask.hyperparameters(a)]
  if not chosen:
    raise ValueError(f"set_model_hparam: no architecture of {archs or 'all'} takes {name!r}.")
  for arch in chosen:
    c.model[arch][name] = value


def _data_section() -> ml_collections.ConfigDict:
  """``config.data``: which data set, its tasks and splits, how it is read."""
  data = ml_collections.ConfigDict()
  # A bundled data set (mtljax/data/builders.py) or a TFDS catalog name
  # ("celeb_a"); several joined by "+" ("mnist+fashion_mnist") put each one's
  # tasks side by side on its own inputs (tasks named SOURCE_TASK).
  data.name = ""
  data.builder_config = ""
  # Where data sets are generated (bundled) or prepared (catalog):
  # "" -> $MTLJAX_DATA_DIR, else ~/.cache/mtljax/tensorflow_datasets.
  data.data_dir = ""
  # Data sets of preprocessed files downloaded elsewhere (nyuv2_mtan,
  # cityscapes_mtan): the directory holding their train/ and val/ folders, the
  # class count (0: the layout's; Cityscapes 2, 7 or 19) and the label folder
  # ('': label, or label_{classes} for Cityscapes; LibMTL's copy: 'label').
  data.root = ""
  data.classes = 0
  data.label_folder = ""
  # Dense tasks: the literature's augmentation of every train batch, a
  # comma-separated subset of "scale_crop,flip" ("" none): random scale-crop
  # (scale drawn from augment_scales, depth divided by it) and horizontal flip
  # (normals' x negated), on the device inside the step, seeded by the step.
  data.augment = ""
  data.augment_scales = (1.0, 1.2, 1.5)
  data.download = True        # catalog data not prepared in data_dir: download it (network)
  data.tasks = ()             # task names to keep; () = all
  data.max_train_examples = 0  # 0 = all; otherwise per task (per source)
  data.input_key = "image"    # catalog data sets only: the input feature
  # Catalog data sets only: label feature -> task kind (auto|binary|
  # classification|regression), slash paths for nested features
  # ({"attributes/Smiling": "binary"}); empty = every class label and bool feature.
  data.labels = ml_collections.ConfigDict()
  data.family = ""            # catalog only: integer feature whose values are tasks (alphabet)
  data.train_split = "train"  # TFDS split strings ("train+test", "train[:80%]")
  data.test_split = "test"    # "" with test_fraction > 0
  data.test_fraction = 0.0    # > 0: hold out this fraction of train_split as the test split
  data.split_seed = 0         # the held-out draw's seed
  data.normalize_labels = True  # regression labels standardised per task (train stats)
  data.pipeline = "auto"      # auto|device|host: inputs on the device, or read per step
  data.device_budget_mb = 0.0  # auto: device path when inputs fit (0: GPU/TPU 1/4, CPU 4096)
  data.workers = 2            # host pipeline: Grain reader threads
  data.prefetch = 2           # host pipeline: batches placed on the device ahead
  return data


def _model_section() -> ml_collections.ConfigDict:
  """``config.model``: the architecture, the trunk every architecture shares
  (``config.model.<name>``) and each architecture's hyper-parameters
  (``config.model.<arch>.<name>``), generated from the registry."""
  model = ml_collections.ConfigDict()
  model.arch = "multi_head"   # one of mtljax.models.multitask.archs() (--list shows them)
  # The trunk every architecture shares: config.model.<name> (encoder mlp|cnn,
  # hidden, channels (cnn), heads auto|per_task|shared; mtljax/models/parts.py: Trunk).
  model.update(multitask.trunk_defaults())
  # Each architecture's hyper-parameters, with their defaults:
  # config.model.<arch>.<name>, e.g. --config.model.mmoe.num_experts=4,
  # --config.model.soft.lambda_=1e-3 (the dataclass of its record in
  # mtljax/models/multitask.py: REGISTRY documents each field).
  for arch in multitask.archs():
    hparams = multitask.hyperparameters(arch)
    if hparams:
      model[arch] = ml_collections.ConfigDict(hparams)
  return model


def _objective_section() -> ml_collections.ConfigDict:
  """``config.objective``: the method, task weights, and every method's
  hyper-parameters (``config.objective.<method>.<name>``), generated."""
  objective = ml_collections.ConfigDict()
  objective.method = "fixed"    # one of mtljax.objectives.methods()
  objective.weights = ml_collections.ConfigDict()  # task name -> weight (default 1)
  objective.gram_path = "jacobian"  # gradient methods: jacobian|accumulate (memory-light)
  objective.slot_backwards = "auto"  # per-task trunk backwards: auto|map|vmap
  # Every method's hyper-parameters, with the defaults of its paper/official code:
  # config.objective.<method>.<name>, e.g. --config.objective.cagrad.c=0.4,
  # --config.objective.nash_mtl.iters=100 (see mtljax/objectives/, mtljax/gradients/).
  for method in objectives.methods():
    hparams = objectives.hyperparameters(method)
    if hparams:
      objective[method] = ml_collections.ConfigDict(hparams)
  return objective


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_seeds = 1   # > 1: seeds seed..seed+N-1 as one vmapped program (mean, s.e., per seed)

  c.data = _data_section()
  c.model = _model_section()

  c.sampling = ml_collections.ConfigDict()
  c.sampling.tasks_per_step = 0  # K; 0 = all tasks
  c.sampling.examples_per_task = 64  # B
  c.sampling.task_sampler = "uniform"  # uniform|proportional|temperature
  c.sampling.temperature = 2.0
  c.sampling.replace = False
  c.sampling.shared_inputs = False  # one example batch for every slot (tasks share inputs)

  c.objective = _objective_section()

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"
  c.optim.lr = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.momentum = 0.0
  c.optim.schedule = "constant"  # constant|warmup_cosine|slanted_triangular
  c.optim.warmup_steps = 0       # warmup_cosine
  c.optim.end_lr_factor = 0.0    # warmup_cosine: final lr / lr
  c.optim.stlr_cut_frac = 0.1    # slanted_triangular (ULMFiT)
  c.optim.stlr_ratio = 32.0
  # Parameter groups: "REGEX:key=value,...;REGEX:frozen" (first match wins,
  # every parameter must match); keys lr_mult, frozen, wd_mult, schedule,
  # unfreeze_at. See mtljax/optim.py.
  c.optim.rules = ""
  c.optim.layerwise_decay = 0.0  # > 0: layer l of L gets lr * decay^(L - l) (ULMFiT: 1/2.6)
  c.optim.unfreeze_every = 0     # > 0: unfreeze one layer group from the top every N steps
  c.optim.frozen_depth = 0       # > 0: freeze that many layer groups from the input side

  # Transfer: start from another run's parameters (its workdir), or, for a ResNet
  # encoder, from a torchvision state dict file (ImageNet weights).
  c.init_from = ""
  c.init_dont_load = ""          # regexes (";"-separated) of parameters left fresh
  c.init_allow_nothing_loaded = False  # True: an init_from that loads no parameter may start
  c.l2sp_alpha = 0.0             # L2-SP: alpha/2 ||w - w0||^2 on loaded parameters
  c.l2sp_beta = 0.0              # L2-SP: beta/2 ||w||^2 on fresh parameters
  c.l2sp_mode = "decoupled"      # decoupled (after Adam's scaling, as AdamW) | coupled (in the loss)

  # Measuring transfer (mtljax/measure.py).
  c.baselines = False     # train (or read cached) single-task baselines; report Delta_m
  c.baselines_cache = ""  # "" -> $MTLJAX_CACHE_DIR or ~/.cache/mtljax
  c.tag_lr = 0.0          # > 0: TAG lookahead affinity with this SGD step size
  c.tag_groups = 2        # tasks grouped by affinity into this many groups
  c.eval_train = False    # also evaluate the train split at eval steps (overfitting)
  # Dense tasks' metrics (mtljax/dense/metrics.py): exact over the split, or a
  # published code's convention (libmtl: its normal mask and angle; mtan:
  # per-batch averages, as MTAN's and Nash-MTL's tables were computed).
  c.dense_convention = "exact"

  # Outputs besides metrics.jsonl/summary.json (mtljax/tensorboard.py, plotting.py).
  c.tensorboard = True    # TensorBoard event files next to metrics.jsonl
  c.plots = True          # curves.png (+ delta_m.png, grad_cosine.png, affinity.png)

  # k-fold cross-validation on the train split (mtljax/cv.py); folds = 0: off.
  c.cv = ml_collections.ConfigDict()
  c.cv.folds = 0
  c.cv.seed = 0
  c.cv.lr = ()          # learning rates, trained side by side (vmap)
  c.cv.steps = ()       # candidate step counts, read off along each run
  c.cv.grid = ""        # other settings: "optim.frozen_depth=0,1;l2sp_alpha=0,0.01"
  c.cv.metric = "loss"  # mean over tasks of this validation metric

  # Device mesh (mtljax/sharding.py): examples split along `data`, stacked
  # per-task parameters, their optimizer state and per-task data along `task`.
  # data * task must equal the device count; -1 takes the rest.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.task = 1
  c.mesh.seed = 1     # > 1: config.num_seeds seeds split over this many device groups
  c.mesh.rules = ""   # "REGEX:AXES;...", e.g. "^tasks/:task;.*:" (default: that when task > 1)

  # A non-finite loss or gradient: "stop" (a clear error; the last good
  # checkpoint stays) or "skip" (the update is skipped and counted).
  c.on_nonfinite = "stop"

  # "float32", or "bfloat16": the model computes in bfloat16; parameters,
  # optimizer state, losses, gradients, the Gram matrix, every solver and the
  # checkpoints stay float32 (mtljax/precision.py).
  c.precision = "float32"

  c.total_steps = 1000
  c.steps_per_call = 50
  c.log_steps = 100
  c.eval_steps = 500
  c.checkpoint_steps = 500
  c.eval_batch_size = 1024
  return c
