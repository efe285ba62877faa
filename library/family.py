"""The small differences between SD 1.x/2.x and SDXL: prompt encoding and ``add_time_ids``.

The training loop is shared; it asks a :class:`ModelFamily` to fill the prompt cache and to
make the per-sample size conditioning (None for SD).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence

import torch

from library.models import LoadedModel
from library.text_encoding import PromptCache, encode_sd, encode_sdxl_part, sdxl_time_ids

logger = logging.getLogger(__name__)

ENCODE_BATCH = 16


class ModelFamily:
    """SD 1.x / 2.x: one CLIP text encoder, no additional conditioning."""

    name = "sd"
    tracker_name = "leco_train"
    recommended_resolution = 512

    def __init__(self, max_token_length: int = 75, clip_skip: int | None = None):
        self.max_token_length = max_token_length
        self.clip_skip = clip_skip

    def encode(self, model: LoadedModel, prompts: Sequence[str], device: torch.device,
               dtype: torch.dtype = torch.float32) -> PromptCache:
        """Encode each distinct prompt once (batched) into a new cache, on ``device``.

        The text encoders visit ``device`` one at a time: each is loaded in ``dtype``, moved, used
        for every prompt, and released before the next is loaded (and long before the U-Net), so
        neither RAM nor VRAM ever holds two of them.
        """
        unique = list(dict.fromkeys(prompts))
        parts: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = []
        for index in range(len(model.text_encoder_loaders)):
            encoder = model.load_text_encoder(index, dtype).to(device)
            parts.append([self._encode_chunk(index, encoder, model.tokenizers[index], unique[start:start + ENCODE_BATCH])
                          for start in range(0, len(unique), ENCODE_BATCH)])
            del encoder
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        cache = PromptCache()
        for chunk_index, start in enumerate(range(0, len(unique), ENCODE_BATCH)):
            outputs = [encoder_parts[chunk_index] for encoder_parts in parts]
            hidden = torch.cat([hidden for hidden, _ in outputs], dim=-1)
            pooled = next((pooled for _, pooled in outputs if pooled is not None), None)
            cache.add(unique[start:start + ENCODE_BATCH], hidden, pooled)
        return cache

    def _encode_chunk(self, index: int, encoder, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return encode_sd(encoder, tokenizer, prompts, self.max_token_length, self.clip_skip), None

    def time_ids(self, height: int, width: int, generator: torch.Generator, dynamic_crops: bool = False) -> torch.Tensor | None:
        """SD has no size conditioning."""
        return None


class SDXLFamily(ModelFamily):
    """SDXL: two text encoders, pooled embedding and ``add_time_ids`` size conditioning."""

    name = "sdxl"
    tracker_name = "sdxl_leco_train"
    recommended_resolution = 1024

    def _encode_chunk(self, index: int, encoder, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        # penultimate layers of both encoders, concatenated; the pooled embedding comes from encoder 2
        return encode_sdxl_part(encoder, tokenizer, prompts, self.max_token_length, pooled=index == 1)

    def time_ids(self, height: int, width: int, generator: torch.Generator, dynamic_crops: bool = False) -> torch.Tensor:
        """``(orig_h, orig_w, crop_top, crop_left, height, width)``.

        With ``dynamic_crops`` the original size is 1-3x the target and the crop a random window of it,
        teaching the LoRA under the size conditioning SDXL saw in training (as sd-scripts does).
        """
        if not dynamic_crops:
            return sdxl_time_ids((height, width), (0, 0), (height, width))
        factor = 1.0 + 2.0 * float(torch.rand((), generator=generator))
        original = (int(height * factor), int(width * factor))
        top = int(torch.randint(0, original[0] - height + 1, (), generator=generator))
        left = int(torch.randint(0, original[1] - width + 1, (), generator=generator))
        return sdxl_time_ids(original, (top, left), (height, width))


def family_for(name: str, max_token_length: int = 75, clip_skip: int | None = None) -> ModelFamily:
    """The family object for ``"sd"`` or ``"sdxl"``."""
    if name == "sdxl":
        return SDXLFamily(max_token_length, None)
    return ModelFamily(max_token_length, clip_skip)
