"""dot_product_attention: one entry point, implementations picked by name.

Layout [batch, seq, heads, head_dim] like jax.nn.dot_product_attention;
k and v may have fewer heads than q (GQA/MQA: the kv head count divides the
query head count). Semantics are reference.py's.

implementation:
  "pallas"  Mosaic GPU flash attention on NVIDIA Hopper (pallas_gpu.py;
            bf16/f16, head_dim 64/128/256); the Mosaic TPU kernel on TPU and,
            in interpret mode, on CPU (pallas_tpu.py; bf16/f16/f32, head_dim a
            multiple of 8 up to 256). Both have a fused custom_vjp backward.
  "cudnn"   jax.nn.dot_product_attention(implementation="cudnn"); NVIDIA GPU,
            bf16/f16. Segment ids become a boolean mask; rows that see no key
            are undefined there.
  "xla"     plain jnp (16-bit matmuls with f32 accumulation, f32 softmax);
            materializes the [B, H, T, S] logits.
  None      the fastest available for the inputs, in the order pallas, cudnn,
            xla; on CPU that is "xla" (interpret mode is for testing).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ops.attention import reference

IMPLEMENTATIONS = ("pallas", "cudnn", "xla")
_TPU_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_XLA_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _platform() -> str:
  return jax.default_backend()


def _is_hopper() -> bool:
  try:
    dev = jax.devices()[0]
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") in ("9.0",)
  except Exception:  # pylint: disable=broad-except
    return False


def _names(dtypes):
  return [jnp.dtype(d).name for d in dtypes]


def _validate(q, k, v, sm_scale):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(
          f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape "
          f"{getattr(x, 'shape', None)}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
  B, T, H, D = q.shape
  if k.shape[0] != B or k.shape[3] != D:
    raise ValueError(
        f"k/v shape {k.shape} does not match q shape {q.shape}: batch and "
        "head_dim must be equal")
  if k.shape[2] == 0 or H % k.shape[2]:
    raise ValueError(
        f"the number of kv heads ({k.shape[2]}) must divide the number of query "
        f"heads ({H})")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if T == 0 or k.shape[1] == 0:
    raise ValueError(f"empty sequence: q {q.shape}, k {k.shape}")
  if sm_scale is not None and not isinstance(sm_scale, (int, float)):
    raise ValueError(f"sm_scale must be a Python number or None, got {type(sm_scale)}")


def _pallas_problem(q, on_gpu: bool):
  """None if the Pallas kernel for this platform takes q, else the reason."""
  D = q.shape[-1]
  if on_gpu:
    from ops.attention import pallas_gpu  # pylint: disable=import-outside-toplevel
    if q.dtype not in pallas_gpu.SUPPORTED_DTYPES:
      return (f"the Mosaic GPU kernel supports dtypes "
              f"{_names(pallas_gpu.SUPPORTED_DTYPES)}, got {q.dtype}")
    if D not in pallas_gpu.SUPPORTED_HEAD_DIMS:
      return (f"the Mosaic GPU kernel supports head_dim in "
              f"{list(pallas_gpu.SUPPORTED_HEAD_DIMS)}, got {D}")
    if not _is_hopper():
      return "the Mosaic GPU kernel needs an NVIDIA Hopper GPU (sm_90)"
    return None
  if q.dtype not in _TPU_DTYPES:
    return f"the Pallas TPU/interpret kernel supports dtypes {_names(_TPU_DTYPES)}, got {q.dtype}"
  if D % 8 or D > 256:
    return ("the Pallas TPU/interpret kernel supports head_dim a multiple of 8 "
            f"up to 256, got {D}")
  return None


def _cudnn_problem(q):
  if _platform() != "gpu":
    return f"cuDNN needs an NVIDIA GPU, jax's default backend is {_platform()!r}"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN attention supports dtypes ['bfloat16', 'float16'], got {q.dtype}"
  return None


def _xla(q, k, v, *, causal, segment_ids, sm_scale):
  if q.dtype not in _XLA_DTYPES:
    raise ValueError(f"xla attention supports dtypes {_names(_XLA_DTYPES)}, got {q.dtype}")
  B, T, H, D = q.shape
  S, K = k.shape[1], k.shape[2]
  G = H // K
  scale = D ** -0.5 if sm_scale is None else sm_scale
  q_ids, kv_ids = reference.split_segment_ids(segment_ids, B, T, S)
  s = jnp.einsum("btkgd,bskd->bkgts", q.reshape(B, T, K, G, D), k,
                 preferred_element_type=jnp.float32) * scale
  mask = reference.attention_mask(B, T, S, causal=causal, q_ids=q_ids, kv_ids=kv_ids)
  s = jnp.where(mask[:, None, None], s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l == 0.0, 1.0, l)
  o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v,
                 preferred_element_type=jnp.float32)
  return o.reshape(B, T, H, D).astype(q.dtype)


def _cudnn(q, k, v, *, causal, segment_ids, sm_scale):
  B, T, S = q.shape[0], q.shape[1], k.shape[1]
  q_ids, kv_ids = reference.split_segment_ids(segment_ids, B, T, S)
  mask = None
  if q_ids is not None:
    mask = (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=sm_scale,
                                      is_causal=causal, implementation="cudnn")


def _pallas(q, k, v, *, causal, segment_ids, sm_scale, on_gpu):
  B, T, S = q.shape[0], q.shape[1], k.shape[1]
  q_ids, kv_ids = reference.split_segment_ids(segment_ids, B, T, S)
  if on_gpu:
    from ops.attention import pallas_gpu  # pylint: disable=import-outside-toplevel
    return pallas_gpu.flash_attention(q, k, v, causal=causal, q_segment_ids=q_ids,
                                      kv_segment_ids=kv_ids, sm_scale=sm_scale)
  from ops.attention import pallas_tpu  # pylint: disable=import-outside-toplevel
  return pallas_tpu.flash_attention(q, k, v, causal=causal, q_segment_ids=q_ids,
                                    kv_segment_ids=kv_ids, sm_scale=sm_scale)


def dot_product_attention(q, k, v, *, causal=False, segment_ids=None, sm_scale=None,
                          implementation=None):
  """Attention over [batch, seq, heads, head_dim] inputs; returns q's shape and dtype.

  causal: query t sees key s only if s <= t.
  segment_ids: [B, T] (self-attention) or a pair ([B, T], [B, S]); queries
    only see keys of the same segment.
  sm_scale: logit scale, default head_dim ** -0.5.
  implementation: None, "pallas", "cudnn" or "xla" (see the module doc).
  """
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation={implementation!r} is not supported; allowed: "
        f"{[None, *IMPLEMENTATIONS]}")
  _validate(q, k, v, sm_scale)
  reference.split_segment_ids(segment_ids, q.shape[0], q.shape[1], k.shape[1])
  kw = dict(causal=bool(causal), segment_ids=segment_ids, sm_scale=sm_scale)
  on_gpu = _platform() == "gpu"
  if implementation == "pallas":
    problem = _pallas_problem(q, on_gpu)
    if problem:
      raise ValueError(f"implementation='pallas': {problem}")
    return _pallas(q, k, v, on_gpu=on_gpu, **kw)
  if implementation == "cudnn":
    problem = _cudnn_problem(q)
    if problem:
      raise ValueError(f"implementation='cudnn': {problem}")
    return _cudnn(q, k, v, **kw)
  if implementation == "xla":
    return _xla(q, k, v, **kw)
  # None: fastest available.
  if _platform() in ("gpu", "tpu") and _pallas_problem(q, on_gpu) is None:
    return _pallas(q, k, v, on_gpu=on_gpu, **kw)
  if _cudnn_problem(q) is None:
    return _cudnn(q, k, v, **kw)
  return _xla(q, k, v, **kw)
