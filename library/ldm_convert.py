"""Convert diffusers/transformers state dicts back to the original single-file (LDM/SGM) layout.

diffusers can read original Stable Diffusion checkpoints (``from_single_file``) but has no
writer for them. This module renames diffusers U-Net, VAE and transformers CLIP text-encoder
weights to the names the original CompVis (SD1/SD2) and Stability "generative-models" (SDXL)
code uses, and writes the result as one ``.safetensors`` file.

Layouts written:

* SD1: ``model.diffusion_model.*`` (U-Net), ``cond_stage_model.transformer.text_model.*``
  (HF CLIP), ``first_stage_model.*`` (VAE).
* SD2: as SD1, but the text encoder is OpenCLIP under ``cond_stage_model.model.*``.
* SDXL: ``conditioner.embedders.0.transformer.text_model.*`` (HF CLIP) and
  ``conditioner.embedders.1.model.*`` (OpenCLIP with ``text_projection``).

Round trips through diffusers' ``from_single_file`` are exact (see ``tests/test_ldm_convert.py``).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

KINDS = ("sd1", "sd2", "sdxl")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT1_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."

# The real SD2 OpenCLIP-H has 24 resblocks; diffusers' text encoder keeps the first 23 (SD2 uses
# the penultimate layer) and ignores resblock 23 when loading.
SD2_HF_TEXT_LAYERS = 23

# OpenCLIP models store logit_scale = ln(1 / temperature); trained CLIP models end at ln(100).
OPEN_CLIP_LOGIT_SCALE = math.log(100.0)

# (diffusers name, original name) pairs for U-Net modules outside the down/mid/up blocks.
_UNET_FIXED_MODULES = (
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("add_embedding.linear_1.", "label_emb.0.0."),
    ("add_embedding.linear_2.", "label_emb.0.2."),
    ("conv_in.", "input_blocks.0.0."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
)

# Inside a U-Net ResnetBlock2D: diffusers name -> original ResBlock name.
_UNET_RESNET_PARTS = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)

# Inside a VAE ResnetBlock2D only the shortcut is renamed.
_VAE_RESNET_PARTS = (("conv_shortcut.", "nin_shortcut."),)

# VAE mid-block attention: diffusers name -> original AttnBlock name (1x1 convolutions there).
_VAE_ATTENTION_PARTS = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)

# Inside one HF CLIP encoder layer -> OpenCLIP resblock (q/k/v are handled separately).
_OPEN_CLIP_LAYER_PARTS = (
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)

_RE_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)")
_RE_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)")
_RE_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_RE_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_RE_VAE_BLOCK = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)")
_RE_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _rename_parts(name: str, parts: tuple[tuple[str, str], ...]) -> str:
    """Rename the leading module of ``name`` using the first matching ``(old, new)`` pair."""
    for old, new in parts:
        if name.startswith(old):
            return new + name[len(old):]
    return name


# --------------------------------------------------------------------------------------------
# U-Net
# --------------------------------------------------------------------------------------------


def _layers_per_block(config: Mapping[str, Any]) -> int:
    """Return the U-Net's ``layers_per_block`` as an int (the SD/SDXL layouts need one value)."""
    layers = config["layers_per_block"]
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ValueError(f"cannot convert a U-Net with varying layers_per_block {list(layers)}")
        layers = layers[0]
    return int(layers)


def _unet_key_to_ldm(key: str, layers: int, up_blocks_with_attention: set[int]) -> str:
    """Map one diffusers U-Net key to its original-layout name (without ``model.diffusion_model.``).

    Args:
        key: diffusers parameter name.
        layers: ``layers_per_block`` of the U-Net.
        up_blocks_with_attention: indices of up blocks that contain attention modules (their
            upsampler sits after the attention in the original output block).

    Raises:
        ValueError: the key belongs to a module the original layout has no place for.
    """
    for old, new in _UNET_FIXED_MODULES:
        if key.startswith(old):
            return new + key[len(old):]

    step = layers + 1
    match = _RE_DOWN.fullmatch(key)
    if match:
        block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * step}.0.{rest.replace('conv.', 'op.', 1)}"
        position = 1 + block * step + index
        if kind == "resnets":
            return f"input_blocks.{position}.0.{_rename_parts(rest, _UNET_RESNET_PARTS)}"
        return f"input_blocks.{position}.1.{rest}"

    match = _RE_MID.fullmatch(key)
    if match:
        kind, index, rest = match[1], int(match[2]), match[3]
        if kind == "resnets":
            return f"middle_block.{2 * index}.{_rename_parts(rest, _UNET_RESNET_PARTS)}"
        return f"middle_block.{2 * index + 1}.{rest}"

    match = _RE_UP.fullmatch(key)
    if match:
        block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "upsamplers":
            slot = 2 if block in up_blocks_with_attention else 1
            return f"output_blocks.{block * step + layers}.{slot}.{rest}"
        position = block * step + index
        if kind == "resnets":
            return f"output_blocks.{position}.0.{_rename_parts(rest, _UNET_RESNET_PARTS)}"
        return f"output_blocks.{position}.1.{rest}"

    raise ValueError(f"U-Net weight {key!r} has no counterpart in the original SD layout")


def convert_unet_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to the original layout.

    Args:
        state_dict: the U-Net's ``state_dict()``.
        config: the U-Net's config (``unet.config``); only ``layers_per_block`` is used.

    Returns:
        A new dict with ``model.diffusion_model.``-prefixed keys (tensors are not copied).
    """
    layers = _layers_per_block(config)
    up_with_attention = {int(k.split(".")[1]) for k in state_dict if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    return {UNET_PREFIX + _unet_key_to_ldm(k, layers, up_with_attention): v for k, v in state_dict.items()}


# --------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------


def _flat_clip_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return a CLIP text model's weights with transformers >= 5.6 flat names.

    ``CLIPTextModel`` (transformers >= 5.6) has no ``text_model.`` prefix;
    ``CLIPTextModelWithProjection`` and older versions do. Buffers such as ``position_ids``
    are dropped.
    """
    flat = {}
    for key, value in model.state_dict().items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        flat[key] = value
    return flat


def convert_clip_text_state_dict(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Convert an HF ``CLIPTextModel`` to the original layout (HF names under ``prefix``).

    Args:
        model: a transformers CLIP text model.
        prefix: e.g. ``cond_stage_model.transformer.text_model.`` (SD1) or
            ``conditioner.embedders.0.transformer.text_model.`` (SDXL TE1).
    """
    return {prefix + key: value for key, value in _flat_clip_state_dict(model).items()}


def _open_clip_layer_entries(index: int, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert the weights of one HF CLIP encoder layer to one OpenCLIP resblock."""
    base = f"transformer.resblocks.{index}."
    out = {}
    for kind in ("weight", "bias"):
        qkv = [parts[f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
        out[f"{base}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
    for name, value in parts.items():
        if name.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
            continue
        renamed = _rename_parts(name, _OPEN_CLIP_LAYER_PARTS)
        if renamed == name:
            raise ValueError(f"text-encoder weight 'encoder.layers.{index}.{name}' has no OpenCLIP counterpart")
        out[base + renamed] = value
    return out


def convert_open_clip_state_dict(
    model: torch.nn.Module, prefix: str, pad_extra_layer: bool = False
) -> dict[str, torch.Tensor]:
    """Convert an HF CLIP text model to the OpenCLIP layout used by SD2 and SDXL's second encoder.

    q/k/v projections are concatenated into ``attn.in_proj_weight``/``in_proj_bias``; the
    projection of a ``CLIPTextModelWithProjection`` is stored transposed as ``text_projection``
    together with a ``logit_scale``.

    Args:
        model: ``CLIPTextModel`` (SD2) or ``CLIPTextModelWithProjection`` (SDXL).
        prefix: ``cond_stage_model.model.`` (SD2) or ``conditioner.embedders.1.model.`` (SDXL).
        pad_extra_layer: write the layout of a real SD2 checkpoint, whose OpenCLIP has one more
            resblock than the HF model (a copy of the last one; SD2 never uses its output), an
            identity ``text_projection`` and a ``logit_scale``. diffusers ignores these when
            loading a 23-layer SD2 text encoder.
    """
    flat = _flat_clip_state_dict(model)
    out: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        match = _RE_CLIP_LAYER.fullmatch(key)
        if match:
            layers.setdefault(int(match[1]), {})[match[2]] = value
        elif key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.removeprefix("final_layer_norm.")] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t()
        else:
            raise ValueError(f"text-encoder weight {key!r} has no OpenCLIP counterpart")
    for index in sorted(layers):
        out.update(_open_clip_layer_entries(index, layers[index]))
    reference = out["positional_embedding"]
    if pad_extra_layer:
        last = max(layers)
        copies = {name: value.clone() for name, value in layers[last].items()}
        out.update(_open_clip_layer_entries(last + 1, copies))
        out.setdefault("text_projection", torch.eye(reference.shape[-1], dtype=reference.dtype))
    if "text_projection" in out:
        out["logit_scale"] = torch.tensor(OPEN_CLIP_LOGIT_SCALE, dtype=reference.dtype)
    return {prefix + key: value for key, value in out.items()}


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------


def _vae_key_to_ldm(key: str, num_up_blocks: int) -> str:
    """Map one diffusers ``AutoencoderKL`` key to its original name (without ``first_stage_model.``)."""
    for side in ("encoder.", "decoder."):
        for old, new in (("conv_norm_out.", "norm_out."), ("conv_in.", "conv_in."), ("conv_out.", "conv_out.")):
            if key.startswith(side + old):
                return side + new + key[len(side + old):]
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key

    match = _RE_VAE_BLOCK.fullmatch(key)
    if match:
        side, _, block, kind, index, rest = match.groups()
        block = int(block)
        if side == "encoder":
            if kind == "downsamplers":
                return f"encoder.down.{block}.downsample.{rest}"
            return f"encoder.down.{block}.block.{index}.{_rename_parts(rest, _VAE_RESNET_PARTS)}"
        level = num_up_blocks - 1 - block
        if kind == "upsamplers":
            return f"decoder.up.{level}.upsample.{rest}"
        return f"decoder.up.{level}.block.{index}.{_rename_parts(rest, _VAE_RESNET_PARTS)}"

    match = _RE_VAE_MID.fullmatch(key)
    if match:
        side, kind, index, rest = match.groups()
        if kind == "resnets":
            return f"{side}.mid.block_{int(index) + 1}.{_rename_parts(rest, _VAE_RESNET_PARTS)}"
        renamed = _rename_parts(rest, _VAE_ATTENTION_PARTS)
        if renamed != rest:
            return f"{side}.mid.attn_1.{renamed}"

    raise ValueError(f"VAE weight {key!r} has no counterpart in the original SD layout")


def convert_vae_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to the original ``first_stage_model.*`` layout.

    The mid-block attention's linear weights become 1x1 convolution weights, as in the originals.

    Args:
        state_dict: the VAE's ``state_dict()``.
        config: the VAE's config (``vae.config``); ``up_block_types`` gives the decoder depth.
    """
    num_up_blocks = len(config["up_block_types"])
    out = {}
    for key, value in state_dict.items():
        name = _vae_key_to_ldm(key, num_up_blocks)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[VAE_PREFIX + name] = value
    return out


# --------------------------------------------------------------------------------------------
# Whole checkpoint
# --------------------------------------------------------------------------------------------


def build_ldm_state_dict(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    vae: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None,
    *,
    kind: str,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Assemble an original-layout state dict from diffusers/transformers components.

    Args:
        unet: diffusers ``UNet2DConditionModel``.
        text_encoder: ``CLIPTextModel`` (SD1/SDXL: OpenAI CLIP-L layout, SD2: OpenCLIP layout).
        vae: optional ``AutoencoderKL``.
        text_encoder_2: SDXL's ``CLIPTextModelWithProjection`` (required for ``sdxl``).
        kind: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        dtype: cast floating-point tensors to this dtype (e.g. ``torch.float16``).

    Returns:
        Contiguous CPU tensors keyed by original names, ready for ``safetensors``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; use one of {', '.join(KINDS)}")
    if (kind == "sdxl") != (text_encoder_2 is not None):
        raise ValueError("text_encoder_2 must be given for kind 'sdxl' and only for it")

    state = convert_unet_state_dict(unet.state_dict(), unet.config)
    if kind == "sd1":
        state.update(convert_clip_text_state_dict(text_encoder, SD1_TEXT_PREFIX))
    elif kind == "sd2":
        pad = text_encoder.config.num_hidden_layers == SD2_HF_TEXT_LAYERS
        state.update(convert_open_clip_state_dict(text_encoder, SD2_TEXT_PREFIX, pad_extra_layer=pad))
    else:
        state.update(convert_clip_text_state_dict(text_encoder, SDXL_TEXT1_PREFIX))
        state.update(convert_open_clip_state_dict(text_encoder_2, SDXL_TEXT2_PREFIX))
    if vae is not None:
        state.update(convert_vae_state_dict(vae.state_dict(), vae.config))
    prepared: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        value = _prepare_tensor(value, dtype)
        if value.numel():
            # safetensors refuses tensors sharing memory (e.g. tied weights): store copies.
            storage = value.untyped_storage().data_ptr()
            if storage in seen:
                value = value.clone()
                storage = value.untyped_storage().data_ptr()
            seen.add(storage)
        prepared[key] = value
    return prepared


def _prepare_tensor(value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Detach, move to CPU, optionally cast floating tensors, and make contiguous."""
    value = value.detach().to("cpu")
    if dtype is not None and value.is_floating_point():
        value = value.to(dtype)
    return value.contiguous()


def save_single_file(
    path: str | os.PathLike[str],
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    vae: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None,
    *,
    kind: str,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the models as one original-layout ``.safetensors`` checkpoint (atomically).

    The file is written to a temporary name in the same folder and renamed into place, so an
    interrupted write never leaves a truncated checkpoint at ``path``.

    Args:
        path: destination; must end in ``.safetensors``.
        unet: diffusers ``UNet2DConditionModel``.
        text_encoder: first (or only) text encoder.
        vae: optional ``AutoencoderKL`` (omit it for a U-Net + text-encoder file).
        text_encoder_2: SDXL's second text encoder.
        kind: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        dtype: optional storage dtype for floating tensors, e.g. ``torch.float16``.

    Returns:
        The written path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file checkpoints are written as .safetensors; got {path.name!r}")
    state = build_ldm_state_dict(unet, text_encoder, vae, text_encoder_2, kind=kind, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(temp), metadata={"format": "pt"})
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    logger.info("wrote %s checkpoint with %d tensors to %s", kind, len(state), path)
    return path
