"""Kohya-format LoRA / LoCon files as per-module factors: reading, checking, and the weight delta.

A module ``NAME`` of a kohya file holds ``NAME.lora_down.weight`` (``(r, in)``, or ``(r, in, kh, kw)``
for a convolution), ``NAME.lora_up.weight`` (``(out, r)`` or ``(out, r, 1, 1)``) and optionally
``NAME.alpha`` (default ``r``). The layer's weight changes by::

    delta = (alpha / r) * up @ down          # per unit of multiplier ("ratio")

Files from sd-scripts, this trainer, LyCORIS' ``algo=locon`` without Tucker, and most UIs'
trainers have this layout. Other LyCORIS algorithms (LoHa, LoKr, Tucker, DoRA, OFT) are refused
with a message naming them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.errors import UserError

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
# Key fragments of LoRA variants whose delta is not up @ down.
_OTHER_TYPES = (
    ("hada_", "LoHa"),
    ("lokr_", "LoKr"),
    ("lora_mid", "LoCon with Tucker decomposition"),
    ("dora_scale", "DoRA"),
    ("oft_", "OFT"),
    (".diff", "a full weight difference (LyCORIS 'full')"),
    (".lora_A.", "PEFT/diffusers-format LoRA"),
    (".lora_B.", "PEFT/diffusers-format LoRA"),
)


@dataclass(frozen=True)
class LoRAWeights:
    """One module's low-rank update.

    Attributes:
        name: kohya module name, e.g. ``lora_unet_down_blocks_0_attentions_0_proj_in``.
        down: ``(r, in)`` or ``(r, in, kh, kw)``.
        up: ``(out, r)`` or ``(out, r, 1, 1)``.
        alpha: the file's alpha (``scale = alpha / r``).
    """

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the layer weight this module changes: ``(out, in)`` or ``(out, in, kh, kw)``."""
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def up_matrix(self) -> torch.Tensor:
        return self.up.reshape(self.up.shape[0], self.rank)  # (out, r)

    def down_matrix(self) -> torch.Tensor:
        return self.down.reshape(self.rank, -1)  # (r, in * kh * kw)

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """``scale * up @ down`` in the layer's weight shape (:attr:`delta_shape`)."""
        up = self.up_matrix().to(device=device, dtype=dtype)
        down = self.down_matrix().to(device=device, dtype=dtype)
        return (up @ down).mul_(self.scale).reshape(self.delta_shape)


@dataclass
class LoRAFile:
    """A LoRA file read into modules (in file order) with its metadata."""

    path: Path
    modules: dict[str, LoRAWeights]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str:
        """``modelspec.title`` if present, else the file name without extension (as sd-scripts)."""
        return self.metadata.get("modelspec.title") or self.path.stem


def _check_key_kinds(path: Path, keys: list[str]) -> None:
    for key in keys:
        for fragment, kind in _OTHER_TYPES:
            if fragment in key:
                raise UserError(
                    f"{path.name}: {kind} weights ({key}) are not supported; only LoRA/LoCon files "
                    "(lora_down/lora_up/alpha) can be merged here (merge LyCORIS types with LyCORIS' own tools)"
                )
    foreign = [key for key in keys if not key.startswith(KOHYA_PREFIXES)]
    if foreign:
        raise UserError(
            f"{path.name}: {len(foreign)} keys are not kohya LoRA keys (first: {foreign[0]}); "
            "expected lora_unet_* / lora_te_* / lora_te1_* / lora_te2_* (an SD 1.x/2.x/XL LoRA in kohya format)"
        )
    odd = [key for key in keys if key.partition(".")[2] not in _SUFFIXES]
    if odd:
        raise UserError(f"{path.name}: unknown LoRA key {odd[0]} (expected NAME.lora_down.weight, NAME.lora_up.weight, NAME.alpha)")


def _module(path: Path, name: str, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> LoRAWeights:
    down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
    if down is None or up is None:
        missing = "lora_down.weight" if down is None else "lora_up.weight"
        raise UserError(f"{path.name}: module {name} has no {missing}")
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        raise UserError(
            f"{path.name}: module {name} has inconsistent shapes (lora_down {tuple(down.shape)}, lora_up {tuple(up.shape)})"
        )
    alpha_tensor = parts.get("alpha")
    alpha = float(alpha_tensor.float().reshape(-1)[0]) if alpha_tensor is not None and alpha_tensor.numel() else float(down.shape[0])
    if not math.isfinite(alpha):
        raise UserError(f"{path.name}: module {name} has a non-finite alpha")
    return LoRAWeights(name, down.to(dtype), up.to(dtype), alpha)


def read_lora(path: str | Path, dtype: torch.dtype = torch.float32) -> LoRAFile:
    """Read and check a kohya-format LoRA/LoCon file (``.safetensors``, or ``.ckpt``/``.pt`` with plain tensors).

    Args:
        path: the file.
        dtype: the dtype the factors are converted to (the merge precision).

    Raises:
        UserError: a missing or unreadable file, a non-kohya key, a LoRA variant other than
            LoRA/LoCon, or a module with missing/inconsistent factors (one line naming the file).
    """
    from networks.lora_files import load_lora_file, lora_file_keys, read_lora_metadata

    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path}")
    try:
        keys = lora_file_keys(path)
        tensors = load_lora_file(path)
    except ValueError as error:
        raise UserError(str(error)) from None
    if not isinstance(tensors, dict) or not all(isinstance(value, torch.Tensor) for value in tensors.values()):
        raise UserError(f"{path.name} does not hold a flat dict of tensors")
    _check_key_kinds(path, keys)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key in keys:
        name, _, suffix = key.partition(".")
        grouped.setdefault(name, {})[suffix] = tensors[key]
    modules = {name: _module(path, name, parts, dtype) for name, parts in grouped.items()}
    return LoRAFile(path, modules, read_lora_metadata(path) if path.suffix == ".safetensors" else {})


def guess_family(lora: LoRAFile) -> str | None:
    """``"sd1"``, ``"sd2"``, ``"sdxl"`` or None: from metadata, else from key names and widths.

    Only used to say what a LoRA probably is when it does not fit a checkpoint or other LoRAs.
    """
    version = lora.metadata.get("ss_base_model_version", "")
    architecture = lora.metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or architecture.startswith("stable-diffusion-v2"):
        return "sd2"
    if version.startswith("sd_v1") or architecture.startswith("stable-diffusion-v1"):
        return "sd1"
    names = list(lora.modules)
    if any(name.startswith(("lora_te1_", "lora_te2_")) or "_input_blocks_" in name or "_output_blocks_" in name
           or "_middle_block_" in name for name in names):
        return "sdxl"
    widths = {module.down.shape[1] for name, module in lora.modules.items() if name.endswith("attn2_to_k")}
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(next(iter(widths)), None) if len(widths) == 1 else None


FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def check_ratios(models: list[str] | None, ratios: list[float] | None) -> list[float]:
    """sd-scripts' rule: one ratio per model (``--ratios`` may be omitted: every ratio is 1.0)."""
    if not models:
        raise UserError("--models: give at least one LoRA file")
    if ratios is None:
        return [1.0] * len(models)
    if len(ratios) != len(models):
        raise UserError(f"--ratios: {len(ratios)} ratios for {len(models)} models; give one ratio per model")
    bad = [ratio for ratio in ratios if not math.isfinite(ratio)]
    if bad:
        raise UserError(f"--ratios: {bad[0]} is not a finite number")
    return list(ratios)
