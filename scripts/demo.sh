#!/usr/bin/env bash
# Set up (or reuse) .venv, then run the demo: build the concept-world model, train an erase LoRA
# and a slider LoRA with `accelerate launch train_leco.py`, evaluate them and write image grids
# into demo_output/. Extra arguments go to tools/demo.py (e.g. --steps 300).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
export HF_HUB_OFFLINE=1
python -m tools.demo "$@"
