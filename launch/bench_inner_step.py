"""One inner step of the outer loops, timed along the path it takes, peers in the same run.

  python launch/bench_inner_step.py --config=configs/lm_125m.py --inner_steps=30 --out=inner.json
  JAX_PLATFORMS=cpu python launch/bench_inner_step.py --config=configs/tiny.py --inner_steps=4

The same jitted `Inner.chain_step` (pathways_lite/outer/inner.py: one train step that donates
its carry) run H times, ms per step, each path timed twice after two warm-up phases:
  direct         restart + H chain_step calls of plain jax, no runtime (the peer);
  runtime        the same chain as rt.call Futures on a one-device island;
  run_islands    as the outer loops lay it out: a worker island and the server island on one
                 device (outer/topology.py), the batches sent with rt.transfer, the phase's
                 start params transferred from the server island;
  driver         (--driver) the DiLoCo driver itself (launch/bench_diloco.py's path, one
                 worker, 3 outer steps of H, inner_loop "steps"): each phase's span in the
                 trace / H (`driver_phase_ms_per_step`; `ms_per_step.driver`: the fastest
                 phase after the first, which compiles).
The batches are the config's corpus (`--tokens=corpus`, what the driver trains on) or
uniform random byte ids (`--tokens=random`). ratio[path] = its ms per step / direct's (1.0:
the path adds nothing). This benchmark found why the driver's phases once ran at 63-89 ms a
step on one H100 against 36 ms for the step alone (125M, 16 x 1024): the peers used random
ids and the driver the corpus, and the step's speed depended on the tokens (the embedding's
bf16 backward scatter-add serialized on frequent tokens; models/decoder.py embed_tokens,
launch/results/diloco_inner_step_h100/). Since both read the same batches, a gap between
the paths is the runtime's or the driver's.
The final params of direct and runtime are compared: `runtime_equals_direct` (bitwise; on
GPU the embedding's scatter-add adds with atomics in a varying order, so only
`runtime_vs_direct_max_rel_diff`, the largest difference over a leaf's largest value, is
small there).
--profile_dir (with --driver) records the driver run with jax.profiler (device kernels and
the host's XLA threads, no Python tracing): open plugins/profile/*/perfetto_trace.json.gz in
ui.perfetto.dev, or the folder in TensorBoard's profile plugin, to see where the phase's
time goes between kernels. `bash launch/gpu_figures.sh OUT inner_step` runs it with both.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from pathways_lite import data as data_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model/train config file.")
_H = flags.DEFINE_integer("inner_steps", 30, "Inner steps per timed phase.")
_DRIVER = flags.DEFINE_bool("driver", False, "Also time the DiLoCo driver's phases.")
_TOKENS = flags.DEFINE_enum("tokens", "corpus", list(data_lib.BENCH_TOKENS),
                           "The phases' batches: the config's corpus (as the driver trains on) or "
                           "uniform random byte ids.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON result to this file.")
_PROFILE = flags.DEFINE_string("profile_dir", None,
                               "With --driver: a jax.profiler trace of the driver run here "
                               "(Perfetto: the *.trace.json.gz under plugins/profile/).")
flags.mark_flags_as_required(["config"])


def paths(config, H: int, tokens: str = "corpus") -> tuple[dict, tuple]:
  """({name: a function that runs one phase of H steps and returns its final carry}, the
  runtimes they use, for the caller to shut down)."""
  import jax
  from pathways_lite import configuration
  from pathways_lite.islands import make_islands
  from pathways_lite.outer.config import OuterConfig
  from pathways_lite.outer.inner import make_inner
  from pathways_lite.outer.topology import SERVER, make_run_islands, worker_name
  from pathways_lite.runtime import Runtime

  ocfg = OuterConfig.from_config(config.outer)
  inner = make_inner(config, configuration.model_config(config), ocfg)
  state = inner.init_state(config.seed)
  hb = data_lib.benchmark_batches(config.data, H, tokens=tokens)
  db = jax.device_put(hb, jax.devices()[0])
  one = make_islands(1, devices=jax.devices()[:1])
  run_ocfg = OuterConfig.from_config(dict(config.outer.to_dict(), num_workers=1,
                                          islands="devices", outer_island=0))
  rt1, rt2 = Runtime(one), Runtime(make_run_islands(run_ocfg, jax.devices()[:1]))

  def direct():
    c = inner.restart(state, state.params, db)
    for _ in range(H):
      c = inner.chain_step(c, db)
    return jax.block_until_ready(c)

  def runtime():
    c = rt1.call(inner.restart, state, state.params, db, island=one[0].name)
    for _ in range(H):
      c = rt1.call(inner.chain_step, c, db, island=one[0].name)
    return c.result()

  def run_islands():
    w = worker_name(0)
    start = rt2.transfer(rt2.transfer(state.params, island=SERVER), island=w)
    b = rt2.transfer(hb, island=w, name="batches")
    c = rt2.call(inner.restart, state, start, b, island=w, cost=0, name="phase restart")
    for i in range(H):
      c = rt2.call(inner.chain_step, c, b, island=w, cost=0, name=f"phase step {i}")
    return c.result()

  return {"direct": direct, "runtime": runtime, "run_islands": run_islands}, (rt1, rt2)


def driver_ms(config, H: int, profile_dir: str | None = None) -> list[float]:
  """Per-step time of each phase of a one-worker DiLoCo run through the driver (trace spans);
  with `profile_dir`, the run is traced by jax.profiler (device kernels and host threads)."""
  import contextlib

  import jax
  from pathways_lite.outer import run_with_state
  from pathways_lite.outer.bench_setup import diloco_config, phase_intervals
  from pathways_lite.outer.topology import worker_name

  prof = contextlib.nullcontext()
  if profile_dir:   # device activity and host threads' XLA spans; no Python tracing (size)
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level, opts.host_tracer_level, opts.enable_hlo_proto = 0, 1, False
    prof = jax.profiler.trace(profile_dir, create_perfetto_trace=True, profiler_options=opts)
  with prof:
    _, run = run_with_state(diloco_config(config, 1, H, 3, "steps"), None,
                            devices=jax.devices()[:1])
  try:
    return [1e3 * (b - a) / H for _, (a, b) in sorted(phase_intervals(run.rt.trace,
                                                                       worker_name(0)).items())]
  finally:
    run.rt.shutdown()


def measure(config, H: int, driver: bool = False, out_path: str | None = None,
            profile_dir: str | None = None, tokens: str = "corpus") -> dict:
  import jax
  import numpy as np
  from pathways_lite.metrics import emit_json

  fns, runtimes = paths(config, H, tokens)
  out = {"device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
         "config": config.name, "batch_size": config.data.batch_size,
         "seq_len": config.data.seq_len, "inner_steps": H, "tokens": tokens, "ms_per_step": {}}
  finals = {}
  try:
    for name, fn in fns.items():
      fn(), fn()                                 # compile, then one untimed phase
      times = []
      for _ in range(2):
        t0 = time.perf_counter()
        finals[name] = fn()
        times.append(1e3 * (time.perf_counter() - t0) / H)
      out["ms_per_step"][name] = statistics.median(times)
  finally:
    for rt in runtimes:
      rt.shutdown()
  leaves = {k: jax.tree.leaves(jax.device_get(v[0]["state"].params)) for k, v in finals.items()}
  pairs = list(zip(leaves["direct"], leaves["runtime"]))
  out["runtime_equals_direct"] = all(np.array_equal(a, b) for a, b in pairs)
  out["runtime_vs_direct_max_rel_diff"] = max(
      float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30)) for a, b in pairs)
  if driver:
    phases = driver_ms(config, H, profile_dir)
    out["driver_phase_ms_per_step"] = phases
    out["ms_per_step"]["driver"] = min(phases[1:]) if len(phases) > 1 else phases[0]
  base = out["ms_per_step"]["direct"]
  out["ratio"] = {k: v / base for k, v in out["ms_per_step"].items()}
  emit_json(out, out_path)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if _PROFILE.value and not _DRIVER.value:
    raise app.UsageError("--profile_dir traces the driver run: give --driver too")
  measure(_CONFIG.value, _H.value, _DRIVER.value, _OUT.value, _PROFILE.value, _TOKENS.value)


if __name__ == "__main__":
  app.run(main)
