"""Both poles of a slider from one x_t and one frozen call, where their x_t distributions are equal.

A two-direction slider target expands to a ``+`` setting (LoRA at ``+m``, target
``eps_neu + g (eps_P - eps_N)``) and a ``-`` setting (``-m``, ``eps_neu - g (eps_P - eps_N)``).
Their x_t come from the same distribution when the trajectory does not depend on the direction:
the sampling model is the frozen one (``--leco_denoise_with_frozen``; with the LoRA on, ``+m``
and ``-m`` sample differently) and the CFG negative of the trajectory is the same (a one-pole
slider, whose negative is "" in both directions, or ``--leco_denoise_guidance_scale 1``, which
uses no negative; a two-pole slider at guidance 3 sets each direction against the opposite pole,
so its two trajectories differ).

Then a step on either pole trains both: one x_t, one frozen call over the union of their prompts
(eps_P, eps_N, eps_neu: the terms of both targets), and one training forward at batch 2B with the
LoRA at ``+m`` for the first B rows and ``-m`` for the others. The loss is the mean of the two
poles' losses, so its expectation over the uniformly drawn settings equals the unpaired one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from library.prompts import PromptSetting

if TYPE_CHECKING:
    from library.leco_step import LecoStep


def share_trajectory(first: PromptSetting, second: PromptSetting, denoise_with_frozen: bool,
                     denoise_guidance_scale: float) -> bool:
    """Whether the two settings' x_t have the same distribution (and the same shape and size conditioning)."""
    if not denoise_with_frozen:
        return False
    same_chain = (first.prompt == second.prompt and first.resolution == second.resolution
                  and first.batch_size == second.batch_size and first.dynamic_resolution == second.dynamic_resolution
                  and first.dynamic_crops == second.dynamic_crops)
    same_negative = denoise_guidance_scale == 1.0 or first.negative == second.negative
    return same_chain and same_negative


def pole_partners(settings: Sequence[PromptSetting], denoise_with_frozen: bool,
                  denoise_guidance_scale: float) -> dict[PromptSetting, PromptSetting]:
    """Each slider direction mapped to its opposite direction, for the pairs that share x_t.

    The two directions of one ``[[targets]]`` entry (for one neutral and resolution) are adjacent
    in the expansion: ``"[[targets]][i] +"`` then ``"[[targets]][i] -"``.
    """
    partners: dict[PromptSetting, PromptSetting] = {}
    for first, second in zip(settings, settings[1:]):
        poles = (first.source.startswith("[[targets]]") and first.source.endswith(" +")
                 and second.source == first.source[:-1] + "-")
        if (poles and first.neutral == second.neutral and first not in partners and second not in partners
                and share_trajectory(first, second, denoise_with_frozen, denoise_guidance_scale)):
            partners[first], partners[second] = second, first
    return partners


def supports_per_sample_multiplier(network) -> bool:
    """This project's LoRA accepts a (B,) multiplier tensor; other network modules get two calls."""
    from networks.lora import LoRANetwork

    return isinstance(network, LoRANetwork)


def pair_loss(step: LecoStep, first: PromptSetting, second: PromptSetting, latents: torch.Tensor,
              labels: torch.Tensor, time_ids: torch.Tensor | None) -> torch.Tensor:
    """The mean LECO loss of two poles trained from the same x_t.

    Args:
        step: the LECO step (U-Net, network, cache, loss options).
        first, second: the two settings (``pole_partners`` of each other).
        latents: (B, C, h, w) x_t shared by both.
        labels: (B,) the exact timestep of each row, a long tensor on the CPU (:meth:`LecoStep.labels`).
        time_ids: (6,) or (B, 6) SDXL size conditioning, else None.
    """
    batch = latents.shape[0]
    timesteps = labels.to(step.device)
    frozen = step.frozen_predictions((first, second), latents, timesteps, time_ids)
    targets = [step.setting_target(setting, frozen) for setting in (first, second)]
    rows = None if time_ids is None else time_ids.reshape(-1, time_ids.shape[-1]).expand(batch, -1)
    if supports_per_sample_multiplier(step.network):
        cond = step.conditioning([first.prompt] * (2 * batch), None if rows is None else torch.cat([rows, rows]))
        multipliers = torch.tensor([first.multiplier] * batch + [second.multiplier] * batch, device=step.device)
        step.network.set_multiplier(multipliers)
        try:
            predictions = step.predict(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), cond).chunk(2)
        finally:
            step.network.set_multiplier(first.multiplier)
    else:
        predictions = []
        for setting in (first, second):
            step.network.set_multiplier(setting.multiplier)
            predictions.append(step.predict(latents, timesteps, step.conditioning([setting.prompt] * batch, rows)))
    total = 0.0
    for setting, prediction, target in zip((first, second), predictions, targets):
        total = total + step.weighted_losses(prediction, target, labels).mean() * setting.weight
    return total / 2
