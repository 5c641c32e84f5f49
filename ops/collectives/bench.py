"""Measurements of the collective kernels against XLA/NCCL (launch/bench_collectives.py).

Each measurement fills a result dict `res` in place and calls `emit()` after
every part it finishes, so a section killed at its time limit keeps what it
measured (the launcher prints `res` on each call). They run on a one-axis mesh
"x" over the first two devices (one on a single-device machine):
  agmm       all_gather(x) @ w, XLA vs the Pallas Mosaic GPU ring kernel
  allreduce  bus bandwidth of psum vs the Pallas ring kernels, + ring_checks
  mlp_step   a data-parallel MLP-block step: compute, communication, overlap
Times are medians of per-call wall time over several trials of back-to-back
asynchronously dispatched calls (`timeit`).
"""
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

import ops.collectives as coll
from ops.collectives import pallas_gpu, reference


# ------------------------------------------------------------------ helpers


def mesh_x():
  """A ("x",) mesh of the first two devices (or the only one)."""
  devs = jax.devices()
  n = 2 if len(devs) >= 2 else 1
  return jax.sharding.Mesh(np.array(devs[:n]), ("x",))


def smap(fn, mesh, in_specs, out_specs):
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                               out_specs=out_specs, check_vma=False))


def put(x, mesh, spec):
  return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))


def timeit(fn, *args, min_time=0.05, trials=5):
  """Median seconds per call of back-to-back dispatched calls."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = max(time.perf_counter() - t0, 1e-6)
  iters = max(3, min(200, int(min_time / one)))
  per = []
  for _ in range(trials):
    t0 = time.perf_counter()
    out = None
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    per.append((time.perf_counter() - t0) / iters)
  return statistics.median(per), min(per)


def max_rel_err(got, want):
  g = np.asarray(got, np.float32)
  w = np.asarray(want, np.float32)
  return float(np.max(np.abs(g - w)) / max(1.0, float(np.max(np.abs(w)))))


def tree_diff(a, b):
  """max |a - b| over a pytree (f32), and the same relative to max |b|."""
  d = m = 0.0
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    d, m = max(d, float(np.max(np.abs(x - y)))), max(m, float(np.max(np.abs(y))))
  return {"max_abs_diff": d, "max_rel_diff": d / max(m, 1e-30)}


def error(e):
  """An exception as a short string for the results."""
  return f"{type(e).__name__}: {str(e)[:600]}"


# ----------------------------------------------------------- measurements


def agmm(res, emit, *, size, only=()):
  """all_gather(x) @ w with m = k = n = `size` per shard, bf16: XLA (lax.all_gather then dot)
  vs the Pallas ring kernel in a few tilings (`only`: a subset by name), plus the local
  matmul of the gathered shape alone; each Pallas output is checked against XLA's first."""
  mesh = mesh_x()
  n = mesh.shape["x"]
  s = size
  res.update(m=s, k=s, n=s, shards=n, dtype="bfloat16")
  kx, kw = jax.random.split(jax.random.key(0))
  x = put(jax.random.normal(kx, (n * s, s), jnp.bfloat16), mesh, P("x"))
  w = put(jax.random.normal(kw, (s, n * s), jnp.bfloat16), mesh, P(None, "x"))
  xla = smap(lambda a, b: lax.all_gather(a, "x", axis=0, tiled=True) @ b,
             mesh, (P("x"), P(None, "x")), P(None, "x"))
  want = xla(x, w)
  res["xla_ms"] = timeit(xla, x, w)[0] * 1e3
  xla_api = smap(lambda a, b: reference.all_gather_matmul(a, b, "x"), mesh,
                 (P("x"), P(None, "x")), P(None, "x"))
  res["xla_f32acc_ms"] = timeit(xla_api, x, w)[0] * 1e3
  x_all = put(jax.device_get(x), mesh, P())
  local = smap(lambda a, b: a @ b, mesh, (P(), P(None, "x")), P(None, "x"))
  res["local_matmul_only_ms"] = timeit(local, x_all, w)[0] * 1e3
  flops = 2 * (n * s) * s * s
  res["local_matmul_tflops"] = flops / res["local_matmul_only_ms"] * 1e-9
  emit()
  ok, why = pallas_gpu.is_available()
  if not ok:
    res["pallas"] = f"skipped: {why}"
    return
  C = pallas_gpu.MatmulConfig
  configs = {
      "m128n128k64s4_N4_wgN": C(max_concurrent_steps=4, grid_tile_width=4),
      "m128n128k64s4_M8_wgM": C(grid_minor_dim="M", grid_tile_width=8,
                                wg_dimension="M"),
      "m128n128k64s3_N8_wgN": C(),  # the default
  }
  res["pallas"] = {}
  if only:
    configs = {k: v for k, v in configs.items() if k in only}
  for name, cfg in configs.items():
    r = res["pallas"][name] = {}
    try:
      shard = jax.ShapeDtypeStruct((s, s), jnp.bfloat16)
      why = pallas_gpu.agmm_unsupported_reason(shard, shard, cfg)
      if why:
        r["skipped"] = why
        continue
      fn = smap(lambda a, b, cfg=cfg: pallas_gpu.all_gather_matmul(
          a, b, "x", config=cfg), mesh, (P("x"), P(None, "x")), P(None, "x"))
      got = fn(x, w)
      r["max_rel_err_vs_xla"] = max_rel_err(got, want)
      r["ok"] = r["max_rel_err_vs_xla"] < 2e-2
      r["ms"] = timeit(fn, x, w)[0] * 1e3
      r["speedup_vs_xla"] = res["xla_ms"] / r["ms"]
    except Exception as e:  # noqa: BLE001
      r["error"] = error(e)
      traceback.print_exc()
    emit()
  done = [v for v in res["pallas"].values() if v.get("ok")]
  if done:
    best = min(done, key=lambda v: v["ms"])
    res["pallas_best_ms"] = best["ms"]
    res["pallas_best_speedup"] = best["speedup_vs_xla"]


def ring_checks(res, emit, mesh):
  """The Pallas ring reduce-scatter / all-gather / all-reduce against the lax references on
  odd sizes, f32 and one-direction rings: res["checks"][case] = {max_rel_err, ok}."""
  n = mesh.shape["x"]
  checks = res["checks"] = {}
  cases = [("all_reduce", jnp.bfloat16, (1000, 37), "both"),
           ("all_reduce", jnp.float32, (4096, 3), "right"),
           ("reduce_scatter", jnp.bfloat16, (n * 999, 5), "both"),
           ("reduce_scatter", jnp.float32, (n * 64, 128), "left"),
           ("all_gather", jnp.bfloat16, (777, 3), "both"),
           ("all_gather", jnp.float32, (64, 4096), "right")]
  for op, dtype, shape, direction in cases:
    name = f"{op}_{jnp.dtype(dtype).name}_{'x'.join(map(str, shape))}_{direction}"
    try:
      x = put(jax.random.normal(jax.random.key(len(checks)),
                                (n * shape[0], *shape[1:])).astype(dtype),
              mesh, P("x"))
      fn = smap(lambda v: getattr(pallas_gpu, op)(v, "x", direction=direction),
                mesh, P("x"), P("x"))
      ref = {"all_reduce": reference.all_reduce_f32,
             "reduce_scatter": reference.reduce_scatter_f32,
             "all_gather": reference.all_gather}[op]
      want = smap(lambda v: ref(v, "x"), mesh, P("x"), P("x"))(x)
      err = max_rel_err(fn(x), want)
      checks[name] = {"max_rel_err": err, "ok": err <= 1e-2}
    except Exception as e:  # noqa: BLE001
      checks[name] = {"error": error(e)}
      traceback.print_exc()
    emit()


def allreduce(res, emit, *, sizes_mib, variants, checks=True):
  """Bus bandwidth of all-reduce, bf16, per size in MiB/device: lax.psum vs the Pallas ring
  kernel in each variant "[tma:]ctas:vec[:tile]" (busbw = bytes * 2(N-1)/N / t); then
  `ring_checks` when `checks` and the Pallas kernels are available."""
  mesh = mesh_x()
  n = mesh.shape["x"]
  res["shards"] = n
  ok, why = pallas_gpu.is_available()
  res["sizes"] = {}
  for mib in sizes_mib:
    r = res["sizes"][str(mib)] = {}
    elems = mib * 2**20 // 2
    x = put(jax.random.normal(jax.random.key(mib), (n * elems,), jnp.bfloat16),
            mesh, P("x"))
    nbytes = elems * 2
    factor = 2 * (n - 1) / n
    psum = smap(lambda v: lax.psum(v, "x"), mesh, P("x"), P("x"))
    want = psum(x)
    t = timeit(psum, x)[0]
    r["xla_ms"], r["xla_busbw_GBps"] = t * 1e3, nbytes * factor / t / 1e9
    emit()
    if not ok:
      r["pallas"] = f"skipped: {why}"
      continue
    for variant in variants:
      tma = variant.startswith("tma:")
      ctas, vec, tile = (list(map(int, variant.removeprefix("tma:").split(":")))
                         + [4096])[:3]
      key = f"pallas_{'tma_' if tma else ''}ctas{ctas}_vec{vec}_tile{tile}"
      try:
        if tma:
          fn = smap(lambda v, c=ctas, e=vec, t=tile: pallas_gpu.all_reduce_tma(
              v, "x", max_ctas=c, vec=e, rows=t // 256), mesh, P("x"), P("x"))
        else:
          fn = smap(lambda v, c=ctas, e=vec, t=tile: pallas_gpu.all_reduce(
              v, "x", transport="registers", max_ctas=c, vec=e, tile=t),
              mesh, P("x"), P("x"))
        err = max_rel_err(fn(x), want)
        t = timeit(fn, x)[0]
        r[key] = {"ms": t * 1e3, "busbw_GBps": nbytes * factor / t / 1e9,
                  "max_rel_err_vs_psum": err, "ok": err <= 1e-2}
        r[key]["vs_xla"] = r[key]["busbw_GBps"] / r["xla_busbw_GBps"]
      except Exception as e:  # noqa: BLE001
        r[key] = {"error": error(e)}
        traceback.print_exc()
      emit()
    del x, want
  if ok and checks:
    ring_checks(res, emit, mesh)


def mlp_step(res, *, dim, layers, tokens):
  """A transformer-MLP-block step, data parallel, per tokens-per-device count: compute only
  (grads, no collective), communication only (bucketed all-reduce of a gradient-sized tree),
  gradient all-reduce per bucket inside the backward (coll.sync_grads, xla and pallas), and
  one all-reduce after the backward."""
  mesh = mesh_x()
  n = mesh.shape["x"]
  d = dim
  keys = jax.random.split(jax.random.key(0), 2 * layers)
  params = {f"block{i}": {
      "w1": jax.random.normal(keys[2 * i], (d, 4 * d), jnp.bfloat16) * d**-0.5,
      "w2": jax.random.normal(keys[2 * i + 1], (4 * d, d), jnp.bfloat16)
            * (4 * d)**-0.5} for i in range(layers)}
  grad_bytes = sum(v.size * 2 for v in jax.tree.leaves(params))
  bucket = 8 * d * d * 2  # one block's weights
  res.update(dim=d, layers=layers, shards=n, grad_MiB=grad_bytes / 2**20,
             bucket_MiB=bucket / 2**20)
  params = put(params, mesh, P())

  def loss(p, x):
    for name in sorted(p):
      h = jax.nn.gelu(x @ p[name]["w1"])
      x = x + h @ p[name]["w2"]
    return jnp.mean(jnp.square(x.astype(jnp.float32)))

  def compute(p, x):
    return jax.grad(loss)(p, x)

  def overlap(impl):
    def f(p, x):
      return jax.grad(lambda q, y: loss(coll.sync_grads(
          q, "x", bucket_bytes=bucket, implementation=impl, mean=True), y))(p, x)
    return f

  def at_end(p, x):
    g = jax.grad(loss)(p, x)
    return coll.all_reduce_tree(g, "x", bucket_bytes=None,
                                implementation="xla", mean=True)

  def comm(g):
    return coll.all_reduce_tree(g, "x", bucket_bytes=bucket,
                                implementation="xla", mean=True)

  grads_like = put(jax.tree.map(jnp.ones_like, jax.device_get(params)), mesh, P())
  res["comm_only_ms"] = timeit(smap(comm, mesh, (P(),), P()), grads_like)[0] * 1e3
  res["tokens"] = {}
  for t in tokens:
    r = res["tokens"][str(t)] = {}
    x = put(jax.random.normal(jax.random.key(t), (n * t, d), jnp.bfloat16),
            mesh, P("x"))
    r["tflop_per_device"] = 3 * 2 * t * 8 * d * d * layers / 1e12
    variants = {"compute_only": compute, "overlap_xla": overlap("xla"),
                "allreduce_after_backward_xla": at_end,
                "overlap_pallas": overlap("pallas")}
    for name, fn in variants.items():
      try:
        f = smap(fn, mesh, (P(), P("x")), P())
        r[name + "_ms"] = timeit(f, params, x)[0] * 1e3
      except Exception as e:  # noqa: BLE001
        r[name + "_error"] = error(e)
        traceback.print_exc()
    ref = max(r.get("compute_only_ms", 0), res["comm_only_ms"])
    for name in ("overlap_xla", "allreduce_after_backward_xla",
                 "overlap_pallas"):
      if name + "_ms" in r and ref:
        r[name + "_over_max"] = r[name + "_ms"] / ref


# ------------------------------------------------------------------ report


def table(results):
  """The short summary of every section's results (the launcher prints it last)."""
  rows = []
  a = results.get("agmm", {})
  if "xla_ms" in a:
    rows.append(f"agmm {a['m']}^3/shard x{a['shards']}: xla {a['xla_ms']:.3f} ms, "
                f"pallas best {a.get('pallas_best_ms', float('nan')):.3f} ms, "
                f"speedup {a.get('pallas_best_speedup', float('nan')):.2f}x "
                f"(goal >= 1.2), local matmul only {a['local_matmul_only_ms']:.3f} ms")
  for mib, r in results.get("allreduce", {}).get("sizes", {}).items():
    best = max((v for k, v in r.items() if k.startswith("pallas_")
                and isinstance(v, dict) and v.get("ok")),
               key=lambda v: v["busbw_GBps"], default=None)
    pb = f"{best['busbw_GBps']:.0f} GB/s = {best['vs_xla']:.2f}x" if best else "n/a"
    rows.append(f"all-reduce {mib} MiB: psum {r['xla_busbw_GBps']:.0f} GB/s, "
                f"pallas {pb} (goal >= 0.9x)")
  s = results.get("step", {})
  for t, r in s.get("tokens", {}).items():
    rows.append(
        f"step T={t}: compute {r.get('compute_only_ms', float('nan')):.2f} ms, "
        f"comm {s.get('comm_only_ms', float('nan')):.2f} ms, overlap_xla "
        f"{r.get('overlap_xla_ms', float('nan')):.2f} ms "
        f"({r.get('overlap_xla_over_max', float('nan')):.2f}x max, goal <= 1.1), "
        f"after-backward {r.get('allreduce_after_backward_xla_ms', float('nan')):.2f},"
        f" overlap_pallas {r.get('overlap_pallas_ms', float('nan')):.2f}")
  dd = results.get("ddp", {})
  for part in ("end_to_end", "timed_step"):
    r = dd.get(part, {})
    diff = r.get("pallas_vs_xla") or r.get("pallas_vs_xla_params") or {}
    times = (f", xla {r['xla_ms']:.2f} ms, pallas {r['pallas_ms']:.2f} ms"
             if "pallas_ms" in r and "xla_ms" in r else "")
    if r:
      rows.append(f"ddp {part}: pallas vs xla params max|diff| "
                  f"{diff.get('max_abs_diff', float('nan')):.3g}{times}")
  tp = results.get("tp", {})
  if "xla" in tp:
    rows.append("tp block fwd+bwd: " + ", ".join(
        f"{k} {tp[k].get('fwd_bwd_ms', float('nan')):.2f} ms"
        + (f" (grads rel diff vs xla {tp[k]['grads_vs_xla']['max_rel_diff']:.2g})"
           if "grads_vs_xla" in tp[k] else "")
        for k in ("gspmd", "xla", "pallas") if k in tp))
  return "\n".join(rows)
