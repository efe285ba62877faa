"""Tokenization windows, clip skip, and SD / SDXL prompt conditioning on tiny text encoders."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.text_encoding import (
    Conditioning,
    PromptCache,
    encode_sd,
    encode_sdxl,
    join_chunks,
    sdxl_time_ids,
    tokenize_chunks,
)

LONG = ", ".join(["a red circle"] * 40)  # well over 75 tokens


@pytest.fixture(scope="module")
def sd_parts(tiny_sd_dir):
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_sd_dir / "tokenizer"), model_max_length=77)
    encoder = CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder").eval()
    return encoder, tokenizer


@pytest.fixture(scope="module")
def sdxl_parts(tiny_sdxl_dir):
    tokenizers = [CLIPTokenizer.from_pretrained(str(tiny_sdxl_dir / name), model_max_length=77) for name in ("tokenizer", "tokenizer_2")]
    encoders = [CLIPTextModel.from_pretrained(tiny_sdxl_dir, subfolder="text_encoder").eval(),
                CLIPTextModelWithProjection.from_pretrained(tiny_sdxl_dir, subfolder="text_encoder_2").eval()]
    return encoders, tokenizers


def test_single_window_is_the_plain_tokenization(sd_parts):
    _, tokenizer = sd_parts
    windows = tokenize_chunks(tokenizer, ["a red circle", ""], 75)
    plain = tokenizer(["a red circle", ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert windows.shape == (2, 1, 77)
    assert torch.equal(windows[:, 0], plain)


def test_long_prompts_are_split_into_75_token_windows(sd_parts):
    _, tokenizer = sd_parts
    windows = tokenize_chunks(tokenizer, [LONG, "short"], 150)
    assert windows.shape == (2, 2, 77)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert (windows[:, :, 0] == bos).all()
    assert windows[0, 0, -1] == eos  # the text runs past the first window: it still ends in EOS
    full = tokenizer([LONG], truncation=False).input_ids[0]
    assert windows[0, 0, 1:76].tolist() == full[1:76]
    assert windows[0, 1, 1:76].tolist() == full[76:151]
    assert windows[1, 1, 1] == eos  # a window that starts in padding gets an EOS after BOS


def test_join_chunks_keeps_one_bos_and_final_token():
    states = torch.arange(2 * 3 * 77).float().view(1, 3, 77, 2).repeat(1, 1, 1, 1)[..., :1].expand(1, 3, 77, 4)
    joined = join_chunks(states)
    assert joined.shape == (1, 3 * 75 + 2, 4)
    assert joined[0, 0, 0] == states[0, 0, 0, 0]  # first BOS
    assert joined[0, -1, 0] == states[0, 2, 76, 0]  # last window's final token
    assert joined[0, 76, 0] == states[0, 1, 1, 0]  # second window starts after its BOS


def test_encode_sd_shapes_and_clip_skip(sd_parts):
    encoder, tokenizer = sd_parts
    hidden = encode_sd(encoder, tokenizer, ["a red circle"], 75)
    assert hidden.shape == (1, 77, encoder.config.hidden_size)
    ids = tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        output = encoder(ids, output_hidden_states=True)
        assert torch.allclose(hidden, output.last_hidden_state)
        skipped = encode_sd(encoder, tokenizer, ["a red circle"], 75, clip_skip=2)
        assert torch.allclose(skipped, encoder.final_layer_norm(output.hidden_states[-2]), atol=1e-6)
    assert encode_sd(encoder, tokenizer, [LONG], 225).shape == (1, 227, encoder.config.hidden_size)


def test_encode_sdxl_concatenates_penultimate_states_and_pools_from_encoder_2(sdxl_parts):
    encoders, tokenizers = sdxl_parts
    hidden, pooled = encode_sdxl(encoders, tokenizers, ["a red circle", ""], 75)
    assert hidden.shape == (2, 77, 32 + 48) and pooled.shape == (2, 48)
    with torch.no_grad():
        ids1 = tokenizers[0](["a red circle", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        ids2 = tokenizers[1](["a red circle", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        first = encoders[0](ids1, output_hidden_states=True).hidden_states[-2]
        second = encoders[1](ids2, output_hidden_states=True)
    assert torch.allclose(hidden, torch.cat([first, second.hidden_states[-2]], dim=-1), atol=1e-6)
    assert torch.allclose(pooled, second.text_embeds, atol=1e-6)
    long_hidden, long_pooled = encode_sdxl(encoders, tokenizers, [LONG], 150)
    assert long_hidden.shape == (1, 152, 80) and long_pooled.shape == (1, 48)


@pytest.mark.parametrize("size", [(1024, 1024), (832, 1216)])
def test_sdxl_time_ids_are_exact_float32(size):
    ids = sdxl_time_ids(size, (0, 0), size)
    assert ids.dtype == torch.float32
    assert ids.tolist() == [size[0], size[1], 0, 0, size[0], size[1]]
    assert sdxl_time_ids((1001, 999), (3, 5), (1001, 999)).tolist() == [1001, 999, 3, 5, 1001, 999]


def test_prompt_cache_and_conditioning_batches():
    cache = PromptCache()
    cache.add(["a", "b"], torch.tensor([[[1.0]], [[2.0]]]), torch.tensor([[10.0], [20.0]]))
    cond = cache.conditioning(["b", "a", "b"], torch.zeros(3, 6))
    assert cond.hidden_states.flatten().tolist() == [2.0, 1.0, 2.0]
    assert cond.pooled.flatten().tolist() == [20.0, 10.0, 20.0]
    kwargs = cond.unet_kwargs()
    assert set(kwargs) == {"encoder_hidden_states", "added_cond_kwargs"}
    assert Conditioning.cat([cond, cond]).hidden_states.shape[0] == 6
    with pytest.raises(KeyError):
        cache.conditioning(["missing"], torch.zeros(1, 6))
    with pytest.raises(ValueError):
        cache.conditioning(["a"])  # SDXL conditioning without time ids is a bug
