"""Step options acting, not only echoed in the metadata: gradient checkpointing, the LoRA dropouts, --noise_offset.

Each test compares the option on and off on the same tiny U-Net and inputs, with expectations worked
out by hand (see ``tests/test_lora.py`` for the dropouts' exact 1 / (1 - p) rescaling in one module).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from library import leco_step
from library.cli import build_run_config, parse_namespace
from library.config import LecoConfig
from library.diffusion import initial_latents
from library.run_setup import create_lora_network, prepare_unet
from library.sample_prompts import SamplePrompt
from library.sampling import SampleGridMaker, build_sample_scheduler
from tests.helpers import base_argv, write_prompts
from tests.test_leco_step import SETTING, make_step

CPU = torch.device("cpu")


def test_gradient_checkpointing_recomputes_blocks_and_keeps_loss_and_gradients(tiny_sd_dir):
    """prepare_unet's checkpointing must really recompute the transformer blocks in the backward (the
    memory saving) and give the loss and LoRA gradients of a run without it.

    Tolerances: the recomputation repeats the same float32 operations in the same order on the same
    CPU, so the loss is bit-identical; gradients are allowed 1e-6 relative (they came out identical in
    the run that set this, torch 2.13 CPU) in case a kernel picks another summation order."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    runs = {}
    for checkpointing in (False, True):
        step = make_step(tiny_sd_dir, LecoConfig(max_denoising_steps=6), seed=7)
        prepare_unet(step.unet, CPU, torch.float32, "sdpa", checkpointing)  # the trainer's switch, as it calls it
        blocks = [module for module in step.unet.modules() if type(module).__name__ == "BasicTransformerBlock"]
        assert blocks
        calls = []
        for block in blocks:  # a pre-hook: torch stops a recomputation once it has the tensors it needs
            block.register_forward_pre_hook(lambda module, args: calls.append(module))
        params = [param for param in step.network.parameters() if param.requires_grad]
        loss = step.loss_at(SETTING, latents, 300, None)
        forward_calls = len(calls)
        grads = torch.autograd.grad(loss, params)
        runs[checkpointing] = {"loss": loss.detach(), "grads": grads, "forward": forward_calls,
                               "recomputed": calls[forward_calls:], "blocks": blocks}
    plain, checkpointed = runs[False], runs[True]
    assert plain["recomputed"] == []
    assert checkpointed["forward"] == plain["forward"]  # frozen batch + training forward: each block twice
    assert sorted(map(id, checkpointed["recomputed"])) == sorted(map(id, checkpointed["blocks"]))  # once each
    assert torch.equal(checkpointed["loss"], plain["loss"])
    assert all(grad.abs().sum() > 0 for grad in plain["grads"])
    for with_checkpointing, without in zip(checkpointed["grads"], plain["grads"]):
        assert torch.allclose(with_checkpointing, without, rtol=1e-6, atol=1e-9)


def _set_dropouts(network, dropout: float | None, rank_dropout: float | None, module_dropout: float | None) -> None:
    for lora in network.unet_loras:
        lora.dropout, lora.rank_dropout, lora.module_dropout = dropout, rank_dropout, module_dropout


def test_lora_dropouts_act_in_the_training_forward_only(tiny_sd_dir):
    """Each of dropout, rank dropout and module dropout makes the training forward's loss follow the
    global random state; with all three on, the trajectory that makes x_t and the sample grids are
    exactly those of the same LoRA without any dropout, whatever the random state."""
    step = make_step(tiny_sd_dir, LecoConfig(max_denoising_steps=6, denoise_guidance_scale=3.0))
    setting = dataclasses.replace(SETTING, multiplier=-0.7)
    grid = SampleGridMaker(step.predict, step.network, step.cache, step.time_ids_fn,
                           lambda name: build_sample_scheduler(name, dict(step.scheduler.config), step.prediction_type),
                           lambda latents: latents.numpy(), CPU, (64, 64))
    prompt = SamplePrompt("van gogh", steps=3, guidance_scale=3.0, seed=1)

    def sample(seed: int) -> tuple[torch.Tensor, int, np.ndarray]:
        torch.manual_seed(seed)
        latents, timestep, _ = step.make_xt(setting, 64, 64, None, torch.Generator().manual_seed(5))
        image = grid.cells([prompt], [-0.7], "ddim")[(0, 0)]
        assert step.network.training  # both put training mode back
        return latents, timestep, image

    def training_loss(seed: int, latents: torch.Tensor, timestep: int) -> float:
        torch.manual_seed(seed)
        with torch.no_grad():
            return step.loss_at(setting, latents, timestep, None).item()

    _set_dropouts(step.network, None, None, None)
    latents, timestep, image = sample(0)
    plain = training_loss(0, latents, timestep)
    for dropouts in ((0.5, None, None), (None, 0.5, None), (None, None, 0.5)):
        _set_dropouts(step.network, *dropouts)
        losses = [plain] + [training_loss(seed, latents, timestep) for seed in (0, 1)]
        assert len(set(losses)) == 3, (dropouts, losses)  # on in training, differently for each seed
    _set_dropouts(step.network, 0.5, 0.5, 0.3)
    for seed in (0, 1):
        dropped_latents, dropped_timestep, dropped_image = sample(seed)
        assert torch.equal(dropped_latents, latents) and dropped_timestep == timestep
        assert np.array_equal(dropped_image, image)


def test_noise_offset_adds_one_offset_per_sample_and_channel():
    """x_T = randn(B, C, h, w) + noise_offset * randn(B, C, 1, 1), both from the step's generator, in that order."""
    latents = initial_latents(3, 64, 32, torch.Generator().manual_seed(5), noise_offset=0.1)
    plain = initial_latents(3, 64, 32, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(3, 4, 8, 4, generator=generator)
    offsets = torch.randn(3, 4, 1, 1, generator=generator)
    assert torch.equal(plain, noise)
    shift = latents - plain  # (3, 4, 8, 4): one value per (sample, channel), the same at every position
    assert torch.allclose(shift, (0.1 * offsets).expand_as(shift), atol=1e-6)
    assert len({round(value, 6) for value in shift[:, :, 0, 0].flatten().tolist()}) == 12
    assert 0.01 < shift.abs().max() < 0.5  # of the order of the offset (0.1 x a standard normal draw)


def test_noise_offset_reaches_the_trajectory(tiny_sd_dir, monkeypatch):
    """The x_T the step's sampler starts from is the by-hand x_T with the offset: k first, then the
    noise, then the offsets, all from the step's generator."""
    starts = []
    original = leco_step.partial_denoise

    def spy(predict, scheduler, latents, *args, **kwargs):
        starts.append(latents.clone())
        return original(predict, scheduler, latents, *args, **kwargs)

    monkeypatch.setattr(leco_step, "partial_denoise", spy)
    for noise_offset in (None, 0.1):
        step = make_step(tiny_sd_dir, LecoConfig(max_denoising_steps=6, noise_offset=noise_offset))
        step.make_xt(SETTING, 64, 64, None, torch.Generator().manual_seed(9))
    generator = torch.Generator().manual_seed(9)
    torch.randint(1, 6, (), generator=generator)  # k
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    offsets = torch.randn(2, 4, 1, 1, generator=generator)
    assert torch.equal(starts[0], noise)  # DDPM's init_noise_sigma is 1
    assert torch.allclose(starts[1], noise + 0.1 * offsets, atol=1e-6)


def test_step_option_flags_reach_the_network_and_the_step(tiny_sd_dir, tmp_path):
    """The flags land in the config the trainer reads and in every LoRA module (the trainer's own wiring
    of config.train / config.leco into prepare_unet / LecoStep is checked in tests/test_train_sd.py)."""
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), tmp_path / "out") + [
        "--gradient_checkpointing", "--network_dropout", "0.1", "--network_args", "rank_dropout=0.2", "module_dropout=0.3",
        "--noise_offset", "0.05"]
    config = build_run_config(parse_namespace(argv, "sd")[0], "sd")
    assert config.train.gradient_checkpointing is True and config.leco.noise_offset == 0.05
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    network = create_lora_network(config, unet)
    assert {(lora.dropout, lora.rank_dropout, lora.module_dropout) for lora in network.unet_loras} == {(0.1, 0.2, 0.3)}
