"""Streaming DiLoCo fragments (arXiv 2501.18512): which parameters sync together, and when.

Fragment 0 holds everything that is not a transformer block (embedding, final
norm, untied head): "embeddings as one fragment". Blocks `blocks_<i>` form
`num_fragments` groups, by one of two patterns over L layers and P groups:

- "strided":    group p = layers {p, p+P, p+2P, ...}  (the paper's choice)
- "sequential": group p = layers [p*L/P, (p+1)*L/P)

So there are P+1 fragments. Each fragment syncs once every H inner steps, at
staggered offsets: fragment f syncs at inner steps t (1-based) with
t % H == offset_f, offset_f = ((f+1)*H) // (P+1) mod H, so syncs are spread
evenly over the H steps and only one fragment is in flight when the overlap
tau is at most H // (P+1).
"""
from __future__ import annotations

import re
from typing import Any

import jax

PyTree = Any
PATTERNS = ("strided", "sequential")
_BLOCK = re.compile(r"^blocks_(\d+)$")


def _layer_of(path) -> int | None:
  for k in path:
    key = getattr(k, "key", getattr(k, "name", None))
    if isinstance(key, str):
      m = _BLOCK.match(key)
      if m:
        return int(m.group(1))
  return None


def num_layers_of(params: PyTree) -> int:
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  layers = {_layer_of(p) for p, _ in flat} - {None}
  return (max(layers) + 1) if layers else 0


def layer_groups(num_layers: int, num_groups: int, pattern: str) -> list[list[int]]:
  if pattern not in PATTERNS:
    raise ValueError(f"outer.fragment_pattern={pattern!r} is not allowed; allowed values: {list(PATTERNS)}")
  if not 1 <= num_groups <= max(num_layers, 1):
    raise ValueError(f"outer.num_fragments must be in [1, num_layers={num_layers}], got {num_groups}")
  if pattern == "strided":
    return [list(range(p, num_layers, num_groups)) for p in range(num_groups)]
  bounds = [(p * num_layers) // num_groups for p in range(num_groups + 1)]
  return [list(range(bounds[p], bounds[p + 1])) for p in range(num_groups)]


def fragment_ids(params: PyTree, num_groups: int, pattern: str) -> PyTree:
  """A pytree like `params` of python ints: the fragment of each leaf (0 = non-block)."""
  groups = layer_groups(num_layers_of(params), num_groups, pattern)
  layer_to_frag = {l: g + 1 for g, ls in enumerate(groups) for l in ls}
  return jax.tree_util.tree_map_with_path(
      lambda p, _: layer_to_frag.get(_layer_of(p), 0), params)


def split(tree: PyTree, ids: PyTree, frag: int) -> dict[str, Any]:
  """The leaves of fragment `frag` as a flat {path: leaf} dict (a plain pytree)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  fid = jax.tree.leaves(ids)
  return {jax.tree_util.keystr(p): x for (p, x), f in zip(flat, fid) if f == frag}


def join(tree: PyTree, ids: PyTree, frag: int, part: dict[str, Any]) -> PyTree:
  """`tree` with fragment `frag`'s leaves replaced from `part` (as made by `split`)."""
  fid = iter(jax.tree.leaves(ids))
  return jax.tree_util.tree_map_with_path(
      lambda p, x: part[jax.tree_util.keystr(p)] if next(fid) == frag else x, tree)


def sync_offsets(num_fragments_total: int, inner_steps: int) -> list[int]:
  """offset_f in [0, H): fragment f syncs when step % H == offset_f (0 means at multiples of H)."""
  F, H = num_fragments_total, inner_steps
  if F > H:
    raise ValueError(f"outer.inner_steps={H} must be >= the number of fragments {F} (num_fragments + 1)")
  return [((f + 1) * H // F) % H for f in range(F)]


def due_fragments(step: int, offsets: list[int], inner_steps: int) -> list[int]:
  """Fragments whose sync falls on (1-based) inner step `step`."""
  return [f for f, o in enumerate(offsets) if step % inner_steps == o]
