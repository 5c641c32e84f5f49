"""Suite 4, overlapping the outer step: Table 2 of Kale et al. 2025 (eager updates, arXiv 2502.12996).

DiLoCo (4 workers, Nesterov 0.7/0.9) over slow links (CPU scale: 0.25 Mbit/s,
100 ms; a full pseudo-gradient then takes ~16 simulated s each way against
30 s of compute at H=30), at H=30 and H=100: no overlap (synchronous
DiLoCo), naive delayed outer gradients (d=1), eager updates with the others'
gradients one (eager-1) and two (eager-2) outer steps late.

Command:
  python launch/reproduce.py --suite=overlap --workdir=runs/suite_overlap [--scale=gpu]
Expected time: CPU (2 shared cores) 5-10 min for the 8 runs (251 s measured at load 6).
Expected ordering (paper): by steps, no overlap <= eager-1 < eager-2 < naive
delayed; by simulated wall-clock the overlapped runs finish first (no idle
time waiting for the exchange).
Observed on CPU (final val loss / simulated s): H=30: DiLoCo 2.032 / 1236 s, eager-1
3.117 / 706 s, naive delayed 6.35 and eager-2 7.24 (both unstable) / 695-706 s;
H=100: DiLoCo 2.100 / 791 s, eager-1 3.238, eager-2 4.248, delayed 4.461 / 695 s.
Ordering eager-1 < eager-2, delayed and overlap saving 43% (H=30) of simulated time
hold; eager-1 stays well behind DiLoCo with the stale outer momentum of lr 0.7 (at
outer lr 0.4: DiLoCo 2.109, eager-1 2.610, delayed 3.036).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # loaded by path
from configs import suite_base  # noqa: E402


EXPECTED = ("final loss: no overlap <= eager-1 < eager-2 < delayed (per H); simulated time: "
            "overlapped runs < no overlap")


def get_config(scale="cpu"):
  c = suite_base.get_config(scale)
  c.name = "suite_overlap"
  c.outer.update(link_bandwidth_gbps=0.00025 if scale == "cpu" else 0.005, link_latency_s=0.1)
  return c


def get_runs(scale="cpu"):
  runs = []
  for h in ((30, 100) if scale == "cpu" else (50, 200)):
    runs += [
        (f"diloco_h{h}", {"outer.inner_steps": h, "outer.algorithm": "diloco"}),
        (f"delayed_h{h}", {"outer.inner_steps": h, "outer.algorithm": "eager",
                           "outer.eager_mode": "delayed", "outer.overlap_outer_steps": 1}),
        (f"eager1_h{h}", {"outer.inner_steps": h, "outer.algorithm": "eager",
                          "outer.eager_mode": "eager", "outer.overlap_outer_steps": 1}),
        (f"eager2_h{h}", {"outer.inner_steps": h, "outer.algorithm": "eager",
                          "outer.eager_mode": "eager", "outer.overlap_outer_steps": 2}),
    ]
  return runs
