"""A tiny run config for the outer-loop tests (the real default config, shrunk)."""
import pytest


def tiny_config(algorithm="diloco", steps=4, **outer):
  from configs import base
  c = base.get_config()
  c.name = f"test_{algorithm}"
  c.model.update(d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, max_seq_len=16)
  c.data.update(seq_len=16, batch_size=2)
  c.train.update(steps=steps, warmup_steps=1, eval_every=0, eval_batches=1, log_every=1,
                 grad_clip=0.0)
  c.outer.algorithm = algorithm
  c.outer.num_workers = outer.pop("num_workers", 2)
  for k, v in outer.items():
    c.outer[k] = v
  return c


@pytest.fixture
def make_config():
  return tiny_config
