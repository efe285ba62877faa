"""LECO regression targets, losses and loss weights: pure tensor functions.

Targets are built in the model's own output space (epsilon or v). At a fixed (x_t, t) the two
are affine in each other with a shared x_t term, so ``v_neu -/+ g (v_pos - v_unc)`` is exactly
the v-space image of the epsilon-space target; no conversion is needed, only a consistent space.
"""

from __future__ import annotations

import math

import torch


def build_target(neutral: torch.Tensor, positive: torch.Tensor, unconditional: torch.Tensor,
                 guidance_scale: float, action: str) -> torch.Tensor:
    """The frozen model's prediction moved along the concept direction.

    ``erase``:   ``neutral - g * (positive - unconditional)``
    ``enhance``: ``neutral + g * (positive - unconditional)``

    All tensors are (B, C, H, W) predictions at the same (x_t, t).
    """
    offset = guidance_scale * (positive - unconditional)
    if action == "erase":
        return neutral - offset
    if action == "enhance":
        return neutral + offset
    raise ValueError(f"unknown action {action!r}")


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                    huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Loss per sample, shape (B,), computed in float32 and averaged over C, H, W.

    ``l2`` squared error; ``l1`` absolute error; ``huber`` the pseudo-Huber loss
    ``2 c (sqrt(d^2 + c^2) - c)`` (quadratic below c, linear above); ``smooth_l1`` the same
    without the leading ``c`` (sd-scripts' definitions). ``huber_c`` has shape (B,).
    """
    diff = pred.float() - target.float()
    if loss_type == "l2":
        elementwise = diff.pow(2)
    elif loss_type == "l1":
        elementwise = diff.abs()
    elif loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"{loss_type} loss needs huber_c")
        c = huber_c.to(device=diff.device, dtype=torch.float32).view(-1, *([1] * (diff.dim() - 1)))
        elementwise = 2 * (torch.sqrt(diff.pow(2) + c.pow(2)) - c)
        if loss_type == "huber":
            elementwise = c * elementwise
    else:
        raise ValueError(f"unknown loss type {loss_type!r}")
    return elementwise.flatten(1).mean(dim=1)


def huber_threshold(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, huber_c: float, schedule: str = "snr",
                    scale: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The Huber threshold ``c`` per sample, shape (B,), at the samples' real timesteps, on ``timesteps``' device.

    ``constant``: ``huber_c * scale``.
    ``exponential``: ``exp(-a t) * scale`` with ``a = -ln(huber_c) / T`` (1 at t = 0, huber_c at t = T).
    ``snr``: ``((1 - huber_c) / (1 + sigma_t)^2 + huber_c) * scale`` with
    ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``: near 1 (L2-like) for clean latents and
    near ``huber_c`` (robust) for noisy ones.
    """
    device = timesteps.device
    timesteps = timesteps.long().cpu()  # a table lookup; the (B,) result goes back to the caller's device
    if schedule == "constant":
        threshold = torch.full(timesteps.shape, huber_c * scale)
    elif schedule == "exponential":
        rate = -math.log(huber_c) / num_train_timesteps
        threshold = torch.exp(-rate * timesteps.float()) * scale
    elif schedule == "snr":
        alpha_bar = alphas_cumprod.cpu().double()[timesteps]
        sigma = ((1.0 - alpha_bar) / alpha_bar).sqrt()
        threshold = ((1.0 - huber_c) / (1.0 + sigma).pow(2) + huber_c).float() * scale
    else:
        raise ValueError(f"unknown huber schedule {schedule!r}")
    return threshold.to(device)


def min_snr_weights(timesteps: torch.Tensor, snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023) at the samples' real timesteps, shape (B,).

    epsilon: ``min(SNR, gamma) / SNR``; v-prediction: ``min(SNR, gamma) / (SNR + 1)``. At SNR 0
    (zero-terminal-SNR's last step) the epsilon weight is its limit, 1.

    Args:
        timesteps: (B,) integer timesteps, the ones x_t really sits at.
        snr: (T,) table from :func:`library.diffusion.snr_table`.

    Returns:
        (B,) float32 weights on ``timesteps``' device.
    """
    values = snr.cpu()[timesteps.long().cpu()]
    clipped = torch.clamp(values, max=gamma)
    if v_prediction:
        weights = clipped / (values + 1.0)
    else:
        weights = torch.where(values > 0, clipped / values.clamp(min=1e-20), torch.ones_like(values))
    return weights.to(timesteps.device)
