"""Prompt encoding, reproducible CFG sampling and latent-to-colour display for the concept world."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from library.concept_world.scenes import DISPLAY_RGB, color_amounts
from library.sampling import denoise
from library.text_encoding import Conditioning

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's maximum length, as SD does.

    Returns:
        (B, model_max_length) int64 ids.
    """
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """The text encoder's last hidden state for ``prompts`` (SD1 conditioning).

    Returns:
        (B, model_max_length, hidden) float tensor on the text encoder's device.
    """
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    return text_encoder(ids)[0]


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """Starting latents, one independent CPU generator per seed (batch-size independent).

    Args:
        seeds: one seed per sample.
        shape: (channels, height, width).

    Returns:
        (len(seeds), *shape) float32.
    """
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample_latents(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler,
    prompts: Sequence[str],
    seeds: Sequence[int],
    guidance_scale: float = DEFAULT_GUIDANCE,
    steps: int = DEFAULT_STEPS,
    latent_size: int | None = None,
    batch_size: int = 256,
    negative_prompt: str = "",
) -> torch.Tensor:
    """Sample latents with deterministic DDIM (eta 0) and classifier-free guidance.

    A DDIM scheduler (``set_alpha_to_one=False`` as in SD) is built from ``scheduler.config``, so
    the given scheduler is not changed.
    The same (prompt, seed) pair gives the same latent whatever the batch composition.

    Args:
        unet: the denoiser (any LoRA hooks already applied).
        text_encoder: CLIP text model.
        tokenizer: CLIP tokenizer.
        scheduler: any diffusers scheduler with SD's training schedule.
        prompts: one prompt per sample.
        seeds: one noise seed per sample.
        guidance_scale: CFG scale; 1 disables the unconditional branch.
        steps: DDIM steps.
        latent_size: canvas side (default: ``unet.config.sample_size``).
        batch_size: samples per U-Net call (each call runs twice that with CFG).
        negative_prompt: the unconditional prompt.

    Returns:
        (B, 4, H, W) float32 latents on the CPU.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    size = int(latent_size or unet.config.sample_size)
    device = unet.device
    ddim = DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=False)
    ddim.set_timesteps(steps)
    uncond = encode_prompts(text_encoder, tokenizer, [negative_prompt]).to(unet.dtype)

    def predict(latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return unet(latents.to(unet.dtype), timesteps, encoder_hidden_states=cond.hidden_states).sample

    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        cond = Conditioning(encode_prompts(text_encoder, tokenizer, chunk).to(unet.dtype))
        latents = initial_noise(seeds[start : start + batch_size], (unet.config.in_channels, size, size))
        latents = (latents * ddim.init_noise_sigma).to(device)
        negative = Conditioning(uncond.expand(len(chunk), -1, -1))
        outputs.append(denoise(predict, ddim, latents, cond, negative, guidance_scale).cpu())
    return torch.cat(outputs)


def latents_to_rgb(latents: torch.Tensor, scale: int = 8) -> np.ndarray:
    """Show latents as colours: each colour vector's amount paints its display colour.

    Background (no colour) is black; negative amounts are ignored; pixels are enlarged by
    nearest-neighbour ``scale`` (8 gives the "pixel" size SD would decode to).

    Args:
        latents: (B, 4, H, W).
        scale: integer enlargement.

    Returns:
        (B, H*scale, W*scale, 3) uint8.
    """
    amounts = color_amounts(latents.detach().cpu()).clamp(min=0)
    palette = torch.tensor(DISPLAY_RGB, dtype=torch.float32)
    rgb = torch.einsum("bkhw,kr->bhwr", amounts, palette).clamp(0, 1)
    rgb = rgb.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return (rgb * 255).round().to(torch.uint8).numpy()


def image_grid(images: np.ndarray, columns: int, gap: int = 2, gap_value: int = 64) -> np.ndarray:
    """Tile (B, H, W, 3) uint8 images into one grid image, row by row.

    Returns:
        (rows*(H+gap)-gap, columns*(W+gap)-gap, 3) uint8.
    """
    count, height, width, _ = images.shape
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    grid = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), gap_value, dtype=np.uint8)
    for i in range(count):
        r, c = divmod(i, columns)
        grid[r * (height + gap) : r * (height + gap) + height, c * (width + gap) : c * (width + gap) + width] = images[i]
    return grid


def save_latent_grid(latents: torch.Tensor, path: str | Path, columns: int = 8, scale: int = 8) -> Path:
    """Write latents as a PNG grid (via :func:`latents_to_rgb`) and return the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(latents_to_rgb(latents, scale), columns)).save(path)
    return path
