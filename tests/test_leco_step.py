"""The LECO step on a tiny U-Net: U-Net call budget, frozen predictions, gradients, accumulation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from accelerate import Accelerator

from library.config import LecoConfig
from library.family import family_for
from library.leco_step import LecoStep, random_resolution
from library.models import load_base_model
from library.optimizer_step import accumulate_and_step
from library.prompts import PromptSetting
from library.run_setup import prepare_unet
from networks.lora import create_network
from tests import hand_schedule

SETTING = PromptSetting(prompt="van gogh", positive="van gogh", negative="", neutral="", action="erase",
                        guidance_scale=1.5, resolution=(64, 64), batch_size=2, multiplier=1.0, weight=1.0)


def make_step(folder, config: LecoConfig, family: str = "sd", settings=(SETTING,), seed: int = 0,
              trajectory: str | None = None) -> LecoStep:
    """A LecoStep on a tiny model with a non-zero LoRA (``trajectory``: the trainer's step builder for that mode)."""
    torch.manual_seed(seed)
    model = load_base_model(str(folder), family)
    fam = family_for(family)
    prompts = [prompt for setting in settings for prompt in setting.prompts]
    cache = fam.encode(model, prompts, torch.device("cpu"))
    unet = prepare_unet(model.load_unet(torch.float32), torch.device("cpu"), torch.float32, "sdpa", False)
    network = create_network(1.0, 4, 1.0, None, [], unet)
    network.apply_to()
    with torch.no_grad():  # a non-zero LoRA, so that "LoRA on" and "LoRA off" differ
        for lora in network.unet_loras:
            lora.lora_up.weight.normal_(std=0.05)
    network.train()
    if trajectory is not None:
        from library.trajectories import build_leco_step

        return build_leco_step(trajectory, settings, unet, network, cache, model.scheduler_config, model.prediction_type,
                               config, fam.time_ids, torch.device("cpu"))
    return LecoStep(unet, network, cache, model.scheduler_config, model.prediction_type, config, fam.time_ids,
                    torch.device("cpu"))


class CallRecorder:
    """Records each U-Net call: batch size, LoRA multiplier, network mode, grad mode."""

    def __init__(self, step: LecoStep):
        self.calls = []
        self.step = step
        self.handle = step.unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls.append({
            "batch": args[0].shape[0],
            "multiplier": self.step.network.multiplier,
            "network_training": self.step.network.training,
            "grad": torch.is_grad_enabled(),
        })


OTHER = dataclasses.replace(SETTING, positive="van gogh painting", neutral="a photo")


@pytest.fixture
def sd_step(tiny_sd_dir):
    return make_step(tiny_sd_dir, LecoConfig(max_denoising_steps=6, denoise_guidance_scale=3.0), settings=(SETTING, OTHER))


def test_unet_calls_per_step_match_the_design(sd_step):
    """Call budget and the LoRA strength of each call, with a multiplier other than the network's default 1.0:
    the LoRA's own output (wrapped layer's output minus the base layer's) must be -0.7 * scale * up(down(x))
    in the trajectory and in the training forward, and absent in the frozen call."""
    setting = dataclasses.replace(SETTING, multiplier=-0.7)
    recorder = CallRecorder(sd_step)
    lora = next(lora for lora in sd_step.network.unet_loras if lora.lora_name.endswith("attn2_to_k"))
    lora_outputs = []  # per U-Net call: (LoRA output, -0.7 * scale * up(down(x)), base output) of one wrapped layer

    def record(module, args, output):
        with torch.no_grad():
            base = lora._org_forward(args[0])
            by_hand = -0.7 * lora.scale * lora.lora_up(lora.lora_down(args[0]))
        lora_outputs.append((output.detach() - base, by_hand, base))

    lora.org_module.register_forward_hook(record)
    result = sd_step(setting, torch.Generator().manual_seed(0))
    k = result.denoise_steps
    assert 1 <= k <= 5
    assert len(recorder.calls) == k + 2  # k trajectory calls + 1 frozen batch + 1 training forward
    trajectory, frozen, training = recorder.calls[:k], recorder.calls[k], recorder.calls[k + 1]
    assert all(call["batch"] == 4 and not call["grad"] for call in trajectory)  # CFG halves batched
    assert all(call["multiplier"] == -0.7 and not call["network_training"] for call in trajectory)
    # positive == target, neutral == unconditional == "": two distinct prompts, computed once each
    assert frozen["batch"] == 4 and frozen["multiplier"] == 0.0 and not frozen["grad"]
    assert training["batch"] == 2 and training["multiplier"] == -0.7 and training["grad"] and training["network_training"]
    assert len(lora_outputs) == k + 2
    for index, (delta, by_hand, base) in enumerate(lora_outputs):
        if index == k:  # the frozen predictions: the LoRA path is skipped, the output is the base layer's exactly
            assert torch.count_nonzero(delta) == 0
        else:
            assert by_hand.abs().max() > 1e-3 * base.abs().max()  # a LoRA output large enough to tell apart
            assert torch.allclose(delta, by_hand, rtol=1e-4, atol=1e-6)


def test_denoise_guidance_one_needs_no_unconditional_half(tiny_sd_dir):
    step = make_step(tiny_sd_dir, LecoConfig(max_denoising_steps=6, denoise_guidance_scale=1.0))
    recorder = CallRecorder(step)
    result = step(SETTING, torch.Generator().manual_seed(1))
    assert [call["batch"] for call in recorder.calls[:result.denoise_steps]] == [2] * result.denoise_steps


def test_frozen_model_trajectory_option(tiny_sd_dir):
    step = make_step(tiny_sd_dir, LecoConfig(max_denoising_steps=6, denoise_with_frozen=True))
    recorder = CallRecorder(step)
    result = step(dataclasses.replace(SETTING, multiplier=-2.0), torch.Generator().manual_seed(2))
    assert {call["multiplier"] for call in recorder.calls[:result.denoise_steps]} == {0.0}
    assert recorder.calls[-1]["multiplier"] == -2.0


def test_frozen_predictions_are_the_base_model_exactly(sd_step):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    timesteps = torch.full((2,), 400)
    frozen = sd_step.frozen_predictions(OTHER, latents, timesteps, None)
    assert set(frozen) == {"van gogh painting", "a photo", ""}
    sd_step.network.restore()
    for prompt, prediction in frozen.items():
        with torch.no_grad():
            base = sd_step.predict(latents, timesteps, sd_step.conditioning([prompt] * 2, None))
        assert torch.allclose(prediction, base, atol=1e-5)


def test_the_trajectory_contributes_no_gradient(sd_step):
    """x_t carries no autograd graph, and a backward of the step's loss reaches the LoRA parameters
    (and nothing of the U-Net) through exactly one U-Net call: the training forward.

    Each U-Net output that is part of a graph gets a gradient hook counting the gradients that reach
    it; each LoRA parameter gets one counting how often it receives a gradient."""
    calls = []  # per U-Net call: {"graph": output has a grad_fn, "grads": gradients that reached the output}

    def record(module, args, kwargs, output):
        call = {"graph": output.sample.grad_fn is not None, "grads": 0}
        if output.sample.requires_grad:
            output.sample.register_hook(lambda grad, call=call: call.update(grads=call["grads"] + 1))
        calls.append(call)

    sd_step.unet.register_forward_hook(record, with_kwargs=True)
    captured = {}
    original = sd_step.make_xt

    def spy(*args, **kwargs):
        captured["xt"] = original(*args, **kwargs)
        return captured["xt"]

    sd_step.make_xt = spy
    params = [param for param in sd_step.network.parameters() if param.requires_grad]
    received = [0] * len(params)
    for index, param in enumerate(params):
        param.register_hook(lambda grad, index=index: received.__setitem__(index, received[index] + 1))
    result = sd_step(SETTING, torch.Generator().manual_seed(4))
    k = result.denoise_steps
    latents = captured["xt"][0]
    assert latents.grad_fn is None and not latents.requires_grad
    assert [call["graph"] for call in calls] == [False] * (k + 1) + [True]  # k trajectory calls, the frozen batch, training
    result.loss.backward()
    assert [call["grads"] for call in calls] == [0] * (k + 1) + [1]
    assert received == [1] * len(params) and all(param.grad is not None and param.grad.abs().sum() > 0 for param in params)
    assert all(param.grad is None for param in sd_step.unet.parameters())


def test_gradient_accumulation_of_two_batches_of_one_equals_one_batch_of_two(tiny_sd_dir):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    single = dataclasses.replace(SETTING, batch_size=1)

    def run(accumulation: int, chunks):
        step = make_step(tiny_sd_dir, LecoConfig(max_denoising_steps=6), seed=7)
        params = [param for param in step.network.parameters() if param.requires_grad]
        accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=True)
        optimizer = accelerator.prepare(torch.optim.SGD(params, lr=10.0))
        for chunk in chunks:
            accumulate_and_step(accelerator, lambda: step.loss_at(single if len(chunk) == 1 else SETTING, chunk, 300, None),
                                optimizer, None, params, 0.0)
        return [param.detach().clone() for param in params], accelerator

    accumulated, accelerator = run(2, [latents[:1], latents[1:]])
    assert accelerator.sync_gradients
    batched, _ = run(1, [latents])
    changed = sum(not torch.equal(a, b) for a, b in zip(accumulated, make_step(tiny_sd_dir, LecoConfig(), seed=7).network.parameters()))
    assert changed > 0
    for a, b in zip(accumulated, batched):
        assert torch.allclose(a, b, atol=1e-6)


def test_min_snr_and_huber_reach_the_loss(sd_step):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    plain = sd_step.loss_at(SETTING, latents, 50, None)
    sd_step.config = dataclasses.replace(sd_step.config, min_snr_gamma=1.0)
    weighted = sd_step.loss_at(SETTING, latents, 50, None)
    # by hand from the betas: alpha_bar_50 = 0.95161..., SNR = 19.651 > gamma = 1, so the weight is gamma / SNR
    snr = hand_schedule.snr(50)
    assert snr == pytest.approx(19.6513, rel=1e-5)
    assert weighted.item() == pytest.approx(plain.item() / snr, rel=1e-5)
    sd_step.config = dataclasses.replace(sd_step.config, min_snr_gamma=None, loss_type="l1")
    assert sd_step.loss_at(SETTING, latents, 50, None).item() != pytest.approx(plain.item())


def test_setting_weight_scales_the_loss(sd_step):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    plain = sd_step.loss_at(SETTING, latents, 500, None)
    double = sd_step.loss_at(dataclasses.replace(SETTING, weight=2.0), latents, 500, None)
    assert double.item() == pytest.approx(2 * plain.item(), rel=1e-5)


@pytest.mark.parametrize("size", [(512, 512), (1024, 1024), (512, 768)])
def test_random_resolution_buckets(size):
    generator = torch.Generator().manual_seed(0)
    seen = {random_resolution(*size, generator) for _ in range(200)}
    area = size[0] * size[1]
    assert len(seen) > 3
    for height, width in seen:
        assert height % 64 == 0 and width % 64 == 0
        assert 0.8 * area <= height * width <= area
        assert 0.5 <= width / height <= 2.0
    assert {(h, w) for h, w in seen if h != w} == {(w, h) for h, w in seen if h != w}  # portrait and landscape alike


def test_preserve_anchor_regresses_the_lora_onto_the_frozen_prediction(sd_step):
    """action = "preserve" (issue 12): one frozen prediction (the target's own) and the loss
    weight * mean((LoRA(x_t, target) - frozen(x_t, target))^2), computed here by hand."""
    anchor = dataclasses.replace(SETTING, prompt="a photo", positive="a photo", neutral="a photo", negative="",
                                 action="preserve", guidance_scale=0.0, weight=3.0)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    timesteps = torch.full((2,), 300)
    assert set(sd_step.frozen_predictions(anchor, latents, timesteps, None)) == {"a photo"}
    cond = sd_step.conditioning(["a photo"] * 2, None)
    with torch.no_grad():
        with sd_step.network.multiplier_context(0.0):
            frozen = sd_step.predict(latents, timesteps, cond)
        with sd_step.network.multiplier_context(1.0):
            with_lora = sd_step.predict(latents, timesteps, cond)
    expected = 3.0 * (with_lora - frozen).pow(2).mean()
    assert expected.item() > 0  # the test LoRA is non-zero
    assert sd_step.loss_at(anchor, latents, 300, None).item() == pytest.approx(expected.item(), rel=1e-5)
    recorder = CallRecorder(sd_step)
    result = sd_step(anchor, torch.Generator().manual_seed(10))
    assert recorder.calls[result.denoise_steps]["batch"] == 2  # the frozen call holds the target only


def test_anchors_are_held_at_the_frozen_prediction_at_the_same_xt(sd_step):
    """An entry's anchors list (issue 12): the loss adds, at the setting's own x_t,
    weight * anchor_weight * sum over anchors of mean((LoRA(x_t, a) - frozen(x_t, a))^2), by hand."""
    anchored = dataclasses.replace(SETTING, anchors=("a photo", "van gogh painting"), anchor_weight=0.5, weight=2.0)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    timesteps = torch.full((2,), 250)
    assert set(sd_step.frozen_predictions(anchored, latents, timesteps, None)) == {"van gogh", "", "a photo", "van gogh painting"}
    expected = sd_step.loss_at(SETTING, latents, 250, None).item() * 2.0
    for anchor in anchored.anchors:
        cond = sd_step.conditioning([anchor] * 2, None)
        with torch.no_grad():
            with sd_step.network.multiplier_context(0.0):
                frozen = sd_step.predict(latents, timesteps, cond)
            with sd_step.network.multiplier_context(1.0):
                with_lora = sd_step.predict(latents, timesteps, cond)
        expected += 2.0 * 0.5 * (with_lora - frozen).pow(2).mean().item()
    assert sd_step.loss_at(anchored, latents, 250, None).item() == pytest.approx(expected, rel=1e-5)
    recorder = CallRecorder(sd_step)
    result = sd_step(anchored, torch.Generator().manual_seed(12))
    k = result.denoise_steps
    assert [call["batch"] for call in recorder.calls[k:]] == [8, 2, 4]  # frozen (4 prompts), target, both anchors
    assert recorder.calls[-1]["grad"] and recorder.calls[-1]["multiplier"] == 1.0
