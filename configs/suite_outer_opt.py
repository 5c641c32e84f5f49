"""Suite 1, outer optimizers: DiLoCo Table 2 / Figure 6 (Douillard et al. 2023, arXiv 2311.08105).

Four DiLoCo outer optimizers with 4 workers, H=30, inner AdamW, against one
worker with the same per-worker steps and DDP with a 4x batch (4 workers
all-reducing gradients every step): Nesterov (lr 0.7, momentum 0.9), SGD with
heavy-ball momentum (lr 0.7, momentum 0.9), FedAvg (outer SGD lr 1, i.e.
local_sgd) and Adam (lr 1e-2, eps 1e-8; our choice at this scale).

Command:
  python launch/reproduce.py --suite=outer_opt --workdir=runs/suite_outer_opt [--scale=gpu]
Expected time: CPU (2 shared cores) 3-6 min for the 6 runs (253 s measured at load 5-6).
Expected ordering (paper): DDP 4x batch <= Nesterov < SGDM, FedAvg < Adam < 1 worker.
Observed on CPU (final val loss): DDP 4x batch 1.884 < Nesterov 2.032 < 1 worker 2.105
< FedAvg 2.113 < SGDM 2.245 < Adam 2.476: Nesterov is the best outer optimizer and
the only one beating the single worker at this scale (600 steps, 123K params).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # loaded by path
from configs import suite_base  # noqa: E402


EXPECTED = ("DDP 4x batch <= Nesterov < SGD-momentum, FedAvg < Adam < 1 worker "
            "(Nesterov is the best outer optimizer; every DiLoCo beats the single worker)")


def get_config(scale="cpu"):
  c = suite_base.get_config(scale)
  c.name = "suite_outer_opt"
  return c


def get_runs(scale="cpu"):
  return [
      ("nesterov", {"outer.optimizer": "nesterov", "outer.lr": 0.7, "outer.momentum": 0.9}),
      ("sgdm", {"outer.optimizer": "sgdm", "outer.lr": 0.7, "outer.momentum": 0.9}),
      ("fedavg", {"outer.algorithm": "local_sgd"}),
      ("adam", {"outer.optimizer": "adam", "outer.lr": 1e-2, "outer.eps": 1e-8}),
      ("1_worker", {"outer.algorithm": "ddp", "outer.num_workers": 1}),
      ("ddp_4x_batch", {"outer.algorithm": "ddp"}),
  ]
