"""Runs one paper-reproduction suite (configs/suite_<name>.py) and writes its report.

  python launch/reproduce.py --suite=outer_opt --workdir=runs/suite_outer_opt
  python launch/reproduce.py --suite=async --scale=gpu --workdir=runs/suite_async_gpu
  python launch/reproduce.py --suite=overlap --only=diloco_h30,eager1_h30 --workdir=...

Suites: outer_opt, h_sweep, async, overlap, streaming, elastic. Writes
<workdir>/README.md (Markdown table, expected vs observed ordering, device,
times), results.json, loss_vs_step.png, loss_vs_tokens.png, loss_vs_time.png
(simulated wall-clock), bytes.png, and one directory per run.
"""
import logging

from absl import app, flags

from pathways_lite.outer.suite import run_suite

_SUITE = flags.DEFINE_string("suite", None, "Suite name: configs/suite_<name>.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the suite's outputs.")
_SCALE = flags.DEFINE_enum("scale", "cpu", ["cpu", "gpu"], "Model and run size.")
_ONLY = flags.DEFINE_list("only", None, "Run only these runs of the suite (labels).")
flags.mark_flags_as_required(["suite", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("pathways_lite").setLevel(logging.INFO)
  print(run_suite(_SUITE.value, _WORKDIR.value, scale=_SCALE.value, only=_ONLY.value))


if __name__ == "__main__":
  app.run(main)
