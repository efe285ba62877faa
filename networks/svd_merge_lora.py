"""Combine LoRAs and compress the result to a fixed rank by SVD (sd-scripts' ``svd_merge_lora.py`` flags).

    python networks/svd_merge_lora.py --save_to combined_r8.safetensors \\
        --models erase_a.safetensors erase_b.safetensors --ratios 1 1 --new_rank 8

Every module becomes the best rank-``--new_rank`` approximation (Eckart-Young) of
``sum_i ratio_i * delta_i``; at a rank no lower than the inputs' summed rank the result is exact.
The log lists each module's kept energy ``sum(S[:R]^2)/sum(S^2)`` and relative error.
Unlike sd-scripts, no values are clamped (its 99th-percentile clamp changes even a full-rank result).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from library.errors import UserError  # noqa: E402
from networks import merge_cli  # noqa: E402

SCRIPT = "networks/svd_merge_lora.py"


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python {SCRIPT}", description=__doc__.splitlines()[0])
    merge_cli.add_precision_arguments(parser, "default: the --precision dtype")
    merge_cli.add_lora_arguments(parser)
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the output's Linear / 1x1-conv modules (default 4)")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank of its 3x3-conv (LoCon) modules (default --new_rank)")
    parser.add_argument("--device", default=None, help="device for the SVD, e.g. cuda (default cpu)")
    return parser


def check_ranks(new_rank: int, new_conv_rank: int | None) -> None:
    if new_rank < 1:
        raise UserError(f"--new_rank {new_rank}: must be at least 1")
    if new_conv_rank is not None and new_conv_rank < 1:
        raise UserError(f"--new_conv_rank {new_conv_rank}: must be at least 1")


def check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        raise UserError(f"--device {device}: not usable here ({str(error).splitlines()[0]})") from None


def merge(args: argparse.Namespace) -> None:
    from networks.lora_combine import log_compression, svd_compress

    save_to = merge_cli.check_lora_output(args.save_to)
    check_ranks(args.new_rank, args.new_conv_rank)
    check_device(args.device)
    merge_dtype = merge_cli.dtype_of(args.precision)
    loras, ratios = merge_cli.read_loras(args.models, args.ratios, merge_dtype)
    if merge_cli.check_same_family(loras) == "sdxl":
        merge_cli.canonical_sdxl_names(loras)
    state, report = svd_compress(loras, ratios, args.new_rank, args.new_conv_rank, args.device)
    log_compression(report)
    conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    comment = f"svd merge of {merge_cli.describe_inputs(loras, ratios)} to rank {args.new_rank} (conv {conv_rank})"
    metadata = merge_cli.lora_metadata(loras, ratios, state, save_to, args.no_metadata, args.precision, SCRIPT, comment,
                                       network_args={"conv_dim": conv_rank, "conv_alpha": conv_rank})
    metadata["ss_svd_mean_kept_energy"] = f"{sum(item.kept_energy for item in report) / len(report):.6f}"
    merge_cli.save_lora(state, save_to, merge_cli.dtype_of(args.save_precision) or merge_dtype, metadata)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns the exit code (0, or 2 for bad input: one line, nothing written)."""
    return merge_cli.run(merge, setup_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
