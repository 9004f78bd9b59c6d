"""How far each convolution implementation's float32 gradients are from the
float64 ones, through ResNet-18 OS8 in train mode (batch statistics) and
eval mode (running averages). Prints, per mode and implementation, the worst
leaf's ``max|g32 - g64| / max|g64|``. Run: ``python experiments/conv_grad_accuracy.py``
(about a minute on 2 cores). Findings in docs/notes/backbones-resnet.md."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mtljax.models.backbones import resnet  # noqa: E402


def main():
  x = np.random.default_rng(5).normal(size=(2, 40, 48, 3))
  v = jax.jit(resnet.ResNet(18, output_stride=8, conv_impl="lax").init)(
      jax.random.key(0), np.float32(x))

  def grads(impl, dt, train):
    n = resnet.ResNet(18, output_stride=8, conv_impl=impl)
    vv = jax.tree.map(lambda a: jnp.asarray(a, dt), v)

    def loss(p):
      out = n.apply({**vv, "params": p}, jnp.asarray(x, dt), train, mutable=["batch_stats"])[0]
      return jnp.mean(jnp.square(out["layer4"]))
    return jax.jit(jax.grad(loss))(vv["params"])

  for train in (True, False):
    truth = grads("lax", jnp.float64, train)
    for impl in ("lax", "im2col"):
      g = grads(impl, jnp.float32, train)
      errs = [(float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()),
               jax.tree_util.keystr(p))
              for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(truth))]
      err, where = max(errs)
      print(f"train={train!s:5} {impl:6} worst leaf {err:.2e} at {where}")


if __name__ == "__main__":
  main()
