#!/usr/bin/env bash
# Install with the dev extras, then lint, type-check and run the whole test suite.
# Extra arguments go to pytest (e.g. -m "not slow").
source "$(dirname "$0")/_venv.sh" dev,embedded,kernels,bench
# The compose-file test needs a compose CLI; Debian's docker-compose validates without an engine.
if ! { docker compose version || command -v docker-compose; } >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null \
      || echo "warning: could not install docker-compose; the compose test will be skipped"
  fi
fi
# The dashboard tests drive a real headless Chromium: Debian's, never a downloaded one.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
      || echo "warning: could not install chromium; the browser tests will be skipped"
  fi
fi
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
