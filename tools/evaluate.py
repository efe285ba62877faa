"""Evaluate a LECO LoRA through diffusers: ``python -m tools.evaluate --model DIR --lora FILE``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.evaluation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
