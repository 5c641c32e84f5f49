"""Sharding rules for DecoderLM params and batches on an island mesh.

Mesh axes: ("data", "fsdp", "tensor"). Batches split over data x fsdp; params
are split over "fsdp" along the model-width dim (ZeRO-3 style, gathered by
XLA for each matmul) and over "tensor" along vocab, heads and the MLP width
(Megatron style). Norm scales are replicated. The rules key on the param's
name in the tree (see models/decoder.py for the tree), not on the model code.

When a mesh is given, a mesh axis that does not divide its dimension (e.g.
vocab 259 over tensor=2) is dropped for that dim, which is then replicated.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.config import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (parent module name, leaf name) -> spec per dim
_RULES = {
    ("embed", "embedding"): ("tensor", "fsdp"),  # [V, D]
    ("lm_head", "kernel"): ("fsdp", "tensor"),  # [D, V]
    ("q", "kernel"): ("fsdp", "tensor", None),  # [D, H, E]
    ("k", "kernel"): ("fsdp", "tensor", None),  # [D, K, E]
    ("v", "kernel"): ("fsdp", "tensor", None),  # [D, K, E]
    ("o", "kernel"): ("tensor", None, "fsdp"),  # [H, E, D]
    ("gate", "kernel"): ("fsdp", "tensor"),  # [D, F]
    ("up", "kernel"): ("fsdp", "tensor"),  # [D, F]
    ("down", "kernel"): ("tensor", "fsdp"),  # [F, D]
    ("*", "scale"): (None,),  # RMSNorm scales [D]
}


def make_mesh(devices, data: int = 1, fsdp: int = 1, tensor: int = 1) -> Mesh:
  """A (data, fsdp, tensor) mesh over the first data*fsdp*tensor devices."""
  n = data * fsdp * tensor
  devices = list(devices)
  if n < 1 or n > len(devices):
    raise ValueError(f"mesh data*fsdp*tensor={n} must be in 1..{len(devices)} (devices available)")
  return Mesh(np.asarray(devices[:n]).reshape(data, fsdp, tensor), MESH_AXES)


def batch_partition_spec() -> P:
  """Spec for [B, L] token batches: batch over data x fsdp, sequence replicated."""
  return P(BATCH_AXES, None)


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", k)))


def _rule(path, leaf) -> tuple:
  names = [_key_name(k) for k in path]
  leaf_name = names[-1]
  parent = names[-2] if len(names) > 1 else ""
  dims = _RULES.get((parent, leaf_name), _RULES.get(("*", leaf_name)))
  if dims is None or len(dims) != np.ndim(leaf):
    raise ValueError(
        f"no sharding rule for param {'/'.join(names)} with shape {np.shape(leaf)}; "
        f"known params: {sorted(set(p for p, _ in _RULES))}")
  return dims


def _fit(dims, shape, mesh: Mesh | None) -> P:
  if mesh is None:
    return P(*dims)
  fitted = []
  for axis, size in zip(dims, shape):
    if axis is not None and size % mesh.shape[axis]:
      axis = None
    fitted.append(axis)
  return P(*fitted)


def param_partition_specs(params, cfg: ModelConfig | None = None, mesh: Mesh | None = None):
  """Pytree of PartitionSpec matching `params` (a DecoderLM param tree).

  cfg (optional) is checked against the tree (tied/untied head); with a mesh,
  axes that don't divide a dimension are dropped.
  """
  if cfg is not None:
    has_head = "lm_head" in params
    if has_head == cfg.tie_embeddings:
      raise ValueError(
          f"params {'have' if has_head else 'lack'} lm_head but "
          f"cfg.tie_embeddings={cfg.tie_embeddings}")
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _fit(_rule(path, leaf), np.shape(leaf), mesh), params)


def param_shardings(params, mesh: Mesh, cfg: ModelConfig | None = None):
  """Pytree of NamedSharding for `params` on `mesh`."""
  specs = param_partition_specs(params, cfg, mesh)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, P))


def shard_params(params, mesh: Mesh, cfg: ModelConfig | None = None):
  """Places `params` on `mesh` according to the rules above."""
  return jax.device_put(params, param_shardings(params, mesh, cfg))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, batch_partition_spec())


# ---- sequence-parallel blocks (ModelConfig.tp_collectives = "xla" | "pallas") ----------

# Inside the block's shard_map: the residual stream [B, L, D] is split over tokens on
# "tensor" (and batch on data x fsdp); each param is the local shard of its "tensor" dim
# (fsdp shards are gathered at the shard_map boundary).
_SP_RULES = {
    ("q", "kernel"): (None, "tensor", None), ("k", "kernel"): (None, "tensor", None),
    ("v", "kernel"): (None, "tensor", None), ("o", "kernel"): ("tensor", None, None),
    ("gate", "kernel"): (None, "tensor"), ("up", "kernel"): (None, "tensor"),
    ("down", "kernel"): ("tensor", None), ("*", "scale"): (None,),
}


def _sp_spec(path, leaf) -> P:
  names = [_key_name(k) for k in path]
  dims = _SP_RULES.get(tuple(names[-2:]), _SP_RULES.get(("*", names[-1])))
  if dims is None or len(dims) != np.ndim(leaf):
    raise ValueError(f"no sequence-parallel rule for block param {'/'.join(names)} with shape "
                     f"{np.shape(leaf)}; known: {sorted(set(p for p, _ in _SP_RULES))}")
  return P(*dims)


def _context_mesh(what: str):
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or "tensor" not in mesh.axis_names:
    raise ValueError(
        f"{what} runs the decoder blocks under shard_map over the mesh axis 'tensor': call the "
        "model inside `with jax.set_mesh(mesh):` with a mesh that has a 'tensor' axis "
        "(models.sharding.make_mesh), or use tp_collectives='gspmd'")
  return mesh


def sequence_parallel(block_fn, cfg: ModelConfig, block_params, x_BxLxD, positions_BxL,
                      segment_ids_BxL):
  """block_fn(params, x_local, positions, segment_ids) under shard_map on the context mesh.

  Checks that "tensor" divides the sequence, heads, kv heads and MLP width, and that the
  batch axes divide the batch (ValueError naming the sizes)."""
  what = f"model.tp_collectives={cfg.tp_collectives!r}"
  mesh = _context_mesh(what)
  T = mesh.shape["tensor"]
  batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  dp = int(np.prod([mesh.shape[a] for a in batch_axes])) if batch_axes else 1
  B, L, _ = x_BxLxD.shape
  for name, size, by in (("sequence length", L, T), ("num_heads", cfg.num_heads, T),
                         ("num_kv_heads", cfg.num_kv_heads, T),
                         ("d_ff", cfg.resolved_d_ff, T), ("batch", B, dp)):
    if size % by:
      axes = "'tensor'" if by is T and name != "batch" else f"batch axes {batch_axes}"
      raise ValueError(f"{what}: {name}={size} must be divisible by the mesh's {axes} size {by}")
  bspec = batch_axes or None
  act = P(bspec, "tensor", None)
  pspecs = jax.tree_util.tree_map_with_path(lambda path, leaf: _sp_spec(path, leaf), block_params)
  seq = P(bspec, None)
  in_specs = (pspecs, act, seq, None if segment_ids_BxL is None else seq)
  fn = jax.shard_map(block_fn, mesh=mesh, in_specs=in_specs, out_specs=act, check_vma=False)
  return fn(block_params, x_BxLxD, positions_BxL, segment_ids_BxL)
