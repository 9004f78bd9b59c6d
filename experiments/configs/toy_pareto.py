r"""The two-objective Pareto toy of CAGrad / Nash-MTL / FAMO, every method.

    python -m experiments.main --config=experiments/configs/toy_pareto.py:protocol=cagrad \
        --workdir=/tmp/mtljax/toy_cagrad

Methods: equal weighting, RLW, FAMO and every gradient method.
Variants: ``protocol=cagrad`` (3 starts, 100k Adam steps, lr 1e-3, the default),
``protocol=nashmtl`` (5 starts, 35k steps, first loss x 0.1), ``protocol=famo``
(5 starts, 50k steps, x 0.1); add ``,quick`` for 5k steps
(e.g. ``:protocol=famo,quick``). Writes ``trajectories.json``,
``toy_pareto.png`` and ``summary.json`` (mean distance of the final points to
the Pareto set, per method).

Expected (protocol=cagrad, measured in BUILD_NOTES.md): equal weighting
(``fixed``) stalls in the valleys near (+-5, 3) from the two outer starts;
MGDA, Nash-MTL and Aligned-MTL end within ~1 of the Pareto set.
"""

import ml_collections

from mtljax import toy


# What --config=FILE:ARG accepts (listed by `python -m experiments.main --list`).
VARIANTS = ("", "quick", "protocol=cagrad", "protocol=nashmtl", "protocol=famo",
            "protocol=famo,quick")


def get_config(arg: str = ""):
  opts = dict(a.split("=", 1) if "=" in a else (a, True) for a in arg.split(",") if a)
  unknown = set(opts) - {"protocol", "quick"}
  if unknown:
    raise ValueError(f"toy_pareto config: unknown option(s) {sorted(unknown)}; use "
                     "'protocol=cagrad|nashmtl|famo' and/or 'quick'.")
  protocol = opts.get("protocol", "cagrad")
  if protocol not in toy.PROTOCOLS:
    raise ValueError(f"toy_pareto config: protocol={protocol!r} is not one of "
                     f"{sorted(toy.PROTOCOLS)}.")
  p = toy.PROTOCOLS[protocol]
  c = ml_collections.ConfigDict()
  c.experiment = "toy_pareto"
  c.seed = 0
  c.toy = ml_collections.ConfigDict()
  c.toy.protocol = protocol
  c.toy.starts = tuple(tuple(s) for s in p["starts"])
  c.toy.steps = 5_000 if opts.get("quick") else p["steps"]
  c.toy.scale = p["scale"]
  c.toy.lr = 1e-3
  c.toy.methods = toy.toy_methods()
  c.toy.record_every = 50 if opts.get("quick") else 200
  c.toy.cagrad_c = 0.5
  c.toy.cagrad_rescale = p["cagrad_rescale"]
  c.toy.famo_gamma = p.get("famo_gamma", 0.01)
  return c
