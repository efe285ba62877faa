"""Tiny random SD1-shaped and SDXL-shaped components for tests (no downloads, milliseconds each).

The shapes follow the real models' block layout (SD1: attention in the first down block and
the last up block; SDXL: three levels, the first without attention, two transformer layers
deeper down, ``text_time`` additional embeddings, two text encoders with *different* widths),
so LoRA key mapping and single-file conversion are exercised on the same structure as the
real checkpoints, only narrower.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.tiny_clip import write_clip_tokenizer

WORDS = (
    "a an the of photo painting style van gogh detailed high low detail cat dog person girl "
    "long short hair smiling expressionless red green blue circle square large small"
).split()

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
)


def make_tokenizer(folder: str | Path) -> CLIPTokenizer:
    write_clip_tokenizer(folder, WORDS)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def _text_config(tokenizer: CLIPTokenizer, hidden: int, layers: int = 4, projection: int | None = None,
                 act: str = "quick_gelu") -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_sd_unet(cross_attention_dim: int = 32, v2: bool = False) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4) if v2 else 8,
        use_linear_projection=v2,
        norm_num_groups=32,
    )


def tiny_sdxl_unet(cross_attention_dim: int = 80, pooled_dim: int = 48, time_dim: int = 8) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim,
        norm_num_groups=32,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def save_tiny_sd(folder: str | Path, seed: int = 0, v2: bool = False, with_vae: bool = True) -> Path:
    """Save a tiny SD1 (or SD2-shaped, ``v2=True``) diffusers folder and return its path."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(folder / "tokenizer")
    act = "gelu" if v2 else "quick_gelu"
    text_encoder = CLIPTextModel(_text_config(tokenizer, 32, act=act))
    text_encoder.save_pretrained(folder / "text_encoder")
    tiny_sd_unet(32, v2=v2).save_pretrained(folder / "unet")
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    components = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    if with_vae:
        tiny_vae().save_pretrained(folder / "vae")
        components["vae"] = ["diffusers", "AutoencoderKL"]
    _write_model_index(folder, "StableDiffusionPipeline", components)
    return folder


def save_tiny_sdxl(folder: str | Path, seed: int = 0, with_vae: bool = True) -> Path:
    """Save a tiny SDXL-shaped diffusers folder (two text encoders of widths 32 and 48)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(folder / "tokenizer")
    make_tokenizer(folder / "tokenizer_2")
    CLIPTextModel(_text_config(tokenizer, 32)).save_pretrained(folder / "text_encoder")
    CLIPTextModelWithProjection(_text_config(tokenizer, 48, projection=48, act="gelu")).save_pretrained(
        folder / "text_encoder_2"
    )
    tiny_sdxl_unet(cross_attention_dim=32 + 48, pooled_dim=48).save_pretrained(folder / "unet")
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    components = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
    }
    if with_vae:
        tiny_vae().save_pretrained(folder / "vae")
        components["vae"] = ["diffusers", "AutoencoderKL"]
    _write_model_index(folder, "StableDiffusionXLPipeline", components)
    return folder


def _write_model_index(folder: Path, class_name: str, components: dict) -> None:
    import json

    index = {"_class_name": class_name, "_diffusers_version": "0.42.1", **components}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
