"""CGC / PLE, DSelect-k and MTAN (mtljax/models/experts.py): the defining
properties -- gates on the simplex, DSelect-k's at-most-k selection once the
smooth-step saturates, the one-expert reductions to shared-bottom checked
numerically with mapped parameters, PLE with one level is CGC -- the
regularisers against a float64 recomputation, the one-pass step against the
per-slot step, unsampled tasks' rows frozen, bad settings rejected. The
forward passes against numpy references are in test_model_references.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import test_model_references  # _dselect_ref: DSelect-k's selectors as scalar loops
from mtljax import objectives
from mtljax import optim
from mtljax import steps
from mtljax import tasks
from mtljax.data import sampling
from mtljax.models import experts
from mtljax.models import multitask

MIXED = tasks.TaskSet((tasks.Task("a", "classification", 4), tasks.Task("r", "regression"),
                       tasks.Task("b", "classification", 4)))
IDS = jnp.array([2, 0, 1, 0])


# Perturbations and inputs are drawn with numpy: an eager jax.random draw
# compiles a threefry program per new shape (seconds each on XLA:CPU), and
# these tests only need arbitrary standard-normal values.
def _noisy(params, seed=0, scale=0.3):
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed + 100)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape), jnp.float32)
      for a in leaves])


def _x(shape=(5,), k=4, b=6, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((k, b) + shape), jnp.float32)


def _assert_outputs_equal(a, b, ids=IDS, taskset=MIXED, tol=1e-5):
  for k, t in enumerate(np.asarray(ids)):
    g = taskset.tasks[t].group
    np.testing.assert_allclose(a[g][k], b[g][k], rtol=tol, atol=tol)


# ---------------------------------------------------------------------------
# Gates.
# ---------------------------------------------------------------------------


def test_gates_are_on_the_simplex():
  """Softmax gates (CGC / PLE) and DSelect-k gates (E a power of 2, static and
  per example, random and saturated logits): weights >= 0 summing to one."""
  rng = jax.random.key(0)
  h = jnp.asarray(np.random.default_rng(0).standard_normal((7, 3, 2)), jnp.float32)
  g = experts.softmax_gate(5, 6)
  p = _noisy(g.init(rng), scale=2.0)
  w = np.asarray(jax.jit(lambda p, h: g(p, h))(p, h), np.float64)
  assert w.shape == (7, 5) and (w >= 0).all()
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  for e in (1, 4, 8):
    for per_example in (False, True):
      gate = experts.dselect_gate(e, min(3, e), 1.0, per_example, 6)
      weights = jax.jit(lambda p, gate=gate: gate(p, h))
      for scale in (1.0, 30.0):  # in the cubic region / saturated
        w = np.asarray(weights(_noisy(gate.init(rng), scale=scale)), np.float64)
        assert w.shape == (7, e) and (w >= 0).all()
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)


def test_dselect_k_selects_at_most_k_experts_once_the_smooth_step_saturates():
  """With every |z_ij| >= gamma/2 each selector is one-hot on the expert whose
  binary code is the signs of z_i, so the gate has at most k non-zeros, at the
  selected experts with the softmax(w) weights (summed where selectors agree);
  inside the cubic region it has more."""
  rng = np.random.default_rng(0)
  gamma = 0.7
  for e, k in ((8, 2), (16, 3), (4, 4), (8, 1)):
    m = int(np.log2(e))
    zs, ws = [], []
    for _ in range(20):
      zs.append(rng.choice([-1.0, 1.0], (k, m)) * (gamma / 2 + rng.exponential(1.0, (k, m))))
      ws.append(rng.standard_normal(k))
    # The 20 draws and the inside case (last) in one program per (E, k)
    # (eagerly, each call compiled a dozen one-op programs per shape).
    zs.append(np.zeros((k, m)) + 0.1 * gamma)
    ws.append(np.zeros(k))
    all_weights, all_sel = map(np.asarray, jax.jit(jax.vmap(
        lambda z, w, e=e: experts.dselect_weights(z, w, num_experts=e, gamma=gamma)))(
            jnp.asarray(np.stack(zs), jnp.float32), jnp.asarray(np.stack(ws), jnp.float32)))
    for z, w, weights, sel in zip(zs[:-1], ws[:-1], all_weights[:-1], all_sel[:-1]):
      chosen = [int("".join("1" if v > 0 else "0" for v in row), 2) for row in z]
      np.testing.assert_array_equal(sel, np.eye(e)[chosen])
      assert np.count_nonzero(weights) <= k
      want = np.zeros(e)
      np.add.at(want, chosen, np.exp(w) / np.exp(w).sum())
      np.testing.assert_allclose(weights, want, rtol=1e-6, atol=1e-7)
    inside = all_weights[-1]
    assert np.count_nonzero(inside) == e


def test_dselect_k_penalty_is_entropy_plus_reachability():
  """Static gates: ``reg * sum -r log(r + 1e-6)`` over every task's selectors,
  plus ``sum 1 / sum_e r`` when E is not a power of 2 (the official code's
  terms), in float64 from the scalar-loop selectors of
  test_model_references at the model's gamma (0.4, so some logits saturate and
  some do not); no penalty when both are off."""
  gamma = 0.4
  for e, reg in ((5, 0.01), (3, 0.0), (4, 0.1)):
    model = multitask.make_model("dselect_k", MIXED, (5,), hidden=(4,), num_experts=e,
                                 k=2, entropy_reg=reg, gamma=gamma)
    p = model.init(jax.random.key(0))
    assert p["tasks"]["gates"]["z"].shape == (3, 2, int(np.ceil(np.log2(e))))
    assert p["tasks"]["gates"]["w"].shape == (3, 2)
    # Logits on both sides of the knots +-gamma/2; the leading bit inside them,
    # so every selector keeps mass on codes 0... (reachable: 1/sum r finite).
    rng = np.random.default_rng(e)
    z = gamma * rng.uniform(-0.8, 0.8, (3, 2, p["tasks"]["gates"]["z"].shape[-1]))
    z[..., 0] = gamma * rng.uniform(-0.45, 0.45, (3, 2))
    p["tasks"]["gates"] = {"z": jnp.asarray(z, jnp.float32),
                           "w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)}
    g = jax.tree.map(lambda a: np.asarray(a, np.float64), p["tasks"]["gates"])
    saturated = np.abs(g["z"]) >= gamma / 2
    assert saturated.any() and not saturated.all()

    def want_at(gam):
      r = np.stack([test_model_references._dselect_ref(g["z"][t], g["w"][t], e, gam)[1]
                    for t in range(3)])  # [T, k, E]
      want = reg * -np.sum(r * np.log(r + 1e-6))
      if e & (e - 1):
        want += np.sum(1.0 / r.sum(-1))
        assert (r.sum(-1) < 1 - 1e-3).any()  # some mass on unreachable codes
      return want
    want = want_at(gamma)
    assert np.isfinite(want) and want > 0
    got = jax.jit(model.penalty)(p)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert abs(want_at(1.0) - want) > 1e-3 * want  # the test sees gamma
  assert multitask.make_model("dselect_k", MIXED, (5,), hidden=(4,), num_experts=4).penalty \
      is None


# ---------------------------------------------------------------------------
# Initialisation.
# ---------------------------------------------------------------------------


def _assert_uniform(a, bound, what):
  """``a`` looks like i.i.d. U(-bound, bound): inside the bounds, reaching
  near them, and a Kolmogorov-Smirnov test (fixed seed) does not reject."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  v = np.asarray(a, np.float64).ravel() / bound
  assert np.abs(v).max() <= 1.0, what
  assert np.abs(v).max() > 1.0 - 4.0 / len(v), what  # E max|U| = 1 - 1/(n+1)
  assert stats.kstest(v, "uniform", args=(-1.0, 2.0)).pvalue > 1e-3, what


@pytest.mark.parametrize("per_example", [False, True])
def test_dselect_k_initialises_as_the_official_code(per_example):
  """z ~ U(-gamma/100, gamma/100) and w ~ U(-0.05, 0.05) (google-research
  dselect_k_moe), for static logits and for per-example gates' kernels and
  biases, each task's gate drawn separately."""
  gamma, e, k, d = 0.4, 64 if not per_example else 16, 8 if not per_example else 4, 40
  m = int(np.log2(e))
  model = multitask.make_model("dselect_k", MIXED, (d,), hidden=(2,), num_experts=e,
                               k=k, gamma=gamma, per_example=per_example)
  g = model.init(jax.random.key(0))["tasks"]["gates"]
  if per_example:
    leaves = {"z/kernel": (g["z"]["kernel"], (3, d, k * m), gamma / 100),
              "z/bias": (g["z"]["bias"], (3, k * m), gamma / 100),
              "w/kernel": (g["w"]["kernel"], (3, d, k), 0.05),
              "w/bias": (g["w"]["bias"], (3, k), 0.05)}
  else:
    leaves = {"z": (g["z"], (3, k, m), gamma / 100), "w": (g["w"], (3, k), 0.05)}
  for name, (a, shape, bound) in leaves.items():
    assert a.shape == shape, name
    _assert_uniform(a, bound, name)
    assert not np.array_equal(a[0], a[1]), name  # per-task draws


def test_cgc_and_ple_gates_start_at_zero():
  """Every task gate and shared gate of every level is zero (uniform weights),
  in the documented shapes; the experts are not."""
  e_s, e_t, levels = 2, 1, 3
  model = multitask.make_model("ple", MIXED, (5,), hidden=(6,), num_experts=e_s,
                               task_experts=e_t, num_levels=levels, level_hidden=(4,))
  p = model.init(jax.random.key(0))
  gate_in = [5, 6, 4]  # x flattened, then level 0's (trunk) and level 1's widths
  for l in range(levels):
    g = p["tasks"]["gates"][f"level_{l}"]
    assert g["kernel"].shape == (3, gate_in[l], e_s + e_t) and g["bias"].shape == (3, e_s + e_t)
    assert not np.any(g["kernel"]) and not np.any(g["bias"]), l
    if l < levels - 1:
      s = p["shared"]["gate"][f"level_{l}"]
      assert s["kernel"].shape == (gate_in[l], e_s + 3 * e_t), l
      assert not np.any(s["kernel"]) and not np.any(s["bias"]), l
    for stack in (p["shared"]["experts"], p["tasks"]["experts"]):
      kernel = np.asarray(stack[f"level_{l}"]["layer_0"]["kernel"])
      assert kernel.std() > 0.1 and np.all(kernel), l
  assert "gate" not in p["shared"] or f"level_{levels - 1}" not in p["shared"]["gate"]
  cgc = multitask.make_model("cgc", MIXED, (5,), hidden=(6,), num_experts=e_s,
                             task_experts=e_t).init(jax.random.key(0))
  assert not any(np.any(a) for a in jax.tree.leaves(cgc["tasks"]["gates"]))


_TRUNC = 0.87962566103423978  # std of a standard normal truncated at +-2


@pytest.mark.parametrize("encoder, shape, kw", [
    ("mlp", (20,), dict(hidden=(64, 32, 16))),
    ("cnn", (8, 8, 2), dict(channels=(8, 16), hidden=(32,)))])
def test_mtan_attention_and_f_initialise_lecun_normal_at_their_fan_in(encoder, shape, kw):
  """A1 reads [s^j, p^{j-1}] (fan-in 2 w_j after the first layer), A2 w_j,
  f^j a 3x3 conv (fan-in 9 C_j) or a dense map of the pooled, flattened
  features: kernels of the documented shapes, truncated N(0, 1/fan_in) (the
  sample std within 15%, |k| within the truncation), zero biases, and each
  task's attention drawn separately."""
  model = multitask.make_model("mtan", MIXED, shape, encoder=encoder, tower=(), **kw)
  p = model.init(jax.random.key(0))
  att, att_f = p["tasks"]["attention"], p["shared"]["att_f"]
  if encoder == "mlp":
    names, w = ["layer_0", "layer_1", "layer_2"], [64, 32, 16]
    f_kernels = {"layer_0": (64, 32), "layer_1": (32, 16)}
  else:
    names, w = ["conv_0", "conv_1", "layer_0"], [8, 16, 32]
    f_kernels = {"conv_0": (3, 3, 8, 16),        # conv on the 8x8x8 map to conv_1's width
                 "conv_1": (2 * 2 * 16, 32)}     # 4x4x16 pooled to 2x2x16, flattened
  assert set(att) == set(names) and set(att_f) == set(f_kernels)

  def check(kernel, fan_in, what):
    k = np.asarray(kernel, np.float64)
    std = 1.0 / np.sqrt(fan_in)
    assert abs(k.std() / std - 1.0) < 0.15, (what, k.std() * np.sqrt(fan_in))
    assert np.abs(k).max() <= 2.0 * std / _TRUNC * (1 + 1e-5), what
    assert abs(k.mean()) < 4 * std / np.sqrt(k.size), what
  for j, n in enumerate(names):
    a1, a2 = att[n]["a1"], att[n]["a2"]
    u = w[j] * (1 if j == 0 else 2)
    assert a1["kernel"].shape == (3, u, w[j]) and a2["kernel"].shape == (3, w[j], w[j]), n
    check(a1["kernel"], u, n + "/a1")
    check(a2["kernel"], w[j], n + "/a2")
    for a in (a1, a2):
      assert a["bias"].shape == (3, w[j]) and not np.any(a["bias"]), n
      assert not np.array_equal(a["kernel"][0], a["kernel"][1]), n
  for n, kshape in f_kernels.items():
    assert att_f[n]["kernel"].shape == kshape and not np.any(att_f[n]["bias"]), n
    check(att_f[n]["kernel"], int(np.prod(kshape[:-1])), "att_f/" + n)


# ---------------------------------------------------------------------------
# Reductions: one expert is shared-bottom; CGC without task experts is MMoE;
# PLE with one level is CGC.
# ---------------------------------------------------------------------------


def _shared_bottom_params(sb, trunk, task_params):
  mapped = {"shared": {"trunk": trunk},
            "tasks": {"towers": task_params["towers"], "heads": task_params["heads"]}}
  assert jax.tree.structure(mapped) == jax.tree.structure(
      jax.eval_shape(sb.init, jax.random.key(9)))  # the tree only: traced, not compiled
  return mapped


@pytest.mark.parametrize("arch, kw", [
    ("mmoe", dict(num_experts=1)), ("cgc", dict(num_experts=1, task_experts=0)),
    ("dselect_k", dict(num_experts=1, k=1))])
@pytest.mark.parametrize("encoder, shape", [
    ("mlp", (5,)), pytest.param("cnn", (4, 4), marks=pytest.mark.slow)])
def test_one_expert_reduces_to_shared_bottom(arch, kw, encoder, shape):
  """The one expert's trunk as shared_bottom's trunk, the same towers and
  heads: equal outputs (the gate's one weight is 1 whatever its parameters)."""
  common = dict(encoder=encoder, hidden=(6, 5), channels=(3,), tower=(4,))
  model = multitask.make_model(arch, MIXED, shape, **common, **kw)
  sb = multitask.make_model("shared_bottom", MIXED, shape, **common)
  p = _noisy(model.init(jax.random.key(0)), scale=1.0)
  experts_p = p["shared"]["experts"]["level_0"] if arch == "cgc" else p["shared"]["experts"]
  trunk = jax.tree.map(lambda a: np.asarray(a)[0], experts_p)  # numpy: no slicing programs
  mapped = _shared_bottom_params(sb, trunk, p["tasks"])
  x = _x(shape)
  _assert_outputs_equal(jax.jit(model.apply)(p, x, IDS), jax.jit(sb.apply)(mapped, x, IDS))


def test_cgc_without_task_experts_is_mmoe():
  """CGC with E shared experts and no task experts has MMoE's function: the
  same experts, per-task softmax gates over them, towers and heads."""
  kw = dict(hidden=(6, 5), num_experts=3, tower=(4,))
  cgc = multitask.make_model("cgc", MIXED, (5,), task_experts=0, **kw)
  mmoe = multitask.make_model("mmoe", MIXED, (5,), **kw)
  p = _noisy(cgc.init(jax.random.key(0)), scale=1.0)
  mapped = {"shared": {"experts": p["shared"]["experts"]["level_0"]},
            "tasks": {**p["tasks"], "gates": p["tasks"]["gates"]["level_0"]}}
  assert (jax.tree.structure(mapped) ==
          jax.tree.structure(jax.eval_shape(mmoe.init, jax.random.key(1))))
  x = _x()
  _assert_outputs_equal(jax.jit(cgc.apply)(p, x, IDS), jax.jit(mmoe.apply)(mapped, x, IDS))


def test_ple_with_one_level_is_cgc():
  """Same initialisation (tree and values), the same function, and both have
  a task-independent part; with two levels the outputs differ."""
  kw = dict(hidden=(6, 5), num_experts=2, task_experts=2, tower=(4,))
  cgc = multitask.make_model("cgc", MIXED, (5,), **kw)
  ple = multitask.make_model("ple", MIXED, (5,), num_levels=1, **kw)
  p_cgc, p_ple = cgc.init(jax.random.key(0)), ple.init(jax.random.key(0))
  helpers.assert_trees_close(p_cgc, p_ple, rtol=0, atol=0)
  assert cgc.layer_groups == ple.layer_groups and ple.encode is not None
  p = _noisy(p_cgc)
  x = _x()
  out1 = jax.jit(cgc.apply)(p, x, IDS)
  _assert_outputs_equal(out1, jax.jit(ple.apply)(p, x, IDS), tol=0)
  ple2 = multitask.make_model("ple", MIXED, (5,), num_levels=2, **kw)
  p2 = jax.eval_shape(ple2.init, jax.random.key(0))
  assert set(p2["shared"]) == {"experts", "gate"} and ple2.encode is None


# ---------------------------------------------------------------------------
# In the step: one pass == per slot; unsampled tasks' rows stay bitwise.
# ---------------------------------------------------------------------------

_KW = dict(hidden=(6,), num_experts=2, task_experts=1, num_levels=2, tower=(4,))


@pytest.mark.parametrize("arch, method", [
    ("cgc", "mgda"), pytest.param("dselect_k", "mgda", marks=pytest.mark.slow),
    pytest.param("cgc", "fixed", marks=pytest.mark.slow)])
def test_one_pass_step_equals_the_per_slot_step(arch, method):
  """Shared inputs, K = 3 of 4 tasks, 2 Adam steps: the step that encodes once
  and decodes per slot gives the per-slot step's losses, parameters and
  optimizer state."""
  data = helpers.toy_data()
  model = multitask.make_model(arch, data.taskset, data.input_shape,
                               **helpers.arch_kwargs(arch, **_KW))
  tx = optim.make_optimizer("adam", lr=1e-2)
  fns, states = [], []
  for one_pass in (None, False):
    obj = objectives.make_objective(method, 4)
    fns.append(steps.make_train_step(
        model, tx, obj, sampling.make_sampler(data.taskset, np.full(4, 0.25), 3, 8,
                                              shared_inputs=True),
        weights=np.array([1.0, 2.0, 0.5, 1.0]), seed=5, one_pass=one_pass, steps_per_call=2))
    states.append(steps.init_train_state(model, tx, jax.random.key(0), obj))
  # Both steps in one program (one compilation instead of two), each on its
  # own state, as two separate calls would run them.
  (a, ma), (b, mb) = jax.jit(lambda s0, s1, d: (fns[0](s0, d), fns[1](s1, d)))(
      *states, data.train)
  helpers.assert_trees_close(ma, mb, rtol=2e-4, atol=2e-5)
  for key in ("params", "opt_state"):
    helpers.assert_trees_close(getattr(a, key), getattr(b, key), rtol=2e-4, atol=2e-5)


def _get(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


@pytest.mark.parametrize("arch", ["ple", pytest.param("mtan", marks=pytest.mark.slow),
                                  pytest.param("dselect_k", marks=pytest.mark.slow)])
def test_unsampled_tasks_rows_do_not_move(arch):
  """One task per step: every per-task row of the other tasks (PLE's experts,
  which feed the shared gate and so do get a gradient, MTAN's attention,
  DSelect-k's gates with their penalty) and its optimizer state are bitwise
  unchanged; the sampled task's rows move."""
  data = helpers.toy_data()
  model = multitask.make_model(arch, data.taskset, data.input_shape, **helpers.arch_kwargs(
      arch, **{**_KW, "num_experts": 3, "entropy_reg": 0.1}))
  assert model.penalty is not None or arch != "dselect_k"
  tx = optim.make_optimizer("adam", lr=1e-2)
  fn = jax.jit(steps.make_train_step(
      model, tx, "fixed", sampling.make_sampler(
          data.taskset, sampling.task_probabilities("uniform", data.num_train), 1, 8),
      weights=np.ones(4), seed=7))
  state = steps.init_train_state(model, tx, jax.random.key(0))
  moved = set()
  for _ in range(3):
    new, meas = fn(state, data.train)
    sampled = np.asarray(meas["task_count"]) > 0
    for stack, rows in model.task_rows.items():
      for part in ("params", "opt_state"):
        for o, n in zip(jax.tree.leaves(_get(getattr(state, part)["tasks"], stack)),
                        jax.tree.leaves(_get(getattr(new, part)["tasks"], stack))):
          o, n = np.asarray(o), np.asarray(n)
          for r, t in enumerate(rows):
            if not sampled[t]:
              assert np.array_equal(o[r], n[r]), (part, stack, t)
            elif part == "params" and not np.array_equal(o[r], n[r]):
              moved.add(stack)
    state = new
  assert {s for s in model.task_rows if not s.startswith("heads/")} <= moved, moved


# ---------------------------------------------------------------------------
# Bad settings.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch, kw, match", [
    ("dselect_k", dict(num_experts=4, k=5), r"^dselect_k.k must be in \[1, num_experts=4\]"),
    ("dselect_k", dict(gamma=0.0), "^dselect_k.gamma must be a finite number > 0"),
    ("dselect_k", dict(per_example=True, entropy_reg=0.1), "^dselect_k.per_example=True"),
    ("dselect_k", dict(per_example=True, num_experts=3), "not a power of 2"),
    ("ple", dict(num_levels=0), "^ple.num_levels must be >= 1"),
    ("cgc", dict(task_experts=-1), "^cgc.task_experts must be >= 0"),
    ("cgc", dict(num_experts=0), "^cgc.num_experts must be >= 1"),
    ("ple", dict(level_hidden=(0,)), "^ple.level_hidden must be positive"),
    ("ple", dict(hidden=(), level_hidden=()), "^ple.num_levels=2 needs ple.level_hidden"),
    ("mtan", dict(hidden=()), "'mtan' with encoder 'mlp' needs at least one trunk layer"),
    ("cgc", dict(num_levels=2), r"^cgc: unknown hyper-parameter\(s\) \['num_levels'\]"),
])
def test_bad_expert_settings_raise_before_compiling(arch, kw, match):
  with pytest.raises(ValueError, match=match):
    multitask.make_model(arch, MIXED, (5,), **{"hidden": (4,), **kw})


def test_mmoe_sweep_sizes_of_the_new_models_match_closed_form_counts():
  """The sweep's width for CGC / PLE / DSelect-k / MTAN is the one whose
  parameter count, written out here from the architectures, is nearest MMoE's
  (100 inputs, 8 shared experts, 1 expert per task, k = 2, towers of 8, 2 tasks)."""
  from experiments import mmoe_sweep  # pylint: disable=g-import-not-at-top
  from experiments.configs import mmoe_sweep as sweep_config  # pylint: disable=g-import-not-at-top
  sizes = mmoe_sweep.model_sizes(sweep_config.get_config())
  d, e, n, tower = 100, 8, 2, 8
  towers = lambda w: n * (w * tower + tower + tower + 1)
  count = {
      "cgc": lambda w: (e + n) * (d * w + w) + n * (d * (e + 1) + e + 1) + towers(w),
      "ple": lambda w: ((e + n) * (d * w + w) + n * (d * (e + 1) + e + 1)   # level 0
                        + (d * (e + n) + e + n)                              # its shared gate
                        + (e + n) * (w * w + w) + n * (w * (e + 1) + e + 1)  # level 1
                        + towers(w)),
      "dselect_k": lambda w: e * (d * w + w) + n * (2 * 3 + 2) + towers(w),  # z [2, 3], w [2]
      "mtan": lambda w: d * w + w + n * 2 * (w * w + w) + towers(w)}  # trunk, A1, A2
  target = sizes["mmoe"]["parameters"]
  assert target == 14834
  for model, c in count.items():
    best = min(range(1, 300), key=lambda w: abs(c(w) - target))
    assert sizes[model] == {"hidden": [best], "parameters": c(best)}, model
