#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs pathways_lite (editable) with its test extras.
# Idempotent: a second run with an unchanged pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

find_python() {
  local c
  for c in "${PYTHON:-}" python3.13 python3.12 python3; do
    [[ -n "$c" ]] && command -v "$c" >/dev/null 2>&1 || continue
    if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  # pyenv keeps interpreters that are not on PATH.
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
    [[ -x "$c" ]] && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null \
      && { echo "$c"; return 0; }
  done
  return 1
}

stamp=".venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)"
if [[ -f "$stamp" ]]; then exit 0; fi

if [[ ! -x .venv/bin/python ]]; then
  py="$(find_python)" || { echo "setup.sh: no Python >= 3.12 found (looked on PATH and in pyenv); set PYTHON=/path/to/python3.12" >&2; exit 1; }
  echo "setup.sh: creating .venv with $py ($("$py" --version))"
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
rm -f .venv/.installed-*
touch "$stamp"
echo "setup.sh: .venv ready ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
