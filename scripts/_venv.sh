# Sourced by the other scripts: make (or reuse) .venv and install the project with the given extras.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ] && ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "modelpress needs Python 3.11 (torch 2.13.0's CPU wheel is pinned for it): $PY is" \
       "$("$PY" -V 2>&1); install python3.11 or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned to the CPU build (see pyproject.toml); -e so the tests import the checkout.
.venv/bin/python -m pip install --quiet -e ".[$1]"
