"""Flash attention benchmark: the Pallas Mosaic GPU kernel vs cuDNN, XLA and
jax's deprecated Pallas Triton `mha`, measured in the same run on one GPU.

    PYTHONUNBUFFERED=1 python3 launch/bench_attention.py --out=$OUT/attn.json
    python3 launch/bench_attention.py --sections=check --check_cases=d128 --quick

Every job runs in its own process with a time limit (a hung kernel costs
that job only) and reports each result as soon as it has it, so a job killed
at its limit still keeps what it measured. Jobs:
  check:<case>  the Pallas kernel's forward and gradients (via a random dO)
                against ops/attention/reference.py (f32) on fresh random
                inputs: head dims 64/128/256, causal, GQA, padded lengths,
                segment ids. Run before any timing.
  bench:<shape>:<causal>  bf16, head_dim 128, (B4,S4096,H16) and
                (B1,S16384,H16): fwd and fwd+bwd times of pallas, cudnn,
                xla (jax.nn.dot_product_attention(implementation="xla")) and
                triton mha; TFLOP/s with 4*B*S^2*H*D per forward (half if
                causal) and 3.5x that for fwd+bwd. Pallas is first checked
                against cuDNN at the benchmark shape.
  memory        S=32768 (B1, H16, D128, causal) fwd+bwd: XLA's compiled
                memory analysis (argument + output + temp bytes) for each
                implementation, and whether it fits the device.
Times are medians over trials of back-to-back dispatched calls (each trial
>= ~30 ms) after a warm-up. JSON to stdout and --out; a short table last.
"""
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("out", "", "also write the JSON here")
flags.DEFINE_string("job", "", "run one job in this process (internal)")
flags.DEFINE_list("sections", ["check", "bench", "memory"], "sections to run")
flags.DEFINE_list("check_cases", [], "check cases to run (default: all)")
flags.DEFINE_list("shapes", [], "bench shapes (default: all)")
flags.DEFINE_list("causal_modes", ["noncausal", "causal"], "bench masks")
flags.DEFINE_list("impls", ["cudnn", "xla", "triton", "pallas"], "implementations timed")
flags.DEFINE_integer("budget_s", 560, "wall-clock budget for all jobs")
flags.DEFINE_integer("check_limit_s", 200,
                     "time limit of one check job (they compile in parallel: ~130 s)")
flags.DEFINE_integer("bench_limit_s", 150, "time limit of one bench job")
flags.DEFINE_bool("quick", False, "small shapes (smoke test)")
flags.DEFINE_bool("check_overlap", False, "check jobs test the forward's overlap variant")
FLAGS = flags.FLAGS

SHAPES = {"B4_S4096_H16": (4, 4096, 16), "B1_S16384_H16": (1, 16384, 16)}
QUICK_SHAPES = {"B1_S256_H2": (1, 256, 2)}
D = 128
# name -> (B, T, S, H, K, D, causal, segments, sm_scale)
CHECKS = {
    "d128": (2, 1024, 1024, 4, 4, 128, False, None, None),
    "d128_causal": (2, 1024, 1024, 4, 4, 128, True, None, None),
    "d128_gqa_padded": (1, 1000, 1000, 4, 2, 128, True, None, 0.1),
    "d128_segments": (2, 1024, 1024, 4, 2, 128, True, "self", None),
    "d64_causal": (2, 1024, 1024, 4, 1, 64, True, None, None),
    "d256": (1, 1024, 1024, 2, 2, 256, False, None, None),
    "d256_causal": (1, 1024, 1024, 2, 2, 256, True, None, None),
}


def emit(kind, **rec):
  print("RESULT " + json.dumps({"kind": kind, **rec}), flush=True)


def _flops(B, S, H, causal, mode):
  f = 4.0 * B * S * S * H * D * (0.5 if causal else 1.0)
  return f * (3.5 if mode == "fwd+bwd" else 1.0)


# ---------------------------------------------------------------- in-job code
def _inputs(seed, B, T, S, H, K, Dh, dtype, segments=None):
  import jax
  import jax.numpy as jnp
  ks = jax.random.split(jax.random.key(seed), 5)
  mk = lambda k_, s: jax.random.normal(k_, s, jnp.float32).astype(dtype)
  q, k, v = mk(ks[0], (B, T, H, Dh)), mk(ks[1], (B, S, K, Dh)), mk(ks[2], (B, S, K, Dh))
  do = mk(ks[3], (B, T, H, Dh))
  seg = None
  if segments == "self":
    seg = jnp.sort(jax.random.randint(ks[4], (B, T), 0, 5), axis=1)
  return q, k, v, do, seg


def _rel(a, b):
  import jax.numpy as jnp
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def job_check(name):
  import jax
  import jax.numpy as jnp
  from ops.attention import api, reference
  B, T, S, H, K, Dh, causal, segs, scale = CHECKS[name]
  if FLAGS.quick:
    T, S = min(T, 200), min(S, 200)
  q, k, v, do, seg = _inputs(zlib.crc32(name.encode()), B, T, S, H, K, Dh,
                             jnp.bfloat16, segs)
  kw = dict(causal=causal, segment_ids=seg, sm_scale=scale)
  if FLAGS.check_overlap:   # the FA3 intra-warpgroup overlap variant of the forward
    import dataclasses
    from ops.attention import blocks, pallas_gpu
    cfg = dataclasses.replace(blocks.gpu_blocks(T, S, Dh, causal), overlap=1)
    qi, ki = reference.split_segment_ids(seg, B, T, S)
    pal = jax.jit(lambda q, k, v: pallas_gpu.flash_attention(
        q, k, v, causal=causal, q_segment_ids=qi, kv_segment_ids=ki,
        sm_scale=scale, blocks=cfg))
  else:
    pal = jax.jit(lambda q, k, v: api.dot_product_attention(
        q, k, v, implementation="pallas", **kw))
  ref = jax.jit(lambda q, k, v: reference.attention(q, k, v, **kw))
  t0 = time.time()
  out = jax.block_until_ready(pal(q, k, v))
  want = ref(q, k, v)
  emit("check", case=name, part="fwd", err=_rel(out, want), finite=bool(jnp.isfinite(out.astype(jnp.float32)).all()),
       compile_s=round(time.time() - t0, 1))
  g = jax.jit(lambda q, k, v, do: jax.vjp(pal, q, k, v)[1](do))
  gr = jax.jit(lambda q, k, v, do: jax.vjp(ref, q, k, v)[1](do))
  t0 = time.time()
  grads = jax.block_until_ready(g(q, k, v, do))
  compile_s = round(time.time() - t0, 1)
  for n, a, b in zip(("dq", "dk", "dv"), grads, gr(q, k, v, do)):
    emit("check", case=name, part=n, err=_rel(a, b), compile_s=compile_s)


def _time(fn, args, min_trial_s=0.03, trials=5):
  import jax
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  est = max(time.perf_counter() - t0, 1e-5)
  n = max(2, int(min_trial_s / est) + 1)
  ts = []
  for _ in range(trials):
    t0 = time.perf_counter()
    for _ in range(n):
      out = fn(*args)
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t0) / n)
  return statistics.median(ts), (max(ts) - min(ts)) / statistics.median(ts)


def _impl_fn(impl, causal):
  import jax
  if impl.startswith("pallas/"):   # pallas/bq/bkv/stages/bwd_bq/bwd_bkv/bwd_stages
    from ops.attention import blocks, pallas_gpu
    cfg = blocks.GpuBlocks(*map(int, impl.split("/")[1:]))
    return lambda q, k, v: pallas_gpu.flash_attention(q, k, v, causal=causal, blocks=cfg)
  if impl == "pallas":
    from ops.attention import api
    return lambda q, k, v: api.dot_product_attention(q, k, v, causal=causal,
                                                     implementation="pallas")
  if impl == "cudnn":
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn")
  if impl == "xla":
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="xla")
  if impl == "triton":
    import warnings
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      from jax.experimental.pallas.ops.gpu import attention as triton_attention
    return lambda q, k, v: triton_attention.mha(
        q, k, v, None, sm_scale=D ** -0.5, causal=causal)
  raise ValueError(impl)


def job_bench(shape, causal):
  import jax
  import jax.numpy as jnp
  causal = causal == "causal"
  B, S, H = (QUICK_SHAPES if FLAGS.quick else SHAPES)[shape]
  q, k, v, do, _ = _inputs(1, B, S, S, H, H, D, jnp.bfloat16)
  fwd_ref = None
  for impl in FLAGS.impls:
    f = _impl_fn(impl, causal)
    fwd = jax.jit(f)
    fb = jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))
    if impl == "cudnn":
      fwd_ref = (fwd(q, k, v), fb(q, k, v, do))
    if impl.startswith("pallas") and fwd_ref is not None:   # correctness before timing
      errs = {"out": _rel(fwd(q, k, v), fwd_ref[0])}
      errs.update({n: _rel(a, b) for n, a, b in zip(("dq", "dk", "dv"),
                                                    fb(q, k, v, do), fwd_ref[1])})
      emit("bench_check", shape=shape, causal=causal, impl=impl, vs="cudnn", errs=errs)
    for mode, fn, args in (("fwd", fwd, (q, k, v)), ("fwd+bwd", fb, (q, k, v, do))):
      try:
        sec, spread = _time(fn, args)
        emit("bench", shape=shape, causal=causal, impl=impl, mode=mode,
             ms=round(sec * 1e3, 4), spread=round(spread, 3),
             tflops=round(_flops(B, S, H, causal, mode) / sec / 1e12, 1))
      except Exception as e:  # pylint: disable=broad-except
        emit("bench", shape=shape, causal=causal, impl=impl, mode=mode,
             error=f"{type(e).__name__}: {str(e)[:300]}")


def job_memory():
  import jax
  import jax.numpy as jnp
  B, S, H = (1, 512, 2) if FLAGS.quick else (1, 32768, 16)
  sds = jax.ShapeDtypeStruct((B, S, H, D), jnp.bfloat16)
  dev_bytes = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  for impl in FLAGS.impls:
    f = _impl_fn(impl, True)
    fb = jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))
    try:
      m = fb.lower(sds, sds, sds, sds).compile().memory_analysis()
      total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
      emit("memory", impl=impl, S=S, causal=True, mode="fwd+bwd",
           temp_gib=round(m.temp_size_in_bytes / 2**30, 3),
           total_gib=round(total / 2**30, 3),
           fits=None if dev_bytes is None else bool(total <= dev_bytes),
           device_gib=None if dev_bytes is None else round(dev_bytes / 2**30, 1))
    except Exception as e:  # pylint: disable=broad-except
      emit("memory", impl=impl, S=S, causal=True, mode="fwd+bwd",
           error=f"{type(e).__name__}: {str(e)[:300]}")


# ------------------------------------------------------------------ driver
def _start(job, env=None):
  cmd = [sys.executable, os.path.abspath(__file__), f"--job={job}"]
  cmd += [a for a in sys.argv[1:] if a.startswith(("--quick", "--check_overlap"))]
  cmd += [f"--impls={','.join(FLAGS.impls)}"]
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True,
                          env={**os.environ, **(env or {})})


def _finish(job, proc, limit, t0):
  recs, tail = [], []
  try:
    out, _ = proc.communicate(timeout=max(limit - (time.time() - t0), 1))
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, 9)
    out, _ = proc.communicate()
    recs.append({"kind": "timeout", "job": job, "limit_s": round(limit)})
  for line in out.splitlines():
    if line.startswith("RESULT "):
      recs.append(json.loads(line[7:]))
    else:
      tail.append(line)
  if proc.returncode not in (0, None) and not any(r["kind"] == "timeout" for r in recs):
    err = [l[:300] for l in tail if l.strip()][-25:]
    recs.append({"kind": "job_failed", "job": job, "rc": proc.returncode,
                 "log_tail": err})
  print(f"# {job}: {time.time() - t0:.0f}s, {len(recs)} records", flush=True)
  for r in recs:
    if r["kind"] == "job_failed":
      print("\n".join("  | " + l for l in r["log_tail"]), flush=True)
    else:
      print("  " + json.dumps(r)[:300], flush=True)
  return recs


def _run_jobs(jobs, deadline, parallel=False):
  """Runs (job, limit) pairs, one at a time or all at once; returns records."""
  recs = []
  if parallel:   # correctness only: share the GPU, no preallocation
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    t0 = time.time()
    procs = [(job, min(limit, deadline - t0), _start(job, env)) for job, limit in jobs]
    for job, limit, proc in procs:
      recs += _finish(job, proc, limit, t0)
    return recs
  for job, limit in jobs:
    limit = min(limit, deadline - time.time())
    if limit < 10:
      recs.append({"kind": "skipped", "job": job, "reason": "budget"})
      continue
    recs += _finish(job, _start(job), limit, time.time())
  return recs


def _table(recs):
  lines = []
  bench = [r for r in recs if r["kind"] == "bench" and "tflops" in r]
  key = lambda r: (r["shape"], r["causal"], r["mode"])
  groups = {}
  for r in bench:
    groups.setdefault(key(r), {})[r["impl"]] = r["tflops"]
  lines.append(f"{'shape':15s} {'causal':6s} {'mode':8s} " +
               " ".join(f"{i:>7s}" for i in FLAGS.impls) +
               "  pal/cudnn pal/triton pal/xla")
  for (shape, causal, mode), t in sorted(groups.items()):
    p = t.get("pallas")
    ratio = lambda o: f"{p / t[o]:9.2f}" if p and t.get(o) else f"{'-':>9s}"
    lines.append(f"{shape:15s} {str(causal):6s} {mode:8s} " +
                 " ".join(f"{t.get(i, float('nan')):7.1f}" for i in FLAGS.impls) +
                 f"  {ratio('cudnn')} {ratio('triton'):>10s} {ratio('xla'):>7s}")
  for r in recs:
    if r["kind"] == "memory":
      lines.append(f"memory S={r['S']} {r['impl']:7s} " + (
          f"total {r['total_gib']} GiB (temp {r['temp_gib']}), fits={r['fits']}"
          if "total_gib" in r else r.get("error", "")[:100]))
  checks = [r for r in recs if r["kind"] in ("check", "bench_check")]
  bad = [r for r in checks if r["kind"] == "check" and not r.get("err", 1) < 2e-2]
  lines.append(f"checks: {len(checks)} records, {len(bad)} over 2e-2: " +
               ", ".join(f"{r['case']}:{r['part']}" for r in bad))
  for r in recs:
    if r["kind"] in ("job_failed", "timeout", "skipped"):
      lines.append(f"{r['kind']}: {r['job']}")
  return "\n".join(lines)


def main(_):
  if FLAGS.job:
    name, *args = FLAGS.job.split(":")
    try:
      {"check": job_check, "bench": job_bench, "memory": job_memory}[name](*args)
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      sys.exit(1)
    return
  import jax  # only for the header; jobs import their own
  deadline = time.time() + FLAGS.budget_s
  dev = jax.devices()[0]
  result = {"device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "flags": [a.split("=")[0] if a.startswith("--out") else a
                      for a in sys.argv[1:]],
            "records": []}
  del jax
  def save():
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=1)
  if "check" in FLAGS.sections:
    jobs = [(f"check:{c}", FLAGS.check_limit_s) for c in FLAGS.check_cases or CHECKS]
    result["records"] += _run_jobs(jobs, deadline, parallel=True)
    save()
  if "bench" in FLAGS.sections:
    # A check job whose forward never reported hung (not just slow to compile
    # the backward); a hung forward would eat every bench job.
    fwd_seen = {r["case"] for r in result["records"]
                if r["kind"] == "check" and r["part"] == "fwd"}
    hung = [r["job"] for r in result["records"]
            if r["kind"] == "timeout" and r["job"].startswith("check:d128")
            and r["job"].split(":")[1] not in fwd_seen]
    if hung and "pallas" in FLAGS.impls:   # a hung kernel would eat every bench job
      FLAGS.impls = [i for i in FLAGS.impls if i != "pallas"]
      result["records"].append({"kind": "skipped", "job": "bench pallas",
                                "reason": f"check jobs timed out: {hung}"})
    for s in FLAGS.shapes or (QUICK_SHAPES if FLAGS.quick else SHAPES):
      for c in FLAGS.causal_modes:
        result["records"] += _run_jobs([(f"bench:{s}:{c}", FLAGS.bench_limit_s)], deadline)
        save()
  if "memory" in FLAGS.sections:
    result["records"] += _run_jobs([("memory", 120)], deadline)
  result["table"] = _table(result["records"])
  print(json.dumps(result))
  save()
  print(result["table"])


if __name__ == "__main__":
  app.run(main)
