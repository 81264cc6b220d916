#!/usr/bin/env bash
# Install with the dev extras, then lint, type-check and run the whole test suite.
# Extra arguments go to pytest (e.g. -m "not slow").
source "$(dirname "$0")/_venv.sh" dev,embedded,kernels
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
