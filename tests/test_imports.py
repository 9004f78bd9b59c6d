"""The import graph of ``mtljax/``: layered, without circles (docs/DESIGN.md,
"Modules and the direction of imports").

Every ``import`` of an mtljax module anywhere in a file (functions included)
is an edge; an edge must go to a strictly lower layer, or stay inside one
package (``mtljax.gradients.*``, ``mtljax.objectives.*``, ``mtljax.data.*``,
``mtljax.models.*``). Reads source only: no JAX, nothing compiled.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "mtljax"

# Lowest first. The library (up to steps) takes explicit arguments; build
# reads configs; train is the loop; cv trains through the loop.
LAYERS = (
    ("errors", "params", "precision", "schedules", "tensorboard", "plotting",
     "xla_workarounds"),
    ("dense",),
    ("tasks", "workdir"),
    ("data", "models", "checkpoint", "transfer", "sharding", "optim", "measure"),
    ("gradients", "pretrained"),
    ("jacobians", "affinity"),
    ("objectives", "instance_wise"),
    ("steps", "toy"),
    ("build",),
    ("train",),
    ("cv",),
)
_LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in ROOT.rglob("*.py"):
    parts = ("mtljax",) + path.relative_to(ROOT).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def _edges(modules) -> set[tuple[str, str]]:
  edges = set()
  for name, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      else:
        continue
      for t in targets:
        if t in modules and t != name and not name.startswith(t + "."):
          edges.add((name, t))
  return edges


def _top(name: str) -> str:
  return name.split(".")[1]


def test_every_module_has_a_layer():
  tops = {_top(n) for n in _modules() if n != "mtljax"}
  assert tops <= set(_LAYER), f"modules without a layer: {sorted(tops - set(_LAYER))}"


def test_imports_go_down_the_layers_and_never_in_a_circle():
  modules = _modules()
  edges = {(a, b) for a, b in _edges(modules) if a != "mtljax"}  # the package's re-exports
  upward = sorted((a, b) for a, b in edges
                  if _top(a) != _top(b) and _LAYER[_top(b)] >= _LAYER[_top(a)])
  assert not upward, f"imports up or across the layers: {upward}"
  graph: dict[str, set[str]] = {}
  for a, b in edges:
    graph.setdefault(a, set()).add(b)
  state: dict[str, int] = {}

  def visit(node, path):
    state[node] = 1
    for nxt in sorted(graph.get(node, ())):
      assert state.get(nxt) != 1, f"import circle: {' -> '.join(path + [node, nxt])}"
      if nxt not in state:
        visit(nxt, path + [node])
    state[node] = 2
  for node in sorted(graph):
    if node not in state:
      visit(node, [])


def test_the_library_reads_no_config():
  """Below build, nothing imports ml_collections (configs are read at the
  boundary: build, the loop, cv, measure's baselines, transfer's strategies,
  which are config edits)."""
  readers = {"build", "train", "cv", "measure", "transfer"}
  found = []
  for name, path in _modules().items():
    if name == "mtljax" or _top(name) in readers:
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
        if mod and mod.split(".")[0] == "ml_collections":
          found.append(name)
  assert not found, f"library modules importing ml_collections: {sorted(set(found))}"
