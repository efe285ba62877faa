"""Change the rank of a LoRA by SVD (sd-scripts' ``resize_lora.py`` flags).

    python networks/resize_lora.py --model big.safetensors --save_to small.safetensors --new_rank 4
    python networks/resize_lora.py --model big.safetensors --save_to dyn.safetensors --new_rank 32 \\
        --dynamic_method sv_fro --dynamic_param 0.95

Each module becomes its best rank-``--new_rank`` approximation; with ``--dynamic_method`` the rank
is chosen per module (``--new_rank`` is then the upper limit): ``sv_ratio`` keeps singular values
larger than ``S[0] / param``, ``sv_fro`` the fewest that keep ``param`` of the Frobenius norm,
``sv_cumulative`` the fewest whose sum reaches ``param`` of the total. The log lists every
module's kept energy and relative error. The input's metadata is kept; dim/alpha are updated.
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
from networks.svd_merge_lora import check_device, check_ranks  # noqa: E402

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python networks/resize_lora.py", description=__doc__.splitlines()[0])
    parser.add_argument("--save_precision", choices=merge_cli.PRECISION_CHOICES, default=None,
                        help="dtype of the saved tensors (default float)")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the output (the upper limit with --dynamic_method)")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3-conv (LoCon) modules (default --new_rank)")
    parser.add_argument("--save_to", required=True, help="output file (.safetensors, .ckpt, .pt or .pth)")
    parser.add_argument("--model", required=True, help="the LoRA to resize")
    parser.add_argument("--device", default=None, help="device for the SVD, e.g. cuda (default cpu)")
    parser.add_argument("--verbose", action="store_true", help="accepted for sd-scripts compatibility: every module is always listed")
    parser.add_argument("--dynamic_method", choices=DYNAMIC_METHODS, default=None, help="choose the rank per module")
    parser.add_argument("--dynamic_param", type=float, default=None, help="the target of --dynamic_method")
    return parser


def _check_dynamic(method: str | None, param: float | None) -> None:
    if method and param is None:
        raise UserError(f"--dynamic_method {method} needs --dynamic_param")
    if param is not None and not method:
        raise UserError("--dynamic_param needs --dynamic_method")
    if method == "sv_ratio" and param is not None and param < 1:
        raise UserError(f"--dynamic_param {param}: sv_ratio needs a ratio of at least 1 (largest / smallest kept value)")
    if method in ("sv_fro", "sv_cumulative") and param is not None and not 0 < param <= 1:
        raise UserError(f"--dynamic_param {param}: {method} needs a fraction in (0, 1]")


def resize(args: argparse.Namespace) -> None:
    import torch

    from networks.lora_combine import log_compression, svd_compress

    save_to = merge_cli.check_lora_output(args.save_to)
    check_ranks(args.new_rank, args.new_conv_rank)
    _check_dynamic(args.dynamic_method, args.dynamic_param)
    check_device(args.device)
    (lora,), _ = merge_cli.read_loras([args.model], None, torch.float32)
    state, report = svd_compress([lora], [1.0], args.new_rank, args.new_conv_rank, args.device,
                                 args.dynamic_method, args.dynamic_param)
    log_compression(report)
    from networks.lora_combine import dims_and_alphas

    old_ranks = sorted({module.rank for module in lora.modules.values()})
    dim, alpha = dims_and_alphas(state)
    metadata = {key: value for key, value in lora.metadata.items() if not key.startswith("sshs_")}
    how = f"{args.dynamic_method} {args.dynamic_param:g}, at most {args.new_rank}" if args.dynamic_method else str(args.new_rank)
    previous = metadata.get("ss_training_comment", "")
    metadata["ss_training_comment"] = f"resized from rank {'/'.join(map(str, old_ranks))} to {how}" + (f"; {previous}" if previous else "")
    metadata["ss_network_dim"] = dim
    metadata["ss_network_alpha"] = alpha
    metadata["ss_svd_mean_kept_energy"] = f"{sum(item.kept_energy for item in report) / len(report):.6f}"
    merge_cli.save_lora(state, save_to, merge_cli.dtype_of(args.save_precision) or torch.float32, metadata)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns the exit code (0, or 2 for bad input: one line, nothing written)."""
    return merge_cli.run(resize, setup_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
