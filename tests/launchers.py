"""Load a launch/*.py script as a module in a test process.

Launchers define absl flags at import (`--config`, `--out`, ...). Two launchers
loaded into one pytest process would define `config` twice, so `load` removes
the flags a launcher registered once its module has run: the tests call the
launcher's functions, never its `main`.
"""
import importlib.util
import os

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(rel_path, name=None):
  """Runs REPO/rel_path as a fresh module named `name` and returns it."""
  name = name or os.path.splitext(os.path.basename(rel_path))[0] + "_under_test"
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, rel_path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for flag_name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, flag_name)
  return module
