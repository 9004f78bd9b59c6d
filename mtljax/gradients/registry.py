"""The gradient-combination methods: one :class:`GramMethod` record each.

A method turns the Gram matrix ``K = G G^T`` of a set of gradient rows into
weights ``beta`` (the direction is ``d = sum_j beta_j g_j``). The rows are any
objectives -- task slots in the train step, single examples in instance-wise
risk minimisation (:mod:`mtljax.instance_wise`) -- so nothing here assumes they
are tasks.

The record says, explicitly, what the weight function takes besides ``K``:

* ``takes_rng``: a random key, as its second positional argument (PCGrad's
  visiting orders);
* ``takes_factor``: the rows' triangular cosine factor
  (:func:`mtljax.gradients.algebra.cosine_factor`) as its second positional
  argument, ``None`` where the rows are not held (the train step's
  ``accumulate`` path);
* ``min_norm``: its answer lies in the rows' convex hull, which an absent
  (all-zero) row would pull to 0; the train step then solves on the present
  rows only;
* ``takes_present``: a ``present [T]`` mask as its last positional argument
  (``None``: every row present), for a method that leaves absent rows out
  itself (Krum: an absent row is neither a candidate nor a neighbour);
* ``min_rows``: the fewest rows its hyper-parameters allow (Krum's
  ``n_byzantine + 3``), checked by :meth:`GramMethod.bind` and, through the
  objective's ``min_slots``, against the train step's slots before tracing.

Its hyper-parameters are the weight function's keyword-only parameters: their
defaults are read from that one signature, by :attr:`GramMethod.hparams`, the
public functions, the objectives and the config. Adding a method is one weight
function and one record in :data:`REGISTRY` (or :func:`register` at run time).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp

from mtljax.gradients import algebra
from mtljax.gradients import aligned
from mtljax.gradients import alpha_fair
from mtljax.gradients import dual_cone
from mtljax.gradients import equal_cosine
from mtljax.gradients import min_norm
from mtljax.gradients import projections
from mtljax.gradients import robust


@dataclasses.dataclass(frozen=True)
class GramMethod:
  """A gradient-combination method.

  Attributes:
    name: its name (``config.objective.method``).
    weights: ``weights(K, [rng | factor,] *, **hparams) -> (beta [T], info)``;
      ``info`` a dict of scalars, ``info["converged"]`` where a solver may fail.
    takes_rng: ``weights`` takes a random key as its second argument.
    takes_factor: ``weights`` takes the cosine factor (or ``None``) as its
      second argument.
    min_norm: the weights are a min-norm point of the rows' hull.
    takes_present: ``weights`` takes the rows' ``present [T]`` mask (or
      ``None``) as its last positional argument.
    min_rows: ``min_rows(**hparams) -> int``, the fewest rows the weight
      function accepts with those hyper-parameters (None: any number); the
      weight function raises on fewer.
    hparams: ``{name: default}``, the keyword-only parameters of ``weights``
      (derived; not an argument).
  """
  name: str
  weights: Callable[..., tuple[jax.Array, dict]]
  takes_rng: bool = False
  takes_factor: bool = False
  min_norm: bool = False
  takes_present: bool = False
  min_rows: Callable[..., int] | None = None
  hparams: Mapping[str, Any] = dataclasses.field(init=False, compare=False, hash=False)

  def __post_init__(self):
    if self.takes_rng and self.takes_factor:
      raise ValueError(f"GramMethod {self.name!r}: a weight function takes a key or a "
                       "factor as its second argument, not both.")
    if self.min_norm and self.takes_factor:
      raise ValueError(f"GramMethod {self.name!r}: a min-norm method is solved on the "
                       "present rows' Gram matrix only, which has no factor; it cannot "
                       "take one.")
    if self.min_norm and self.takes_present:
      raise ValueError(f"GramMethod {self.name!r}: a min-norm method's absent rows are "
                       "left out by the train step (a large diagonal); it cannot also "
                       "take the present mask.")
    params = list(inspect.signature(self.weights).parameters.values())
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    want = 1 + int(self.takes_rng or self.takes_factor) + int(self.takes_present)
    if len(positional) != want:
      raise ValueError(
          f"GramMethod {self.name!r}: its weight function must take {want} positional "
          f"argument(s) (K{', rng' if self.takes_rng else ''}"
          f"{', factor' if self.takes_factor else ''}"
          f"{', present' if self.takes_present else ''}), got "
          f"{[p.name for p in positional]}; hyper-parameters are keyword-only.")
    keyword = [p for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]
    missing = [p.name for p in keyword if p.default is inspect.Parameter.empty]
    if missing:
      raise ValueError(f"GramMethod {self.name!r}: hyper-parameter(s) {missing} have no "
                       "default; every keyword-only parameter needs one.")
    object.__setattr__(self, "hparams",
                       types.MappingProxyType({p.name: p.default for p in keyword}))

  def check(self, hparams: Mapping[str, Any]) -> None:
    """Raises on a hyper-parameter name the method does not take."""
    unknown = sorted(set(hparams) - set(self.hparams))
    if unknown:
      raise ValueError(f"{self.name}: unknown hyper-parameter(s) {unknown}; it takes "
                       f"{sorted(self.hparams) or 'none'}.")

  def rows_needed(self, hparams: Mapping[str, Any]) -> int:
    """The fewest rows the method takes with ``hparams`` (defaults filled in)."""
    if self.min_rows is None:
      return 1
    return int(self.min_rows(**{**self.hparams, **hparams}))

  def bind(self, **hparams) -> Callable[..., tuple[jax.Array, dict]]:
    """``weights(K, rng=None, factor=None) -> (beta, info)`` with ``hparams``
    bound; their names and values are checked here (the weights are traced
    once on a 2 x 2 problem, or on the fewest rows the method takes), so a bad
    value fails before any jit."""
    self.check(hparams)

    def weights(k, rng=None, factor=None, present=None):
      return self(k, rng=rng, factor=factor, present=present, **hparams)
    t = max(2, self.rows_needed(hparams))
    jax.eval_shape(lambda k: weights(k, jax.random.key(0)), jnp.eye(t))
    return weights

  def __call__(self, k: jax.Array, *, rng: jax.Array | None = None,
               factor: jax.Array | None = None, present: jax.Array | None = None,
               **hparams) -> tuple[jax.Array, dict]:
    """``(beta, info)`` from ``K``; ``rng`` is required by a method that takes
    one, ``factor`` and ``present`` passed on to a method that takes them
    (ignored otherwise: the train step leaves a min-norm method's absent rows
    out itself, and the other methods handle a zero row finitely)."""
    self.check(hparams)
    extra = (present,) if self.takes_present else ()
    if self.takes_rng:
      if rng is None:
        raise ValueError(f"{self.name} needs a random key: pass rng=.")
      return self.weights(k, rng, *extra, **hparams)
    if self.takes_factor:
      return self.weights(k, factor, *extra, **hparams)
    return self.weights(k, *extra, **hparams)


# The methods, in the order --list shows them (after the other objectives).
REGISTRY: dict[str, GramMethod] = {m.name: m for m in (
    GramMethod("mgda", min_norm.mgda_weights, min_norm=True),
    GramMethod("pcgrad", projections.pcgrad_weights, takes_rng=True),
    GramMethod("cagrad", min_norm.cagrad_weights),
    GramMethod("imtl_g", equal_cosine.imtl_g_weights, takes_factor=True),
    GramMethod("nash_mtl", alpha_fair.nash_mtl_weights),
    GramMethod("aligned_mtl", aligned.aligned_mtl_weights, takes_factor=True),
    GramMethod("upgrad", dual_cone.upgrad_weights),
    GramMethod("dualproj", dual_cone.dualproj_weights),
    GramMethod("config", equal_cosine.config_weights, takes_factor=True),
    GramMethod("fairgrad", alpha_fair.fairgrad_weights),
    GramMethod("krum", robust.krum_weights, takes_factor=True, takes_present=True,
               min_rows=robust.krum_min_rows),
)}


# Names a gradient method may not take: the other objectives' (set by
# mtljax.objectives, which builds on this registry).
_RESERVED: set[str] = set()


def reserve(names: Iterable[str]) -> None:
  """Marks ``names`` as taken by other objectives (:func:`register` refuses them)."""
  _RESERVED.update(names)


def register(method: GramMethod) -> GramMethod:
  """Adds ``method`` to :data:`REGISTRY` (the train step's objectives, the
  config's defaults, ``--list`` and the toy read it); a taken name raises."""
  if not isinstance(method, GramMethod):
    raise TypeError(f"register: expected a GramMethod, got {type(method).__name__}.")
  if method.name in REGISTRY:
    raise ValueError(f"register: a gradient method named {method.name!r} exists.")
  if method.name in _RESERVED:
    raise ValueError(f"register: {method.name!r} is the name of another objective.")
  REGISTRY[method.name] = method
  return method


def get(name: str) -> GramMethod:
  """The registered method ``name``; an unknown name raises, listing the known."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown gradient method {name!r}; known: {tuple(REGISTRY)}.")
  return REGISTRY[name]


def direction(method: str | GramMethod, grads, *, rng: jax.Array | None = None,
              **hparams):
  """``(d, beta [T], info)`` of a method on the rows ``grads`` (``[T, D]`` or a
  pytree with row axis 0): ``beta`` from the rows' Gram matrix (and their
  cosine factor, for a method that takes it), ``d = sum_j beta_j g_j``."""
  m = get(method) if isinstance(method, str) else method
  m.check(hparams)
  k = algebra.gram(grads)
  factor = algebra.cosine_factor(grads) if m.takes_factor else None
  beta, info = m(k, rng=rng, factor=factor, **hparams)
  return algebra.combine(beta, grads), beta, info


def public_function(method: GramMethod, name: str | None = None,
                    doc: str | None = None, rows: str = "grads") -> Callable:
  """``fn(grads, [rng,] *, **hparams) -> (d, beta, info)``: :func:`direction`
  for one method, with its real signature (the weight function's defaults;
  ``rows``: the name of the first parameter)."""
  def fn(*args, **kwargs):
    try:
      bound = fn.__signature__.bind(*args, **kwargs)
    except TypeError as e:
      raise TypeError(f"{fn.__name__}: {e}.") from None
    a = bound.arguments
    hparams = {k: v for k, v in a.items() if k not in (rows, "rng")}
    return direction(method, a[rows], rng=a.get("rng"), **hparams)

  params = [inspect.Parameter(rows, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
  if method.takes_rng:
    params.append(inspect.Parameter("rng", inspect.Parameter.POSITIONAL_OR_KEYWORD))
  params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
             for k, v in method.hparams.items()]
  fn.__signature__ = inspect.Signature(params)
  fn.__name__ = fn.__qualname__ = name or method.name
  fn.__doc__ = doc or (
      f"{method.name}'s direction. ``grads``: ``[T, D]`` or a pytree with row axis 0. "
      f"Returns ``(d, beta [T], info)``; the weights are "
      f"``{method.weights.__module__}.{method.weights.__name__}``.")
  return fn
