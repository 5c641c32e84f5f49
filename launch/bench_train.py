"""Train-step throughput of a config's model: tokens/s and MFU per attention implementation.

  python launch/bench_train.py --config=configs/lm_125m.py --impls=xla,cudnn --out=bench.json
  python launch/bench_train.py --config=configs/tiny.py --impls=xla --steps=3   # CPU smoke

Times `--steps` jitted train steps (random tokens, config's batch and seq_len)
after `--warmup` steps, for each implementation, and prints one JSON object.
An implementation that fails (e.g. cudnn on CPU) is reported with its error.
"""
import dataclasses
import time

from absl import app, flags
from ml_collections import config_flags

import jax
import numpy as np

from models import utils as model_utils
from pathways_lite import configuration
from pathways_lite import train as train_lib
from pathways_lite.metrics import emit_json

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config().", lock_config=True)
_IMPLS = flags.DEFINE_string("impls", "xla,cudnn", "Comma-separated attention_impl values.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per implementation.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first compiles).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON result to this file.")
flags.mark_flags_as_required(["config"])


def bench_impl(config, model_cfg, impl: str, steps: int, warmup: int) -> dict:
  cfg = dataclasses.replace(model_cfg, attention_impl=impl)
  B, L = config.data.batch_size, config.data.seq_len
  optimizer = train_lib.make_optimizer(config.train)
  state = train_lib.init_train_state(cfg, optimizer, config.seed, L)
  step = jax.jit(train_lib.make_train_step(cfg, optimizer), donate_argnums=0)
  batch = jax.device_put(np.random.default_rng(0).integers(0, 256, (B, L + 1), np.int32))
  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  loss = float(jax.block_until_ready(metrics)["loss"])
  dt = time.perf_counter() - t0
  tps = steps * B * L / dt
  return {"tokens_per_s": tps, "step_time_s": dt / steps, "loss": loss,
          "mfu": model_utils.mfu(tps, cfg, L, jax.devices()[0])}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  model_cfg = configuration.validate(config)
  if _STEPS.value < 1 or _WARMUP.value < 1:
    raise app.UsageError("--steps and --warmup must be >= 1")
  impls = [s.strip() for s in _IMPLS.value.split(",") if s.strip()]
  for impl in impls:
    configuration.check_choice("--impls", impl, ("xla", "cudnn", "pallas"))
  device = jax.devices()[0]
  results = {}
  for impl in impls:
    try:
      results[impl] = bench_impl(config, model_cfg, impl, _STEPS.value, _WARMUP.value)
    except Exception as e:  # report and go on: one impl may not exist on this device
      results[impl] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
  tps = {k: v.get("tokens_per_s") for k, v in results.items()}
  out = {
      "device_kind": device.device_kind, "platform": device.platform,
      "jax_version": jax.__version__, "config": config.name,
      "model": dataclasses.asdict(model_cfg) | {"attention_impl": impls},
      "param_count_matmul": model_utils.matmul_param_count(model_cfg),
      "batch_size": config.data.batch_size, "seq_len": config.data.seq_len,
      "steps": _STEPS.value, "warmup": _WARMUP.value, "results": results,
      "ratio_cudnn_over_xla": (tps["cudnn"] / tps["xla"]
                               if tps.get("cudnn") and tps.get("xla") else None),
  }
  emit_json(out, _OUT.value)


if __name__ == "__main__":
  app.run(main)
