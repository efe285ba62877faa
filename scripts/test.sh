#!/usr/bin/env bash
# Set up (or reuse) .venv and run the whole test suite, slow tests included.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -m "not slow"   # extra pytest arguments pass through
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
export HF_HUB_OFFLINE=1
python -m pytest -q "$@"
