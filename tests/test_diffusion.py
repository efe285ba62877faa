"""Timestep bookkeeping, CFG batching, v-prediction sampling and the gradient-free trajectory."""

from __future__ import annotations

import math

import pytest
import torch

from library.diffusion import (
    build_noise_scheduler,
    cfg_combine,
    guided_prediction,
    landing_timestep,
    legacy_timestep,
    partial_denoise,
)
from library.text_encoding import Conditioning
from tests.hand_schedule import scaled_linear_alphas_cumprod

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   steps_offset=1)
ALPHA_BAR = torch.tensor(scaled_linear_alphas_cumprod(), dtype=torch.float64)  # by hand from the betas, not the scheduler's


def oracle(x0: torch.Tensor, eps: torch.Tensor, prediction_type: str):
    """A perfect model: returns the true epsilon (or v) of x_t = a x0 + s eps at the queried t
    (alpha_bar computed by hand from SD's betas)."""

    def predict(latents, timesteps, cond):
        alpha_bar = ALPHA_BAR[timesteps.long()].float().view(-1, 1, 1, 1)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        # the noise actually in ``latents`` given the known x0 (works for stochastic samplers too)
        true_eps = (latents - a * x0.repeat(latents.shape[0] // x0.shape[0], 1, 1, 1)) / s
        if prediction_type == "epsilon":
            return true_eps
        x0_b = x0.repeat(latents.shape[0] // x0.shape[0], 1, 1, 1)
        return a * true_eps - s * x0_b

    return predict


def _cond(batch: int) -> Conditioning:
    return Conditioning(torch.zeros(batch, 1, 1))


def test_legacy_timestep_matches_sd_scripts():
    assert [legacy_timestep(k, 40) for k in (1, 2, 39)] == [974, 949, 24]


@pytest.mark.parametrize("steps", [10, 30, 40, 50])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_landing_timestep_is_the_next_grid_entry(steps, sampler, zero_terminal_snr):
    scheduler = build_noise_scheduler(SD_SCHEDULE, "epsilon", zero_terminal_snr, sampler)
    scheduler.set_timesteps(steps)
    grid = scheduler.timesteps.tolist()
    for k in range(1, steps):
        landed = landing_timestep(scheduler, k - 1)
        if sampler == "ddpm" or not zero_terminal_snr or 1000 % steps == 0:
            assert landed == grid[k]
        else:  # DDIM always steps by T // N, even on an uneven trailing grid
            assert landed == grid[k - 1] - 1000 // steps
    if not zero_terminal_snr:
        # sd-scripts' label is always noisier than where x_t really is
        assert all(legacy_timestep(k, steps) > landing_timestep(scheduler, k - 1) for k in range(1, steps))


def test_legacy_label_is_24_steps_off_at_40_steps():
    """The anchor's figure: with sd-scripts' own DDPM (steps_offset 0), x_t sits at 975 - 25k, labelled 999 - 25k."""
    scheduler = build_noise_scheduler({**SD_SCHEDULE, "steps_offset": 0}, "epsilon", False, "ddpm")
    scheduler.set_timesteps(40)
    assert [landing_timestep(scheduler, k - 1) for k in (1, 39)] == [950, 0]
    assert {legacy_timestep(k, 40) - landing_timestep(scheduler, k - 1) for k in range(1, 40)} == {24}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("k", [1, 7, 19])
def test_ddim_trajectory_with_a_perfect_model_lands_exactly_on_its_label(prediction_type, k):
    """With the true epsilon/v, DDIM (eta 0) keeps x0 and eps fixed, so after k steps x must be
    exactly sqrt(a_t) x0 + sqrt(1 - a_t) eps at the returned label t. This pins both the label and
    that the sampler reads v-predictions as v."""
    scheduler = build_noise_scheduler(SD_SCHEDULE, prediction_type, False, "ddim")
    scheduler.set_timesteps(20)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 4, 4, generator=generator)
    eps = torch.randn(2, 4, 4, 4, generator=generator)
    # "leading" spacing with steps_offset 1: the 20 steps sit at 951, 901, ..., 1 (every T / N = 50)
    a0 = ALPHA_BAR[951].float()
    x_start = a0.sqrt() * x0 + (1 - a0).sqrt() * eps
    x_t, label = partial_denoise(oracle(x0, eps, prediction_type), scheduler, x_start, k, _cond(2), _cond(2), 1.0)
    assert label == 951 - 50 * k
    a = ALPHA_BAR[label].float()
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_ddim_step_by_hand(prediction_type):
    """One DDIM (eta 0) step from t = 951 to 901 with an arbitrary model output, written out by hand
    (Song et al., 2021, eq. 12): x0_hat = (x - sqrt(1 - a_t) eps_hat) / sqrt(a_t),
    x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps_hat; a v-model's output v gives
    eps_hat = sqrt(a_t) v + sqrt(1 - a_t) x."""
    scheduler = build_noise_scheduler(SD_SCHEDULE, prediction_type, False, "ddim")
    scheduler.set_timesteps(20)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 2, 2, generator=generator, dtype=torch.float64)
    output = torch.randn(1, 4, 2, 2, generator=generator, dtype=torch.float64)
    x_prev, label = partial_denoise(lambda latents, timesteps, cond: output.float(), scheduler, x.float(), 1,
                                    _cond(1), _cond(1), 1.0)
    a_t, a_prev = ALPHA_BAR[951], ALPHA_BAR[901]
    eps_hat = output if prediction_type == "epsilon" else a_t.sqrt() * output + (1 - a_t).sqrt() * x
    x0_hat = (x - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
    assert label == 901
    assert torch.allclose(x_prev.double(), a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps_hat, rtol=1e-5, atol=1e-5)


def test_ddim_reading_v_as_epsilon_misses_the_label():
    """What sd-scripts does for v-models: the same perfect v-model sampled as epsilon goes off course."""
    v_scheduler = build_noise_scheduler(SD_SCHEDULE, "v_prediction", False, "ddim")
    eps_scheduler = build_noise_scheduler(SD_SCHEDULE, "epsilon", False, "ddim")
    for scheduler in (v_scheduler, eps_scheduler):
        scheduler.set_timesteps(20)
    generator = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1, 4, 4, 4, generator=generator), torch.randn(1, 4, 4, 4, generator=generator)
    a0 = ALPHA_BAR[951].float()
    x_start = a0.sqrt() * x0 + (1 - a0).sqrt() * eps
    v_model = oracle(x0, eps, "v_prediction")
    wrong, label = partial_denoise(v_model, eps_scheduler, x_start, 10, _cond(1), _cond(1), 1.0)
    a = ALPHA_BAR[label].float()
    assert not torch.allclose(wrong, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_trajectory_has_the_marginal_of_its_label(prediction_type):
    """DDPM is stochastic: with a perfect model, x_k ~ N(sqrt(a_t) x0, (1 - a_t) I) at the label t."""
    scheduler = build_noise_scheduler(SD_SCHEDULE, prediction_type, False, "ddpm")
    scheduler.set_timesteps(40)
    generator = torch.Generator().manual_seed(2)
    x0 = torch.full((4000, 4, 2, 2), 0.7)
    eps = torch.randn(x0.shape, generator=generator)
    # "leading" spacing, steps_offset 1, N = 40: the steps sit at 976, 951, ..., 1 (every 25)
    a0 = ALPHA_BAR[976].float()
    x_start = a0.sqrt() * x0 + (1 - a0).sqrt() * eps
    x_t, label = partial_denoise(oracle(x0, eps, prediction_type), scheduler, x_start, 25,
                                 _cond(4000), _cond(4000), 1.0, generator)
    assert label == 976 - 25 * 25
    a = ALPHA_BAR[label].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - a, rel=0.05)


def test_zero_terminal_snr_schedule_ends_in_pure_noise():
    scheduler = build_noise_scheduler(SD_SCHEDULE, "v_prediction", True, "ddpm")
    assert scheduler.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-6)
    scheduler.set_timesteps(40)
    assert int(scheduler.timesteps[0]) == 999


def test_cfg_combine_by_hand():
    assert torch.equal(cfg_combine(torch.tensor([1.0]), torch.tensor([3.0]), 3.0), torch.tensor([7.0]))


def test_guided_prediction_batches_cfg_and_skips_it_at_scale_one():
    calls = []

    def predict(latents, timesteps, cond):
        calls.append((latents.shape[0], timesteps.shape[0], cond.hidden_states.shape[0]))
        return cond.hidden_states.view(-1, 1, 1, 1).expand_as(latents)

    latents = torch.zeros(3, 4, 2, 2)
    timestep = torch.full((3,), 500)
    cond = Conditioning(torch.full((3, 1, 1), 2.0))
    uncond = Conditioning(torch.full((3, 1, 1), 1.0))
    out = guided_prediction(predict, latents, timestep, cond, uncond, 3.0)
    assert calls == [(6, 6, 6)]  # one call, uncond and cond halves together
    assert torch.equal(out, torch.full_like(latents, 1.0 + 3.0 * (2.0 - 1.0)))
    calls.clear()
    guided_prediction(predict, latents, timestep, cond, uncond, 1.0)
    assert calls == [(3, 3, 3)]  # no unconditional half at all


def test_partial_denoise_keeps_no_graph():
    """The trajectory must not carry gradient (sd-scripts back-propagates through all k calls)."""
    weight = torch.nn.Parameter(torch.tensor(0.5))
    scheduler = build_noise_scheduler(SD_SCHEDULE, "epsilon", False, "ddpm")
    scheduler.set_timesteps(10)

    graphs = []  # per model call: whether its output is part of an autograd graph

    def predict(latents, timesteps, cond):
        output = latents * weight
        graphs.append(output.grad_fn is not None)
        return output

    x_t, _ = partial_denoise(predict, scheduler, torch.randn(1, 4, 2, 2), 5, _cond(1), _cond(1), 3.0,
                             torch.Generator().manual_seed(0))
    assert graphs == [False] * 5  # no call inside the trajectory records a graph, not only the returned x_t
    assert not x_t.requires_grad and x_t.grad_fn is None


def test_partial_denoise_rejects_out_of_range_steps():
    scheduler = build_noise_scheduler(SD_SCHEDULE, "epsilon")
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError):
        partial_denoise(lambda *a: a[0], scheduler, torch.zeros(1, 4, 2, 2), 10, _cond(1), _cond(1), 1.0)
