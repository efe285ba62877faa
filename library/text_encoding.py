"""Prompt tokenization (75-token chunking) and text encoding for SD 1.x/2.x and SDXL.

Every distinct prompt is encoded once, in batches, before training; the results are kept in a
:class:`PromptCache` and the text encoders can then leave the accelerator.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

CHUNK = 75  # tokens per CLIP window, without BOS/EOS


def tokenize_chunks(tokenizer, prompts: Sequence[str], max_token_length: int = 75) -> torch.Tensor:
    """Token ids in 77-token windows: ``(B, n_chunks, 77)`` with ``n_chunks = max_token_length // 75``.

    Each window is ``[BOS] + 75 tokens + [EOS or pad]``. A window whose text runs to its end gets
    an EOS at the end; a window that starts in padding gets an EOS right after BOS, so every
    window has one (the pooled output reads the EOS position).
    """
    n_chunks = max_token_length // CHUNK
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_token_length + 2,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    windows = []
    for index in range(n_chunks):
        body = ids[:, 1 + index * CHUNK: 1 + (index + 1) * CHUNK].clone()  # (B, 75)
        last = torch.full((ids.shape[0], 1), pad, dtype=ids.dtype)
        runs_on = (body[:, -1] != eos) & (body[:, -1] != pad)
        last[runs_on] = eos
        starts_in_padding = body[:, 0] == pad
        body[starts_in_padding, 0] = eos
        first = torch.full((ids.shape[0], 1), bos, dtype=ids.dtype)
        windows.append(torch.cat([first, body, last], dim=1))
    return torch.stack(windows, dim=1)


def join_chunks(states: torch.Tensor) -> torch.Tensor:
    """Join per-window hidden states ``(B, n, 77, D)`` into ``(B, 75 * n + 2, D)``.

    The first window keeps its BOS, the last its final token; inner BOS/EOS positions are dropped.
    """
    n_chunks = states.shape[1]
    if n_chunks == 1:
        return states[:, 0]
    parts = [states[:, 0, :-1]]
    parts += [states[:, index, 1:-1] for index in range(1, n_chunks - 1)]
    parts.append(states[:, -1, 1:])
    return torch.cat(parts, dim=1)


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers >= 5.6 flattened CLIPTextModel; older versions (and WithProjection) nest it.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


@torch.no_grad()
def encode_sd(text_encoder, tokenizer, prompts: Sequence[str], max_token_length: int = 75,
              clip_skip: int | None = None) -> torch.Tensor:
    """SD 1.x/2.x prompt embeddings ``(B, 75 * n + 2, D)``.

    Without ``clip_skip`` (or 1) this is the last hidden state after the final layer norm; with
    ``clip_skip = n`` it is the n-th last layer's output, passed through the final layer norm
    (the sd-scripts / A1111 convention).
    """
    windows = tokenize_chunks(tokenizer, prompts, max_token_length)
    batch, n_chunks, length = windows.shape
    flat = windows.view(batch * n_chunks, length).to(text_encoder.device)
    output = text_encoder(flat, output_hidden_states=True)
    if clip_skip is None or clip_skip <= 1:
        hidden = output.last_hidden_state
    else:
        hidden = _final_layer_norm(text_encoder)(output.hidden_states[-clip_skip])
    return join_chunks(hidden.view(batch, n_chunks, length, -1))


@torch.no_grad()
def encode_sdxl_part(encoder, tokenizer, prompts: Sequence[str], max_token_length: int = 75,
                     pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One SDXL text encoder's share: its penultimate layer ``(B, L, D_i)`` without the final layer
    norm and, with ``pooled``, the projection of its EOS token from the first 75-token window ``(B, P)``.

    Each encoder can be encoded on its own (and then released) before the next one is loaded.
    """
    windows = tokenize_chunks(tokenizer, prompts, max_token_length)
    batch, n_chunks, length = windows.shape
    flat = windows.view(batch * n_chunks, length).to(encoder.device)
    output = encoder(flat, output_hidden_states=True)
    hidden = join_chunks(output.hidden_states[-2].view(batch, n_chunks, length, -1))
    return hidden, output.text_embeds.view(batch, n_chunks, -1)[:, 0] if pooled else None


@torch.no_grad()
def encode_sdxl(text_encoders: Sequence, tokenizers: Sequence, prompts: Sequence[str],
                max_token_length: int = 75) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning: ``(hidden (B, L, D1 + D2), pooled (B, P))``.

    Hidden states are both encoders' penultimate layers, concatenated along features (768 + 1280 =
    2048 for the real model), without the final layer norm. The pooled embedding is text encoder
    2's projection of its EOS token, from the first 75-token window.
    """
    first, _ = encode_sdxl_part(text_encoders[0], tokenizers[0], prompts, max_token_length)
    second, pooled = encode_sdxl_part(text_encoders[1], tokenizers[1], prompts, max_token_length, pooled=True)
    return torch.cat([first, second], dim=-1), pooled


@dataclass
class Conditioning:
    """What the U-Net is conditioned on, batched.

    Attributes:
        hidden_states: ``(B, L, D)`` prompt embeddings (``encoder_hidden_states``).
        pooled: ``(B, P)`` SDXL pooled text embedding, else None.
        time_ids: ``(B, 6)`` SDXL ``add_time_ids`` (original size, crop top-left, target size), else None.
    """

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def unet_kwargs(self) -> dict:
        kwargs: dict = {"encoder_hidden_states": self.hidden_states}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def repeat(self, times: int) -> Conditioning:
        """Each row repeated ``times`` times in place (row0, row0, row1, row1, ...)."""
        return Conditioning(*(None if t is None else t.repeat_interleave(times, dim=0) for t in self._fields()))

    def _fields(self):
        return (self.hidden_states, self.pooled, self.time_ids)

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        fields = zip(*(item._fields() for item in items))
        return Conditioning(*(None if parts[0] is None else torch.cat(parts, dim=0) for parts in fields))


class PromptCache:
    """Prompt -> embeddings, filled once before training. A missing prompt is a bug: KeyError."""

    def __init__(self) -> None:
        self._hidden: dict[str, torch.Tensor] = {}
        self._pooled: dict[str, torch.Tensor] = {}

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._hidden

    def __len__(self) -> int:
        return len(self._hidden)

    def add(self, prompts: Sequence[str], hidden: torch.Tensor, pooled: torch.Tensor | None = None) -> None:
        for index, prompt in enumerate(prompts):
            self._hidden[prompt] = hidden[index]
            if pooled is not None:
                self._pooled[prompt] = pooled[index]

    def to(self, device, dtype: torch.dtype) -> PromptCache:
        for store in (self._hidden, self._pooled):
            for prompt, value in store.items():
                store[prompt] = value.to(device=device, dtype=dtype)
        return self

    def conditioning(self, prompts: Sequence[str], time_ids: torch.Tensor | None = None) -> Conditioning:
        """Stack the cached embeddings of ``prompts`` (one row each)."""
        hidden = torch.stack([self._hidden[prompt] for prompt in prompts])
        pooled = torch.stack([self._pooled[prompt] for prompt in prompts]) if self._pooled else None
        if pooled is not None and time_ids is None:
            raise ValueError("SDXL conditioning needs time_ids")
        return Conditioning(hidden, pooled, time_ids)


def sdxl_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL ``add_time_ids`` row: ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` as float32.

    Kept in float32: bf16 cannot represent every size exactly (e.g. 1000 -> 1000, 1001 -> 1000).
    """
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
