"""Merge LoRAs into an SDXL checkpoint, or combine SDXL LoRAs into one LoRA (sd-scripts' flags).

    python networks/sdxl_merge_lora.py --sd_model sd_xl_base_1.0.safetensors --save_to merged.safetensors \\
        --models erase.safetensors --ratios 1.0

Same flags and meaning as ``networks/merge_lora.py`` (without ``--v2``). LoRA U-Net names may use
the SGM block names (``lora_unet_input_blocks_4_1_...``, what this trainer and sd-scripts write) or
diffusers paths (``lora_unet_down_blocks_1_...``); combined LoRAs are written with SGM names.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from networks import merge_lora  # noqa: E402


def setup_parser():
    return merge_lora.setup_parser("sdxl")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns the exit code (0, or 2 for bad input: one line, nothing written)."""
    return merge_lora.main(argv, family="sdxl")


if __name__ == "__main__":
    sys.exit(main())
