"""Parameter-tree utilities: slash paths, lookup by path, row gathers.

Every tool that addresses parameters (optimizer rules, freezing, logging,
checkpoint loading) names them by one slash path, e.g.
``shared/trunk/layer_1/kernel`` or ``tasks/heads/classification10/kernel``.
"""

from __future__ import annotations

from typing import Any

import jax


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_name(path) -> str:
  return "/".join(_key_name(k) for k in path)


def flatten_with_names(tree) -> list[tuple[str, Any]]:
  """``[(slash_path, leaf), ...]`` in tree order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_name(p), leaf) for p, leaf in leaves]


def flatten_dict(d: dict, sep: str = "/", prefix: str = "") -> dict[str, Any]:
  """A nested dict's leaves by joined key (only dicts are nodes: tuples and
  lists stay values), e.g. ``{"a": {"b": 1}} -> {"a/b": 1}``."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten_dict(v, sep, key + sep))
    else:
      out[key] = v
  return out


def tree_map_with_names(fn, tree):
  """``fn(slash_path, leaf)`` over every leaf."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_name(p), x), tree)


def get_path(tree, path: str):
  """The subtree at a slash path (``""`` is the whole tree)."""
  node = tree
  for part in filter(None, path.split("/")):
    if part not in node:
      raise KeyError(f"parameter path {path!r}: no {part!r} among {sorted(node)}.")
    node = node[part]
  return node


def set_path(tree: dict, path: str, value) -> dict:
  """A copy of nested dict ``tree`` with the subtree at ``path`` replaced."""
  parts = [p for p in path.split("/") if p]
  if not parts:
    return value
  head, rest = parts[0], "/".join(parts[1:])
  out = dict(tree)
  out[head] = set_path(tree[head], rest, value)
  return out


def count(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
