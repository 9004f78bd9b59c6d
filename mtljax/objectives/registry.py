"""The objectives' registry: the one place a method is chosen by name
(:func:`make_objective`), its hyper-parameters and their checks."""

from __future__ import annotations

import inspect
from typing import Callable

from mtljax import gradients
from mtljax.objectives import bilevel
from mtljax.objectives import double_sampling
from mtljax.objectives import gradnorm
from mtljax.objectives import gram
from mtljax.objectives import stateful
from mtljax.objectives import weightings
from mtljax.objectives.base import Objective

# The objectives that are not a gradient method's (those are read from
# mtljax.gradients.REGISTRY): name -> factory(num_tasks, **hparams).
REGISTRY: dict[str, Callable[..., Objective]] = {
    "fixed": weightings.fixed, "rlw": weightings.rlw, "dwa": weightings.dwa,
    "uncertainty": weightings.uncertainty, "min_max": weightings.min_max,
    "famo": weightings.famo, "gradnorm": gradnorm.gradnorm, "mgda_ub": gram.mgda_ub,
    "gradvac": stateful.gradvac, "graddrop": stateful.graddrop, "db_mtl": stateful.db_mtl,
    "stch": weightings.stch, "gls": weightings.gls, "imtl": stateful.imtl,
    "excess_mtl": stateful.excess_mtl, "moco": stateful.moco,
    "trimmed_mean": stateful.trimmed_mean, "cr_mogm": stateful.cr_mogm,
    "modo": double_sampling.modo, "sdmgrad": double_sampling.sdmgrad,
    "auto_lambda": bilevel.auto_lambda, "moml": bilevel.moml, "forum": bilevel.forum,
}

gradients.reserve(REGISTRY)  # a gradient method may not take one of these names

# Objectives whose hyper-parameters (and defaults) are a gradient method's:
# MGDA-UB runs MGDA's solver, IMTL runs IMTL-G's.
HPARAMS_OF = {"mgda_ub": "mgda", "imtl": "imtl_g"}


def methods() -> tuple[str, ...]:
  """Every method name: the objectives here, then the registered gradient
  methods (read now, so a method registered at run time is included)."""
  return tuple(REGISTRY) + tuple(gradients.REGISTRY)


def check_method(method: str) -> None:
  if method not in REGISTRY and method not in gradients.REGISTRY:
    raise ValueError(f"method={method!r} is not one of {methods()}.")


def hyperparameters(method: str) -> dict:
  """``{name: default}`` of a method's hyper-parameters."""
  check_method(method)
  if method in gradients.REGISTRY or method in HPARAMS_OF:
    return dict(gradients.REGISTRY[HPARAMS_OF.get(method, method)].hparams)
  return {p.name: p.default for p in inspect.signature(REGISTRY[method]).parameters.values()
          if p.kind == inspect.Parameter.KEYWORD_ONLY}


def check_hyperparameters(method: str, hparams: dict) -> None:
  """Raises on a hyper-parameter name ``method`` does not take."""
  check_method(method)
  known = hyperparameters(method)
  unknown = sorted(set(hparams) - set(known))
  if unknown:
    raise ValueError(f"{method}: unknown hyper-parameter(s) {unknown}; "
                     f"{method!r} takes {sorted(known) or 'none'}.")


def make_objective(method: str, num_tasks: int, *, gram_path: str = "jacobian",
                   **hparams) -> Objective:
  """The :class:`Objective` named ``method`` for ``num_tasks`` tasks.

  ``hparams`` are the method's hyper-parameters (:func:`hyperparameters`;
  unknown names raise); ``gram_path`` applies to the gradient-combination
  methods only.
  """
  check_hyperparameters(method, hparams)
  if method in gradients.REGISTRY:
    return gram.gram_combiner(gradients.REGISTRY[method], num_tasks, gram_path=gram_path,
                              **hparams)
  if gram_path != "jacobian":
    raise ValueError(
        f"gram_path={gram_path!r} applies to the gradient methods "
        f"{tuple(gradients.REGISTRY)}, whose per-task parameter gradients it accumulates; "
        f"method {method!r} does not use it (mgda_ub never forms the parameter Jacobian). "
        "Leave gram_path='jacobian'.")
  return REGISTRY[method](num_tasks, **hparams)


def needs(method: str) -> str:
  """What ``method`` asks the step to linearise (:attr:`Objective.needs`: a
  loss weighting ``"sum"``, a gradient method ``"slots"``, MGDA-UB and
  GradDrop ``"representation"``), read from the objective it builds (for
  two tasks; a gradient method's build traces its weights once on a 2 x 2
  Gram matrix, milliseconds)."""
  return make_objective(method, 2).needs
