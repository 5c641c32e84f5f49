"""Suite 6, elastic compute: DiLoCo Figure 7 (Douillard et al. 2023, arXiv 2311.08105).

Up to 8 workers; the number of active workers changes over 4 equal slices of
training, at matched total compute (20 worker-slices each): ramp up 2,4,6,8;
ramp down 8,6,4,2; constant 5,5,5,5. New workers start from the global params.

Command:
  python launch/reproduce.py --suite=elastic --workdir=runs/suite_elastic [--scale=gpu]
Expected time: CPU (2 shared cores) 3-6 min for the 3 runs (156 s measured at load 5-6).
Expected ordering (paper): all three end close to each other (what matters is
the total compute); ramping up is slightly better than ramping down.
Observed on CPU (final val loss, 1.54M tokens each): ramp up 1.956 < ramp down 2.042
< constant 2.063.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # loaded by path
from configs import suite_base  # noqa: E402


EXPECTED = "ramp up ~ constant ~ ramp down (total compute decides), ramp up slightly ahead"


def get_config(scale="cpu"):
  c = suite_base.get_config(scale)
  c.name = "suite_elastic"
  c.outer.update(num_workers=8)
  return c


def get_runs(scale="cpu"):
  return [
      ("ramp_up", {"outer.worker_schedule": (2, 4, 6, 8)}),
      ("ramp_down", {"outer.worker_schedule": (8, 6, 4, 2)}),
      ("constant", {"outer.worker_schedule": (5, 5, 5, 5)}),
  ]
