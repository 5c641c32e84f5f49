"""Benchmark of ops/collectives against XLA/NCCL, measured in the same run.

    export NCCL_NVLS_ENABLE=0
    python3 launch/bench_collectives.py --out=/tmp/coll.json        # 2+ GPUs
    python3 launch/bench_collectives.py --quick                     # CPU smoke
    # DDP with collectives and the sequence-parallel block, 2 GPUs (~3 min):
    python3 launch/bench_collectives.py --sections=ddp,tp --out=/tmp/ddp_tp.json

Sections, each run in its own process with a time limit (a hung kernel costs
its section only), results merged into one JSON object (stdout and --out):
  agmm       all_gather(x) @ w, m=k=n=--agmm_size per shard, bf16: XLA
             (lax.all_gather then dot) vs the Pallas Mosaic GPU ring kernel
             (a few tilings), plus the local matmul of the gathered shape alone;
             each Pallas output is checked against XLA's first.
  allreduce  bus bandwidth of all-reduce, bf16, --ar_mib sizes per device:
             lax.psum vs the Pallas ring kernel (busbw = bytes * 2(N-1)/N / t);
             plus correctness checks of the ring reduce-scatter / all-gather /
             all-reduce on odd sizes, f32 and one-direction rings.
  step       a transformer-MLP-block step, data parallel: compute only (grads,
             no collective), communication only (bucketed all-reduce of a
             gradient-sized tree), gradient all-reduce per bucket inside the
             backward (ops.collectives.sync_grads, xla and pallas), and one
             all-reduce after the backward.
  ddp        DDP with real collectives (outer.collectives): (a) the outer loop
             end to end (shrunk base config, 2 workers on 2 devices, 3 steps)
             with "server", "xla" and "pallas": max |param diff|; (b) one gang
             step (pathways_lite/outer/ddp_collective.py) of a --ddp_dim model,
             all-reduce inside the backward, "xla" vs "pallas": time and diff.
  tp         a decoder block (models.decoder.Block, bf16) forward+backward on a
             (data=1, tensor=N) mesh: tp_collectives "gspmd", "xla" and
             "pallas" (sequence parallel, ops.collectives): times, max |diff|
             of output and grads against "xla".
A short table is printed last. Times are medians of per-call wall time over
several trials of back-to-back asynchronously dispatched calls.
"""
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

os.environ["NCCL_NVLS_ENABLE"] = "0"  # the GPU machines' required NCCL setting
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("out", "", "also write the JSON here")
flags.DEFINE_string("section", "", "run one section in this process (internal)")
flags.DEFINE_list("sections", ["agmm", "allreduce", "step"], "sections to run")
flags.DEFINE_integer("budget_s", 300, "wall-clock budget for all sections")
flags.DEFINE_list("limits", ["agmm:170", "allreduce:150", "step:150", "ddp:130",
                              "tp:100"],
                  "per-section time limits, name:seconds")
flags.DEFINE_integer("agmm_size", 4096, "m = k = n per shard")
flags.DEFINE_list("ar_mib", ["64", "256", "1024"], "all-reduce sizes, MiB/device")
flags.DEFINE_list("step_tokens", ["2048", "8192"], "tokens per device per step")
flags.DEFINE_integer("step_dim", 2048, "model width of the MLP blocks")
flags.DEFINE_integer("step_layers", 4, "MLP blocks")
flags.DEFINE_bool("quick", False, "tiny sizes (CPU smoke test)")
flags.DEFINE_list("agmm_configs", [], "subset of the Pallas tilings to run")
flags.DEFINE_list("ar_variants", ["tma:512:4", "tma:1024:4", "512:4"],
                  "[tma:]ctas:vec[:tile] (tma: TMA transport, else registers)")
flags.DEFINE_bool("checks", True, "run the ring-kernel correctness checks")
flags.DEFINE_integer("ddp_dim", 1024, "ddp section: model width of the timed step")
flags.DEFINE_integer("tp_tokens", 2048, "tp section: sequence length (batch 4)")
FLAGS = flags.FLAGS



# ------------------------------------------------------------------ helpers


def _jax():
  import jax
  return jax


def _mesh():
  jax = _jax()
  import numpy as np
  devs = jax.devices()
  n = 2 if len(devs) >= 2 else 1
  return jax.sharding.Mesh(np.array(devs[:n]), ("x",))


def _smap(fn, mesh, in_specs, out_specs):
  jax = _jax()
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                               out_specs=out_specs, check_vma=False))


def _put(x, mesh, spec):
  jax = _jax()
  return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))


def timeit(fn, *args, min_time=0.05, trials=5):
  """Median seconds per call of back-to-back dispatched calls."""
  jax = _jax()
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
  import numpy as np
  g = np.asarray(got, np.float32)
  w = np.asarray(want, np.float32)
  return float(np.max(np.abs(g - w)) / max(1.0, float(np.max(np.abs(w)))))


_CURRENT = {}


def emit():
  """Print the section's results so far (the orchestrator keeps the last)."""
  print("@@RESULT@@" + json.dumps(_CURRENT), flush=True)


def _err(e):
  return f"{type(e).__name__}: {str(e)[:600]}"


# ---------------------------------------------------------------- sections


def section_agmm(res):
  jax = _jax()
  import jax.numpy as jnp
  from jax import lax
  from jax.sharding import PartitionSpec as P
  from ops.collectives import pallas_gpu, reference
  mesh = _mesh()
  n = mesh.shape["x"]
  s = 256 if FLAGS.quick else FLAGS.agmm_size
  res.update(m=s, k=s, n=s, shards=n, dtype="bfloat16")
  kx, kw = jax.random.split(jax.random.key(0))
  x = _put(jax.random.normal(kx, (n * s, s), jnp.bfloat16), mesh, P("x"))
  w = _put(jax.random.normal(kw, (s, n * s), jnp.bfloat16), mesh, P(None, "x"))
  xla = _smap(lambda a, b: lax.all_gather(a, "x", axis=0, tiled=True) @ b,
              mesh, (P("x"), P(None, "x")), P(None, "x"))
  want = xla(x, w)
  res["xla_ms"] = timeit(xla, x, w)[0] * 1e3
  xla_api = _smap(lambda a, b: reference.all_gather_matmul(a, b, "x"), mesh,
                  (P("x"), P(None, "x")), P(None, "x"))
  res["xla_f32acc_ms"] = timeit(xla_api, x, w)[0] * 1e3
  x_all = _put(jax.device_get(x), mesh, P())
  local = _smap(lambda a, b: a @ b, mesh, (P(), P(None, "x")), P(None, "x"))
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
  if FLAGS.agmm_configs:
    configs = {k: v for k, v in configs.items() if k in FLAGS.agmm_configs}
  for name, cfg in configs.items():
    r = res["pallas"][name] = {}
    try:
      shard = jax.ShapeDtypeStruct((s, s), jnp.bfloat16)
      why = pallas_gpu.agmm_unsupported_reason(shard, shard, cfg)
      if why:
        r["skipped"] = why
        continue
      fn = _smap(lambda a, b, cfg=cfg: pallas_gpu.all_gather_matmul(
          a, b, "x", config=cfg), mesh, (P("x"), P(None, "x")), P(None, "x"))
      got = fn(x, w)
      r["max_rel_err_vs_xla"] = max_rel_err(got, want)
      r["ok"] = r["max_rel_err_vs_xla"] < 2e-2
      r["ms"] = timeit(fn, x, w)[0] * 1e3
      r["speedup_vs_xla"] = res["xla_ms"] / r["ms"]
    except Exception as e:  # noqa: BLE001
      r["error"] = _err(e)
      traceback.print_exc()
    emit()
  done = [v for v in res["pallas"].values() if v.get("ok")]
  if done:
    best = min(done, key=lambda v: v["ms"])
    res["pallas_best_ms"] = best["ms"]
    res["pallas_best_speedup"] = best["speedup_vs_xla"]


def _ring_checks(res, mesh):
  jax = _jax()
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  from ops.collectives import pallas_gpu, reference
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
      x = _put(jax.random.normal(jax.random.key(len(checks)),
                                 (n * shape[0], *shape[1:])).astype(dtype),
               mesh, P("x"))
      fn = _smap(lambda v: getattr(pallas_gpu, op)(v, "x", direction=direction),
                 mesh, P("x"), P("x"))
      ref = {"all_reduce": reference.all_reduce_f32,
             "reduce_scatter": reference.reduce_scatter_f32,
             "all_gather": reference.all_gather}[op]
      want = _smap(lambda v: ref(v, "x"), mesh, P("x"), P("x"))(x)
      err = max_rel_err(fn(x), want)
      checks[name] = {"max_rel_err": err, "ok": err <= 1e-2}
    except Exception as e:  # noqa: BLE001
      checks[name] = {"error": _err(e)}
      traceback.print_exc()
    emit()


def section_allreduce(res):
  jax = _jax()
  import jax.numpy as jnp
  from jax import lax
  from jax.sharding import PartitionSpec as P
  from ops.collectives import pallas_gpu
  mesh = _mesh()
  n = mesh.shape["x"]
  res["shards"] = n
  ok, why = pallas_gpu.is_available()
  sizes = [1] if FLAGS.quick else [int(v) for v in FLAGS.ar_mib]
  res["sizes"] = {}
  for mib in sizes:
    r = res["sizes"][str(mib)] = {}
    elems = mib * 2**20 // 2
    x = _put(jax.random.normal(jax.random.key(mib), (n * elems,), jnp.bfloat16),
             mesh, P("x"))
    nbytes = elems * 2
    factor = 2 * (n - 1) / n
    psum = _smap(lambda v: lax.psum(v, "x"), mesh, P("x"), P("x"))
    want = psum(x)
    t = timeit(psum, x)[0]
    r["xla_ms"], r["xla_busbw_GBps"] = t * 1e3, nbytes * factor / t / 1e9
    emit()
    if not ok:
      r["pallas"] = f"skipped: {why}"
      continue
    for variant in FLAGS.ar_variants:
      tma = variant.startswith("tma:")
      ctas, vec, tile = (list(map(int, variant.removeprefix("tma:").split(":")))
                         + [4096])[:3]
      key = f"pallas_{'tma_' if tma else ''}ctas{ctas}_vec{vec}_tile{tile}"
      try:
        if tma:
          fn = _smap(lambda v, c=ctas, e=vec, t=tile: pallas_gpu.all_reduce_tma(
              v, "x", max_ctas=c, vec=e, rows=t // 256), mesh, P("x"), P("x"))
        else:
          fn = _smap(lambda v, c=ctas, e=vec, t=tile: pallas_gpu.all_reduce(
              v, "x", transport="registers", max_ctas=c, vec=e, tile=t),
              mesh, P("x"), P("x"))
        err = max_rel_err(fn(x), want)
        t = timeit(fn, x)[0]
        r[key] = {"ms": t * 1e3, "busbw_GBps": nbytes * factor / t / 1e9,
                  "max_rel_err_vs_psum": err, "ok": err <= 1e-2}
        r[key]["vs_xla"] = r[key]["busbw_GBps"] / r["xla_busbw_GBps"]
      except Exception as e:  # noqa: BLE001
        r[key] = {"error": _err(e)}
        traceback.print_exc()
      emit()
    del x, want
  if ok and FLAGS.checks:
    _ring_checks(res, mesh)


def section_step(res):
  jax = _jax()
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  import ops.collectives as coll
  mesh = _mesh()
  n = mesh.shape["x"]
  d = 128 if FLAGS.quick else FLAGS.step_dim
  layers = 2 if FLAGS.quick else FLAGS.step_layers
  keys = jax.random.split(jax.random.key(0), 2 * layers)
  params = {f"block{i}": {
      "w1": jax.random.normal(keys[2 * i], (d, 4 * d), jnp.bfloat16) * d**-0.5,
      "w2": jax.random.normal(keys[2 * i + 1], (4 * d, d), jnp.bfloat16)
            * (4 * d)**-0.5} for i in range(layers)}
  grad_bytes = sum(v.size * 2 for v in jax.tree.leaves(params))
  bucket = 8 * d * d * 2  # one block's weights
  res.update(dim=d, layers=layers, shards=n, grad_MiB=grad_bytes / 2**20,
             bucket_MiB=bucket / 2**20)
  params = _put(params, mesh, P())

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

  grads_like = _put(jax.tree.map(jnp.ones_like, jax.device_get(params)), mesh, P())
  res["comm_only_ms"] = timeit(_smap(comm, mesh, (P(),), P()), grads_like)[0] * 1e3
  res["tokens"] = {}
  tokens = [256] if FLAGS.quick else [int(t) for t in FLAGS.step_tokens]
  for t in tokens:
    r = res["tokens"][str(t)] = {}
    x = _put(jax.random.normal(jax.random.key(t), (n * t, d), jnp.bfloat16),
             mesh, P("x"))
    r["tflop_per_device"] = 3 * 2 * t * 8 * d * d * layers / 1e12
    variants = {"compute_only": compute, "overlap_xla": overlap("xla"),
                "allreduce_after_backward_xla": at_end,
                "overlap_pallas": overlap("pallas")}
    for name, fn in variants.items():
      try:
        f = _smap(fn, mesh, (P(), P("x")), P())
        r[name + "_ms"] = timeit(f, params, x)[0] * 1e3
      except Exception as e:  # noqa: BLE001
        r[name + "_error"] = _err(e)
        traceback.print_exc()
    ref = max(r.get("compute_only_ms", 0), res["comm_only_ms"])
    for name in ("overlap_xla", "allreduce_after_backward_xla",
                 "overlap_pallas"):
      if name + "_ms" in r and ref:
        r[name + "_over_max"] = r[name + "_ms"] / ref


def _tree_diff(a, b):
  """max |a - b| over a pytree (f32), and the same relative to max |b|."""
  jax = _jax()
  import numpy as np
  d = m = 0.0
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    d, m = max(d, float(np.max(np.abs(x - y)))), max(m, float(np.max(np.abs(y))))
  return {"max_abs_diff": d, "max_rel_diff": d / max(m, 1e-30)}


def _small_config(steps, workers, mode):
  from configs import base
  c = base.get_config()
  c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, max_seq_len=64)
  c.data.update(seq_len=64, batch_size=4)
  c.train.update(steps=steps, warmup_steps=1, eval_every=0, eval_batches=1, log_every=1)
  c.outer.update(algorithm="ddp", num_workers=workers, islands="devices", collectives=mode)
  return c


def section_ddp(res):
  jax = _jax()
  import numpy as np
  import optax
  from models.config import ModelConfig
  from pathways_lite import train as train_lib
  from pathways_lite.islands import Union, make_islands
  from pathways_lite.outer import run_with_state
  from pathways_lite.outer.snapshot import resolve
  from pathways_lite.outer.ddp_collective import initial_carry, make_ddp_step
  from pathways_lite.outer.inner import Inner
  n = 2 if len(jax.devices()) >= 2 else 1
  res["workers"] = n
  final = {}
  e2e = res["end_to_end"] = {}
  for mode in ("server", "xla", "pallas"):
    try:
      t0 = time.perf_counter()
      summary, r = run_with_state(_small_config(3, n, mode), None)
      final[mode] = jax.device_get(resolve(r.state["arrays"]["global"]["state"]).params)
      e2e[mode] = {"wall_s": time.perf_counter() - t0, "val_loss": summary["final_val_loss"]}
      if mode != "server":
        reps = [f.result()[0].params for f in r.replicas]
        e2e[mode]["replicas_max_abs_diff"] = max(_tree_diff(x, reps[0])["max_abs_diff"]
                                                 for x in reps)
        e2e[mode]["vs_server"] = _tree_diff(final[mode], final["server"])
    except Exception as e:  # noqa: BLE001
      e2e[mode] = {"error": _err(e)}
      traceback.print_exc()
    emit()
  if "xla" in final and "pallas" in final:
    e2e["pallas_vs_xla"] = _tree_diff(final["pallas"], final["xla"])
    # The yardstick is XLA's own distance from the server mode: the same math in a
    # differently fused program (on GPU ~1.5e-6 after 3 f32 steps; on CPU ~1e-8).
    yard = e2e["xla"].get("vs_server", {}).get("max_abs_diff", 0.0)
    e2e["ok_tolerance"] = max(4 * yard, 1e-6)
    e2e["ok"] = e2e["pallas_vs_xla"]["max_abs_diff"] <= e2e["ok_tolerance"]
  d = 128 if FLAGS.quick else FLAGS.ddp_dim
  layers, seq, batch = (2, 32, 2) if FLAGS.quick else (2, 1024, 8)
  cfg = ModelConfig(d_model=d, num_layers=layers, num_heads=max(1, d // 128),
                    num_kv_heads=max(1, d // 128), max_seq_len=seq, compute_dtype="bfloat16")
  opt = optax.adamw(1e-3)
  inner = Inner(cfg, opt, optax.constant_schedule(1e-3), seq)
  state = train_lib.init_train_state(cfg, opt, 0, seq)
  nparams = sum(x.size for x in jax.tree.leaves(state.params))
  res["timed_step"] = t = {"d_model": d, "layers": layers, "seq": seq, "batch_per_worker": batch,
                           "params_M": nparams / 1e6, "grad_MiB_f32": nparams * 4 / 2**20}
  islands = make_islands(n, devices=jax.devices()[:n], devices_per_island=1)
  union = Union(islands)
  rng = np.random.default_rng(0)
  per = [(jax.device_put(initial_carry(state, n), i.replicated()),
          jax.device_put(rng.integers(0, 256, (batch, seq + 1), dtype=np.int32),
                         i.replicated())) for i in islands]
  carry = jax.tree.map(lambda *xs: union.stack(xs), *[p[0] for p in per])
  batches = union.stack([p[1] for p in per])
  out = {}
  for impl in ("xla", "pallas"):
    try:
      f = union.compile(make_ddp_step(inner, n, impl))
      out[impl] = f(carry, batches)
      t[impl + "_ms"] = timeit(f, carry, batches, trials=3)[0] * 1e3
    except Exception as e:  # noqa: BLE001
      t[impl + "_error"] = _err(e)
      traceback.print_exc()
    emit()
  if len(out) == 2:
    t["pallas_vs_xla_params"] = _tree_diff(out["pallas"][0].params, out["xla"][0].params)
    t["ok"] = t["pallas_vs_xla_params"]["max_abs_diff"] <= 1e-6
    t["pallas_over_xla"] = t["pallas_ms"] / t["xla_ms"]


def section_tp(res):
  jax = _jax()
  import dataclasses
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  from models.config import ModelConfig
  from models.decoder import Block
  from models.sharding import make_mesh, param_shardings
  n = 2 if len(jax.devices()) >= 2 else 1
  mesh = make_mesh(jax.devices(), tensor=n)
  if FLAGS.quick:
    cfg = ModelConfig(d_model=64, num_heads=4, num_kv_heads=4, max_seq_len=64)
    b, seq = 2, 32
  else:
    cfg = ModelConfig(d_model=2048, num_heads=16, num_kv_heads=16, d_ff=5632, num_layers=1,
                      max_seq_len=FLAGS.tp_tokens, param_dtype="bfloat16",
                      compute_dtype="bfloat16")
    b, seq = 4, FLAGS.tp_tokens
  res.update(shards=n, batch=b, seq=seq, d_model=cfg.d_model, heads=cfg.num_heads,
             d_ff=cfg.resolved_d_ff, dtype=cfg.compute_dtype)
  dt = jnp.dtype(cfg.compute_dtype)
  x = jax.random.normal(jax.random.key(0), (b, seq, cfg.d_model), jnp.float32).astype(dt)
  pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (b, seq))
  params = Block(cfg).init(jax.random.key(1), x, pos, None, True)["params"]
  flops = 3 * 2 * b * seq * (4 * cfg.d_model**2 + 3 * cfg.d_model * cfg.resolved_d_ff)
  res["matmul_tflop"] = flops / 1e12
  act = NamedSharding(mesh, P(("data", "fsdp"), "tensor", None))
  x = jax.device_put(x, act)
  pos = jax.device_put(pos, NamedSharding(mesh, P(("data", "fsdp"), None)))
  params = jax.device_put(params, param_shardings(params, mesh))
  outs = {}
  for impl in ("gspmd", "xla", "pallas"):
    r = res[impl] = {}
    try:
      block = Block(dataclasses.replace(cfg, tp_collectives=impl))

      def fwd_bwd(p, x, pos, block=block):
        def loss(p, x):
          y = block.apply({"params": p}, x, pos, None, True)
          return jnp.sum(jnp.square(y.astype(jnp.float32))) / y.size, y
        (_, y), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)
        return y, g

      with jax.set_mesh(mesh):
        f = jax.jit(fwd_bwd)
        outs[impl] = jax.device_get(f(params, x, pos))
        ms = timeit(f, params, x, pos, trials=3)[0] * 1e3
      r.update(fwd_bwd_ms=ms, tflops_per_device=flops / n / ms * 1e-9)
    except Exception as e:  # noqa: BLE001
      r["error"] = _err(e)
      traceback.print_exc()
    emit()
  for impl in ("gspmd", "pallas"):
    if impl in outs and "xla" in outs:
      res[impl]["output_vs_xla"] = _tree_diff(outs[impl][0], outs["xla"][0])
      res[impl]["grads_vs_xla"] = _tree_diff(outs[impl][1], outs["xla"][1])
      res[impl]["ok"] = max(res[impl]["output_vs_xla"]["max_rel_diff"],
                            res[impl]["grads_vs_xla"]["max_rel_diff"]) <= 3e-2


SECTIONS = {"agmm": section_agmm, "allreduce": section_allreduce,
            "step": section_step, "ddp": section_ddp, "tp": section_tp}


# ------------------------------------------------------------ orchestration


def _run_section(name):
  jax = _jax()
  res = _CURRENT
  res.update({"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
              "device_kind": jax.devices()[0].device_kind})
  t0 = time.perf_counter()
  try:
    SECTIONS[name](res)
  except Exception as e:  # noqa: BLE001
    res["error"] = _err(e)
    traceback.print_exc()
  res["section_wall_s"] = time.perf_counter() - t0
  print("@@RESULT@@" + json.dumps(res), flush=True)


def _table(results):
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


def main(argv):
  del argv
  if FLAGS.section:
    _run_section(FLAGS.section)
    return
  start = time.perf_counter()
  results = {"command": " ".join(sys.argv), "nccl_nvls_enable": "0"}
  for name in FLAGS.sections:
    left = FLAGS.budget_s - (time.perf_counter() - start)
    if left < 30:
      results[name] = {"skipped": f"time budget ({FLAGS.budget_s} s) spent"}
      continue
    limits = {k: float(v) for k, v in (a.split(":") for a in FLAGS.limits)}
    limit = min(limits.get(name, 150), left)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    if name == "step":
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                          " --xla_gpu_enable_latency_hiding_scheduler=true").strip()
    cmd = [sys.executable, os.path.abspath(__file__), f"--section={name}"] + [
        a for a in sys.argv[1:] if not a.startswith(("--out", "--section"))]
    t0 = time.perf_counter()
    try:
      p = subprocess.run(cmd, env=env, capture_output=True, text=True,
                         timeout=limit)
      out = p.stdout
      lines = [l for l in out.splitlines() if l.startswith("@@RESULT@@")]
      results[name] = (json.loads(lines[-1][len("@@RESULT@@"):]) if lines else
                       {"error": f"exit {p.returncode}", "stderr_tail": p.stderr[-2000:]})
      sys.stderr.write(p.stderr[-4000:])
    except subprocess.TimeoutExpired as e:
      def text(v):
        return v.decode(errors="replace") if isinstance(v, bytes) else (v or "")
      lines = [l for l in text(e.stdout).splitlines()
               if l.startswith("@@RESULT@@")]
      results[name] = json.loads(lines[-1][len("@@RESULT@@"):]) if lines else {}
      results[name]["error"] = f"timed out after {limit:.0f} s (partial results)"
      results[name]["stderr_tail"] = text(e.stderr)[-2000:]
    results[name]["process_wall_s"] = time.perf_counter() - t0
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=1)
  print(json.dumps(results, indent=1))
  print(_table(results))


if __name__ == "__main__":
  app.run(main)
