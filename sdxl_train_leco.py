#!/usr/bin/env python
"""Train a LECO LoRA (erase / enhance / slider) on a Stable Diffusion XL U-Net, without images.

    accelerate launch sdxl_train_leco.py --pretrained_model_name_or_path model.safetensors \
        --prompts_file prompts.toml --output_dir output --output_name my_leco

See docs/train_leco.md for every flag and the prompt TOML format.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from library.cli import setup_parser as _setup_parser
from library.entry import main as _main


def setup_parser():
    """The argument parser (shared with train_leco.py)."""
    return _setup_parser("sdxl")


def main(argv: Sequence[str] | None = None) -> int:
    """Run training; returns the exit code (callable from Python or a notebook)."""
    return _main(argv, "sdxl")


if __name__ == "__main__":
    sys.exit(main())
