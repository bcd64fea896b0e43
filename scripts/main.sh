#!/usr/bin/env bash
# The README's main command: set up the environment, then run the main job (see scripts/main_job.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
exec bash scripts/main_job.sh "$@"
