"""The small differences between SD 1.x/2.x and SDXL: prompt encoding and ``add_time_ids``.

The training loop is shared; it asks a :class:`ModelFamily` to fill the prompt cache and to
make the per-sample size conditioning (None for SD).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from library.models import LoadedModel
from library.text_encoding import PromptCache, encode_sd, encode_sdxl, sdxl_time_ids

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

    def encode(self, model: LoadedModel, prompts: Sequence[str], device: torch.device) -> PromptCache:
        """Encode each distinct prompt once (batched) into a new cache, on ``device``."""
        cache = PromptCache()
        unique = list(dict.fromkeys(prompts))
        for encoder in model.text_encoders:
            encoder.to(device).eval().requires_grad_(False)
        for start in range(0, len(unique), ENCODE_BATCH):
            chunk = unique[start:start + ENCODE_BATCH]
            cache.add(chunk, *self._encode_chunk(model, chunk))
        for encoder in model.text_encoders:
            encoder.to("cpu")
        return cache

    def _encode_chunk(self, model: LoadedModel, prompts: list[str]):
        hidden = encode_sd(model.text_encoders[0], model.tokenizers[0], prompts, self.max_token_length, self.clip_skip)
        return (hidden,)

    def time_ids(self, height: int, width: int, generator: torch.Generator, dynamic_crops: bool = False) -> torch.Tensor | None:
        """SD has no size conditioning."""
        return None


class SDXLFamily(ModelFamily):
    """SDXL: two text encoders, pooled embedding and ``add_time_ids`` size conditioning."""

    name = "sdxl"
    tracker_name = "sdxl_leco_train"
    recommended_resolution = 1024

    def _encode_chunk(self, model: LoadedModel, prompts: list[str]):
        return encode_sdxl(model.text_encoders, model.tokenizers, prompts, self.max_token_length)

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
