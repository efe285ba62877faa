"""Noise schedules, timestep bookkeeping, CFG and the partial denoising pass that makes x_t.

The trajectory carries no gradient: LECO only needs a point x_t on the model's own sampling
path, so it is produced under ``torch.no_grad()``. Its timestep label is the scheduler timestep
x_t actually sits at after k steps (sd-scripts and p1atdev label it about one coarse step
noisier; ``legacy_timestep`` reproduces that for parity).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from library.text_encoding import Conditioning

# Keys of a diffusers scheduler config that define the noise schedule itself.
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "steps_offset")

PredictFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


def fitting_steps_offset(scheduler_config: dict, num_inference_steps: int | None) -> int | None:
    """The model's ``steps_offset``, lowered where "leading" spacing would push the first of
    ``num_inference_steps`` timesteps past the last training timestep.

    Leading spacing puts step i at ``i * (T // N) + steps_offset``; with SD's ``steps_offset = 1`` and
    N = T = 1000 the first timestep would be 1000, outside the schedule. For every N that fits
    the offset is returned unchanged.
    """
    offset = scheduler_config.get("steps_offset")
    if not offset or not num_inference_steps:
        return offset
    total = int(scheduler_config.get("num_train_timesteps", 1000))
    room = total - 1 - (num_inference_steps - 1) * (total // num_inference_steps)
    return max(0, min(int(offset), room))


def schedule_options(scheduler_config: dict, prediction_type: str, zero_terminal_snr: bool = False,
                     num_inference_steps: int | None = None) -> dict:
    """Keyword arguments that put any diffusers scheduler on the model's own noise schedule.

    The betas, the number of training timesteps, ``steps_offset`` (lowered where N steps would not
    fit, see :func:`fitting_steps_offset`) and ``timestep_spacing`` come from the model's config;
    ``prediction_type`` is how the U-Net's output is read; with zero terminal SNR the betas are
    rescaled and spacing is "trailing" so that sampling starts at the pure-noise timestep. The
    trajectory's DDPM/DDIM and the sample images' samplers share this, so both sample the same model.
    """
    options = {key: scheduler_config[key] for key in _SCHEDULE_KEYS if scheduler_config.get(key) is not None}
    if "steps_offset" in options and not zero_terminal_snr:
        options["steps_offset"] = fitting_steps_offset(scheduler_config, num_inference_steps)
    options.update(
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_terminal_snr,
        timestep_spacing="trailing" if zero_terminal_snr else scheduler_config.get("timestep_spacing", "leading"),
    )
    return options


def build_noise_scheduler(
    scheduler_config: dict,
    prediction_type: str,
    zero_terminal_snr: bool = False,
    sampler: str = "ddpm",
    num_inference_steps: int | None = None,
) -> DDPMScheduler | DDIMScheduler:
    """A DDPM (ancestral) or DDIM (eta 0) scheduler on the model's own noise schedule.

    Args:
        scheduler_config: the model's scheduler config (betas, number of timesteps, offset).
        prediction_type: ``"epsilon"`` or ``"v_prediction"``; the sampler reads the U-Net's
            output in this space (sd-scripts always reads epsilon, which breaks v-models).
        zero_terminal_snr: rescale betas so the last timestep is pure noise; uses "trailing"
            spacing so sampling starts at that timestep.
        sampler: ``"ddpm"`` or ``"ddim"``.
        num_inference_steps: the N the scheduler will be set to; where "leading" spacing with the
            model's ``steps_offset`` would not fit N steps (N = 1000), the offset is lowered.
    """
    options = schedule_options(scheduler_config, prediction_type, zero_terminal_snr, num_inference_steps)
    if sampler == "ddim":
        return DDIMScheduler(**options, clip_sample=False, set_alpha_to_one=False)
    return DDPMScheduler(**options, clip_sample=False, variance_type="fixed_small")


def snr_table(scheduler) -> torch.Tensor:
    """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` for every training timestep, shape (T,)."""
    alphas_cumprod = scheduler.alphas_cumprod.double()
    return (alphas_cumprod / (1.0 - alphas_cumprod)).float()


def landing_timestep(scheduler, step_index: int) -> int:
    """The timestep x sits at after ``step_index + 1`` sampler steps (``step_index`` 0-based).

    This is where the scheduler's own step lands: DDPM steps to the next grid entry, DDIM to
    ``t - num_train_timesteps // num_inference_steps`` (the same point unless the grid is uneven,
    as "trailing" spacing is when N does not divide the number of training timesteps).
    """
    t = scheduler.timesteps[step_index]
    if hasattr(scheduler, "previous_timestep"):
        return int(scheduler.previous_timestep(t))
    return int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def legacy_timestep(k: int, max_denoising_steps: int, num_train_timesteps: int = 1000) -> int:
    """sd-scripts/p1atdev label for x_t after k of N steps: ``T - 1 - int(k * T / N)``.

    About ``T / N - 1`` timesteps noisier than x_t really is (24 for N = 40).
    """
    return num_train_timesteps - 1 - int(k * num_train_timesteps / max_denoising_steps)


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def guided_prediction(predict: PredictFn, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                      uncond: Conditioning, scale: float) -> torch.Tensor:
    """CFG prediction in one batched U-Net call; a scale of 1 needs (and makes) no unconditional half."""
    if scale == 1.0:
        return predict(latents, timestep, cond)
    both = predict(torch.cat([latents, latents]), torch.cat([timestep, timestep]), Conditioning.cat([uncond, cond]))
    uncond_out, cond_out = both.chunk(2)
    return cfg_combine(uncond_out, cond_out, scale)


@torch.no_grad()
def partial_denoise(
    predict: PredictFn,
    scheduler,
    latents: torch.Tensor,
    steps: int,
    cond: Conditioning,
    uncond: Conditioning,
    guidance_scale: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Run the first ``steps`` sampler steps from ``latents`` (x_T) with CFG, without gradient.

    The caller sets ``scheduler.set_timesteps(N)`` first. Returns ``(x_t, t)`` where ``t`` is
    the timestep x_t sits at (see :func:`landing_timestep`).
    """
    if steps < 1 or steps >= len(scheduler.timesteps):
        raise ValueError(f"steps must be in [1, {len(scheduler.timesteps) - 1}], got {steps}")
    sample = latents
    for index in range(steps):
        t = scheduler.timesteps[index]
        timestep = t.expand(sample.shape[0]).to(sample.device)
        model_output = guided_prediction(predict, sample, timestep, cond, uncond, guidance_scale)
        sample = scheduler.step(model_output.float(), t, sample.float(), generator=generator).prev_sample
        sample = sample.to(latents.dtype)
    return sample, landing_timestep(scheduler, steps - 1)


def initial_latents(batch: int, height: int, width: int, generator: torch.Generator, noise_offset: float | None = None,
                    init_noise_sigma: float = 1.0, channels: int = 4) -> torch.Tensor:
    """x_T ~ N(0, I) (B, 4, H/8, W/8) on the CPU generator, plus optional per-channel offset noise."""
    latents = torch.randn((batch, channels, height // 8, width // 8), generator=generator)
    if noise_offset:
        latents = latents + noise_offset * torch.randn((batch, channels, 1, 1), generator=generator)
    return latents * init_noise_sigma
