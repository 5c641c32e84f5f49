"""Benchmark of ops/collectives against XLA/NCCL, measured in the same run.

    export NCCL_NVLS_ENABLE=0
    python3 launch/bench_collectives.py --out=/tmp/coll.json        # 2+ GPUs
    python3 launch/bench_collectives.py --quick                     # CPU smoke
    # DDP with collectives and the sequence-parallel block, 2 GPUs (~3 min):
    python3 launch/bench_collectives.py --sections=ddp,tp --out=/tmp/ddp_tp.json

Sections, each run in its own process with a time limit (a hung kernel costs
its section only), results merged into one JSON object (stdout and --out):
  agmm       all_gather(x) @ w, m=k=n=--agmm_size per shard, bf16: XLA vs the
             Pallas Mosaic GPU ring kernel (a few tilings, each checked against
             XLA's output), plus the local matmul of the gathered shape alone.
  allreduce  all-reduce bus bandwidth, bf16, --ar_mib MiB per device: lax.psum
             vs the Pallas ring kernel; ring RS/AG/AR correctness checks.
  step       a data-parallel MLP-block step: compute only, communication only,
             gradient all-reduce per bucket inside the backward (xla, pallas),
             and one all-reduce after the backward.
             (agmm, allreduce, step: ops/collectives/bench.py says more)
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


_CURRENT = {}


def emit():
  """Print the section's results so far (the orchestrator keeps the last)."""
  print("@@RESULT@@" + json.dumps(_CURRENT), flush=True)


# ---------------------------------------------------------------- sections
# agmm, allreduce and step: ops/collectives/bench.py; ddp and tp (the runtime's and the
# model's users of the kernels) here.


def section_agmm(res):
  from ops.collectives import bench
  bench.agmm(res, emit, size=256 if FLAGS.quick else FLAGS.agmm_size, only=FLAGS.agmm_configs)


def section_allreduce(res):
  from ops.collectives import bench
  sizes = [1] if FLAGS.quick else [int(v) for v in FLAGS.ar_mib]
  bench.allreduce(res, emit, sizes_mib=sizes, variants=FLAGS.ar_variants, checks=FLAGS.checks)


def section_step(res):
  from ops.collectives import bench
  bench.mlp_step(res, dim=128 if FLAGS.quick else FLAGS.step_dim,
                 layers=2 if FLAGS.quick else FLAGS.step_layers,
                 tokens=[256] if FLAGS.quick else [int(t) for t in FLAGS.step_tokens])


def _small_config(steps, workers, mode):
  from configs import base
  c = base.get_config()
  c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, max_seq_len=64)
  c.data.update(seq_len=64, batch_size=4)
  c.train.update(steps=steps, warmup_steps=1, eval_every=0, eval_batches=1, log_every=1)
  c.outer.update(algorithm="ddp", num_workers=workers, islands="devices", collectives=mode)
  return c


def section_ddp(res):
  import jax
  import numpy as np
  import optax
  from models.config import ModelConfig
  from pathways_lite import train as train_lib
  from pathways_lite.islands import Union, make_islands
  from pathways_lite.outer import run_with_state
  from pathways_lite.outer.snapshot import resolve
  from pathways_lite.outer.ddp_collective import initial_carry, make_ddp_step
  from pathways_lite.outer.inner import Inner
  from ops.collectives.bench import error, timeit, tree_diff
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
        e2e[mode]["replicas_max_abs_diff"] = max(tree_diff(x, reps[0])["max_abs_diff"]
                                                 for x in reps)
        e2e[mode]["vs_server"] = tree_diff(final[mode], final["server"])
    except Exception as e:  # noqa: BLE001
      e2e[mode] = {"error": error(e)}
      traceback.print_exc()
    emit()
  if "xla" in final and "pallas" in final:
    e2e["pallas_vs_xla"] = tree_diff(final["pallas"], final["xla"])
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
      t[impl + "_error"] = error(e)
      traceback.print_exc()
    emit()
  if len(out) == 2:
    t["pallas_vs_xla_params"] = tree_diff(out["pallas"][0].params, out["xla"][0].params)
    t["ok"] = t["pallas_vs_xla_params"]["max_abs_diff"] <= 1e-6
    t["pallas_over_xla"] = t["pallas_ms"] / t["xla_ms"]


def section_tp(res):
  import dataclasses
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  from models.config import ModelConfig
  from models.decoder import Block
  from models.sharding import make_mesh, param_shardings
  from ops.collectives.bench import error, timeit, tree_diff
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
      r["error"] = error(e)
      traceback.print_exc()
    emit()
  for impl in ("gspmd", "pallas"):
    if impl in outs and "xla" in outs:
      res[impl]["output_vs_xla"] = tree_diff(outs[impl][0], outs["xla"][0])
      res[impl]["grads_vs_xla"] = tree_diff(outs[impl][1], outs["xla"][1])
      res[impl]["ok"] = max(res[impl]["output_vs_xla"]["max_rel_diff"],
                            res[impl]["grads_vs_xla"]["max_rel_diff"]) <= 3e-2


SECTIONS = {"agmm": section_agmm, "allreduce": section_allreduce,
            "step": section_step, "ddp": section_ddp, "tp": section_tp}


# ------------------------------------------------------------ orchestration


def _run_section(name):
  import jax
  from ops.collectives.bench import error
  res = _CURRENT
  res.update({"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
              "device_kind": jax.devices()[0].device_kind})
  t0 = time.perf_counter()
  try:
    SECTIONS[name](res)
  except Exception as e:  # noqa: BLE001
    res["error"] = error(e)
    traceback.print_exc()
  res["section_wall_s"] = time.perf_counter() - t0
  print("@@RESULT@@" + json.dumps(res), flush=True)


def _last_result(stdout):
  """The JSON of a section's last @@RESULT@@ line (emit), or None."""
  lines = [l for l in stdout.splitlines() if l.startswith("@@RESULT@@")]
  return json.loads(lines[-1][len("@@RESULT@@"):]) if lines else None


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
      last = _last_result(p.stdout)
      results[name] = (last if last is not None else
                       {"error": f"exit {p.returncode}", "stderr_tail": p.stderr[-2000:]})
      sys.stderr.write(p.stderr[-4000:])
    except subprocess.TimeoutExpired as e:
      def text(v):
        return v.decode(errors="replace") if isinstance(v, bytes) else (v or "")
      results[name] = _last_result(text(e.stdout)) or {}
      results[name]["error"] = f"timed out after {limit:.0f} s (partial results)"
      results[name]["stderr_tail"] = text(e.stderr)[-2000:]
    results[name]["process_wall_s"] = time.perf_counter() - t0
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=1)
  print(json.dumps(results, indent=1))
  from ops.collectives import bench
  print(bench.table(results))


if __name__ == "__main__":
  app.run(main)
