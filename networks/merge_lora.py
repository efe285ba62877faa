"""Merge LoRAs into an SD 1.x/2.x checkpoint, or combine LoRAs into one LoRA (sd-scripts' flags).

    # bake into a checkpoint (original single-file layout; text encoders and VAE copied unchanged)
    python networks/merge_lora.py --sd_model model.safetensors --save_to merged.safetensors \\
        --models erase_van_gogh.safetensors slider_age.safetensors --ratios 1.0 -0.5

    # combine LoRAs into one LoRA: --concat is exact (ranks add up)
    python networks/merge_lora.py --save_to both.safetensors --models a.safetensors b.safetensors --ratios 1 0.8 --concat

``--sd_model`` may be a diffusers folder: ``--save_to x.safetensors`` writes a single file,
``--save_to some_folder`` a diffusers folder. SDXL: ``networks/sdxl_merge_lora.py``.
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

SCRIPTS = {"sd": "networks/merge_lora.py", "sdxl": "networks/sdxl_merge_lora.py"}


def setup_parser(family: str = "sd") -> argparse.ArgumentParser:
    """The parser of ``merge_lora.py`` (``family="sd"``) or ``sdxl_merge_lora.py`` (``"sdxl"``)."""
    what = "SDXL" if family == "sdxl" else "SD 1.x/2.x"
    parser = argparse.ArgumentParser(
        prog=f"python {SCRIPTS[family]}",
        description=f"Merge LoRAs into an {what} checkpoint (--sd_model), or combine LoRAs into one LoRA (without it).",
    )
    if family == "sd":
        parser.add_argument("--v2", action="store_true",
                            help="the --sd_model is SD 2.x (checked against the file; detected anyway)")
    merge_cli.add_precision_arguments(
        parser, "default: a checkpoint keeps each tensor's stored dtype, a LoRA gets the --precision dtype")
    parser.add_argument("--sd_model", default=None,
                        help="checkpoint to merge into: .safetensors/.ckpt single file or diffusers folder; "
                             "omit it to combine the LoRAs into one LoRA")
    merge_cli.add_lora_arguments(parser, "output: a .safetensors/.ckpt checkpoint with --sd_model (a folder name writes a "
                                         "diffusers folder when --sd_model is one), else the combined LoRA file")
    parser.add_argument("--concat", action="store_true",
                        help="combine LoRAs by stacking their ranks (exactly the weighted sum; the rank is the sum of the inputs')")
    return parser


def _other_script(family: str) -> str:
    return SCRIPTS["sdxl" if family == "sdxl" else "sd"]


def _check_output(args: argparse.Namespace) -> Path:
    from library.checkpoint_merge import SINGLE_FILE_SUFFIXES

    save_to = Path(args.save_to)
    if args.sd_model is None:
        return merge_cli.check_lora_output(args.save_to)
    if args.concat:
        raise UserError("--concat combines LoRAs into one LoRA; leave out --sd_model (or --concat)")
    if save_to.suffix in SINGLE_FILE_SUFFIXES:
        return save_to
    if save_to.suffix:
        raise UserError(f"--save_to: {save_to.name}: use .safetensors or .ckpt for a single file, or a folder name for a diffusers folder")
    if not Path(args.sd_model).is_dir():
        raise UserError("--save_to without .safetensors/.ckpt writes a diffusers folder, which needs a diffusers folder as --sd_model")
    if args.save_precision:
        raise UserError("--save_precision applies to single-file outputs; a diffusers folder keeps each component's stored dtype")
    return save_to


def merge_into_checkpoint(args: argparse.Namespace, family: str, save_to: Path) -> None:
    """``--sd_model`` given: bake the LoRAs into it."""
    from library import checkpoint_merge as cm
    from library.diffusers_merge import merge_into_diffusers_folder

    merge_dtype = merge_cli.dtype_of(args.precision)
    source = Path(args.sd_model)
    if not source.exists():
        raise UserError(f"--sd_model: not found: {source}")
    loras, ratios = merge_cli.read_loras(args.models, args.ratios, merge_dtype)

    def hint(lora_family: str) -> str:
        return f"use {_other_script(lora_family)} with an {'SDXL' if lora_family == 'sdxl' else 'SD 1.x/2.x'} checkpoint"

    def metadata(kind: str, prediction: str) -> dict[str, str] | None:
        if args.no_metadata:
            return None
        return cm.merge_metadata(source.stem if source.is_file() else source.name, loras, ratios, save_to.stem, kind,
                                 prediction, args.precision, SCRIPTS[family])

    finished = merge_cli.timed("merge")
    if source.is_dir() and save_to.suffix not in cm.SINGLE_FILE_SUFFIXES:
        _check_family(cm.diffusers_kind(source), family, source, args)
        merge_into_diffusers_folder(source, loras, ratios, save_to, merge_dtype,
                                    None if args.no_metadata else metadata, hint)
        finished()
        return
    checkpoint = cm.open_checkpoint(source)
    _check_family(checkpoint.kind, family, source, args)
    where = f"this {cm.describe_kind(checkpoint.kind)} checkpoint"
    plan = cm.plan_merge(cm.targets_for(checkpoint), checkpoint.kind, loras, ratios, where, hint)
    changed = sum(len(items) for items in plan.values())
    merge_cli.logger.info("merging %s into %s: %d layer updates in %d tensors", merge_cli.describe_inputs(loras, ratios),
                          source.name, changed, len(plan))
    if any(key.startswith("model_ema.") for key in checkpoint.shapes):
        merge_cli.logger.warning("%s holds EMA weights (model_ema.*); they are copied without the LoRAs", source.name)
    info = metadata(checkpoint.kind, cm.prediction_type_for(checkpoint, loras))
    if save_to.suffix != ".safetensors" and info:
        merge_cli.logger.info("%s files hold no metadata; the merge recipe is not recorded", save_to.suffix)
    cm.write_merged_checkpoint(checkpoint, plan, save_to, merge_dtype, merge_cli.dtype_of(args.save_precision), info)
    merge_cli.logger.info("wrote %s", save_to)
    finished()


def _check_family(kind: str, family: str, source: Path, args: argparse.Namespace) -> None:
    from library.checkpoint_merge import describe_kind

    if (kind == "sdxl") != (family == "sdxl"):
        raise UserError(f"--sd_model: {source.name} is an {describe_kind(kind)} model; use {_other_script(kind)}")
    if family == "sd" and args.v2 and kind != "sd2":
        raise UserError(f"--v2: {source.name} is an {describe_kind(kind)} model, not SD 2.x; leave out --v2")


def combine_loras(args: argparse.Namespace, family: str, save_to: Path) -> None:
    """No ``--sd_model``: combine the LoRAs into one LoRA file."""
    from networks.lora_combine import concat_loras, plain_merge_loras

    merge_dtype = merge_cli.dtype_of(args.precision)
    loras, ratios = merge_cli.read_loras(args.models, args.ratios, merge_dtype)
    merge_cli.check_same_family(loras)
    if family == "sdxl":
        merge_cli.canonical_sdxl_names(loras)
    state = (concat_loras if args.concat else plain_merge_loras)(loras, ratios)
    mode = "concat" if args.concat else "merge"
    comment = f"{mode} of {merge_cli.describe_inputs(loras, ratios)}"
    metadata = merge_cli.lora_metadata(loras, ratios, state, save_to, args.no_metadata, args.precision, SCRIPTS[family],
                                       comment, v2=bool(getattr(args, "v2", False)))
    merge_cli.save_lora(state, save_to, merge_cli.dtype_of(args.save_precision) or merge_dtype, metadata)


def merge(args: argparse.Namespace, family: str = "sd") -> None:
    """Run the tool on parsed arguments (raises :class:`UserError` for bad input)."""
    save_to = _check_output(args)
    if args.sd_model is not None:
        merge_into_checkpoint(args, family, save_to)
    else:
        combine_loras(args, family, save_to)


def main(argv: Sequence[str] | None = None, family: str = "sd") -> int:
    """Command line; returns the exit code (0, or 2 for bad input: one line, nothing written)."""
    return merge_cli.run(lambda args: merge(args, family), setup_parser(family), argv)


if __name__ == "__main__":
    sys.exit(main())
