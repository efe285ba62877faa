"""One LECO step (DESIGN section 3): draw a setting, make x_t, query the frozen model, regress.

U-Net calls per step: k for the trajectory (CFG halves batched together, none when the denoise
guidance is 1), one batched call for the frozen predictions (each distinct prompt once, LoRA
switched off), and one training forward with the LoRA at the setting's multiplier (the only
call with a gradient; a setting with ``anchors`` adds one more, for all its anchors at once).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ContextManager

import torch

from library.config import LecoConfig
from library.diffusion import build_noise_scheduler, initial_latents, legacy_timestep, partial_denoise, snr_table
from library.pole_pairs import pair_loss
from library.prompts import PromptSetting
from library.targets import build_target, huber_threshold, min_snr_weights, per_sample_loss
from library.text_encoding import Conditioning, PromptCache


def random_resolution(height: int, width: int, generator: torch.Generator, step: int = 64,
                      max_aspect: float = 2.0) -> tuple[int, int]:
    """A random aspect-ratio bucket with about the area of ``height x width`` (``dynamic_resolution``).

    Buckets are multiples of ``step`` with aspect ratio within ``[1/max_aspect, max_aspect]`` and
    area between 80% and 100% of the base area. Unlike sd-scripts' version (which only shrinks and
    ignores the area), the model keeps seeing images of its usual pixel count.
    """
    area = height * width
    buckets = []
    for bucket_width in range(step, int(math.sqrt(area * max_aspect)) + step, step):
        bucket_height = (area // bucket_width) // step * step
        if bucket_height < step:
            continue
        if not 1 / max_aspect <= bucket_width / bucket_height <= max_aspect:
            continue
        if bucket_height * bucket_width >= 0.8 * area:
            buckets.append((bucket_height, bucket_width))
            buckets.append((bucket_width, bucket_height))  # portrait and landscape alike
    buckets = sorted(set(buckets))
    if not buckets:
        return (height, width)
    return buckets[int(torch.randint(len(buckets), (), generator=generator))]


@dataclass
class StepResult:
    """What one micro-step produced (for logging)."""

    loss: torch.Tensor  # scalar, with grad
    setting: PromptSetting
    timestep: float  # the batch's mean when its samples sit at different timesteps (persistent chains)
    denoise_steps: float


class LecoStep:
    """Computes the LECO loss for one setting.

    Args:
        unet: the U-Net with the LoRA network applied.
        network: the LoRA network (``set_multiplier``, ``multiplier_context``).
        cache: cached prompt embeddings (on the training device, in the U-Net's dtype).
        scheduler_config: the model's noise-schedule config.
        prediction_type: "epsilon" or "v_prediction".
        config: LECO options (denoising steps, guidance, loss, min-SNR ...).
        time_ids_fn: ``(height, width, generator, dynamic_crops) -> (6,) tensor or None``.
        device: training device.
        autocast: factory of the mixed-precision context (``accelerator.autocast``).
        zero_terminal_snr: rescale the schedule to zero terminal SNR.
    """

    def __init__(self, unet, network, cache: PromptCache, scheduler_config: dict, prediction_type: str, config: LecoConfig,
                 time_ids_fn: Callable, device: torch.device, autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                 zero_terminal_snr: bool = False):
        self.unet = unet
        self.network = network
        self.cache = cache
        self.config = config
        self.prediction_type = prediction_type
        self.time_ids_fn = time_ids_fn
        self.device = device
        self.autocast = autocast
        self.scheduler = build_noise_scheduler(scheduler_config, prediction_type, zero_terminal_snr, config.denoise_sampler,
                                               config.max_denoising_steps)
        self.snr = snr_table(self.scheduler)
        self.dtype = next(unet.parameters()).dtype
        self.partners: dict[PromptSetting, PromptSetting] = {}  # slider poles trained together (pole_pairs)

    # --- building blocks -----------------------------------------------------------------

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One U-Net call: (B, 4, h, w) latents, (B,) timesteps -> (B, 4, h, w) prediction."""
        with self.autocast():
            return self.unet(latents.to(self.dtype), timesteps, **cond.unet_kwargs()).sample

    def conditioning(self, prompts: Sequence[str], time_ids: torch.Tensor | None) -> Conditioning:
        """Cached embeddings of ``prompts`` (one row each), with SDXL time ids, (6,) or (B, 6), tiled over the rows."""
        rows = None if time_ids is None else time_ids.to(self.device).reshape(-1, time_ids.shape[-1])
        rows = None if rows is None else rows.repeat(len(prompts) // rows.shape[0], 1)
        return self.cache.conditioning(list(prompts), rows)

    def trajectory_conditioning(self, setting: PromptSetting, count: int, time_ids) -> tuple[Conditioning, Conditioning]:
        """The trajectory's CFG halves for ``count`` rows: the setting's prompt and its negative."""
        return (self.conditioning([setting.prompt] * count, time_ids),
                self.conditioning([setting.negative] * count, time_ids))

    @contextlib.contextmanager
    def sampling_network(self, setting: PromptSetting):
        """The network as the trajectory samples with it: no LoRA dropout (eval mode), at the setting's
        multiplier (0 with ``--leco_denoise_with_frozen``); training mode comes back afterwards."""
        multiplier = 0.0 if self.config.denoise_with_frozen else setting.multiplier
        was_training = self.network.training
        self.network.eval()
        try:
            with self.network.multiplier_context(multiplier):
                yield
        finally:
            self.network.train(was_training)

    def draw_denoise_steps(self, generator: torch.Generator) -> int:
        """k ~ U{1, ..., N - 1}: how many sampler steps make this x_t."""
        return int(torch.randint(1, self.config.max_denoising_steps, (), generator=generator))

    def make_xt(self, setting: PromptSetting, height: int, width: int, time_ids, generator: torch.Generator):
        """Partial CFG denoising from fresh noise: returns ``(x_t, t, k)``, no gradient."""
        steps = self.config.max_denoising_steps
        k = self.draw_denoise_steps(generator)
        self.scheduler.set_timesteps(steps)  # timesteps stay on the CPU: read as ints, moved per call
        latents = initial_latents(setting.batch_size, height, width, generator, self.config.noise_offset,
                                  float(self.scheduler.init_noise_sigma)).to(self.device)
        cond, uncond = self.trajectory_conditioning(setting, setting.batch_size, time_ids)
        with self.sampling_network(setting):
            latents, t = partial_denoise(self.predict, self.scheduler, latents, k, cond, uncond,
                                         self.config.denoise_guidance_scale, generator)
        if self.config.legacy_timestep:
            t = legacy_timestep(k, steps, self.scheduler.config.num_train_timesteps)
        return latents.detach(), t, k

    @torch.no_grad()
    def frozen_predictions(self, setting: PromptSetting | Sequence[PromptSetting], latents: torch.Tensor,
                           timesteps: torch.Tensor, time_ids) -> dict[str, torch.Tensor]:
        """Frozen-model predictions for positive/neutral/unconditional and the anchors (of one setting or
        several sharing ``latents``), each distinct prompt once, one call; a preserve setting needs only
        its own prompt's."""
        settings = tuple(setting) if isinstance(setting, (list, tuple)) else (setting,)
        prompts = list(dict.fromkeys(p for s in settings for p in (
            (s.neutral,) if s.action == "preserve" else (s.positive, s.neutral, s.negative, *s.anchors))))
        batch = latents.shape[0]
        cond = self.conditioning([prompt for prompt in prompts for _ in range(batch)], time_ids)
        with self.network.multiplier_context(0.0):
            output = self.predict(latents.repeat(len(prompts), 1, 1, 1), timesteps.repeat(len(prompts)), cond)
        return {prompt: chunk.float() for prompt, chunk in zip(prompts, output.chunk(len(prompts)))}

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights (min-SNR at the real timestep), shape (B,)."""
        if not self.config.min_snr_gamma:
            return torch.ones(timesteps.shape[0], device=timesteps.device)
        return min_snr_weights(timesteps, self.snr, self.config.min_snr_gamma, self.prediction_type == "v_prediction")

    def huber_c(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if self.config.loss_type not in ("huber", "smooth_l1"):
            return None
        return huber_threshold(timesteps, self.scheduler.alphas_cumprod, self.config.huber_c, self.config.huber_schedule,
                               self.config.huber_scale, self.scheduler.config.num_train_timesteps)

    def labels(self, timestep: int | torch.Tensor, batch: int) -> torch.Tensor:
        """The batch's timesteps as a (B,) long tensor on the CPU, where the loss tables are looked up
        (``timestep``: one for the batch, or one per sample)."""
        if isinstance(timestep, torch.Tensor):
            return timestep.detach().to(device="cpu", dtype=torch.long)
        return torch.full((batch,), timestep, dtype=torch.long)

    def weighted_losses(self, prediction: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample losses (``--loss_type``, Huber thresholds at ``labels``) times their min-SNR weights, (B,)."""
        losses = per_sample_loss(prediction, target, self.config.loss_type, self.huber_c(labels))
        return losses * self.loss_weights(labels).to(losses.device)

    def setting_target(self, setting: PromptSetting, frozen: dict[str, torch.Tensor]) -> torch.Tensor:
        """The regression target of ``setting`` from the frozen predictions."""
        if setting.action == "preserve":  # an anchor: the frozen model's own prediction for the prompt
            return frozen[setting.neutral]
        return build_target(frozen[setting.neutral], frozen[setting.positive], frozen[setting.negative],
                            setting.guidance_scale, setting.action)

    # --- the step -------------------------------------------------------------------------

    def loss_at(self, setting: PromptSetting, latents: torch.Tensor, timestep: int | torch.Tensor, time_ids) -> torch.Tensor:
        """The LECO loss for a given x_t: frozen target, then the LoRA's prediction (with grad).

        ``timestep``: one for the batch, or (B,) per sample (persistent chains)."""
        labels = self.labels(timestep, latents.shape[0])
        timesteps = labels.to(self.device)
        frozen = self.frozen_predictions(setting, latents, timesteps, time_ids)
        target = self.setting_target(setting, frozen)
        cond = self.conditioning([setting.prompt] * latents.shape[0], time_ids)
        self.network.set_multiplier(setting.multiplier)
        prediction = self.predict(latents, timesteps, cond)
        loss = self.weighted_losses(prediction, target, labels).mean() * setting.weight
        if setting.anchors:
            loss = loss + self.anchor_loss(setting, latents, labels, frozen, time_ids)
        return loss

    def anchor_loss(self, setting: PromptSetting, latents: torch.Tensor, labels: torch.Tensor,
                    frozen: dict[str, torch.Tensor], time_ids) -> torch.Tensor:
        """The setting's anchors held where the frozen model has them, at the same x_t (issue 12):
        ``weight * anchor_weight * sum_a loss(LoRA(x_t, a), frozen(x_t, a))``, one LoRA call for all anchors."""
        count, batch = len(setting.anchors), latents.shape[0]
        cond = self.conditioning([anchor for anchor in setting.anchors for _ in range(batch)], time_ids)
        steps = labels.repeat(count)
        prediction = self.predict(latents.repeat(count, 1, 1, 1), steps.to(self.device), cond)  # (count*B, 4, h, w)
        target = torch.cat([frozen[anchor] for anchor in setting.anchors])
        weighted = self.weighted_losses(prediction, target, steps).view(count, batch)
        return weighted.mean(dim=1).sum() * setting.anchor_weight * setting.weight

    def setting_loss(self, setting: PromptSetting, latents: torch.Tensor, timestep: int | torch.Tensor, time_ids) -> torch.Tensor:
        """:meth:`loss_at`, or both slider poles from this x_t where ``setting`` has a partner."""
        partner = self.partners.get(setting)
        if partner is None:
            return self.loss_at(setting, latents, timestep, time_ids)
        return pair_loss(self, setting, partner, latents, self.labels(timestep, latents.shape[0]), time_ids)

    def __call__(self, setting: PromptSetting, generator: torch.Generator) -> StepResult:
        """Draw x_t for ``setting`` and return its loss (call ``backward`` on ``result.loss``)."""
        height, width = setting.resolution
        if setting.dynamic_resolution:
            height, width = random_resolution(height, width, generator)
        time_ids = self.time_ids_fn(height, width, generator, setting.dynamic_crops)
        latents, timestep, k = self.make_xt(setting, height, width, time_ids, generator)
        loss = self.setting_loss(setting, latents, timestep, time_ids)
        return StepResult(loss=loss, setting=setting, timestep=timestep, denoise_steps=k)
