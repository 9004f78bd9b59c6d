"""Workarounds for known bugs of the XLA that mtljax's pinned jaxlib ships,
applied when ``mtljax`` is imported (before JAX starts a backend, which is
when XLA reads ``XLA_FLAGS``).

**YNNPACK fusions on XLA:CPU (jaxlib 0.10.x).** XLA:CPU hands dot products
and reductions to YNNPACK kernels (``__ynn_fusion`` in the optimised HLO). In
jaxlib 0.10.2 one of them segfaults: a transpose inside a YNNPACK fusion reads
past its buffer's dimension array (the crashing frames,
``slinky::internal::can_fuse`` <- ``slinky::fuse_contiguous_dims`` <-
``ynn::make_transpose_impl`` <- ``xla::cpu::YnnFusionThunk::Execute``, taken
with gdb while executing the SegNet/MTAN steps of
tests/test_backbone_models.py). Whether it crashes depends on what lies in
memory after the array, so the same program ran clean in one process and
crashed in another, every time. We switch YNNPACK fusions off with
``--xla_cpu_experimental_ynn_fusion_type=`` (an empty list: XLA's own dot
and reduce emitters compute those ops instead). It is a CPU-only compiler
option. float32 results agree to rounding (the whole suite passes either
way). bfloat16 results on CPU move more, because XLA's emitters round bf16
differently: the bf16-vs-float32 gaps of the dense scenes test grew, up to
8 % on depth rel (BUILD_NOTES.md, "Ready for accelerators").

The flag is added to ``XLA_FLAGS`` only where it is known to exist and to be
needed: jaxlib 0.10.x (an unknown flag aborts XLA at start, and a later
jaxlib is re-checked before it is pinned), and not on a TPU host (libtpu
parses ``XLA_FLAGS`` with its own flag set). A value the user put in
``XLA_FLAGS`` for this flag is kept: that is the way to turn the fusions back
on (``--xla_cpu_experimental_ynn_fusion_type=individual_dot,...``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import warnings
from typing import MutableMapping

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
DISABLE_YNN_FUSIONS = YNN_FUSION_FLAG + "="
# jaxlib (major, minor) versions whose XLA:CPU has the YNNPACK crash above and
# knows the flag that avoids it.
YNN_CRASH_JAXLIB = ((0, 10),)


def _jaxlib_version() -> tuple[int, ...]:
  try:
    text = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ()
  parts = []
  for piece in text.split(".")[:2]:
    digits = "".join(ch for ch in piece if ch.isdigit())
    parts.append(int(digits) if digits else 0)
  return tuple(parts)


def _backend_started() -> bool:
  """Whether this process's JAX has created a backend (XLA_FLAGS read)."""
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(getattr(bridge, "_backends", None))


def ynn_fusion_flags(flags: str, jaxlib_version: tuple[int, ...],
                     tpu_host: bool) -> str | None:
  """``flags`` (an ``XLA_FLAGS`` value) with YNNPACK fusions switched off, or
  None when it is to be left as it is: a jaxlib without the crash (or without
  the flag), a TPU host, or a value for the flag already there (the user's)."""
  if tuple(jaxlib_version[:2]) not in YNN_CRASH_JAXLIB or tpu_host:
    return None
  if YNN_FUSION_FLAG in flags:
    return None
  return (flags + " " + DISABLE_YNN_FUSIONS).strip()


def apply(environ: MutableMapping[str, str] | None = None) -> bool:
  """Adds the workarounds to ``environ`` (``os.environ``): True when it changed
  ``XLA_FLAGS``. Warns, and changes nothing, when this process's JAX backend
  has already read ``XLA_FLAGS`` (mtljax imported after a JAX computation):
  then the flag would not take effect in this process."""
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  new = ynn_fusion_flags(flags, _jaxlib_version(),
                         importlib.util.find_spec("libtpu") is not None)
  if new is None:
    return False
  if environ is os.environ and _backend_started():
    warnings.warn(
        "mtljax was imported after JAX started its backend, so XLA:CPU's YNNPACK "
        "fusions (which segfault in some programs with this jaxlib) stay on in this "
        f"process. Import mtljax before the first JAX computation, or set "
        f"XLA_FLAGS='{DISABLE_YNN_FUSIONS}' before starting Python.",
        RuntimeWarning, stacklevel=3)
    return False
  environ["XLA_FLAGS"] = new
  return True
