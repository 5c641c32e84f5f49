"""Shrinks the real configs/tiny.py for tests: a minute model on a small stdlib corpus."""
import os

from pathways_lite import configuration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.py")

# Overrides applied to configs/tiny.py (also given to launch/train.py as flags).
SMALL = {
    "model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 2,
    "model.max_seq_len": 64, "data.seq_len": 32, "data.batch_size": 8,
    "data.val_fraction": 0.1, "train.steps": 40, "train.warmup_steps": 5, "train.lr": 1e-2,
    "train.eval_every": 20, "train.eval_batches": 4, "train.log_every": 5,
}


def small_config(source: str, cache_dir: str, **overrides):
  c = configuration.load_config_file(TINY)
  for key, value in {**SMALL, "data.sources": (source,), "data.cache_dir": cache_dir,
                     **overrides}.items():
    section, _, field = key.rpartition(".")
    target = c
    for part in filter(None, section.split(".")):
      target = target[part]
    target[field] = value
  return c
