"""Collectives by name: `implementation=None | "pallas" | "xla"`.

Call inside `shard_map` (the Pallas paths need `check_vma=False`). Shapes:

  all_reduce(x, axis)                 x: any shape      -> same shape (psum)
  reduce_scatter(x, axis)             x: (N*M, ...)     -> (M, ...)
  all_gather(x, axis)                 x: (M, ...)       -> (N*M, ...)
  all_gather_matmul(x, w, axis)       x: (M, K), w: (K, F) -> all_gather(x) @ w: (N*M, F)
  matmul_reduce_scatter(x, w, axis)   x: (N*M, K), w: (K, F) -> reduce_scatter(x @ w): (M, F)

`implementation`:
  None      the best available: the Pallas kernels on TPU, and on Hopper GPUs
            where a kernel exists for the op and operands; otherwise XLA. On
            CPU that is XLA (the Pallas kernels only run there in the slow TPU
            interpreter).
  "pallas"  the Pallas kernels, or an error saying why they cannot run. On CPU
            this is the TPU interpreter (`pltpu.InterpretParams()`), which
            simulates remote DMAs and semaphores between fake devices.
  "xla"     lax collectives (reference.py): NCCL on GPU.

Kernel options: `direction` ("both", "right", "left": which ring(s) carry the
data), `num_chunks` (TPU: pieces per ring step, pipelined), `interpret`
(TPU interpreter parameters, forcing the interpreted TPU kernels).

Gradients: all_reduce <-> all_reduce, reduce_scatter <-> all_gather (the lax
transposes under `check_vma=False`); the collective matmuls differentiate into
each other (d x of all_gather_matmul is a matmul_reduce_scatter and so on), with
the same implementation.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ops.collectives import layout
from ops.collectives import reference

IMPLEMENTATIONS = ("pallas", "xla")
PALLAS_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                 jnp.dtype(jnp.float16))
_GPU_PLATFORMS = ("gpu", "cuda")


@dataclasses.dataclass(frozen=True)
class _Plan:
  backend: str            # "xla" | "tpu" | "tpu_interpret" | "gpu"
  direction: str = "both"
  num_chunks: int = 2
  interpret: Any = None   # pltpu.InterpretParams for "tpu_interpret"


# --------------------------------------------------------------------------
# Validation and choice of backend


def _check_implementation(implementation):
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation={implementation!r} is not one of None, "
        + ", ".join(repr(i) for i in IMPLEMENTATIONS))


def axis_size(axis_name) -> int:
  """The size of a shard_map axis, with a clear error when it is not bound."""
  try:
    return int(lax.axis_size(axis_name))
  except NameError as e:
    raise ValueError(
        f"axis_name={axis_name!r} is not an axis of the enclosing shard_map "
        "mesh: call the collectives inside shard_map over a mesh with that "
        "axis") from e


def _check_options(direction, num_chunks):
  layout.ring_dirs(direction)
  if not isinstance(num_chunks, int) or num_chunks < 1:
    raise ValueError(f"num_chunks={num_chunks!r} must be a positive int")


def _varying_axes(x) -> frozenset:
  """Mesh axes x varies over, as tracked by shard_map(check_vma=True)."""
  try:
    t = jax.typeof(x)
  except (TypeError, AttributeError):
    return frozenset()
  for attr in ("manual_axis_type", "mat"):
    mat = getattr(t, attr, None)
    if mat is not None and hasattr(mat, "varying"):
      return frozenset(mat.varying)
  return frozenset(getattr(t, "vma", None) or ())


def _pallas_reason(op: str, x, w, axis_name, interpret) -> tuple[str, str]:
  """(backend, '') if a Pallas kernel can run, else ('', why not)."""
  if not isinstance(axis_name, str):
    return "", f"the Pallas kernels take one axis name, got {axis_name!r}"
  if any(_varying_axes(a) for a in (x, w) if a is not None):
    return "", ("the Pallas kernels need shard_map(..., check_vma=False) "
                "(their outputs carry no varying-axes types)")
  for a in (x, w):
    if a is not None and jnp.dtype(a.dtype) not in PALLAS_DTYPES:
      return "", (f"dtype {a.dtype} is not supported by the Pallas kernels "
                  f"(supported: {', '.join(str(d) for d in PALLAS_DTYPES)})")
  if interpret is not None:
    return "tpu_interpret", ""
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu", ""
  if platform in _GPU_PLATFORMS:
    from ops.collectives import pallas_gpu
    ok, why = pallas_gpu.is_available()
    if not ok:
      return "", why
    if op == "all_gather_matmul":
      why = pallas_gpu.agmm_unsupported_reason(x, w)
      if why:
        return "", why
    return "gpu", ""
  return "", (f"no Pallas kernel compiles for platform {platform!r}; "
              "implementation='pallas' runs the TPU interpreter there")


def _plan(op, implementation, x, w, axis_name, direction, num_chunks,
          interpret, strict=True) -> _Plan:
  """The backend for one op. strict=False (plans for the backward pass) falls
  back to XLA instead of raising when an explicit "pallas" cannot run."""
  _check_implementation(implementation)
  _check_options(direction, num_chunks)
  if implementation == "xla":
    return _Plan("xla")
  backend, why = _pallas_reason(op, x, w, axis_name, interpret)
  if not backend and implementation == "pallas" and jax.default_backend() == "cpu" \
      and why.startswith("no Pallas kernel compiles"):
    from jax.experimental.pallas import tpu as pltpu
    backend, interpret = "tpu_interpret", pltpu.InterpretParams()
  if backend:
    return _Plan(backend, direction, num_chunks, interpret)
  if implementation == "pallas" and strict:
    raise NotImplementedError(f"{op}: implementation='pallas' is unavailable: {why}")
  return _Plan("xla")


def _check_rows(op, x, n, axis_name):
  if x.ndim < 1 or x.shape[0] % n:
    raise ValueError(
        f"{op}: x.shape={x.shape}: the leading dimension must be divisible by "
        f"the size {n} of axis {axis_name!r}")


def _check_matmul(op, x, w):
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(
        f"{op}: expects x (rows, K) and w (K, F), got x{x.shape} w{w.shape}")


# --------------------------------------------------------------------------
# Dispatch to a backend (forward only; gradients are defined below)


def _tpu_kwargs(plan):
  return dict(direction=plan.direction, interpret=plan.interpret)


def _run(op, plan: _Plan, axis_name, *args):
  if plan.backend == "xla":
    return getattr(reference, op)(*args, axis_name)
  if plan.backend in ("tpu", "tpu_interpret"):
    from ops.collectives import pallas_tpu as impl
    kw = _tpu_kwargs(plan)
    if op in ("all_reduce", "reduce_scatter", "all_gather"):
      kw["num_chunks"] = plan.num_chunks
    return getattr(impl, op)(*args, axis_name, **kw)
  from ops.collectives import pallas_gpu as impl
  if op == "matmul_reduce_scatter":  # matmul by XLA, then the ring kernel
    x, w = args
    prod = jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return impl.reduce_scatter(prod, axis_name, direction=plan.direction)
  if op == "all_gather_matmul":
    return impl.all_gather_matmul(*args, axis_name)
  return getattr(impl, op)(*args, axis_name, direction=plan.direction)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _all_reduce(x, axis_name, plan):
  return _run("all_reduce", plan, axis_name, x)


def _all_reduce_fwd(x, axis_name, plan):
  return _all_reduce(x, axis_name, plan), None


def _all_reduce_bwd(axis_name, plan, _, g):
  return (_all_reduce(g, axis_name, plan),)


_all_reduce.defvjp(_all_reduce_fwd, _all_reduce_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _reduce_scatter(x, axis_name, plan):
  return _run("reduce_scatter", plan, axis_name, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _all_gather(x, axis_name, plan):
  return _run("all_gather", plan, axis_name, x)


_reduce_scatter.defvjp(
    lambda x, a, p: (_reduce_scatter(x, a, p), None),
    lambda a, p, _, g: (_all_gather(g, a, p),))
_all_gather.defvjp(
    lambda x, a, p: (_all_gather(x, a, p), None),
    lambda a, p, _, g: (_reduce_scatter(g, a, p),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _ag_matmul(x, w, axis_name, plan, mmrs_plan):
  return _run("all_gather_matmul", plan, axis_name, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul_rs(x, w, axis_name, plan, agmm_plan):
  return _run("matmul_reduce_scatter", plan, axis_name, x, w)


def _ag_matmul_fwd(x, w, axis_name, plan, mmrs_plan):
  return _ag_matmul(x, w, axis_name, plan, mmrs_plan), (x, w)


def _ag_matmul_bwd(axis_name, plan, mmrs_plan, res, g):
  x, w = res
  dx = _matmul_rs(g, w.T, axis_name, mmrs_plan, plan)
  x_all = _all_gather(x, axis_name, plan)
  dw = jnp.dot(x_all.T, g, preferred_element_type=jnp.float32).astype(w.dtype)
  return dx.astype(x.dtype), dw


def _matmul_rs_fwd(x, w, axis_name, plan, agmm_plan):
  return _matmul_rs(x, w, axis_name, plan, agmm_plan), (x, w)


def _matmul_rs_bwd(axis_name, plan, agmm_plan, res, g):
  x, w = res
  dx = _ag_matmul(g, w.T, axis_name, agmm_plan, plan)
  g_all = _all_gather(g, axis_name, plan)
  dw = jnp.dot(x.T, g_all, preferred_element_type=jnp.float32).astype(w.dtype)
  return dx.astype(x.dtype), dw


_ag_matmul.defvjp(_ag_matmul_fwd, _ag_matmul_bwd)
_matmul_rs.defvjp(_matmul_rs_fwd, _matmul_rs_bwd)


# --------------------------------------------------------------------------
# Public API


def all_reduce(x, axis_name, *, implementation=None, direction="both",
               num_chunks=2, interpret=None):
  """psum(x, axis_name); bf16/f16 inputs are accumulated in float32 (Pallas)."""
  axis_size(axis_name)
  plan = _plan("all_reduce", implementation, x, None, axis_name, direction,
               num_chunks, interpret)
  if plan.backend == "xla":  # lax's own AD (also right under check_vma=True)
    return reference.all_reduce(x, axis_name)
  return _all_reduce(x, axis_name, plan)


def reduce_scatter(x, axis_name, *, implementation=None, direction="both",
                   num_chunks=2, interpret=None):
  """psum_scatter(x, axis_name, scatter_dimension=0, tiled=True)."""
  n = axis_size(axis_name)
  _check_rows("reduce_scatter", x, n, axis_name)
  plan = _plan("reduce_scatter", implementation, x, None, axis_name, direction,
               num_chunks, interpret)
  if plan.backend == "xla":
    return reference.reduce_scatter(x, axis_name)
  return _reduce_scatter(x, axis_name, plan)


def all_gather(x, axis_name, *, implementation=None, direction="both",
               num_chunks=2, interpret=None):
  """all_gather(x, axis_name, axis=0, tiled=True)."""
  axis_size(axis_name)
  if x.ndim < 1:
    raise ValueError("all_gather: x must have at least one dimension")
  plan = _plan("all_gather", implementation, x, None, axis_name, direction,
               num_chunks, interpret)
  if plan.backend == "xla":
    return reference.all_gather(x, axis_name)
  return _all_gather(x, axis_name, plan)


def all_gather_matmul(x, w, axis_name, *, implementation=None,
                      direction="both", interpret=None):
  """all_gather(x) @ w, each ring step's transfer overlapping a block matmul."""
  axis_size(axis_name)
  _check_matmul("all_gather_matmul", x, w)
  plan = _plan("all_gather_matmul", implementation, x, w, axis_name, direction,
               1, interpret)
  if plan.backend == "xla":
    return reference.all_gather_matmul(x, w, axis_name)
  n = axis_size(axis_name)
  mmrs_plan = _plan("matmul_reduce_scatter", implementation,
                    jax.ShapeDtypeStruct((n * x.shape[0], w.shape[1]), x.dtype),
                    jax.ShapeDtypeStruct(w.shape[::-1], w.dtype), axis_name,
                    direction, 1, interpret, strict=False)
  return _ag_matmul(x, w, axis_name, plan, mmrs_plan)


def matmul_reduce_scatter(x, w, axis_name, *, implementation=None,
                          direction="both", interpret=None):
  """reduce_scatter(x @ w), each step's matmul overlapping the previous send."""
  n = axis_size(axis_name)
  _check_matmul("matmul_reduce_scatter", x, w)
  _check_rows("matmul_reduce_scatter", x, n, axis_name)
  plan = _plan("matmul_reduce_scatter", implementation, x, w, axis_name,
               direction, 1, interpret)
  if plan.backend == "xla":
    return reference.matmul_reduce_scatter(x, w, axis_name)
  agmm_plan = _plan("all_gather_matmul", implementation,
                    jax.ShapeDtypeStruct((x.shape[0] // n, w.shape[1]), x.dtype),
                    jax.ShapeDtypeStruct(w.shape[::-1], w.dtype), axis_name,
                    direction, 1, interpret, strict=False)
  return _matmul_rs(x, w, axis_name, plan, agmm_plan)
