"""A ~1.3B-class byte-level decoder LM at seq 2048, bf16 compute: the largest one-GPU benchmark.

Shape (GPT-3 XL's): d_model 2048, 24 layers, 16 heads of 128, SwiGLU d_ff
5632, tied byte embeddings (vocab 259): 1.23B matmul parameters. FLOPs per
token at seq 2048: 8.6 G (models/utils.flops_per_token; attention 14%).
Memory: f32 params + AdamW state are 14.8 GB before activations, so batch 8
needs remat or most of an 80 GB H100 (run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.92).

Commands (one H100; PYTHONPATH=. from the repository root):
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python launch/bench_train.py --config=configs/lm_1b.py \\
      --impls=cudnn,xla --batch_sizes=4,8,16 --remats=none,dots,full --max_seconds=270 \\
      --out=runs/bench_1b.json
      tokens/s and MFU per attention impl at its best batch size and remat
      policy, out-of-memory points reported and skipped; under 5 minutes
      (about 40 s of compile per trial; the budget cuts the rest).
      Measured (one H100, 2026-11-22, launch/results/bench_train_1b_h100.json):
      cudnn, batch 8, remat none: 64.6k tokens/s, MFU 0.562 (0.523 counting
      causal attention at half); remat dots at batch 8 was 61.3k (0.533) in an
      earlier probe. Each trial costs ~100 s (25 s compile + init), so the
      whole sweep needs more than one 10-minute call.
  python launch/train.py --config=configs/lm_1b.py --workdir=runs/lm_1b
      1000 steps of 8 x 2048 tokens (1.5 epochs of the stdlib corpus); expected
      ~5 minutes on one H100; loss not measured yet.
Not for CPU (use configs/tiny.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # loaded by path
from configs import base  # noqa: E402


def get_config():
  c = base.get_config()
  c.name = "lm_1b"
  c.model.update(d_model=2048, num_layers=24, num_heads=16, num_kv_heads=16, d_ff=5632,
                 max_seq_len=2048, compute_dtype="bfloat16", attention_impl="cudnn",
                 remat="dots")
  c.data.update(seq_len=2048, batch_size=8)
  c.train.update(steps=1000, lr=3e-4, warmup_steps=100, eval_every=250, eval_batches=8,
                 log_every=50)
  return c
