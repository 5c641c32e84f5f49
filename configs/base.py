"""The full default config schema: every field a run may set, with its default.

Every other config file starts from `get_config()` here and changes values;
`pathways_lite.configuration.validate` rejects any field not defined here.
Not meant to be run directly (it trains the default tiny model for 1000 steps).

Sections: seed, name, model (models.config.ModelConfig fields), data, train,
outer (the outer loop; "single" = one island, plain AdamW), runtime (local |
ray | pathways islands; pathways_lite/ray_backends.py) and checkpoint.
"""
import ml_collections

from models.config import ModelConfig
from pathways_lite.outer.config import OuterConfig


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.seed = 0

  c.model = ml_collections.ConfigDict(ModelConfig().to_dict())

  c.data = ml_collections.ConfigDict()
  c.data.sources = ()        # file globs; () = the Python standard library's .py files
  c.data.seq_len = 128       # tokens per training row (rows hold seq_len + 1)
  c.data.batch_size = 8
  c.data.val_fraction = 0.02  # share of documents held out for validation
  c.data.split = "iid"       # how documents are shared among workers: iid | non_iid
  c.data.cache_dir = ""      # "" = ~/.cache/pathways_lite

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.lr = 3e-3
  c.train.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0    # global-norm clip; 0 = off
  c.train.eval_every = 200   # steps between evaluations (and one at the end); 0 = end only
  c.train.eval_batches = 8
  c.train.log_every = 10

  c.outer = ml_collections.ConfigDict(OuterConfig().to_dict())  # fields: pathways_lite/outer/config.py

  # where the islands live: pathways_lite/ray_backends.py (fields), ray_islands.RUNTIME_DEFAULTS
  c.runtime = ml_collections.ConfigDict()
  c.runtime.backend = "local"        # local | ray | pathways
  c.runtime.ray_address = ""         # "" starts a local Ray instance; "HOST:PORT" joins a cluster
  c.runtime.island_num_cpus = 1.0    # Ray CPUs per island actor
  c.runtime.island_num_gpus = 0.0    # GPUs per island actor (0: CPU islands)
  c.runtime.server_num_gpus = -1.0   # GPUs of the outer loops' server island; -1: as the others
  c.runtime.island_devices = 1       # JAX devices per island
  c.runtime.start_timeout_s = 120.0  # islands not started by then: IslandStartError
  c.runtime.replace_lost = True      # a lost island is replaced and rejoins at the next outer step
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.enabled = True       # False: no checkpoints, no resume
  c.checkpoint.every_steps = 0      # save when step % every_steps == 0; 0 = not by steps
  c.checkpoint.every_secs = 600.0   # save when this many seconds passed; 0 = not by time
  c.checkpoint.keep = 3             # keep the latest `keep` checkpoints ...
  c.checkpoint.keep_every = 0       # ... plus every multiple of keep_every (0 = none)
  c.checkpoint.async_save = True    # write on a background thread
  c.checkpoint.compress = False     # zstd: ~8% smaller, 2-3x slower writes
  c.checkpoint.if_busy = "skip"     # a due save while the last one still writes: skip | wait
  c.checkpoint.allow_config_change = False  # resume a workdir saved with another config
  return c
