"""Shared helpers for the attention tests (no tests here): inputs, tolerances, checks."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ops.attention import reference

# Norm-relative error budgets (||got - want|| / ||want||) for a reduction of
# 128 terms; they grow with log2 of the reduction length.
_BASE_TOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 1.2e-2,
             jnp.dtype(jnp.float16): 2e-3}


def tolerance(dtype, n):
  return _BASE_TOL[jnp.dtype(dtype)] * (1.0 + max(0.0, math.log2(max(n, 1) / 128)) / 4)


def rel_err(got, want):
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  assert np.all(np.isfinite(got)), "non-finite values in the kernel's result"
  denom = np.linalg.norm(want)
  return float(np.linalg.norm(got - want) / (denom if denom > 0 else 1.0))


def make_inputs(seed, B, T, S, H, K, D, dtype, segments=None):
  """Fresh random q, k, v, dO (never zeros) and optional segment ids.

  segments: None, "self" (one [B,T] array, T == S) or "pair" (separate q and
  kv ids with some query segments absent from the keys: empty rows).
  """
  ks = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, S, K, D), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, S, K, D), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (B, T, H, D), jnp.float32).astype(dtype)
  seg = None
  if segments == "self":
    assert T == S
    seg = jnp.sort(jax.random.randint(ks[4], (B, T), 0, 4), axis=1)
  elif segments == "pair":
    seg = (jnp.sort(jax.random.randint(ks[4], (B, T), 0, 4), axis=1),
           jnp.sort(jax.random.randint(ks[5], (B, S), 1, 4), axis=1))
  return q, k, v, do, seg


def check_against_reference(fn, q, k, v, do, *, causal, segment_ids, sm_scale,
                            what=""):
  """fn(q, k, v) vs reference.attention: forward and all three gradients."""
  ref = lambda q_, k_, v_: reference.attention(
      q_, k_, v_, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale)
  out, vjp = jax.vjp(fn, q, k, v)
  ref_out, ref_vjp = jax.vjp(ref, q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  grads, ref_grads = vjp(do), ref_vjp(do)
  T, S = q.shape[1], k.shape[1]
  errs = {"out": (rel_err(out, ref_out), tolerance(q.dtype, S))}
  for name, g, rg, n in zip(("dq", "dk", "dv"), grads, ref_grads, (S, T, T)):
    assert g.shape == rg.shape and g.dtype == rg.dtype, (name, g.shape, g.dtype)
    errs[name] = (rel_err(g, rg), tolerance(q.dtype, n) * 1.5)
  bad = {k_: e for k_, e in errs.items() if not e[0] <= e[1]}
  assert not bad, f"{what}: errors over tolerance (err, tol): {bad}; all: {errs}"
  return errs
