"""Train one config with several attention implementations and compare the loss curves.

  # one H100: 200 steps of the 125M LM with cuDNN (reference), Pallas, and XLA as the
  # yardstick of bf16 noise; ~3 minutes with compiles
  python launch/compare_training.py --config=configs/lm_125m.py --impls=cudnn,pallas,xla \
      --noise=xla --steps=200 --workdir=runs/compare_attention --out=runs/compare_attention.json
  # CPU smoke run (the Pallas kernel in the TPU interpreter)
  python launch/compare_training.py --config=configs/tiny.py --impls=xla,pallas --steps=10 \
      --workdir=/tmp/cmp

Every run starts from the same seed and reads the same batches; the JSON gives
each implementation's largest / mean per-step loss difference from the first,
and `within_noise` when --noise names the yardstick implementation. The PNG
(workdir/loss_compare.png) shows the curves and their differences.
"""
from absl import app, flags
from ml_collections import config_flags

from pathways_lite import curves
from pathways_lite.metrics import emit_json

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config().", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "One sub-directory per implementation.")
_IMPLS = flags.DEFINE_list("impls", ["cudnn", "pallas", "xla"], "attention_impl values; the "
                           "first is the reference.")
_NOISE = flags.DEFINE_string("noise", None, "The implementation whose difference from the "
                             "reference is the noise yardstick (optional).")
_STEPS = flags.DEFINE_integer("steps", 200, "Train steps per implementation.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON result to this file.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if len(set(_IMPLS.value)) != len(_IMPLS.value):
    raise app.UsageError(f"--impls has duplicates: {_IMPLS.value}")
  common = {"train.steps": _STEPS.value, "train.log_every": 1, "train.eval_every": 0,
            "checkpoint.enabled": False}
  variants = {impl: common | {"model.attention_impl": impl} for impl in _IMPLS.value}
  result = curves.compare(_CONFIG.value, variants, _WORKDIR.value, noise=_NOISE.value)
  emit_json(result, _OUT.value)


if __name__ == "__main__":
  app.run(main)
