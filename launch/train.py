"""Trains a model from a config file: the single entry point of a run.

  python launch/train.py --config=configs/tiny.py --workdir=runs/tiny \
      --config.train.steps=100 --config.model.num_layers=4

Writes config.json, metrics.jsonl, tensorboard/, loss_vs_step.png,
loss_vs_time.png and summary.txt into --workdir.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from pathways_lite.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config().", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the run's outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(f"final val loss {summary['final_val_loss']:.4f} "
        f"(perplexity {summary['final_val_perplexity']:.2f}); outputs in {summary['workdir']}")


if __name__ == "__main__":
  app.run(main)
