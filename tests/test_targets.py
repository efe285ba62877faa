"""Every formula of the training step against a hand computation on small tensors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from library.prompts import parse_prompt_text
from library.targets import build_target, huber_threshold, min_snr_weights, per_sample_loss


def sd_alphas_cumprod() -> np.ndarray:
    """SD's scaled-linear schedule, computed independently of diffusers."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- targets --------------------------------------------------------------------------------


def test_erase_and_enhance_targets_by_hand():
    neutral, positive, unconditional = t([[1.0, 2.0]]), t([[3.0, 5.0]]), t([[1.0, 1.0]])
    # offset = 2 * ([3, 5] - [1, 1]) = [4, 8]
    assert torch.equal(build_target(neutral, positive, unconditional, 2.0, "erase"), t([[-3.0, -6.0]]))
    assert torch.equal(build_target(neutral, positive, unconditional, 2.0, "enhance"), t([[5.0, 10.0]]))


def test_guidance_zero_gives_the_neutral_prediction():
    neutral = t([[0.5, -0.5]])
    assert torch.equal(build_target(neutral, t([[9.0, 9.0]]), t([[1.0, 2.0]]), 0.0, "erase"), neutral)


def test_unknown_action_is_rejected():
    with pytest.raises(ValueError):
        build_target(t([0.0]), t([0.0]), t([0.0]), 1.0, "swap")


def _predictions() -> dict[str, torch.Tensor]:
    # Frozen-model predictions by prompt, chosen so every combination is distinguishable.
    return {"cls": t([[10.0]]), "P": t([[13.0]]), "N": t([[11.0]]), "": t([[10.5]])}


def _target_for(setting) -> torch.Tensor:
    eps = _predictions()
    return build_target(eps[setting.neutral], eps[setting.positive], eps[setting.negative],
                        setting.guidance_scale, setting.action)


def test_slider_with_both_poles_targets_each_direction():
    text = 'guidance_scale = 2.0\n[[targets]]\ntarget_class = "cls"\npositive = "P"\nnegative = "N"\nmultiplier = 1.5'
    plus, minus = parse_prompt_text(text, Path("."))
    # +m: eps_neu + g (eps_P - eps_N) = 10 + 2 * (13 - 11) = 14;  -m: 10 - 4 = 6
    assert plus.multiplier == 1.5 and torch.equal(_target_for(plus), t([[14.0]]))
    assert minus.multiplier == -1.5 and torch.equal(_target_for(minus), t([[6.0]]))
    # each direction denoises with the opposite pole as CFG negative
    assert (plus.prompt, plus.negative) == ("cls", "N")
    assert (minus.prompt, minus.negative) == ("cls", "P")


def test_slider_with_one_pole_sets_it_against_the_empty_prompt():
    only_p = parse_prompt_text('[[targets]]\ntarget_class = "cls"\npositive = "P"', Path("."))
    # +: 10 + (13 - 10.5) = 12.5; -: 10 - 2.5 = 7.5
    assert [float(_target_for(s)) for s in only_p] == [12.5, 7.5]
    assert [s.multiplier for s in only_p] == [1.0, -1.0]
    only_n = parse_prompt_text('[[targets]]\ntarget_class = "cls"\nnegative = "N"', Path("."))
    # +: 10 - (11 - 10.5) = 9.5; -: 10 + 0.5 = 10.5
    assert [float(_target_for(s)) for s in only_n] == [9.5, 10.5]


def test_targets_in_v_space_are_the_image_of_epsilon_targets():
    """v = (eps - s x_t) / a is affine in eps with a shared x_t term, so building the target in v
    space equals mapping the epsilon-space target to v (the coefficients 1, +g, -g sum to 1)."""
    generator = torch.Generator().manual_seed(0)
    alpha_bar = 0.3
    a, s = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    x_t = torch.randn(2, 4, 3, 3, generator=generator)
    eps = [torch.randn(2, 4, 3, 3, generator=generator) for _ in range(3)]

    def to_v(e):
        return (e - s * x_t) / a

    for action in ("erase", "enhance"):
        eps_target = build_target(*eps, 1.7, action)
        v_target = build_target(*(to_v(e) for e in eps), 1.7, action)
        assert torch.allclose(v_target, to_v(eps_target), atol=1e-5)


# --- losses ---------------------------------------------------------------------------------


def test_l2_and_l1_losses_are_per_sample_means():
    pred = t([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])  # (2, 1, 1, 2)
    target = t([[[[0.0, 0.0]]], [[[3.0, -1.0]]]])
    assert torch.allclose(per_sample_loss(pred, target, "l2"), t([2.5, 5.0]))  # (1+4)/2, (9+1)/2
    assert torch.allclose(per_sample_loss(pred, target, "l1"), t([1.5, 2.0]))


def test_huber_and_smooth_l1_by_hand():
    pred = t([[[[3.0]]]])
    target = t([[[[0.0]]]])
    c = t([4.0])
    # sqrt(3^2 + 4^2) = 5: huber = 2 * 4 * (5 - 4) = 8, smooth_l1 = 2 * (5 - 4) = 2
    assert torch.allclose(per_sample_loss(pred, target, "huber", c), t([8.0]))
    assert torch.allclose(per_sample_loss(pred, target, "smooth_l1", c), t([2.0]))


def test_huber_thresholds_by_schedule():
    alphas = torch.tensor(sd_alphas_cumprod())
    steps = torch.tensor([0, 500, 1000 - 1])
    assert torch.allclose(huber_threshold(steps, alphas, 0.1, "constant", 2.0), t([0.2, 0.2, 0.2]))
    exponential = huber_threshold(torch.tensor([0, 1000]), torch.ones(1001), 0.1, "exponential", 1.0, 1000)
    assert torch.allclose(exponential, t([1.0, 0.1]), atol=1e-6)
    snr = huber_threshold(torch.tensor([500]), alphas, 0.1, "snr", 1.0)
    sigma = math.sqrt((1 - alphas[500].item()) / alphas[500].item())
    assert snr.item() == pytest.approx(0.9 / (1 + sigma) ** 2 + 0.1, rel=1e-6)


def test_unknown_loss_type_is_rejected():
    with pytest.raises(ValueError):
        per_sample_loss(t([1.0]), t([1.0]), "l3")


# --- min-SNR ----------------------------------------------------------------------------------


def test_min_snr_weights_at_the_noisiest_and_cleanest_timesteps():
    alphas = sd_alphas_cumprod()
    snr = torch.tensor(alphas / (1 - alphas), dtype=torch.float32)
    weights = min_snr_weights(torch.tensor([974, 24]), snr, 5.0, v_prediction=False)
    # t = 974: SNR ~ 0.006 < 5 -> weight 1.  t = 24: SNR ~ 43.6 -> 5 / 43.6 ~ 0.115.
    assert weights[0].item() == pytest.approx(1.0)
    assert weights[1].item() == pytest.approx(5.0 / snr[24].item(), rel=1e-6)
    assert 0.10 < weights[1].item() < 0.13
    v_weights = min_snr_weights(torch.tensor([974, 24]), snr, 5.0, v_prediction=True)
    assert v_weights[0].item() == pytest.approx(snr[974].item() / (snr[974].item() + 1), rel=1e-6)
    assert v_weights[1].item() == pytest.approx(5.0 / (snr[24].item() + 1), rel=1e-6)


def test_min_snr_uses_the_timestep_not_a_step_index():
    """sd-scripts looked the SNR up by the denoising index, inverting the weights."""
    alphas = sd_alphas_cumprod()
    snr = torch.tensor(alphas / (1 - alphas), dtype=torch.float32)
    noisy, clean = min_snr_weights(torch.tensor([999, 0]), snr, 5.0, v_prediction=False)
    assert noisy > clean


def test_min_snr_at_zero_terminal_snr():
    snr = torch.tensor([10.0, 0.0])
    eps_w = min_snr_weights(torch.tensor([0, 1]), snr, 5.0, v_prediction=False)
    v_w = min_snr_weights(torch.tensor([0, 1]), snr, 5.0, v_prediction=True)
    assert eps_w.tolist() == pytest.approx([0.5, 1.0])
    assert v_w.tolist() == pytest.approx([5.0 / 11.0, 0.0])
