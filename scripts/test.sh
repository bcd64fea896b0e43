#!/usr/bin/env bash
# The README's test command: set up the environment, then run the whole test suite.
# Extra arguments go to pytest (e.g. `-m "not slow"` for the fast subset).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
