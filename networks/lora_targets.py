"""Which U-Net layers a LoRA wraps (``train_method``, ``conv_dim``, ``include``/``exclude``), and the check
of ``--network_args`` for ``networks.lora`` that runs before any model is loaded."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from networks.lora_blocks import BLOCK_ARG_KEYS, LORAPLUS_KEYS, float_arg, validate_block_args
from networks.sgm_names import lora_name_for

TRANSFORMER_CLASSES = ("Transformer2DModel",)
RESNET_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")

# train_method presets: which transformer-block layers get a LoRA (ESD / p1atdev vocabulary).
TRAIN_METHODS = ("full", "xattn", "xattn_strict", "selfattn", "noxattn")
NETWORK_ARG_KEYS = (
    "conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "train_method", "include", "exclude",
    *LORAPLUS_KEYS, "dropout", *BLOCK_ARG_KEYS,
)


def is_conv_1x1(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)


def is_conv_3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)


def _keep_for_method(path: str, method: str) -> bool:
    """Whether a transformer-block layer at ``path`` belongs to the ``train_method`` preset."""
    if method == "full":
        return True
    if method == "xattn":
        return ".attn2." in path
    if method == "xattn_strict":
        return bool(re.search(r"\.attn2\.to_[kv]$", path))
    if method == "selfattn":
        return ".attn1." in path
    if method == "noxattn":
        return ".attn2." not in path
    raise ValueError(method)


def find_target_modules(
    unet: nn.Module,
    conv: bool = False,
    train_method: str = "full",
    include: str | None = None,
    exclude: str | None = None,
) -> list[tuple[str, str, nn.Module]]:
    """List ``(lora_name, module_path, module)`` for the layers a network should wrap.

    Default: every Linear and 1x1 Conv2d inside the transformer blocks (attention, feed-forward,
    proj_in/out), as sd-scripts. ``conv`` adds the ResNet/up/down-sampler layers (3x3 convs get
    the conv rank; their Linear/1x1 layers the normal rank). ``train_method`` restricts the
    transformer layers; ``include``/``exclude`` are regular expressions searched in the kohya
    name (``lora_unet_...``).
    """
    found = []
    for block_path, block in unet.named_modules():
        class_name = type(block).__name__
        in_transformer = class_name in TRANSFORMER_CLASSES
        if not in_transformer and not (conv and class_name in RESNET_CLASSES):
            continue
        for child_path, child in block.named_modules():
            if not child_path:
                continue
            if not (isinstance(child, nn.Linear) or is_conv_1x1(child) or (conv and is_conv_3x3(child) and not in_transformer)):
                continue
            path = f"{block_path}.{child_path}"
            if in_transformer and not _keep_for_method(path, train_method):
                continue
            found.append((lora_name_for(path, unet), path, child))
    names = [name for name, _, _ in found]
    duplicates = {name for name in names if names.count(name) > 1}
    assert not duplicates, f"duplicate LoRA names: {sorted(duplicates)[:3]}"
    if include:
        found = [item for item in found if re.search(include, item[0])]
    if exclude:
        found = [item for item in found if not re.search(exclude, item[0])]
    return found


def validate_network_args(kwargs: dict[str, Any], family: str | None = None) -> str:
    """Check ``--network_args`` for networks.lora (no model needed); returns the train_method.

    ``family`` (``"sd"`` or ``"sdxl"``) fixes the block count of the block-wise options (25 or 23).

    Raises:
        ValueError: naming the bad option.
    """
    unknown = [key for key in kwargs if key not in NETWORK_ARG_KEYS and key != "loraplus_text_encoder_lr_ratio"]
    if unknown:
        raise ValueError(f"--network_args: unknown option '{unknown[0]}' for networks.lora (known: {', '.join(NETWORK_ARG_KEYS)})")
    train_method = str(kwargs.get("train_method") or "full").replace("-", "_")
    if train_method not in TRAIN_METHODS:
        raise ValueError(f"--network_args train_method={train_method}: use one of {', '.join(TRAIN_METHODS)}")
    for key in ("conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout"):
        float_arg(kwargs, key)
    conv_dim = float_arg(kwargs, "conv_dim")
    if conv_dim is not None and (conv_dim < 1 or conv_dim != int(conv_dim)):
        raise ValueError(f"--network_args conv_dim={kwargs['conv_dim']}: must be a positive integer")
    if conv_dim and train_method in ("xattn", "xattn_strict", "selfattn"):
        raise ValueError(f"--network_args: conv_dim adds ResNet convs, which train_method={train_method} excludes")
    for key in ("dropout", "rank_dropout", "module_dropout"):
        value = float_arg(kwargs, key)
        if value is not None and not 0 <= value < 1:
            raise ValueError(f"--network_args {key}={value}: must be in [0, 1)")
    for key in ("include", "exclude"):
        if kwargs.get(key):
            try:
                re.compile(kwargs[key])
            except re.error as exc:
                raise ValueError(f"--network_args {key}={kwargs[key]}: not a regular expression ({exc})") from None
    validate_block_args(kwargs, family, train_method)
    return train_method
