"""Which checkpoint tensor a kohya LoRA module changes, for original-layout (LDM/SGM) checkpoints.

A kohya LoRA names a layer by a module path with ``_`` for ``.``: SD 1.x/2.x files use diffusers
U-Net paths (``lora_unet_down_blocks_0_attentions_0_proj_in``), SDXL files the original SGM block
names (``lora_unet_input_blocks_4_1_proj_in``), text-encoder LoRAs the transformers CLIP paths
(``lora_te_text_model_encoder_layers_0_self_attn_q_proj``; SDXL ``lora_te1_``/``lora_te2_``).
An original-layout checkpoint stores the U-Net under SGM names and SD 2.x's / SDXL's OpenCLIP
text encoder with q, k and v fused into one ``in_proj_weight``.

:func:`checkpoint_targets` reads only the checkpoint's tensor names and shapes and returns, for
every name a LoRA may use (both U-Net naming styles), the tensor it changes and, for a fused
q/k/v weight, the rows. The U-Net's ``layers_per_block`` is read off the keys, so any SD-shaped
checkpoint works without a config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

UNET_PREFIX = "model.diffusion_model."

# (kohya prefix, checkpoint prefix, layout) of the text encoders per checkpoint kind.
TEXT_ENCODERS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "sd1": (("lora_te", "cond_stage_model.transformer.", "hf"),),
    "sd2": (("lora_te", "cond_stage_model.model.", "open_clip"),),
    "sdxl": (
        ("lora_te1", "conditioner.embedders.0.transformer.", "hf"),
        ("lora_te2", "conditioner.embedders.1.model.", "open_clip"),
    ),
}

# Inside a ResBlock: original name -> diffusers name.
_RESNET_PARTS = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)
_FIXED = (
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
)
# OpenCLIP resblock part -> transformers CLIP encoder-layer part (q/k/v come from in_proj_weight).
_OPEN_CLIP_PARTS = {
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RE_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)")
_RE_MIDDLE = re.compile(r"middle_block\.(\d+)\.(.+)")
_RE_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(attn\.in_proj|.+\.weight)(_weight)?")


@dataclass(frozen=True)
class Target:
    """A tensor of the checkpoint that a LoRA module changes.

    Attributes:
        key: the tensor's name in the checkpoint.
        shape: the shape of the changed part (``rows`` applied).
        rows: ``(start, stop)`` rows of a fused q/k/v weight, or None for the whole tensor.
    """

    key: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None


def _rename(name: str, parts: Sequence[tuple[str, str]]) -> str:
    for old, new in parts:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def unet_layers_per_block(unet_keys: Sequence[str]) -> int:
    """``layers_per_block`` of an original-layout U-Net, from its key names.

    Every level has ``layers_per_block + 1`` output blocks; levels = downsamplers + 1.

    Args:
        unet_keys: tensor names without the ``model.diffusion_model.`` prefix.
    """
    outputs = {int(match[2]) for key in unet_keys if (match := _RE_BLOCK.fullmatch(key)) and match[1] == "output_blocks"}
    downsamplers = {int(match[2]) for key in unet_keys
                    if (match := _RE_BLOCK.fullmatch(key)) and match[1] == "input_blocks" and match[4].startswith("op.")}
    if not outputs:
        raise ValueError("the checkpoint's U-Net has no output_blocks")
    levels = len(downsamplers) + 1
    per_level, remainder = divmod(len(outputs), levels)
    if remainder or per_level < 2:
        raise ValueError(f"cannot read the U-Net layout ({len(outputs)} output blocks for {levels} levels)")
    return per_level - 1


def sgm_to_diffusers(name: str, layers_per_block: int) -> str:
    """The diffusers ``UNet2DConditionModel`` name of an original-layout U-Net tensor or module.

    Args:
        name: a tensor name without the prefix, e.g. ``input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight``
            (module paths need a trailing part: pass ``path + ".weight"``).
        layers_per_block: from :func:`unet_layers_per_block`.

    Returns:
        e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight``.
    """
    for old, new in _FIXED:
        if name.startswith(old):
            return new + name[len(old):]
    step = layers_per_block + 1
    match = _RE_BLOCK.fullmatch(name)
    if match:
        side, index, slot, rest = match[1], int(match[2]), int(match[3]), match[4]
        if side == "input_blocks":
            level, position = divmod(index - 1, step)
            if position == layers_per_block:
                return f"down_blocks.{level}.downsamplers.0.{rest.replace('op.', 'conv.', 1)}"
            kind = "resnets" if slot == 0 else "attentions"
            return f"down_blocks.{level}.{kind}.{position}.{_rename(rest, _RESNET_PARTS) if slot == 0 else rest}"
        level, position = divmod(index, step)
        if slot == 0:
            return f"up_blocks.{level}.resnets.{position}.{_rename(rest, _RESNET_PARTS)}"
        if slot == 2 or rest.startswith("conv."):  # the upsampler follows the attention (or the resnet)
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        return f"up_blocks.{level}.attentions.{position}.{rest}"
    match = _RE_MIDDLE.fullmatch(name)
    if match:
        slot, rest = int(match[1]), match[2]
        if slot == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{slot // 2}.{_rename(rest, _RESNET_PARTS)}"
    raise ValueError(f"U-Net tensor {name!r} has no diffusers counterpart")


def kohya_name(prefix: str, module_path: str) -> str:
    """``lora_unet`` + ``down_blocks.0.resnets.0.conv1`` -> ``lora_unet_down_blocks_0_resnets_0_conv1``."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def _unet_targets(shapes: Mapping[str, Sequence[int]]) -> dict[str, Target]:
    unet = {key[len(UNET_PREFIX):]: tuple(shape) for key, shape in shapes.items() if key.startswith(UNET_PREFIX)}
    layers = unet_layers_per_block(list(unet))
    targets: dict[str, Target] = {}
    for name, shape in unet.items():
        if not name.endswith(".weight") or len(shape) not in (2, 4):
            continue
        target = Target(UNET_PREFIX + name, shape)
        module = name[: -len(".weight")]
        targets[kohya_name("lora_unet", module)] = target
        try:
            diffusers_name = sgm_to_diffusers(name, layers)
        except ValueError:
            continue
        targets[kohya_name("lora_unet", diffusers_name[: -len(".weight")])] = target
    return targets


def _hf_text_targets(lora_prefix: str, prefix: str, shapes: Mapping[str, Sequence[int]]) -> dict[str, Target]:
    targets = {}
    for key, shape in shapes.items():
        if not key.startswith(prefix) or not key.endswith(".weight") or len(shape) != 2:
            continue
        module = key[len(prefix): -len(".weight")]
        if ".layers." not in module:
            continue  # embeddings, final norm: no LoRA layers there
        module = module if module.startswith("text_model.") else "text_model." + module
        targets[kohya_name(lora_prefix, module)] = Target(key, tuple(shape))
    return targets


def _open_clip_text_targets(lora_prefix: str, prefix: str, shapes: Mapping[str, Sequence[int]]) -> dict[str, Target]:
    targets = {}
    for key, shape in shapes.items():
        match = _RE_RESBLOCK.fullmatch(key[len(prefix):]) if key.startswith(prefix) else None
        if not match or len(shape) != 2:
            continue
        layer, part = int(match[1]), match[2].removesuffix(".weight")
        if part == "attn.in_proj" and not match[3]:
            continue  # the bias
        base = f"text_model.encoder.layers.{layer}."
        if part == "attn.in_proj":
            width = shape[0] // 3
            for index, projection in enumerate(("q_proj", "k_proj", "v_proj")):
                rows = (index * width, (index + 1) * width)
                targets[kohya_name(lora_prefix, base + "self_attn." + projection)] = Target(key, (width, shape[1]), rows)
        elif part in _OPEN_CLIP_PARTS:
            targets[kohya_name(lora_prefix, base + _OPEN_CLIP_PARTS[part])] = Target(key, tuple(shape))
    return targets


def checkpoint_targets(shapes: Mapping[str, Sequence[int]], kind: str) -> dict[str, Target]:
    """Every kohya module name a LoRA may use for this checkpoint, and the tensor it changes.

    U-Net layers are listed under both naming styles (diffusers paths and SGM names), so SD and
    SDXL files from any kohya-format trainer resolve. Text-encoder layers use the transformers
    CLIP paths kohya writes; for OpenCLIP encoders q/k/v map to row slices of ``in_proj_weight``.

    Args:
        shapes: ``{tensor name: shape}`` of the whole checkpoint.
        kind: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
    """
    targets = _unet_targets(shapes)
    for lora_prefix, prefix, layout in TEXT_ENCODERS[kind]:
        builder = _hf_text_targets if layout == "hf" else _open_clip_text_targets
        targets.update(builder(lora_prefix, prefix, shapes))
    return targets


def module_targets(models: Mapping[str, tuple[str, object]]) -> dict[str, Target]:
    """Kohya names for the Linear/Conv2d layers of loaded diffusers/transformers models.

    Args:
        models: ``{namespace: (kohya prefix, module)}``, e.g. ``{"unet": ("lora_unet", unet),
            "text_encoder": ("lora_te", text_encoder)}``.

    Returns:
        ``{kohya name: Target}`` whose ``key`` is ``"<namespace>/<parameter name>"``. SDXL U-Net
        layers are listed under their SGM names too.
    """
    from torch import nn

    from networks.sgm_names import diffusers_to_sgm, is_sdxl_unet

    targets: dict[str, Target] = {}
    for namespace, (lora_prefix, model) in models.items():
        sdxl = lora_prefix == "lora_unet" and is_sdxl_unet(model)
        for path, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            target = Target(f"{namespace}/{path}.weight", tuple(module.weight.shape))
            if lora_prefix == "lora_unet":
                targets[kohya_name(lora_prefix, path)] = target
                if sdxl:
                    try:
                        targets[kohya_name(lora_prefix, diffusers_to_sgm(path, model.config))] = target
                    except ValueError:
                        pass
            elif ".layers." in path:
                targets[kohya_name(lora_prefix, path if path.startswith("text_model.") else "text_model." + path)] = target
    return targets
