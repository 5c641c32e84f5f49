"""Ray islands benchmark: controller overhead, object-store transfers, losing and replacing an island.

    python launch/bench_ray.py --out=/tmp/bench_ray.json               # CPU: about a minute
    python launch/bench_ray.py --address=HEAD:6379 --island_gpus=1      # on a Ray cluster of GPUs

Measured in one run (medians; times in microseconds or seconds as named):
  overhead_us.{local,ray,raw_ray}  per call of a tiny jitted op: "enqueue" (a chain of --calls
                                   dependent calls submitted, per call) and "roundtrip" (call +
                                   result, one at a time); local = pathways_lite.Runtime on this
                                   process's devices, raw_ray = a bare Ray actor method (ObjectRef
                                   chain / ray.get), ray = RayRuntime (Futures over the same)
  transfer[]                       island -> island through the object store for --sizes_mib:
                                   RayRuntime.transfer (device->host->store->host->device) and a
                                   raw actor-to-actor ObjectRef hand-off; MB/s = MiB*1.048576/s
  diloco_step                      one synchronous outer step of 2 workers + a server on Ray
                                   islands: params (--diloco_mib MiB f32) server -> workers, an
                                   inner phase of --inner_s seconds, deltas workers -> server,
                                   the averaged update; transfer_share = the step's time not spent
                                   in the inner phase or the update, over the step time
  failure                          detect_s: SIGKILL of an island running a call -> its Future fails
                                   with IslandLost; replace_s: replace_island until the actor answers;
                                   first_call_{cold,replacement}_s: first call of a small train step
                                   on the original island (compiles) and on the replacement (the
                                   islands share a persistent compilation cache)
Prints one JSON object (and writes it to --out).
"""
import functools
import os
import signal
import statistics
import sys
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import ray

from pathways_lite.islands import make_islands
from pathways_lite.metrics import emit_json
from pathways_lite.ray_islands import IslandLost, RayIsland, RayRuntime
from pathways_lite.runtime import Runtime

flags.DEFINE_integer("calls", 300, "calls per overhead measurement")
flags.DEFINE_list("sizes_mib", ["1", "4", "16", "64"], "transfer sizes in MiB")
flags.DEFINE_integer("repeats", 3, "repeats per transfer size (median)")
flags.DEFINE_string("address", "", "Ray cluster address ('' starts a local one)")
flags.DEFINE_float("island_cpus", 1.0, "Ray CPUs per island actor")
flags.DEFINE_float("island_gpus", 0.0, "GPUs per island actor")
flags.DEFINE_float("diloco_mib", 64, "DiLoCo step: size of the params (MiB, f32); 0 skips it")
flags.DEFINE_float("inner_s", 1.0, "DiLoCo step: seconds of the inner phase")
flags.DEFINE_string("out", "", "also write the JSON here")
FLAGS = flags.FLAGS


def add1(x):
  return x + 1


def filled(n, v):
  return jnp.full((n,), v, jnp.float32)


def mlp_steps(w, x):
  """A few SGD steps of a small MLP: something that takes a moment to compile."""
  def step(w, _):
    g = jax.grad(lambda w: jnp.mean(jnp.tanh(jnp.tanh(x @ w[0]) @ w[1]) ** 2))(w)
    return jax.tree.map(lambda a, b: a - 0.1 * b, w, g), None
  return jax.lax.scan(step, w, None, length=8)[0]


def _sleep_host(s):
  time.sleep(float(s))
  return np.float32(0)


def sleep_then(x, seconds):
  return x + jax.pure_callback(_sleep_host, jax.ShapeDtypeStruct((), jnp.float32), jnp.float32(seconds))


class RawActor:
  """A bare Ray actor running the same jitted op: the floor under RayRuntime's overhead."""

  def __init__(self):
    self.f = jax.jit(add1)

  def add1(self, x):
    return np.asarray(self.f(x))

  def make(self, n):
    return np.ones(n, np.float32)

  def size(self, x):
    return int(x.nbytes)


def overhead_runtime(rt, islands, n):
  x = np.float32(0)
  rt.call(add1, x, island=islands[0]).result()          # compile
  rt.call(add1, rt.call(add1, x, island=islands[0]), island=islands[1]).result()
  t0 = time.perf_counter()
  f = rt.call(add1, x, island=islands[0])
  for i in range(n - 1):
    f = rt.call(add1, f, island=islands[0])
  t_enq = time.perf_counter() - t0
  assert float(np.asarray(f.result())) == n
  rts = []
  for _ in range(n // 3):
    t0 = time.perf_counter()
    rt.call(add1, x, island=islands[0]).result()
    rts.append(time.perf_counter() - t0)
  return {"enqueue": 1e6 * t_enq / n, "roundtrip": 1e6 * statistics.median(rts)}


def overhead_raw(actor, n):
  x = np.float32(0)
  ray.get(actor.add1.remote(x))
  t0 = time.perf_counter()
  r = actor.add1.remote(x)
  for _ in range(n - 1):
    r = actor.add1.remote(r)
  t_enq = time.perf_counter() - t0
  assert float(ray.get(r)) == n
  rts = []
  for _ in range(n // 3):
    t0 = time.perf_counter()
    ray.get(actor.add1.remote(x))
    rts.append(time.perf_counter() - t0)
  return {"enqueue": 1e6 * t_enq / n, "roundtrip": 1e6 * statistics.median(rts)}


def transfers(rt, raws, sizes, repeats):
  out = []
  for mib in sizes:
    n = int(mib * 2**20 // 4)
    make = functools.partial(filled, n)
    ours, raw = [], []
    for r in range(repeats):
      x = rt.call(make, np.float32(r), island="a")
      x.result()   # ready (fetched once; the transfer below starts from the island)
      t0 = time.perf_counter()
      rt.transfer(x, island="b").exception()
      ours.append(time.perf_counter() - t0)
      ref = raws[0].make.remote(n)
      ray.wait([ref])
      t0 = time.perf_counter()
      assert ray.get(raws[1].size.remote(ref)) == 4 * n
      raw.append(time.perf_counter() - t0)
    o, w = statistics.median(ours), statistics.median(raw)
    out.append({"mib": mib, "ours_s": o, "ours_MBps": mib * 1.048576 / o, "raw_s": w,
                "raw_MBps": mib * 1.048576 / w})
  return out


def inner_phase(p, seconds):
  return sleep_then(p * 0.999, seconds)


def delta(start, local):
  return start - local


def average_update(p, d0, d1):
  return p - 0.7 * 0.5 * (d0 + d1)


def diloco_step(spec, mib, inner_s, cache):
  n = int(mib * 2**20 // 4)
  names = ["w0", "w1", "server"]
  rt = RayRuntime([RayIsland(k, **spec) for k in names], compile_cache_dir=cache)
  phase = functools.partial(inner_phase, seconds=inner_s)
  gp = rt.call(functools.partial(filled, n), np.float32(1), island="server")
  times = []
  for t in range(3):                       # the first one compiles
    gp.result()
    t0 = time.perf_counter()
    ds = []
    for w in ("w0", "w1"):
      start = rt.transfer(gp, island=w)
      local = rt.call(phase, start, island=w)
      ds.append(rt.transfer(rt.call(delta, start, local, island=w), island="server"))
    gp = rt.call(average_update, gp, *ds, island="server")
    gp.exception()
    upd = gp.times[2] - gp.times[1]
    times.append((time.perf_counter() - t0, upd))
  rt.shutdown()
  step, upd = statistics.median(s for s, _ in times[1:]), statistics.median(u for _, u in times[1:])
  return {"mib": mib, "inner_s": inner_s, "step_s": step, "update_s": upd,
          "transfer_share": max(0.0, step - inner_s - upd) / step}


def failure(rt):
  w = [np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)] * 2
  x = np.ones((32, 64), np.float32)
  t0 = time.perf_counter()
  rt.call(mlp_steps, w, x, island="b").result()
  cold = time.perf_counter() - t0
  slow = rt.call(functools.partial(sleep_then, seconds=60.0), np.float32(0), island="b")
  time.sleep(0.5)
  os.kill(rt.island_info("b")["pid"], signal.SIGKILL)
  t0 = time.perf_counter()
  assert isinstance(slow.exception(timeout=60), IslandLost)
  detect = time.perf_counter() - t0
  t0 = time.perf_counter()
  rt.replace_island("b")
  replace = time.perf_counter() - t0
  t0 = time.perf_counter()
  rt.call(mlp_steps, w, x, island="b").result()
  first = time.perf_counter() - t0
  return {"detect_s": detect, "replace_s": replace, "first_call_cold_s": cold,
          "first_call_replacement_s": first}


def log(msg):
  print(f"bench_ray: {msg}", file=sys.stderr, flush=True)


def main(argv):
  del argv
  t_start = time.time()
  local = {} if FLAGS.address else {"num_cpus": int(4 * max(1.0, FLAGS.island_cpus))}
  ray.init(address=FLAGS.address or "local", include_dashboard=False, log_to_driver=False, **local)
  res = {"jax": jax.__version__, "ray": ray.__version__, "cpus": os.cpu_count(),
         "load_avg_1m_at_start": os.getloadavg()[0],
         "controller_device": str(jax.devices()[0].device_kind), "calls": FLAGS.calls}
  spec = dict(num_cpus=FLAGS.island_cpus, num_gpus=FLAGS.island_gpus)
  with tempfile.TemporaryDirectory() as cache:
    rt = RayRuntime([RayIsland("a", **spec), RayIsland("b", **spec)], compile_cache_dir=cache)
    env = {"env_vars": {"JAX_PLATFORMS": "cpu"}} if not FLAGS.island_gpus else {}
    raws = [ray.remote(RawActor).options(runtime_env=env, **spec).remote() for _ in range(2)]
    res["islands"] = {n: rt.island_info(n)["devices"] for n in ("a", "b")}
    devs = jax.devices()
    local_isls = make_islands(2, devices=devs[:2] if len(devs) >= 2 else devs[:1],
                              virtual=len(devs) < 2, names=["a", "b"])
    log("islands up")
    with Runtime(local_isls) as lrt:
      res["overhead_us"] = {"local": overhead_runtime(lrt, ["a", "b"], FLAGS.calls)}
    log(f"local overhead {res['overhead_us']['local']}")
    res["overhead_us"]["ray"] = overhead_runtime(rt, ["a", "b"], FLAGS.calls)
    log(f"ray overhead {res['overhead_us']['ray']}")
    res["overhead_us"]["raw_ray"] = overhead_raw(raws[0], FLAGS.calls)
    log(f"raw overhead {res['overhead_us']['raw_ray']}")
    res["transfer"] = transfers(rt, raws, [float(s) for s in FLAGS.sizes_mib], FLAGS.repeats)
    log("transfers done")
    res["failure"] = failure(rt)
    rt.shutdown()
    for a in raws:
      ray.kill(a)
    if FLAGS.diloco_mib > 0:
      res["diloco_step"] = diloco_step(spec, FLAGS.diloco_mib, FLAGS.inner_s, cache)
      log(f"diloco step {res['diloco_step']}")
  ray.shutdown()
  res["load_avg_1m_at_end"] = os.getloadavg()[0]
  res["wall_s"] = time.time() - t_start
  emit_json(res, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
