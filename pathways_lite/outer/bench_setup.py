"""What the outer-loop benchmarks share (launch/bench_diloco.py, launch/bench_inner_step.py)."""
from __future__ import annotations

import copy


def diloco_config(config, M: int, H: int, n_outer: int, inner_loop: str = "auto"):
  """config with a DiLoCo outer loop of M one-device islands for n_outer outer steps of H.

  The real clock, no simulated link delays, no checkpoints, evaluation only at the start and
  the end, the local runtime."""
  c = copy.deepcopy(config)
  c.outer.update(algorithm="diloco", num_workers=M, inner_steps=H, clock="real",
                 inner_loop=inner_loop,
                 islands="devices", outer_island=0, step_time_s=(), worker_schedule=(),
                 drop_prob=0.0, link_bandwidth_gbps=0.0, link_latency_s=0.0)
  steps = n_outer * H
  c.train.update(steps=steps, warmup_steps=min(c.train.warmup_steps, steps // 2),
                 eval_every=0, eval_batches=1)
  c.checkpoint.enabled = False
  c.runtime.backend = "local"
  return c


def phase_intervals(trace, island: str) -> dict[int, tuple[float, float]]:
  """Outer step -> (start, end) of `island`'s phase: its calls named "phase <t>..." (the scan
  call, or restart + H steps + delta); the phase's batch transfer is not counted."""
  return trace.intervals(island, lambda s: int(s.name.split()[1])
                         if s.name.startswith("phase ") else None)
