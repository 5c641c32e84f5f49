"""A small real-text corpus for tests: a few standard-library packages copied to a tmp dir.

Layout root/<package>/*.py plus some top-level modules, so the glob
"root/**/*.py" gives one group per package or module (the non-iid unit).
"""
import os
import shutil
import sysconfig

PACKAGES = ("json", "collections", "importlib", "logging")
MODULES = ("textwrap.py", "shlex.py", "colorsys.py", "bisect.py")


def make_small_corpus(root) -> str:
  """Copies the files under root; returns the glob for data.sources."""
  stdlib = sysconfig.get_paths()["stdlib"]
  root = str(root)
  for pkg in PACKAGES:
    os.makedirs(os.path.join(root, pkg), exist_ok=True)
    for f in sorted(os.listdir(os.path.join(stdlib, pkg))):
      if f.endswith(".py"):
        shutil.copyfile(os.path.join(stdlib, pkg, f), os.path.join(root, pkg, f))
  for m in MODULES:
    shutil.copyfile(os.path.join(stdlib, m), os.path.join(root, m))
  return os.path.join(root, "**", "*.py")
