"""SD's noise schedule computed by hand from its betas (float64, no diffusers), for expected values in tests.

Stable Diffusion (and the tiny test models) use ``beta_schedule = "scaled_linear"``: the betas are evenly
spaced in square root between ``beta_start`` and ``beta_end`` and then squared, and
``alpha_bar_t = prod_{s <= t} (1 - beta_s)`` (Ho et al., 2020, eq. 4).
"""

from __future__ import annotations

import math

SD_BETA_START, SD_BETA_END, SD_TIMESTEPS = 0.00085, 0.012, 1000


def scaled_linear_alphas_cumprod(beta_start: float = SD_BETA_START, beta_end: float = SD_BETA_END,
                                 timesteps: int = SD_TIMESTEPS) -> list[float]:
    """``alpha_bar_t`` for t = 0 .. timesteps - 1."""
    low, high = math.sqrt(beta_start), math.sqrt(beta_end)
    product, table = 1.0, []
    for index in range(timesteps):
        beta = (low + (high - low) * index / (timesteps - 1)) ** 2
        product *= 1.0 - beta
        table.append(product)
    return table


def snr(t: int) -> float:
    """Signal-to-noise ratio ``alpha_bar_t / (1 - alpha_bar_t)`` of SD's schedule at timestep ``t``."""
    alpha_bar = scaled_linear_alphas_cumprod()[t]
    return alpha_bar / (1.0 - alpha_bar)
