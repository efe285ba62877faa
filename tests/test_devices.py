"""Where tensors live: the LECO step run with the model on the ``meta`` device.

Our tests run on a CPU, where a tensor created on the CPU by mistake mixes silently with the
model's tensors. On a GPU the same mix is a crash at the first step. A ``meta`` model catches it
here: torch refuses to combine a CPU tensor (other than a 0-dim scalar) with a meta tensor, exactly
as it refuses a CPU/CUDA mix. Everything the step computes must therefore follow the model's
device, whatever the options.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from library.config import LecoConfig
from library.diffusion import build_noise_scheduler, partial_denoise
from library.text_encoding import Conditioning
from tests.test_leco_step import SETTING, make_step

META = torch.device("meta")


def to_meta(step):
    """Move a LecoStep's U-Net, LoRA and prompt cache to the meta device (values are dropped)."""
    step.unet.to(META)
    step.network.to(META)
    step.cache.to(META, torch.float32)
    step.device = META
    return step


@pytest.fixture(scope="module")
def meta_step(tiny_sd_dir):
    return to_meta(make_step(tiny_sd_dir, LecoConfig(max_denoising_steps=4, denoise_guidance_scale=2.0)))


OPTIONS = {
    "l2": {},
    "l1": {"loss_type": "l1"},
    "huber_snr": {"loss_type": "huber", "huber_schedule": "snr"},
    "huber_exponential": {"loss_type": "huber", "huber_schedule": "exponential"},
    "smooth_l1_constant": {"loss_type": "smooth_l1", "huber_schedule": "constant"},
    "min_snr": {"min_snr_gamma": 5.0},
    "min_snr_huber": {"min_snr_gamma": 5.0, "loss_type": "huber"},
    "noise_offset": {"noise_offset": 0.1},
    "frozen_trajectory_ddim": {"denoise_with_frozen": True, "denoise_sampler": "ddim"},
    "legacy_timestep": {"legacy_timestep": True},
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_the_step_keeps_every_tensor_on_the_model_device(meta_step, name):
    meta_step.config = dataclasses.replace(LecoConfig(max_denoising_steps=4, denoise_guidance_scale=2.0), **OPTIONS[name])
    result = meta_step(SETTING, torch.Generator().manual_seed(0))
    assert result.loss.device == META and result.loss.dim() == 0
    result.loss.backward()  # the backward pass stays on the device too
    grads = [param.grad for param in meta_step.network.parameters() if param.grad is not None]
    assert grads and all(grad.device == META for grad in grads)
    meta_step.network.zero_grad(set_to_none=True)


def test_sdxl_step_with_dynamic_crops_on_the_model_device(tiny_sdxl_dir):
    step = to_meta(make_step(tiny_sdxl_dir, LecoConfig(max_denoising_steps=3, loss_type="huber", min_snr_gamma=5.0),
                             family="sdxl"))
    setting = dataclasses.replace(SETTING, dynamic_crops=True, dynamic_resolution=True)
    result = step(setting, torch.Generator().manual_seed(1))
    assert result.loss.device == META


def test_a_thousand_step_schedule_fits_the_model(tiny_sd_dir):
    """N = 1000 with leading spacing and SD's steps_offset = 1 used to start at timestep 1000 (IndexError)."""
    from tests.tiny_models import SCHEDULER_CONFIG

    for sampler in ("ddpm", "ddim"):
        scheduler = build_noise_scheduler(SCHEDULER_CONFIG, "epsilon", sampler=sampler, num_inference_steps=1000)
        scheduler.set_timesteps(1000)
        assert int(scheduler.timesteps[0]) == 999 and int(scheduler.timesteps[-1]) == 0
        latents = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
        cond = Conditioning(torch.zeros(1, 3, 8))
        x_t, t = partial_denoise(lambda x, ts, c: torch.zeros_like(x), scheduler, latents, 999, cond, cond, 1.0,
                                 torch.Generator().manual_seed(0))
        assert t == 0 and torch.isfinite(x_t).all()
    # every N that fits keeps the model's offset (the grid of the original schedule)
    scheduler = build_noise_scheduler(SCHEDULER_CONFIG, "epsilon", num_inference_steps=40)
    scheduler.set_timesteps(40)
    assert int(scheduler.timesteps[0]) == 976 and int(scheduler.timesteps[-1]) == 1


def test_prepare_unet_casts_before_it_moves(tiny_sd_dir):
    """A float32 U-Net must reach the device already in the run's dtype: moving first would put the float32
    weights on the GPU (about 10 GB for SDXL) before the cast halves them."""
    from diffusers import UNet2DConditionModel

    from library.run_setup import prepare_unet

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    moves = []
    original_to = unet.to

    def to(*args, **kwargs):
        target = kwargs.get("device", args[0] if args and not isinstance(args[0], torch.dtype) else None)
        if target is not None:
            moves.append({param.dtype for param in unet.parameters()})
        return original_to(*args, **kwargs)

    unet.to = to
    prepared = prepare_unet(unet, META, torch.bfloat16, "sdpa", False)
    assert moves == [{torch.bfloat16}]
    assert {param.device for param in prepared.parameters()} == {META}
    assert not any(param.requires_grad for param in prepared.parameters())
