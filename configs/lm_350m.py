"""A ~350M-class byte-level decoder LM at seq 2048, bf16 compute: the one-GPU benchmark model.

Shape (GPT-3 Medium's): d_model 1024, 24 layers, 16 heads of 64, SwiGLU d_ff
2816, tied byte embeddings (vocab 259): 308M matmul parameters (GPT-3's "350M"
counts a 50k-token embedding this byte model does not have). FLOPs per token
at seq 2048: 2.45 G (models/utils.flops_per_token; attention 25% of it).

Commands (one H100; PYTHONPATH=. from the repository root):
  python launch/bench_train.py --config=configs/lm_350m.py --impls=xla,cudnn \\
      --batch_sizes=8,16,32 --remats=none,dots --max_seconds=270 --out=runs/bench_350m.json
      tokens/s and MFU per attention impl at its best batch size and remat
      policy; under 5 minutes (about 30 s of compile per trial).
      Measured (one H100, 2026-11-22): cudnn batch 16, remat none: 191k
      tokens/s, MFU 0.475 (launch/results/runtime_vs_plain_350m_h100.json,
      the plain loop); xla not measured yet.
  python launch/bench_train.py --config=configs/lm_350m.py --impls=cudnn --compare_runtime \\
      --steps=20 --trials=5 --out=runs/runtime_vs_plain_350m.json
      the same training step through pathways_lite's runtime on one island vs a
      plain jitted loop, interleaved; ~3.5 minutes. Measured (one H100,
      --steps=10 --trials=4): 190.4k vs 191.2k tokens/s, ratio 0.996.
  python launch/train.py --config=configs/lm_350m.py --workdir=runs/lm_350m
      2000 steps of 16 x 2048 tokens (~6 epochs of the 10.6M-token stdlib
      corpus); expected ~6 minutes on one H100 at the rate above; loss not
      measured yet (watch val/loss in loss_vs_step.png for overfitting).
Not for CPU (use configs/tiny.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # loaded by path
from configs import base  # noqa: E402


def get_config():
  c = base.get_config()
  c.name = "lm_350m"
  c.model.update(d_model=1024, num_layers=24, num_heads=16, num_kv_heads=16, d_ff=2816,
                 max_seq_len=2048, compute_dtype="bfloat16", attention_impl="cudnn")
  c.data.update(seq_len=2048, batch_size=16)
  c.train.update(steps=2000, lr=6e-4, warmup_steps=200, eval_every=500, eval_batches=8,
                 log_every=50)
  return c
