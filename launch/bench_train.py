"""Train-step throughput of a config's model: tokens/s and MFU, swept, or runtime vs plain.

  # sweep attention impl x remat policy x batch size; best tokens/s per impl
  python launch/bench_train.py --config=configs/lm_350m.py --impls=xla,cudnn \
      --batch_sizes=8,16,32 --remats=none,dots --max_seconds=240 --out=bench.json
  # the same step through pathways_lite's runtime (one island) vs a plain jitted loop
  python launch/bench_train.py --config=configs/lm_350m.py --impls=cudnn --compare_runtime
  python launch/bench_train.py --config=configs/tiny.py --impls=xla --steps=3   # CPU smoke

Sweep: for each remat policy, batch size (ascending) and implementation, one
trial: a fresh state, `--warmup` untimed steps (the first compiles), then
`--steps` timed steps. Steps run as pathways_lite/train.py runs them: the
jitted step with the state donated, a host (numpy) batch per call, and step
n-1's metrics read after step n is dispatched. The batches are the config's
corpus (`--tokens=corpus`, the default): a step's speed can depend on the
token frequencies (models/decoder.py, embed_tokens), which uniform random ids
(`--tokens=random`) hide. A trial that fails is reported
with its error; an out-of-memory one (`"oom": true`) also skips the larger
batch sizes of its (impl, remat); any other failure skips the rest of its
impl. `--max_seconds` stops the sweep when the
next trial would not fit (estimated by the last one) and lists the trials it
skipped; --out is rewritten after every trial (with "partial": true) so a run
killed from outside keeps what it measured. The defaults of --batch_sizes /
--remats are the config's values.

--compare_runtime: the first impl/remat/batch size only. (a) plain:
`jax.jit(step, donate_argnums=0)` in a Python for loop; (b) runtime: one
island of `pathways_lite.runtime.Runtime` (real clock, trace on, as the outer
loops build it), one `rt.call(step, out_future, batch)` per step, where
out_future is the previous call's (state, metrics) Future and the metrics are
read one step behind (no per-step selector call: a jitted `out[0]` such as
outer/inner.pick0 copies the whole state). `--trials` interleaved trials of `--steps` steps
each (the order alternates); reports the median tokens/s of each and
ratio = runtime / plain. Both donate the state (the runtime's step prunes the
unused metrics input, so only the state is donated); `runtime_donates_state`
is checked on the first state's buffers, not assumed.

MFU is models/utils.mfu (PaLM's FLOPs: 6N + 12*layers*heads*head_dim*L per
token, attention counted non-causal; bf16 dense peak, 989 TFLOP/s on
H100/H200); `mfu_causal` halves the attention term (the FLOPs a causal kernel
does).
"""
import dataclasses
import functools
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from models import utils as model_utils  # noqa: E402
from pathways_lite import configuration  # noqa: E402
from pathways_lite import data as data_lib  # noqa: E402
from pathways_lite import train as train_lib  # noqa: E402
from pathways_lite.metrics import emit_json, write_partial  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config().", lock_config=True)
_IMPLS = flags.DEFINE_string("impls", "xla,cudnn", "Comma-separated attention_impl values.")
_BATCH_SIZES = flags.DEFINE_string("batch_sizes", "", "Comma-separated batch sizes; '' = config's.")
_REMATS = flags.DEFINE_string("remats", "", "Comma-separated model.remat policies; '' = config's.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per trial.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first compiles).")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 0.0, "Sweep time budget; 0 = none.")
_COMPARE = flags.DEFINE_bool("compare_runtime", False, "Runtime (one island) vs plain jit loop.")
_TRIALS = flags.DEFINE_integer("trials", 5, "Interleaved trials per path (--compare_runtime).")
_TOKENS = flags.DEFINE_enum("tokens", "corpus", list(data_lib.BENCH_TOKENS),
                           "The steps' batches: the config's corpus (real token frequencies) or "
                           "uniform random byte ids.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON result to this file.")
flags.mark_flags_as_required(["config"])


def _ints(text: str, field: str) -> list[int]:
  try:
    out = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise app.UsageError(f"{field} must be comma-separated ints, got {text!r}") from None
  if any(b < 1 for b in out):
    raise app.UsageError(f"{field} must be >= 1, got {text!r}")
  return out


def _names(text: str, field: str, allowed) -> list[str]:
  out = [s.strip() for s in text.split(",") if s.strip()]
  for name in out:
    configuration.check_choice(field, name, allowed)
  return out


def is_oom(message: str) -> bool:
  m = message.lower()
  return "resource_exhausted" in m or "out of memory" in m


def mfu_causal(tps: float, cfg, L: int, device) -> float | None:
  peak = model_utils.peak_flops_per_s(device)
  if peak is None:
    return None
  attn = 6 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * L
  return tps * (6 * model_utils.matmul_param_count(cfg) + attn) / peak


def run_plain(step, state, batches, n: int):
  """n steps as train.py runs them (metrics one step behind); returns (state, last metrics)."""
  prev = None
  for i in range(n):
    state, metrics = step(state, batches[i % len(batches)])
    if prev is not None:
      jax.device_get(prev)
    prev = metrics
  return state, jax.device_get(prev)


def bench_trial(config, cfg, B: int, L: int, steps: int, warmup: int,
                tokens: str = "corpus") -> dict:
  optimizer = train_lib.make_optimizer(config.train)
  t0 = time.perf_counter()
  state = jax.block_until_ready(train_lib.init_train_state(cfg, optimizer, config.seed, L))
  init_s = time.perf_counter() - t0
  step = jax.jit(train_lib.make_train_step(cfg, optimizer), donate_argnums=0)
  batches = list(data_lib.benchmark_batches(config.data, 2, batch_size=B, tokens=tokens))
  t0 = time.perf_counter()
  state, _ = run_plain(step, state, batches, 1)
  compile_s = time.perf_counter() - t0
  if warmup > 1:
    state, _ = run_plain(step, state, batches, warmup - 1)
  t0 = time.perf_counter()
  state, metrics = run_plain(step, state, batches, steps)
  dt = time.perf_counter() - t0
  tps = steps * B * L / dt
  device = jax.devices()[0]
  return {"tokens_per_s": tps, "step_time_s": dt / steps, "loss": float(metrics["loss"]),
          "mfu": model_utils.mfu(tps, cfg, L, device),
          "mfu_causal": mfu_causal(tps, cfg, L, device),
          "init_s": init_s, "first_step_s": compile_s}


def sweep(config, model_cfg, impls, remats, batch_sizes, steps, warmup, max_seconds,
          trial=bench_trial, on_trial=None) -> dict:
  """Runs `trial(config, cfg, B, L, steps, warmup) -> dict` over the grid (module docstring).

  on_trial(trials) is called after each trial (main saves the partial JSON with it)."""
  L = config.data.seq_len
  t_start, last_s = time.perf_counter(), 0.0
  trials, skipped, oom_at, failed = [], [], {}, {}
  stopped = False
  for remat in remats:
    for B in sorted(batch_sizes):
      for impl in impls:
        point = {"impl": impl, "remat": remat, "batch_size": B}
        if impl in failed:
          skipped.append(point | {"reason": f"{impl} failed: {failed[impl]}"})
          continue
        if (impl, remat) in oom_at:
          skipped.append(point | {"reason": f"batch {oom_at[impl, remat]} ran out of memory"})
          continue
        elapsed = time.perf_counter() - t_start
        if max_seconds and (stopped or elapsed + last_s > max_seconds):
          stopped = True
          skipped.append(point | {"reason": f"time budget --max_seconds={max_seconds:g}"})
          continue
        cfg = dataclasses.replace(model_cfg, attention_impl=impl, remat=remat)
        t0 = time.perf_counter()
        try:
          result = trial(config, cfg, B, L, steps, warmup)
        except Exception as e:  # report and go on: one impl may not exist here, or not fit
          text = str(e).strip()
          msg = f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__
          result = {"error": msg, "oom": is_oom(text)}
          if result["oom"]:
            oom_at[impl, remat] = B
          else:  # not a matter of size: the other points of this impl would fail the same way
            failed[impl] = msg
        gc.collect()
        last_s = time.perf_counter() - t0
        trials.append(point | result | {"trial_s": last_s})
        if on_trial is not None:
          on_trial(trials)
        print(f"{impl:6s} remat={remat:4s} B={B:3d}: " + (
            f"{result['tokens_per_s']:,.0f} tok/s" if "error" not in result else result["error"]),
            flush=True)
  best = {}
  for tr in trials:
    prev = best.get(tr["impl"], {}).get("tokens_per_s", 0.0)
    if tr.get("tokens_per_s", 0.0) > prev:
      best[tr["impl"]] = tr
  tps = {k: v["tokens_per_s"] for k, v in best.items()}
  return {"trials": trials, "skipped": skipped, "best": best,
          "ratio_cudnn_over_xla": tps["cudnn"] / tps["xla"] if "cudnn" in tps and "xla" in tps
          else None, "sweep_s": time.perf_counter() - t_start}


def compare_runtime(config, cfg, B: int, L: int, steps: int, warmup: int, trials: int,
                    tokens: str = "corpus") -> dict:
  from pathways_lite.islands import make_islands
  from pathways_lite.runtime import Runtime

  optimizer = train_lib.make_optimizer(config.train)
  train_step = train_lib.make_train_step(cfg, optimizer)
  plain_step = jax.jit(train_step, donate_argnums=0)
  # The runtime's step takes the previous step's whole output (state, metrics) as one Future:
  # no selector call per step (a jitted `out[0]` is a full copy of the state). The state is
  # donated; the metrics are not (jit prunes the unused input), so they stay readable.
  rt_step = jax.jit(lambda out, batch: train_step(out[0], batch), donate_argnums=0)
  batches = list(data_lib.benchmark_batches(config.data, 2, batch_size=B, tokens=tokens))
  islands = make_islands(1, devices=jax.devices()[:1])
  isl = islands[0].name
  rt = Runtime(islands, clock="real", trace=True)
  init = train_lib.init_train_state(cfg, optimizer, config.seed, L)
  no_metrics = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                            jax.eval_shape(train_step, init, batches[0])[1])
  held = {"runtime": rt.transfer((init, no_metrics), island=isl, name="init state"),
          "plain": train_lib.init_train_state(cfg, optimizer, config.seed, L)}

  def plain(n):
    held["plain"], metrics = run_plain(plain_step, held["plain"], batches, n)
    return metrics

  def runtime(n):
    out, prev = held["runtime"], None
    for i in range(n):
      out = rt.call(rt_step, out, batches[i % len(batches)], island=isl, name="train step")
      if prev is not None:
        jax.device_get(prev.result()[1])
      prev = out
    held["runtime"] = out
    return jax.device_get(out.result()[1])

  paths = {"plain": plain, "runtime": runtime}
  first = held["runtime"]
  for fn in paths.values():
    fn(warmup)
  # measured, not assumed: the first state's buffers were given to the next step
  donated = all(x.is_deleted() for x in jax.tree.leaves(first.result()[0]))
  tps = {k: [] for k in paths}
  losses = {}
  try:
    for t in range(trials):
      for name in (("plain", "runtime") if t % 2 == 0 else ("runtime", "plain")):
        t0 = time.perf_counter()
        losses[name] = float(paths[name](steps)["loss"])
        tps[name].append(steps * B * L / (time.perf_counter() - t0))
  finally:
    rt.shutdown()
  med = {k: statistics.median(v) for k, v in tps.items()}
  ratios = [r / p for r, p in zip(tps["runtime"], tps["plain"])]
  device = jax.devices()[0]
  return {"impl": cfg.attention_impl, "remat": cfg.remat, "batch_size": B, "steps": steps,
          "trials": trials, "tokens_per_s": tps, "median_tokens_per_s": med,
          "mfu": {k: model_utils.mfu(v, cfg, L, device) for k, v in med.items()},
          "loss": losses, "ratio_runtime_over_plain": med["runtime"] / med["plain"],
          "ratio_per_trial_median": statistics.median(ratios), "runtime_donates_state": donated}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  model_cfg = configuration.validate(config)
  if _STEPS.value < 1 or _WARMUP.value < 1 or _TRIALS.value < 1:
    raise app.UsageError("--steps, --warmup and --trials must be >= 1")
  impls = _names(_IMPLS.value, "--impls", ("xla", "cudnn", "pallas"))
  remats = _names(_REMATS.value, "--remats", ("none", "dots", "full")) or [model_cfg.remat]
  batch_sizes = _ints(_BATCH_SIZES.value, "--batch_sizes") or [config.data.batch_size]
  if not impls:
    raise app.UsageError("--impls is empty")
  device = jax.devices()[0]
  L = config.data.seq_len
  out = {
      "device_kind": device.device_kind, "platform": device.platform,
      "jax_version": jax.__version__, "config": config.name,
      "model": dataclasses.asdict(model_cfg),
      "param_count_matmul": model_utils.matmul_param_count(model_cfg),
      "flops_per_token": model_utils.flops_per_token(model_cfg, L),
      "peak_flops_per_s": model_utils.peak_flops_per_s(device),
      "seq_len": L, "steps": _STEPS.value, "warmup": _WARMUP.value, "tokens": _TOKENS.value,
  }
  if _COMPARE.value:
    cfg = dataclasses.replace(model_cfg, attention_impl=impls[0], remat=remats[0])
    out["compare_runtime"] = compare_runtime(config, cfg, batch_sizes[0], L, _STEPS.value,
                                             _WARMUP.value, _TRIALS.value, _TOKENS.value)
  else:
    out.update(impls=impls, remats=remats, batch_sizes=batch_sizes,
               max_seconds=_MAX_SECONDS.value)

    def save_partial(trials):  # a run killed from outside still leaves what it measured
      write_partial(out | {"trials": trials}, _OUT.value)

    out.update(sweep(config, model_cfg, impls, remats, batch_sizes, _STEPS.value, _WARMUP.value,
                     _MAX_SECONDS.value, on_trial=save_partial,
                     trial=functools.partial(bench_trial, tokens=_TOKENS.value)))
  emit_json(out, _OUT.value)


if __name__ == "__main__":
  app.run(main)
