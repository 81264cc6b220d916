#!/usr/bin/env bash
# Install, start the embedded service (Redis, one worker, the API), run the main job, and keep serving.
# Pass --exit to stop after the job. Everything lives under ./.modelpress.
source "$(dirname "$0")/_venv.sh" embedded
exec .venv/bin/modelpress serve --demo "$@"
