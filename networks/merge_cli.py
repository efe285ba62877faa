"""Command lines of the merge tools (sd-scripts' flag names and meanings), shared by the four scripts.

* ``networks/merge_lora.py`` / ``networks/sdxl_merge_lora.py``: with ``--sd_model``, bake the
  LoRAs into the checkpoint; without it, combine them into one LoRA (``--concat`` exact).
* ``networks/svd_merge_lora.py``: combine, then compress every module to ``--new_rank`` by SVD.
* ``networks/resize_lora.py``: compress one LoRA to ``--new_rank`` (optionally chosen per module).

User errors print one line (``error: ...``) and return exit code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from library.errors import UserError
from networks.lora_weights import FAMILY_NAMES, LoRAFile, check_ratios, guess_family, read_lora

logger = logging.getLogger("leco.merge")

EXIT_USER_ERROR = 2
PRECISION_CHOICES = ("float", "fp16", "bf16")
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def add_precision_arguments(parser: argparse.ArgumentParser, save_default_help: str) -> None:
    parser.add_argument("--save_precision", choices=PRECISION_CHOICES, default=None,
                        help=f"dtype of the saved floating-point tensors; {save_default_help}")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="float",
                        help="precision of the merge arithmetic (default float; float is recommended)")


def add_lora_arguments(parser: argparse.ArgumentParser, save_to_help: str = "output LoRA file (.safetensors, .ckpt, .pt or .pth)") -> None:
    parser.add_argument("--save_to", required=True, help=save_to_help)
    parser.add_argument("--models", nargs="*", help="LoRA files (.safetensors, or .ckpt/.pt with plain tensors)")
    parser.add_argument("--ratios", type=float, nargs="*",
                        help="one ratio per model: the strength each LoRA is applied at (default 1.0 each)")
    parser.add_argument("--no_metadata", action="store_true",
                        help="do not write modelspec metadata (a LoRA still gets the minimal ss_* keys)")


def run(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, run, and turn user errors into one line and exit code 2 (argparse errors also exit 2)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    root = logging.getLogger()
    # a caller that configured logging (the demo, a notebook, pytest) keeps its handlers and level
    handler = None if root.handlers else logging.StreamHandler(sys.stderr)
    previous = root.level
    if handler is not None:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    try:
        from library.quiet import quiet_third_party_output

        quiet_third_party_output()
        main(args)
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        if handler is not None:
            root.removeHandler(handler)
            root.setLevel(previous)


def dtype_of(name: str | None) -> torch.dtype | None:
    from library.checkpoint_merge import PRECISIONS

    return PRECISIONS[name] if name else None


def read_loras(models: Sequence[str], ratios: Sequence[float] | None, dtype: torch.dtype) -> tuple[list[LoRAFile], list[float]]:
    """Check the ratio count and that every file exists, then read the LoRAs."""
    ratios = check_ratios(list(models or []), list(ratios) if ratios is not None else None)
    missing = [model for model in models if not Path(model).is_file()]
    if missing:
        raise UserError(f"--models: LoRA file not found: {missing[0]}")
    return [read_lora(model, dtype) for model in models], ratios


def check_lora_output(save_to: str) -> Path:
    path = Path(save_to)
    if path.suffix not in LORA_SUFFIXES:
        raise UserError(f"--save_to: {path.name} must end in .safetensors, .ckpt, .pt or .pth")
    if path.is_dir():
        raise UserError(f"--save_to: {path} is a folder; give a file name")
    return path


def check_same_family(loras: Sequence[LoRAFile]) -> str | None:
    """LoRAs for different model families cannot be combined; returns the family if known."""
    families = {lora.path.name: guess_family(lora) for lora in loras}
    known = {name: family for name, family in families.items() if family}
    # SD 1.x and 2.x LoRAs share names; their widths differ, which the shape check catches.
    groups = {"sdxl" if family == "sdxl" else "sd" for family in known.values()}
    if len(groups) > 1:
        described = ", ".join(f"{name} ({FAMILY_NAMES[family]})" for name, family in known.items())
        raise UserError(f"--models: the LoRAs are for different model families: {described}")
    return next(iter(known.values()), None)


def canonical_sdxl_names(loras: Sequence[LoRAFile]) -> None:
    """Rename diffusers-style SDXL U-Net module names (``lora_unet_down_blocks_...``) to SGM names in place."""
    if not any("_down_blocks_" in name or "_up_blocks_" in name or "_mid_block_" in name for lora in loras for name in lora.modules):
        return
    from diffusers import UNet2DConditionModel

    from library.single_file import default_config_dir
    from networks.sgm_names import kohya_aliases

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(default_config_dir("sdxl"), subfolder="unet"))
    aliases = kohya_aliases(unet)
    for lora in loras:
        renamed = {}
        for name, module in lora.modules.items():
            new = aliases.get(name, name)
            if new in renamed:
                raise UserError(f"{lora.path.name}: {name} and another module name the same layer ({new})")
            renamed[new] = module if new == name else type(module)(new, module.down, module.up, module.alpha)
        lora.modules = renamed


def lora_metadata(loras: Sequence[LoRAFile], ratios: Sequence[float], state: dict[str, torch.Tensor], save_to: Path,
                  no_metadata: bool, precision: str, tool: str, comment: str, v2: bool = False,
                  network_args: dict | None = None) -> dict[str, str]:
    """Minimal ``ss_*`` keys (as sd-scripts writes for merges) and, unless ``--no_metadata``, modelspec."""
    from library.checkpoint_merge import merge_metadata
    from networks.lora_combine import dims_and_alphas

    def first(key: str, default: str) -> str:
        return next((lora.metadata[key] for lora in loras if lora.metadata.get(key)), default)

    family = guess_family(loras[0]) if loras else None
    version_default = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(family or "", "sd_v1")
    dim, alpha = dims_and_alphas(state)
    v_param = first("ss_v_parameterization", "False")
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": alpha,
        "ss_network_args": json.dumps(network_args or {}),
        "ss_v2": first("ss_v2", str(v2 or family == "sd2")),
        "ss_base_model_version": first("ss_base_model_version", version_default),
        "ss_v_parameterization": v_param,
        "ss_training_comment": comment,
    }
    if not no_metadata:
        kind = family or ("sd2" if v2 else "sd1")
        prediction = "v" if v_param == "True" else first("modelspec.prediction_type", "epsilon")
        metadata.update(merge_metadata(None, loras, ratios, save_to.stem, kind, prediction, precision, tool, adapter="lora"))
    return metadata


def save_lora(state: dict[str, torch.Tensor], save_to: Path, save_dtype: torch.dtype, metadata: dict[str, str]) -> None:
    from networks.lora_files import save_lora_file

    state = {key: value.to(save_dtype).contiguous() if value.is_floating_point() else value for key, value in state.items()}
    save_lora_file(state, save_to, metadata)
    modules = sum(key.endswith(".lora_down.weight") for key in state)
    logger.info("wrote %s (%d modules, %s)", save_to, modules, str(save_dtype).replace("torch.", ""))


def describe_inputs(loras: Sequence[LoRAFile], ratios: Sequence[float]) -> str:
    return ", ".join(f"{lora.path.name} x{ratio:g}" for lora, ratio in zip(loras, ratios))


def timed(label: str) -> Callable[[], None]:
    start = time.perf_counter()
    return lambda: logger.info("%s took %.1f s", label, time.perf_counter() - start)
