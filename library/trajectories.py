"""Persistent trajectories (``--leco_trajectory persistent``): sampling chains that live across steps.

The fresh step (``library.leco_step``) makes every x_t from new noise with k ~ U{1..N-1} CFG
sampler calls and throws it away. Here each prompt setting keeps ``batch_size`` chains alive
between steps instead. A step on a setting

1. advances each of its chains by **one** sampler step (one batched CFG U-Net call, each chain at
   its own timestep; :func:`sampler_step_per_sample` applies the DDPM/DDIM update per sample),
2. trains on the chains where they now stand, each labelled with the exact timestep it sits at,
3. restarts from fresh noise every chain that has reached position N-1 (the end of the schedule).

A chain's *position* is the number of sampler steps it has taken since its noise; it trains at
positions 1..N-1 and, since it advances once per step of its setting, visits each of them exactly
once per cycle of N-1 steps. When a setting's chains are first made they are *staggered*: chain j
of B is pre-advanced to position ``floor((j + u)(N-1)/B)`` (u ~ U[0, 1) drawn once per chain set),
so the B chains stand at different positions and one cycle covers 1..N-1 uniformly: the timestep
marginal equals the fresh mode's. The pre-advance (warm-up) costs at most N-2 batched calls,
once per chain set.

Resolution: one chain set per (setting, resolution); with ``dynamic_resolution`` each drawn
bucket has its own chain set (made on the bucket's first draw), so a chain never changes size.
SDXL size conditioning (``add_time_ids``, random with ``dynamic_crops``) is drawn per chain when
it (re)starts and kept for its whole life, as a fresh trajectory keeps its one draw.

Chains are not saved with ``--save_state``: a resumed run re-makes them (staggered, from fresh
noise drawn from the restored random stream). Each process keeps its own chains from its own
random stream.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from library.config import LecoConfig
from library.diffusion import guided_prediction, initial_latents, landing_timestep, legacy_timestep
from library.leco_step import LecoStep, StepResult, random_resolution
from library.pole_pairs import pole_partners
from library.prompts import PromptSetting

logger = logging.getLogger(__name__)

TRAJECTORIES = ("fresh", "persistent")


# ----------------------------------------------------------------------------------------------
# Pure functions


def previous_timestep(scheduler, timestep: int) -> int:
    """Where one sampler step from ``timestep`` lands: the next grid entry (DDPM) or ``t - T // N``
    (DDIM); -1 past the end. ``scheduler.set_timesteps(N)`` must have been called."""
    if hasattr(scheduler, "previous_timestep"):
        return int(scheduler.previous_timestep(timestep))
    return timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def _check_supported(scheduler) -> None:
    config = scheduler.config
    if not isinstance(scheduler, (DDPMScheduler, DDIMScheduler)):
        raise ValueError(f"per-sample steps support DDPM and DDIM, not {type(scheduler).__name__}")
    if config.clip_sample or config.thresholding:
        raise ValueError("per-sample steps assume clip_sample=False and thresholding=False")
    if isinstance(scheduler, DDPMScheduler) and config.variance_type != "fixed_small":
        raise ValueError("per-sample DDPM steps assume variance_type='fixed_small'")
    if config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {config.prediction_type!r}")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) on ``like``'s device."""
    return values.view(-1, *([1] * (like.dim() - 1))).to(like.device)


def sampler_step_per_sample(scheduler, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
                            noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDPM (``fixed_small`` variance) or DDIM (eta 0) step for samples at different timesteps.

    Sample i gets exactly ``scheduler.step(model_output[i:i+1], timesteps[i], sample[i:i+1])``, the
    same float32 operations in the same order as diffusers, with ``noise[i]`` as its DDPM noise.

    DDPM, with ``a = alpha_bar(t)``, ``a' = alpha_bar(prev)`` (1 past the end), ``b = 1 - a``::

        x0   = (x - sqrt(b) * out) / sqrt(a)      (epsilon)   or   sqrt(a) x - sqrt(b) out   (v)
        mean = sqrt(a') (1 - a/a') / b * x0 + sqrt(a/a') (1 - a') / b * x
        x'   = mean + sqrt(max((1 - a') / b * (1 - a/a'), 1e-20)) * noise      (noise only where t > 0)

    DDIM (eta 0), ``a'`` at ``t - T // N`` (``final_alpha_cumprod`` past the end)::

        eps  = out                                (epsilon)   or   sqrt(a) out + sqrt(b) x   (v)
        x'   = sqrt(a') x0 + sqrt(1 - a') eps

    Args:
        scheduler: a DDPM/DDIM scheduler after ``set_timesteps(N)``, as ``build_noise_scheduler`` makes it.
        model_output: (B, C, H, W) the (guided) U-Net output in the scheduler's prediction space.
        timesteps: (B,) the timestep each sample sits at (entries of ``scheduler.timesteps``).
        sample: (B, C, H, W) the current samples.
        noise: (B, C, H, W) standard normal noise; required for DDPM, ignored by DDIM.

    Returns:
        (B, C, H, W) the samples one step further.
    """
    _check_supported(scheduler)
    t = timesteps.long().cpu()
    prev = torch.tensor([previous_timestep(scheduler, int(value)) for value in t], dtype=torch.long)
    alphas = scheduler.alphas_cumprod.cpu()
    past_end = scheduler.one if isinstance(scheduler, DDPMScheduler) else scheduler.final_alpha_cumprod
    alpha_t = alphas[t]
    alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], past_end.to(alphas.dtype))
    beta_t = 1 - alpha_t
    a_t, b_t = _per_sample(alpha_t, sample), _per_sample(beta_t, sample)
    if scheduler.config.prediction_type == "epsilon":
        x0 = (sample - b_t ** 0.5 * model_output) / a_t ** 0.5
        eps = model_output
    else:
        x0 = a_t ** 0.5 * sample - b_t ** 0.5 * model_output
        eps = a_t ** 0.5 * model_output + b_t ** 0.5 * sample
    if isinstance(scheduler, DDIMScheduler):
        return _per_sample(alpha_prev ** 0.5, sample) * x0 + _per_sample((1 - alpha_prev) ** 0.5, sample) * eps
    if noise is None:
        raise ValueError("a DDPM step needs noise")
    beta_prev = 1 - alpha_prev
    current_alpha = alpha_t / alpha_prev
    current_beta = 1 - current_alpha
    x0_coeff = (alpha_prev ** 0.5 * current_beta) / beta_t
    sample_coeff = current_alpha ** 0.5 * beta_prev / beta_t
    mean = _per_sample(x0_coeff, sample) * x0 + _per_sample(sample_coeff, sample) * sample
    variance = torch.clamp((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev), min=1e-20)
    std = torch.where(t > 0, variance ** 0.5, torch.zeros_like(variance))
    return mean + _per_sample(std, sample) * noise.to(mean.device, mean.dtype)


def staggered_starts(batch: int, max_denoising_steps: int, offset: float) -> list[int]:
    """Positions (sampler steps already taken) of ``batch`` new chains before their first step.

    ``floor((j + offset) * (N - 1) / batch)`` for chain j, each in 0..N-2 for ``offset`` in [0, 1):
    evenly spread, distinct when ``batch <= N - 1``. After one advance they train at 1..N-1.
    """
    if not 0.0 <= offset < 1.0:
        raise ValueError(f"offset must be in [0, 1), got {offset}")
    span = max_denoising_steps - 1
    return [min(int((index + offset) * span / batch), span - 1) for index in range(batch)]


def timestep_labels(scheduler, positions: torch.Tensor, max_denoising_steps: int, legacy: bool = False) -> torch.Tensor:
    """The timestep each chain sits at after ``positions`` (>= 1) sampler steps, shape (B,).

    Exact (:func:`library.diffusion.landing_timestep`), or sd-scripts' label with ``legacy``.
    """
    if legacy:
        values = [legacy_timestep(int(p), max_denoising_steps, scheduler.config.num_train_timesteps) for p in positions]
    else:
        values = [landing_timestep(scheduler, int(p) - 1) for p in positions]
    return torch.tensor(values, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Chains


@dataclass
class ChainSet:
    """The chains of one setting at one resolution.

    Attributes:
        latents: (B, C, h, w) float32 where each chain stands (never modified in place: a training
            graph may still hold the previous tensor).
        positions: (B,) sampler steps taken since each chain's noise, 0..N-1.
        time_ids: (B, 6) SDXL ``add_time_ids`` of each chain, else None.
        height, width: pixel size of the chains.
    """

    latents: torch.Tensor
    positions: torch.Tensor
    time_ids: torch.Tensor | None
    height: int
    width: int


class PersistentLecoStep(LecoStep):
    """A LECO step on persistent, staggered sampling chains (one CFG call per step, whatever N is).

    Same constructor as :class:`~library.leco_step.LecoStep`. ``chain_owner`` maps a setting to
    the setting whose chains it uses (slider poles that share x_t share chains).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chains: dict[tuple, ChainSet] = {}
        self.chain_owner: dict[PromptSetting, PromptSetting] = {}
        self.last_positions: list[int] = []  # where the last step's chains trained (for logs and tests)
        # the grid stays on the CPU: chains index it with CPU positions; only U-Net inputs move to the device
        self.scheduler.set_timesteps(self.config.max_denoising_steps)
        self.grid = self.scheduler.timesteps.long()

    # --- chain bookkeeping ----------------------------------------------------------------

    def _new_latents(self, setting: PromptSetting, count: int, height: int, width: int, generator: torch.Generator):
        latents = initial_latents(count, height, width, generator, self.config.noise_offset,
                                  float(self.scheduler.init_noise_sigma))
        rows = [self.time_ids_fn(height, width, generator, setting.dynamic_crops) for _ in range(count)]
        time_ids = None if rows[0] is None else torch.stack(rows)
        return latents.to(self.device), time_ids

    def start_chains(self, setting: PromptSetting, height: int, width: int, generator: torch.Generator) -> ChainSet:
        """New chains for ``setting`` from fresh noise, pre-advanced to staggered positions."""
        offset = float(torch.rand((), generator=generator))
        starts = torch.tensor(staggered_starts(setting.batch_size, self.config.max_denoising_steps, offset))
        latents, time_ids = self._new_latents(setting, setting.batch_size, height, width, generator)
        chains = ChainSet(latents, torch.zeros(setting.batch_size, dtype=torch.long), time_ids, height, width)
        while bool((chains.positions < starts).any()):
            self.advance(setting, chains, torch.nonzero(chains.positions < starts).flatten(), generator)
        logger.debug("persistent chains for %s at %dx%d start at positions %s", setting.source or setting.prompt,
                     height, width, (starts + 1).tolist())
        return chains

    @torch.no_grad()
    def advance(self, setting: PromptSetting, chains: ChainSet, rows: torch.Tensor, generator: torch.Generator) -> None:
        """One CFG sampler step for the chains in ``rows`` (a (b,) index tensor), in one U-Net call."""
        count = rows.numel()
        latents = chains.latents[rows.to(chains.latents.device)]
        current = self.grid[chains.positions[rows]]  # (b,) the timestep each chain sits at now
        time_ids = None if chains.time_ids is None else chains.time_ids[rows]
        cond, uncond = self.trajectory_conditioning(setting, count, time_ids)
        with self.sampling_network(setting):
            output = guided_prediction(self.predict, latents, current.to(self.device), cond, uncond,
                                       self.config.denoise_guidance_scale)
        noise = torch.randn(latents.shape, generator=generator) if isinstance(self.scheduler, DDPMScheduler) else None
        stepped = sampler_step_per_sample(self.scheduler, output.float(), current, latents.float(), noise)
        updated = chains.latents.clone()
        updated[rows.to(updated.device)] = stepped.to(updated.dtype)
        chains.latents = updated
        positions = chains.positions.clone()
        positions[rows] += 1
        chains.positions = positions

    def restart_finished(self, setting: PromptSetting, chains: ChainSet, generator: torch.Generator) -> int:
        """Replace every chain at position N-1 by fresh noise at position 0; returns how many."""
        done = torch.nonzero(chains.positions >= self.config.max_denoising_steps - 1).flatten()
        if done.numel() == 0:
            return 0
        latents, time_ids = self._new_latents(setting, done.numel(), chains.height, chains.width, generator)
        updated = chains.latents.clone()
        updated[done.to(updated.device)] = latents.to(updated.dtype)
        chains.latents = updated
        if chains.time_ids is not None:
            chain_ids = chains.time_ids.clone()
            chain_ids[done] = time_ids
            chains.time_ids = chain_ids
        positions = chains.positions.clone()
        positions[done] = 0
        chains.positions = positions
        return done.numel()

    def chains_for(self, setting: PromptSetting, generator: torch.Generator) -> ChainSet:
        """The chain set of ``setting`` (or of its slider partner) at this step's resolution."""
        height, width = setting.resolution
        if setting.dynamic_resolution:
            height, width = random_resolution(height, width, generator)
        owner = self.chain_owner.get(setting, setting)
        key = (owner, height, width)
        if key not in self.chains:
            self.chains[key] = self.start_chains(owner, height, width, generator)
        return self.chains[key]

    # --- the step -------------------------------------------------------------------------

    def __call__(self, setting: PromptSetting, generator: torch.Generator) -> StepResult:
        """Advance ``setting``'s chains one step, train on them, restart the finished ones."""
        owner = self.chain_owner.get(setting, setting)
        chains = self.chains_for(setting, generator)
        self.advance(owner, chains, torch.arange(chains.positions.numel()), generator)
        positions = chains.positions
        self.last_positions = positions.tolist()
        timesteps = timestep_labels(self.scheduler, positions, self.config.max_denoising_steps, self.config.legacy_timestep)
        loss = self.setting_loss(setting, chains.latents, timesteps, chains.time_ids)
        self.restart_finished(owner, chains, generator)
        return StepResult(loss=loss, setting=setting, timestep=float(timesteps.float().mean()),
                          denoise_steps=float(positions.float().mean()))


def build_leco_step(trajectory: str, settings: Sequence[PromptSetting], *args, **kwargs) -> LecoStep:
    """The step object for ``--leco_trajectory`` (``fresh`` or ``persistent``), with slider poles
    that share x_t paired (see :mod:`library.pole_pairs`). Other arguments as :class:`LecoStep`."""
    if trajectory not in TRAJECTORIES:
        raise ValueError(f"unknown trajectory mode {trajectory!r}")
    step = PersistentLecoStep(*args, **kwargs) if trajectory == "persistent" else LecoStep(*args, **kwargs)
    step.partners = pole_partners(settings, step.config.denoise_with_frozen, step.config.denoise_guidance_scale)
    if isinstance(step, PersistentLecoStep):
        for first, second in step.partners.items():
            step.chain_owner[first] = first if first.source.endswith("+") else second
    return step


def trajectory_summary(config: LecoConfig, settings: Sequence[PromptSetting]) -> str:
    """The run summary's description of how x_t is made."""
    steps = config.max_denoising_steps
    if config.trajectory == "persistent":
        text = (f"persistent trajectories: batch_size chains per setting staggered over positions "
                f"1..{steps - 1} of {steps} ({config.denoise_sampler}), one sampler step per training step")
    else:
        text = f"fresh trajectories: denoise k in 1..{steps - 1} of {steps} ({config.denoise_sampler})"
    pairs = len(pole_partners(settings, config.denoise_with_frozen, config.denoise_guidance_scale)) // 2
    if pairs:
        text += f", {pairs} slider pole pair{'s' if pairs > 1 else ''} trained from one x_t"
    return text
