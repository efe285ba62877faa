"""LoRA key names: diffusers U-Net module paths, and the original SGM/LDM names (``input_blocks.4.1...``).

SDXL LoRA files name modules the way Stability's original U-Net does; AUTOMATIC1111, ComfyUI,
Forge and diffusers' kohya loader all read that layout. The mapping is pure arithmetic on the
block layout: in the original U-Net every down level contributes ``layers_per_block`` entries
(resnet at ``.0``, attention at ``.1``) plus one downsampler entry, the middle block is
resnet/attention/resnet, and every up level contributes ``layers_per_block + 1`` entries with
the upsampler appended to the last one (at ``.2`` when the level has attention, else ``.1``).
"""

from __future__ import annotations

import re

import torch
from torch import nn

LORA_PREFIX_UNET = "lora_unet"

# Inside a ResnetBlock2D, diffusers names -> original names.
_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _layers_per_block(config) -> int:
    value = config["layers_per_block"] if isinstance(config, dict) else config.layers_per_block
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError("SGM names need the same layers_per_block on every level")
        value = value[0]
    return int(value)


def _up_block_has_attention(config, index: int) -> bool:
    types = config["up_block_types"] if isinstance(config, dict) else config.up_block_types
    return "CrossAttn" in types[index]


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return ".".join(filter(None, [_RESNET_PARTS.get(head, head), tail]))


def diffusers_to_sgm(path: str, unet_config) -> str:
    """Translate a diffusers ``UNet2DConditionModel`` module path to its SGM/LDM name.

    Args:
        path: e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``.
        unet_config: the U-Net's config (object or dict) with ``layers_per_block`` and
            ``up_block_types``.

    Returns:
        e.g. ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``.
    """
    for prefix, original in _TOP_LEVEL.items():
        if path == prefix or path.startswith(prefix + "."):
            return original + path[len(prefix):]
    layers = _layers_per_block(unet_config)

    match = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", path)
    if match:
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * (layers + 1)}.0.{rest.replace('conv', 'op', 1)}"
        index = 1 + block * (layers + 1) + layer
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_resnet_rest(rest)}"
        return f"input_blocks.{index}.1.{rest}"

    match = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if match:
        kind, layer, rest = match[1], int(match[2]), match[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * layer}.{_resnet_rest(rest)}"

    match = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", path)
    if match:
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "upsamplers":
            position = 2 if _up_block_has_attention(unet_config, block) else 1
            return f"output_blocks.{block * (layers + 1) + layers}.{position}.{rest}"
        index = block * (layers + 1) + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_resnet_rest(rest)}"
        return f"output_blocks.{index}.1.{rest}"

    raise ValueError(f"no SGM name for U-Net module '{path}'")


def is_sdxl_unet(unet: nn.Module) -> bool:
    """SDXL U-Nets have ``text_time`` additional embeddings; their LoRA keys use SGM names."""
    config = getattr(unet, "config", None)
    return getattr(config, "addition_embed_type", None) == "text_time"


def lora_name_for(path: str, unet: nn.Module) -> str:
    """The kohya key prefix for the U-Net module at ``path``."""
    if is_sdxl_unet(unet):
        path = diffusers_to_sgm(path, unet.config)
    return f"{LORA_PREFIX_UNET}_{path.replace('.', '_')}"


def kohya_aliases(unet: nn.Module) -> dict[str, str]:
    """For SDXL: diffusers-style kohya names (``lora_unet_down_blocks_...``) -> SGM kohya names.

    Covers every Linear/Conv2d of the U-Net, so files from other tools (and LyCORIS networks,
    which name diffusers U-Net layers by their diffusers paths) can be read and rewritten in the
    layout the UIs expect.
    """
    if not is_sdxl_unet(unet):
        return {}
    aliases = {}
    for path, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            try:
                aliases[f"{LORA_PREFIX_UNET}_{path.replace('.', '_')}"] = lora_name_for(path, unet)
            except ValueError:
                continue
    return aliases


def canonical_weights(weights: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename aliased keys (see :func:`kohya_aliases`) to the network's own names."""
    renamed = {}
    for key, value in weights.items():
        name, sep, suffix = key.partition(".")
        renamed[aliases.get(name, name) + sep + suffix] = value
    return renamed
