"""Gradient all-reduce issued per bucket during the backward pass.

`sync_grads(params, axis)` is the identity on the forward pass. Its leaves are
grouped into buckets (consecutive leaves of one dtype, at most `bucket_bytes`
each); each bucket is wrapped in a `custom_vjp` identity whose backward
all-reduces the bucket's cotangents as one flat vector. Backprop reaches a
bucket's backward as soon as every gradient in it is complete, so the
all-reduce of the last layers' gradients is issued while the earlier layers'
backward is still to run, instead of one all-reduce after the whole backward.
With `implementation="xla"` on GPU, XLA runs these all-reduces asynchronously
on its collective stream, overlapping the remaining backward compute.

Use inside shard_map, at the top of the per-device loss:

    def loss(params, batch):
      params = sync_grads(params, "data", mean=True)
      return model_loss(params, batch)
    grads = jax.grad(loss)(params, batch)   # already averaged over "data"

Bucket order: leaves are taken in reverse flatten order, since the last
leaves (the last layers, for sorted layer names) get their gradients first.
To bucket by layer instead, call `sync_grads` on each layer's parameters where
the layer uses them (a per-layer hook), with bucket_bytes=None (one bucket).
`all_reduce_tree` is the non-overlapped counterpart: bucketed all-reduce of a
finished gradient pytree.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ops.collectives import api

DEFAULT_BUCKET_BYTES = 4 * 2**20


@dataclasses.dataclass(frozen=True)
class _Sync:
  axis_name: str
  implementation: str | None
  mean: bool


def plan_buckets(leaves, bucket_bytes: int | None) -> list[list[int]]:
  """Indices of leaves per bucket: reverse order, one dtype, <= bucket_bytes.

  A leaf larger than bucket_bytes gets a bucket of its own.
  """
  buckets: list[list[int]] = []
  size = 0
  dtype = None
  for j in reversed(range(len(leaves))):
    leaf = leaves[j]
    nbytes = leaf.size * jnp.dtype(leaf.dtype).itemsize
    full = bucket_bytes is not None and size + nbytes > bucket_bytes
    if not buckets or jnp.dtype(leaf.dtype) != dtype or (full and size > 0):
      buckets.append([])
      size = 0
      dtype = jnp.dtype(leaf.dtype)
    buckets[-1].append(j)
    size += nbytes
  return buckets


def _reduce_flat(leaves, sync: _Sync):
  n = api.axis_size(sync.axis_name)
  flat = jnp.concatenate([jnp.ravel(g) for g in leaves])
  flat = api.all_reduce(flat, sync.axis_name,
                        implementation=sync.implementation)
  if sync.mean:
    flat = (flat.astype(jnp.float32) / n).astype(flat.dtype)
  out, start = [], 0
  for g in leaves:
    out.append(flat[start:start + g.size].reshape(g.shape))
    start += g.size
  return tuple(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _bucket(leaves, sync: _Sync):
  return leaves


def _bucket_fwd(leaves, sync):
  return leaves, None


def _bucket_bwd(sync, _, cts):
  cts = tuple(jnp.zeros(c.shape, c.dtype) if c is None else c for c in cts)
  return (_reduce_flat(cts, sync),)


_bucket.defvjp(_bucket_fwd, _bucket_bwd)


def sync_grads(params, axis_name, *, bucket_bytes=DEFAULT_BUCKET_BYTES,
               implementation=None, mean=False):
  """Identity whose backward all-reduces the gradients of `params` per bucket."""
  api.axis_size(axis_name)
  leaves, treedef = jax.tree.flatten(params)
  sync = _Sync(axis_name, implementation, mean)
  out = list(leaves)
  for idx in plan_buckets(leaves, bucket_bytes):
    synced = _bucket(tuple(leaves[j] for j in idx), sync)
    for j, v in zip(idx, synced):
      out[j] = v
  return jax.tree.unflatten(treedef, out)


def all_reduce_tree(tree, axis_name, *, bucket_bytes=DEFAULT_BUCKET_BYTES,
                    implementation=None, mean=False):
  """All-reduce every leaf of `tree`, one collective per bucket."""
  api.axis_size(axis_name)
  leaves, treedef = jax.tree.flatten(tree)
  sync = _Sync(axis_name, implementation, mean)
  out = list(leaves)
  for idx in plan_buckets(leaves, bucket_bytes):
    for j, v in zip(idx, _reduce_flat([leaves[j] for j in idx], sync)):
      out[j] = v
  return jax.tree.unflatten(treedef, out)
