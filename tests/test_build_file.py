"""BUILD must name every module, launcher and test in the tree."""
import re

from tests import build_targets


def test_build_file_lists_every_module_and_test():
  build = (build_targets.ROOT / "BUILD").read_text()
  listed = set(re.findall(r'"([\w/]+\.py)"', build))
  expected = set(re.findall(r'"([\w/]+\.py)"', build_targets.render()))
  missing = sorted(expected - listed)
  stale = sorted(listed - expected)
  assert not missing and not stale, (
      f"BUILD is out of date: missing {missing}, stale {stale}; "
      "run `python tests/build_targets.py --write`")


def test_build_file_is_current():
  build = (build_targets.ROOT / "BUILD").read_text()
  assert build == build_targets.render(), "run `python tests/build_targets.py --write`"
