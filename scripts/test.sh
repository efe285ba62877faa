#!/usr/bin/env bash
# Set up (or reuse) .venv and run the whole test suite, slow tests included.
#   bash scripts/test.sh                 # everything, in 2 pytest-xdist workers (LECO_TEST_WORKERS=N to change)
#   bash scripts/test.sh -m "not slow"   # extra pytest arguments pass through (-n 0: one process)
# The concept-world model is built once: a worker that needs it while another builds it waits on
# the build's file lock, then reuses the cached folder.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
export HF_HUB_OFFLINE=1
python -m pytest -q -n "${LECO_TEST_WORKERS:-2}" "$@"
