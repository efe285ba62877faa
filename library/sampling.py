"""Sample images: a grid of prompts (rows) x LoRA multipliers (columns), during or after training.

Latents are decoded through the model's VAE when it has one (loaded only when sampling asks
for it); models without a VAE (such as the built-in concept world, whose latents *are* the
picture) are shown through a latent preview.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ContextManager

import numpy as np
import torch
from PIL import Image, ImageDraw

from library.diffusion import guided_prediction, schedule_options
from library.sample_prompts import SamplePrompt
from library.text_encoding import Conditioning, PromptCache

logger = logging.getLogger(__name__)

SAMPLERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddpm": "DDPMScheduler",
}


def build_sample_scheduler(name: str, scheduler_config: dict, prediction_type: str, zero_terminal_snr: bool = False,
                           steps: int | None = None):
    """A diffusers scheduler of the given kind on the model's noise schedule (:func:`schedule_options`)."""
    import diffusers

    options = schedule_options(scheduler_config, prediction_type, zero_terminal_snr, steps)
    if name in ("ddim", "ddpm"):
        options["clip_sample"] = False
    if name == "ddim":
        options["set_alpha_to_one"] = False
    return getattr(diffusers, SAMPLERS[name])(**options)


@torch.no_grad()
def denoise(predict: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor], scheduler, latents: torch.Tensor,
            cond: Conditioning, uncond: Conditioning, guidance_scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Run every step of ``scheduler`` (after ``set_timesteps``) from ``latents`` with CFG, without gradient.

    ``latents`` are the starting noise already scaled by ``init_noise_sigma``, on the model's device.
    The unconditional and conditional halves share one batched call per step; at guidance 1 there is
    no unconditional half (:func:`library.diffusion.guided_prediction`). Returns float32 latents.
    """
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        timesteps = t.expand(latents.shape[0]).to(latents.device)
        noise_pred = guided_prediction(predict, model_input, timesteps, cond, uncond, guidance_scale).float()
        latents = scheduler.step(noise_pred, t, latents.float(), generator=generator).prev_sample
    return latents


@torch.no_grad()
def sample_latents(predict: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor], scheduler,
                   cond: Conditioning, uncond: Conditioning, shape: tuple[int, ...], steps: int, guidance_scale: float,
                   generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Sample latents from pure noise (drawn from ``generator`` on the CPU) with CFG."""
    scheduler.set_timesteps(steps, device=device)
    latents = (torch.randn(shape, generator=generator) * scheduler.init_noise_sigma).to(device)
    return denoise(predict, scheduler, latents, cond, uncond, guidance_scale, generator)


def latent_preview(latents: torch.Tensor) -> np.ndarray:
    """(B, 4, h, w) latents -> (B, h*8, w*8, 3) uint8, first three channels as RGB, upscaled.

    For models without a VAE (e.g. the concept world); real models are decoded through their VAE.
    """
    rgb = latents[:, :3].float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    rgb = rgb.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    return rgb.permute(0, 2, 3, 1).cpu().numpy()


def vae_decoder(vae, device: torch.device, dtype: torch.dtype = torch.float32) -> Callable[[torch.Tensor], np.ndarray]:
    """A decoder through an ``AutoencoderKL`` (moved to ``device`` only while decoding)."""
    scaling = getattr(vae.config, "scaling_factor", 0.18215)
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> np.ndarray:
        vae.to(device, dtype)
        images = vae.decode((latents / scaling + shift).to(device, dtype)).sample
        vae.to("cpu")
        images = images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()

    return decode


def make_grid(images: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str], column_labels: Sequence[str]) -> Image.Image:
    """Rows x columns of equally sized uint8 images with text labels on the top and left."""
    tile_h, tile_w = images[0][0].shape[:2]
    label_w, label_h, pad = 160, 18, 2
    width = label_w + len(column_labels) * (tile_w + pad)
    height = label_h + len(row_labels) * (tile_h + pad)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(column_labels):
        draw.text((label_w + column * (tile_w + pad) + 2, 3), label, fill=(0, 0, 0))
    for row, label in enumerate(row_labels):
        top = label_h + row * (tile_h + pad)
        text = label if len(label) <= 24 else label[:23] + "…"
        draw.text((3, top + tile_h // 2 - 6), text, fill=(0, 0, 0))
        for column, image in enumerate(images[row]):
            grid.paste(Image.fromarray(image), (label_w + column * (tile_w + pad), top))
    return grid


class SampleGridMaker:
    """Makes sample grids with the network being trained (rows: prompts, columns: multipliers).

    Args:
        predict: one U-Net call ``(latents, timesteps, conditioning) -> prediction``.
        network: the LoRA network (its multiplier is set per column and restored afterwards).
        cache: prompt embeddings, including every sample prompt and negative.
        time_ids_fn: the family's SDXL size conditioning (None for SD).
        scheduler_factory: ``name -> scheduler`` on the model's schedule.
        decode: latents -> uint8 images.
    """

    def __init__(self, predict, network, cache: PromptCache, time_ids_fn, scheduler_factory, decode, device: torch.device,
                 default_size: tuple[int, int], autocast: Callable[[], ContextManager] = contextlib.nullcontext):
        self.predict = predict
        self.network = network
        self.cache = cache
        self.time_ids_fn = time_ids_fn
        self.scheduler_factory = scheduler_factory
        self.decode = decode
        self.device = device
        self.default_size = default_size
        self.autocast = autocast

    def _one(self, prompt: SamplePrompt, multiplier: float, sampler: str, index: int) -> np.ndarray:
        height = prompt.height or self.default_size[0]
        width = prompt.width or self.default_size[1]
        generator = torch.Generator().manual_seed(prompt.seed if prompt.seed is not None else 1000 + index)
        time_ids = self.time_ids_fn(height, width, generator, False)
        rows = None if time_ids is None else time_ids.to(self.device).unsqueeze(0)
        cond = self.cache.conditioning([prompt.prompt], rows)
        uncond = self.cache.conditioning([prompt.negative], rows)
        with self.network.multiplier_context(multiplier):
            latents = sample_latents(self.predict, self.scheduler_factory(sampler), cond, uncond,
                                     (1, 4, height // 8, width // 8), prompt.steps, prompt.guidance_scale, generator, self.device)
        return self.decode(latents)[0]

    def cells(self, prompts: Sequence[SamplePrompt], multipliers: Sequence[float], sampler: str,
              shard: tuple[int, int] = (0, 1), should_stop: Callable[[], bool] = lambda: False) -> dict[tuple[int, int], np.ndarray]:
        """This process's share of the grid: ``{(row, column): image}`` for every cell whose index
        ``row * len(multipliers) + column`` is ``rank`` modulo ``world`` (``shard = (rank, world)``).

        Stops early (returning what it has) once ``should_stop()`` is true.
        """
        rank, world = shard
        was_training = self.network.training
        self.network.eval()
        images: dict[tuple[int, int], np.ndarray] = {}
        try:
            for index, prompt in enumerate(prompts):
                for column, multiplier in enumerate(multipliers):
                    if (index * len(multipliers) + column) % world != rank:
                        continue
                    if should_stop():
                        return images
                    images[(index, column)] = self._one(prompt, multiplier, sampler, index)
        finally:
            self.network.train(was_training)
        return images

    @staticmethod
    def compose(cells: dict[tuple[int, int], np.ndarray], prompts: Sequence[SamplePrompt],
                multipliers: Sequence[float]) -> Image.Image | None:
        """The grid of all cells (rows: prompts, columns: multipliers), or None when some are missing."""
        if len(cells) != len(prompts) * len(multipliers):
            return None
        images = [[cells[(row, column)] for column in range(len(multipliers))] for row in range(len(prompts))]
        return make_grid(images, [prompt.prompt or '""' for prompt in prompts], [f"x{m:g}" for m in multipliers])


def save_grid(image: Image.Image, folder: Path, name: str) -> Path:
    """Write a PNG atomically into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    tmp = folder / f".{name}.tmp.png"
    image.save(tmp)
    tmp.replace(path)
    return path
