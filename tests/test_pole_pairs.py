"""Slider poles that share x_t are trained from one x_t and one frozen call (library.pole_pairs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library import pole_pairs
from library.config import LecoConfig
from library.pole_pairs import pair_loss, pole_partners
from library.prompts import parse_prompt_text
from tests.test_trajectories import PERSISTENT_SLIDER, UNetCalls, make_persistent

TWO_POLES = PERSISTENT_SLIDER + "multiplier = 1.5\n"

ONE_POLE = """
resolution = 64
batch_size = 2
[[targets]]
target_class = "girl"
positive = "girl, long hair"
"""

MIXED = TWO_POLES + """
[[prompts]]
target = "van gogh"
[[targets]]
target_class = "girl"
negative = "girl, short hair"
neutrals = ["a", "b"]
"""


def settings_of(text: str):
    return parse_prompt_text(text, Path("."))


def test_poles_are_paired_only_where_their_x_t_is_the_same():
    two, one = settings_of(TWO_POLES), settings_of(ONE_POLE)
    # with the LoRA sampling, +m and -m make different x_t
    assert pole_partners(two, False, 1.0) == {} and pole_partners(one, False, 3.0) == {}
    # frozen sampling: two poles share x_t only without a CFG negative (each direction's negative is the other pole)
    assert pole_partners(two, True, 3.0) == {}
    assert pole_partners(two, True, 1.0) == {two[0]: two[1], two[1]: two[0]}
    # one pole: both directions are set against "", so they share x_t at any guidance
    assert pole_partners(one, True, 3.0) == {one[0]: one[1], one[1]: one[0]}
    mixed = settings_of(MIXED)
    partners = pole_partners(mixed, True, 1.0)
    assert len(partners) == 6  # the two-pole target and each neutral of the one-pole target; not the [[prompts]] entry
    assert all(partners[partners[s]] is s and partners[s].neutral == s.neutral for s in partners)
    assert all(s.source.startswith("[[targets]]") for s in partners)


def _losses_and_grads(step, settings, latents, timesteps):
    params = [param for param in step.network.parameters() if param.requires_grad]
    plus, minus = settings
    separate = (step.loss_at(plus, latents, timesteps, None) + step.loss_at(minus, latents, timesteps, None)) / 2
    separate_grads = torch.autograd.grad(separate, params)
    paired = pair_loss(step, plus, minus, latents, timesteps, None)
    paired_grads = torch.autograd.grad(paired, params)
    return separate, separate_grads, paired, paired_grads


@pytest.mark.parametrize("per_sample", [True, False])
def test_pair_loss_is_the_mean_of_the_two_poles_losses(tiny_sd_dir, monkeypatch, per_sample):
    settings = settings_of(TWO_POLES)
    config = LecoConfig(max_denoising_steps=6, denoise_with_frozen=True, denoise_guidance_scale=1.0, min_snr_gamma=5.0)
    step = make_persistent(tiny_sd_dir, config, settings=settings, trajectory="fresh")
    monkeypatch.setattr(pole_pairs, "supports_per_sample_multiplier", lambda network: per_sample)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([101, 701])
    separate, separate_grads, paired, paired_grads = _losses_and_grads(step, settings, latents, timesteps)
    assert paired.item() == pytest.approx(separate.item(), rel=1e-5)
    for a, b in zip(separate_grads, paired_grads):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-4)
    recorder = UNetCalls(step)
    pair_loss(step, *settings, latents, timesteps, None)
    frozen, *training = recorder.calls
    assert frozen["batch"] == 6 and frozen["multiplier"] == 0.0  # eps_P, eps_N, eps_neutral: one call for both targets
    if per_sample:
        assert [call["batch"] for call in training] == [4]
        assert training[0]["multiplier"] == [1.5, 1.5, -1.5, -1.5] and training[0]["timesteps"] == [101, 701] * 2
    else:
        assert [(call["batch"], call["multiplier"]) for call in training] == [(2, 1.5), (2, -1.5)]
    assert not isinstance(step.network.multiplier, torch.Tensor)  # left as a number for whatever runs next


def test_a_fresh_step_on_either_pole_trains_both_from_one_trajectory(tiny_sd_dir):
    settings = settings_of(ONE_POLE)
    step = make_persistent(tiny_sd_dir, LecoConfig(max_denoising_steps=6, denoise_with_frozen=True), settings=settings,
                           trajectory="fresh")
    recorder = UNetCalls(step)
    result = step(settings[1], torch.Generator().manual_seed(1))
    k = result.denoise_steps
    assert len(recorder.calls) == k + 2
    assert {call["multiplier"] for call in recorder.calls[:k]} == {0.0}  # the frozen trajectory
    assert recorder.calls[k]["batch"] == 6  # "girl, long hair", the neutral "girl" and "", once for both targets
    assert recorder.calls[k + 1]["batch"] == 4 and recorder.calls[k + 1]["multiplier"] == [-1.0, -1.0, 1.0, 1.0]  # drawn pole first


def test_persistent_poles_share_one_chain_set(tiny_sd_dir):
    settings = settings_of(ONE_POLE)
    step = make_persistent(tiny_sd_dir, LecoConfig(max_denoising_steps=6, denoise_with_frozen=True), settings=settings)
    generator = torch.Generator().manual_seed(2)
    step(settings[1], generator)
    step(settings[0], generator)
    assert list(step.chains) == [(settings[0], 64, 64)]  # owned by the + direction
    recorder = UNetCalls(step)
    before = step.last_positions
    step(settings[1], generator)
    assert step.last_positions == [p % 5 + 1 for p in before]  # the shared chains advanced once
    assert [call["batch"] for call in recorder.calls] == [4, 6, 4]  # CFG advance, frozen for both, training at +-m


def test_pair_loss_keeps_every_tensor_on_the_training_device(tiny_sd_dir):
    settings = settings_of(ONE_POLE)
    step = make_persistent(tiny_sd_dir, LecoConfig(max_denoising_steps=6, denoise_with_frozen=True, loss_type="huber",
                                                   min_snr_gamma=5.0), settings=settings, trajectory="fresh")
    meta = torch.device("meta")
    step.unet.to(meta)
    step.network.to(meta)
    step.cache.to(meta, torch.float32)
    step.device = meta
    loss = pair_loss(step, *settings, torch.zeros(2, 4, 8, 8, device=meta), torch.tensor([101, 701]), None)
    assert loss.device == meta and loss.requires_grad
