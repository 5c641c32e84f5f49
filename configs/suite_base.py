"""The shared base of the reproduction suites (configs/suite_*.py); not a run by itself.

Scales:
  cpu: a 123K-parameter decoder (d_model 64, 2 layers, 4 heads, 64 tokens x 8
       rows per batch) on the stdlib corpus, 600 inner steps per worker, 4 workers
       as virtual islands of one device; one DiLoCo run takes ~20 s on 2 CPU cores.
  gpu: a 3.3M-parameter decoder (d_model 256, 4 layers, 256 tokens x 32 rows),
       2000 inner steps per worker, workers spread over the GPUs
       (outer.islands="devices": 4 workers on 2 GPUs = 2 islands per GPU).
Both use the virtual clock (1 simulated second per inner step unless a suite
says otherwise), so simulated wall-clock and bytes do not depend on the machine.
"""
import importlib.util
import os

SCALES = ("cpu", "gpu")


def load(name):
  """configs/<name>.py as a module, whether or not the repo root is on sys.path."""
  try:
    return importlib.import_module(f"configs.{name}")
  except ImportError:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(scale: str = "cpu"):
  if scale not in SCALES:
    raise ValueError(f"suite scale={scale!r} is not allowed; allowed values: {list(SCALES)}")
  c = load("base").get_config()
  c.name = "suite"
  c.checkpoint.enabled = False
  if scale == "cpu":
    c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, max_seq_len=64)
    c.data.update(seq_len=64, batch_size=8)
    c.train.update(steps=600, warmup_steps=30, lr=1e-3, eval_every=100, eval_batches=8,
                   log_every=30)
    c.outer.update(num_workers=4, inner_steps=30, islands="virtual")
  else:
    c.model.update(d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, max_seq_len=256)
    c.data.update(seq_len=256, batch_size=32)
    c.train.update(steps=2000, warmup_steps=100, lr=1e-3, eval_every=250, eval_batches=16,
                   log_every=50)
    c.outer.update(num_workers=4, inner_steps=50, islands="devices")
  c.outer.update(algorithm="diloco", optimizer="nesterov", lr=0.7, momentum=0.9,
                 weighting="shard_size", clock="virtual")
  return c
