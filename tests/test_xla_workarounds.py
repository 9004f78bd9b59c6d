"""mtljax's XLA_FLAGS workarounds (mtljax/xla_workarounds.py): YNNPACK fusions
off on XLA:CPU with the pinned jaxlib, where one of them segfaults.

The crash itself is caught by the test that found it
(test_backbone_models.py::test_segnet_and_mtan_train_with_every_objective_family,
slow tier): with the fusions on it crashed in every pytest process on the
2-core CI machine. These tests check the mechanism: the rules for the flag,
that this process's programs are compiled without YNNPACK fusions (and that
plain JAX, in a process without mtljax, compiles the same program with them:
the check is not vacuous), and the warning when mtljax comes too late."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mtljax import xla_workarounds as xw

AFFECTED = xw.YNN_CRASH_JAXLIB[0]
_INSTALLED_AFFECTED = xw._jaxlib_version()[:2] in xw.YNN_CRASH_JAXLIB  # pylint: disable=protected-access

# A dot and a reduction: the two op kinds XLA:CPU hands to YNNPACK.
_PROGRAM = textwrap.dedent("""
    import jax, jax.numpy as jnp
    def ynn_fusions():
      f = jax.jit(lambda a, b: jnp.sum(a @ b, axis=0))
      text = f.lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile().as_text()
      return text.count("__ynn_fusion")
""")


def test_the_flag_is_added_only_where_it_exists_and_is_needed():
  flag = "--xla_cpu_experimental_ynn_fusion_type="
  assert xw.ynn_fusion_flags("", AFFECTED, False) == flag
  assert xw.ynn_fusion_flags("", AFFECTED + (2,), False) == flag
  # appended to the user's flags, which stay as they were
  assert (xw.ynn_fusion_flags("--xla_force_host_platform_device_count=8", AFFECTED, False)
          == "--xla_force_host_platform_device_count=8 " + flag)
  # the user's own value for the flag is kept (how to turn the fusions back on)
  assert xw.ynn_fusion_flags("--xla_cpu_experimental_ynn_fusion_type=individual_dot",
                             AFFECTED, False) is None
  # other jaxlibs (the flag may not exist: XLA aborts on unknown flags), TPU hosts
  for version in ((0, 9), (0, 11), (1, 0), ()):
    assert xw.ynn_fusion_flags("", version, False) is None, version
  assert xw.ynn_fusion_flags("", AFFECTED, True) is None


def test_apply_changes_a_given_environment_once():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xw.apply(env) is _INSTALLED_AFFECTED
  expected = xw.ynn_fusion_flags("--xla_force_host_platform_device_count=2", AFFECTED, False)
  if _INSTALLED_AFFECTED:
    assert env == {"XLA_FLAGS": expected}
  assert xw.apply(env) is False  # idempotent: the flag is there now
  empty = {}
  xw.apply(empty)
  assert empty == ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
                   if _INSTALLED_AFFECTED else {})


@pytest.mark.skipif(not _INSTALLED_AFFECTED, reason="this jaxlib has no workaround")
def test_programs_compile_without_ynnpack_fusions_and_plain_jax_would_use_them():
  # This process: mtljax was imported (tests/conftest.py) before any backend.
  assert xw.DISABLE_YNN_FUSIONS in os.environ["XLA_FLAGS"].split()
  namespace = {}
  exec(_PROGRAM, namespace)  # pylint: disable=exec-used
  assert namespace["ynn_fusions"]() == 0
  # A process with plain JAX and no workaround compiles the same program with
  # YNNPACK fusions; importing mtljax after its backend started warns and
  # changes nothing.
  script = _PROGRAM + textwrap.dedent("""
      import json, os, warnings
      before = ynn_fusions()
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import mtljax
      print(json.dumps({"before": before, "after": ynn_fusions(),
                        "xla_flags": os.environ.get("XLA_FLAGS", ""),
                        "warnings": [str(w.message) for w in caught
                                     if issubclass(w.category, RuntimeWarning)]}))
  """)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                       capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert out["before"] > 0 and out["after"] > 0, out
  assert out["xla_flags"] == "", out
  assert len(out["warnings"]) == 1 and "YNNPACK" in out["warnings"][0], out
  assert "XLA_FLAGS='--xla_cpu_experimental_ynn_fusion_type='" in out["warnings"][0]


def test_jax_in_this_process_is_the_one_checked():
  # The checks above read the installed jaxlib's version; the process's JAX
  # must be that jaxlib (not, say, one on another path).
  import jaxlib  # pylint: disable=g-import-not-at-top
  assert jaxlib.__version__.split(".")[:2] == [str(v) for v in xw._jaxlib_version()[:2]]  # pylint: disable=protected-access
