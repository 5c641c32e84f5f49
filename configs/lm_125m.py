"""A ~127M-parameter byte-level decoder LM at seq 1024, bf16 compute: the GPU check.

Shape: d_model 768, 12 layers, 12 heads (head_dim 64), SwiGLU d_ff 3584, tied
byte embeddings (vocab 259): 127M matmul parameters.

Commands (one H100 or H200):
  .venv/bin/python launch/bench_train.py --config=configs/lm_125m.py --out=runs/bench_125m.json
      tokens/s and MFU of the train step, attention "xla" vs "cudnn"; ~2 minutes
      with compiles.
  .venv/bin/python launch/train.py --config=configs/lm_125m.py --workdir=runs/lm_125m
      5000 steps of 16 x 1024 tokens (~8 epochs of the 10.6M-token stdlib corpus).
      Run time and final loss: not measured yet (expect minutes, not hours, on
      one H100; watch val/loss in loss_vs_step.png for overfitting).
Not for CPU (use configs/tiny.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # loaded by path
from configs import base  # noqa: E402


def get_config():
  c = base.get_config()
  c.name = "lm_125m"
  c.model.update(d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, d_ff=3584,
                 max_seq_len=1024, compute_dtype="bfloat16", attention_impl="cudnn")
  c.data.update(seq_len=1024, batch_size=16)
  c.train.update(steps=5000, lr=1e-3, warmup_steps=200, eval_every=500, eval_batches=16,
                 log_every=50)
  return c
