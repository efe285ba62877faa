"""Persistent trajectories: the per-sample sampler step, staggered chains, restarts, exact labels."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

import sdxl_train_leco
import train_leco
from library.config import LecoConfig
from library.diffusion import build_noise_scheduler, initial_latents, landing_timestep, legacy_timestep, partial_denoise
from library.prompts import PromptSetting
from library.run_setup import seeded_generator
from library.trajectories import (
    PersistentLecoStep,
    sampler_step_per_sample,
    staggered_starts,
    timestep_labels,
)
from networks.lora import read_lora_metadata
from tests.helpers import all_finite, base_argv, lora_changed, scalars, write_prompts
from tests.test_diffusion import SD_SCHEDULE
from tests.test_leco_step import make_step

SETTING = PromptSetting(prompt="van gogh", positive="van gogh", negative="", neutral="", action="erase",
                        guidance_scale=1.5, resolution=(64, 64), batch_size=3, multiplier=1.0, weight=1.0)


# ----------------------------------------------------------------------------------------------
# The per-sample sampler step


def _scheduler(sampler: str, prediction_type: str, zero_terminal_snr: bool, steps: int = 10):
    scheduler = build_noise_scheduler(SD_SCHEDULE, prediction_type, zero_terminal_snr, sampler)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction_type, zero_terminal_snr", [("epsilon", False), ("v_prediction", False),
                                                                 ("v_prediction", True)])
def test_per_sample_step_equals_the_scalar_scheduler_step_for_each_sample(sampler, prediction_type, zero_terminal_snr):
    scheduler = _scheduler(sampler, prediction_type, zero_terminal_snr)
    grid = scheduler.timesteps
    indices = [0, 3, 7, len(grid) - 1]  # the first (pure noise with zero terminal SNR) and the last grid entry
    timesteps = grid[indices]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(len(indices), 4, 3, 3, generator=generator)
    output = torch.randn(len(indices), 4, 3, 3, generator=generator)
    noise = torch.cat([torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(10 + i)) for i in range(len(indices))])
    stepped = sampler_step_per_sample(scheduler, output, timesteps, sample, noise)
    for row, t in enumerate(timesteps):
        # diffusers draws its DDPM noise from the generator: the same seed gives the same noise as above
        expected = scheduler.step(output[row:row + 1], t, sample[row:row + 1],
                                  generator=torch.Generator().manual_seed(10 + row)).prev_sample
        assert torch.allclose(stepped[row:row + 1], expected, atol=1e-6, rtol=1e-6), (row, int(t))


def test_per_sample_ddim_epsilon_step_by_hand():
    """x' = sqrt(a') x0 + sqrt(1 - a') eps with x0 = (x - sqrt(1 - a) eps) / sqrt(a), a' at t - T/N."""
    scheduler = _scheduler("ddim", "epsilon", False, steps=10)  # grid 901, 801, ..., 1; T // N = 100
    alphas = scheduler.alphas_cumprod.double()
    x = torch.tensor([0.3, -1.2]).view(2, 1, 1, 1)
    eps = torch.tensor([0.5, 0.8]).view(2, 1, 1, 1)
    out = sampler_step_per_sample(scheduler, eps, torch.tensor([901, 101]), x)
    for row, (t, prev) in enumerate([(901, 801), (101, 1)]):
        a, a_prev = alphas[t].item(), alphas[prev].item()
        x0 = (x[row].item() - math.sqrt(1 - a) * eps[row].item()) / math.sqrt(a)
        assert out[row].item() == pytest.approx(math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps[row].item(), rel=1e-5)


def test_per_sample_ddpm_v_step_by_hand():
    """DDPM posterior: mean = sqrt(a') beta / (1 - a) x0 + sqrt(alpha) (1 - a') / (1 - a) x, variance
    (1 - a') / (1 - a) beta, with alpha = a / a', beta = 1 - alpha and x0 = sqrt(a) x - sqrt(1 - a) v;
    past the end of the grid a' = 1 (no noise is left to remove: variance 0)."""
    scheduler = _scheduler("ddpm", "v_prediction", False, steps=10)  # grid 901, ..., 1
    alphas = scheduler.alphas_cumprod.double()
    x = torch.tensor([0.7, -0.4]).view(2, 1, 1, 1)
    v = torch.tensor([-0.2, 0.9]).view(2, 1, 1, 1)
    noise = torch.tensor([1.5, -0.5]).view(2, 1, 1, 1)
    out = sampler_step_per_sample(scheduler, v, torch.tensor([501, 1]), x, noise)
    for row, (t, a_prev) in enumerate([(501, alphas[401].item()), (1, 1.0)]):
        a = alphas[t].item()
        alpha, beta = a / a_prev, 1 - a / a_prev
        x0 = math.sqrt(a) * x[row].item() - math.sqrt(1 - a) * v[row].item()
        mean = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(alpha) * (1 - a_prev) / (1 - a) * x[row].item()
        std = math.sqrt(max((1 - a_prev) / (1 - a) * beta, 1e-20))
        assert out[row].item() == pytest.approx(mean + std * noise[row].item(), rel=1e-5, abs=1e-6)


def test_per_sample_step_keeps_every_tensor_on_the_samples_device():
    """Coefficients are looked up on the CPU and must move to the samples' device (meta stands in for CUDA:
    mixing it with a CPU tensor raises, as CUDA would)."""
    for sampler in ("ddpm", "ddim"):
        scheduler = _scheduler(sampler, "epsilon", False)
        sample = torch.zeros(2, 4, 3, 3, device="meta")
        out = sampler_step_per_sample(scheduler, torch.zeros_like(sample), scheduler.timesteps[[0, 4]], sample,
                                      torch.randn(2, 4, 3, 3))
        assert out.device.type == "meta" and out.shape == sample.shape


def test_per_sample_step_refuses_a_scheduler_it_does_not_reproduce():
    scheduler = _scheduler("ddpm", "epsilon", False)
    with pytest.raises(ValueError, match="noise"):
        sampler_step_per_sample(scheduler, torch.zeros(1, 4, 2, 2), scheduler.timesteps[:1], torch.zeros(1, 4, 2, 2))
    scheduler.register_to_config(clip_sample=True)
    with pytest.raises(ValueError, match="clip_sample"):
        sampler_step_per_sample(scheduler, torch.zeros(1, 4, 2, 2), scheduler.timesteps[:1], torch.zeros(1, 4, 2, 2),
                                torch.zeros(1, 4, 2, 2))


# ----------------------------------------------------------------------------------------------
# Staggering


@pytest.mark.parametrize("batch, steps", [(1, 2), (1, 40), (3, 6), (4, 20), (4, 40), (7, 8), (5, 3)])
def test_staggered_starts_are_spread_over_the_schedule(batch, steps):
    for offset in (0.0, 0.37, 0.999999):
        starts = staggered_starts(batch, steps, offset)
        assert len(starts) == batch and all(0 <= s <= steps - 2 for s in starts)
        assert starts == sorted(starts)
        if batch <= steps - 1:
            assert len(set(starts)) == batch  # distinct positions
            gaps = [b - a for a, b in zip(starts, starts[1:])]
            assert all(math.floor((steps - 1) / batch) <= g <= math.ceil((steps - 1) / batch) for g in gaps)
    assert staggered_starts(2, 11, 0.5) == [2, 7]  # floor(0.5 * 10 / 2), floor(1.5 * 10 / 2)
    with pytest.raises(ValueError):
        staggered_starts(2, 10, 1.0)


def test_labels_are_where_the_chain_sits():
    scheduler = _scheduler("ddpm", "epsilon", False, steps=40)
    positions = torch.tensor([1, 20, 39])
    assert timestep_labels(scheduler, positions, 40).tolist() == [landing_timestep(scheduler, p - 1) for p in (1, 20, 39)]
    assert timestep_labels(scheduler, positions, 40).tolist() == scheduler.timesteps[[1, 20, 39]].tolist()
    assert timestep_labels(scheduler, positions, 40, legacy=True).tolist() == [legacy_timestep(p, 40) for p in (1, 20, 39)]


# ----------------------------------------------------------------------------------------------
# Chains on a tiny U-Net


def make_persistent(folder, config: LecoConfig, family: str = "sd", settings=(SETTING,), seed: int = 0,
                    trajectory: str = "persistent"):
    return make_step(folder, config, family, settings, seed, trajectory)


class UNetCalls:
    """Every U-Net call: batch, timesteps, LoRA multiplier, grad mode, SDXL time ids."""

    def __init__(self, step):
        self.calls = []
        self.step = step
        step.unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        added = kwargs.get("added_cond_kwargs")
        multiplier = self.step.network.multiplier
        self.calls.append({
            "batch": args[0].shape[0],
            "timesteps": args[1].tolist(),
            "multiplier": multiplier.tolist() if isinstance(multiplier, torch.Tensor) else multiplier,
            "network_training": self.step.network.training,
            "grad": torch.is_grad_enabled(),
            "time_ids": None if added is None else added["time_ids"].clone(),
        })


def test_a_step_costs_one_cfg_call_whatever_n_is(tiny_sd_dir):
    for steps in (4, 12):
        step = make_persistent(tiny_sd_dir, LecoConfig(max_denoising_steps=steps, denoise_guidance_scale=3.0))
        generator = torch.Generator().manual_seed(0)
        recorder = UNetCalls(step)
        step(SETTING, generator)  # first step on the setting: makes the chains (warm-up) too
        assert 3 <= len(recorder.calls) <= 3 + steps - 2
        for _ in range(3):
            recorder.calls.clear()
            result = step(SETTING, generator)
            assert len(recorder.calls) == 3
            advance, frozen, training = recorder.calls
            assert advance["batch"] == 6 and not advance["grad"] and advance["multiplier"] == 1.0
            assert not advance["network_training"]  # no LoRA dropout while sampling
            assert frozen["batch"] == 6 and frozen["multiplier"] == 0.0 and not frozen["grad"]
            assert training["batch"] == 3 and training["grad"] and training["multiplier"] == 1.0
            # the advance queries each chain at the grid entry it stands on; training at where it lands
            assert training["timesteps"] == [landing_timestep(step.scheduler, p - 1) for p in step.last_positions]
            assert result.loss.requires_grad and math.isfinite(result.loss.item())


def test_positions_cover_one_to_n_minus_one_uniformly_over_each_cycle(tiny_sd_dir):
    steps = 6
    for batch in (1, 3):
        setting = dataclasses.replace(SETTING, batch_size=batch)
        step = make_persistent(tiny_sd_dir, LecoConfig(max_denoising_steps=steps, denoise_guidance_scale=1.0),
                               settings=(setting,), seed=batch)
        generator = torch.Generator().manual_seed(batch)
        trained = []
        for _ in range(2 * (steps - 1)):
            step(setting, generator)
            trained.append(step.last_positions)
        for positions in trained:
            assert len(set(positions)) == batch  # the chains stand at distinct positions
        for start in range(len(trained) - (steps - 1) + 1):  # every window of N-1 consecutive steps is a cycle
            window = Counter(p for positions in trained[start:start + steps - 1] for p in positions)
            assert window == {p: batch for p in range(1, steps)}


def test_a_chain_restarts_from_fresh_noise_after_n_minus_1_advances(tiny_sd_dir):
    steps = 5
    config = LecoConfig(max_denoising_steps=steps, denoise_sampler="ddim", denoise_guidance_scale=1.0)
    setting = dataclasses.replace(SETTING, batch_size=2)
    step = make_persistent(tiny_sd_dir, config, settings=(setting,))
    generator = torch.Generator().manual_seed(3)
    history, restarts = [], []
    for index in range(3 * (steps - 1)):
        before = generator.get_state()
        step(setting, generator)
        history.append(step.last_positions)
        chains = next(iter(step.chains.values()))
        done = [row for row, position in enumerate(step.last_positions) if position == steps - 1]
        if done:
            restarts.append(index)
            # DDIM draws nothing while advancing: the restart's noise is the generator's next draw
            replay = torch.Generator()
            replay.set_state(before)
            expected = initial_latents(len(done), 64, 64, replay)
            assert torch.equal(chains.latents[done], expected)
            assert chains.positions[done].tolist() == [0] * len(done)
    chain0 = [positions[0] for positions in history]
    ends = [index for index, position in enumerate(chain0) if position == steps - 1]
    assert len(ends) >= 2 and all(b - a == steps - 1 for a, b in zip(ends, ends[1:]))  # N-1 advances per life
    assert all(chain0[end + 1] == 1 for end in ends if end + 1 < len(chain0))  # one step from fresh noise


def test_chains_follow_the_fresh_trajectory_exactly(tiny_sd_dir):
    """Without optimizer steps a chain at position p is exactly the fresh k = p trajectory of its noise
    (DDIM is deterministic), and trains with the label x_t really sits at."""
    steps = 8
    config = LecoConfig(max_denoising_steps=steps, denoise_sampler="ddim", denoise_guidance_scale=3.0)
    step = make_persistent(tiny_sd_dir, config)
    generator = torch.Generator().manual_seed(5)
    replay = torch.Generator()
    replay.set_state(generator.get_state())
    torch.rand((), generator=replay)  # the stagger offset
    noise = initial_latents(3, 64, 64, replay)
    recorder = UNetCalls(step)
    restarted = set()
    for _ in range(2):
        step(SETTING, generator)
        restarted |= {row for row, position in enumerate(step.last_positions) if position == steps - 1}
    positions = step.last_positions
    assert len(restarted) < len(positions)
    labels = recorder.calls[-1]["timesteps"]  # the training forward of the last step
    chains = next(iter(step.chains.values()))
    cond = step.conditioning([SETTING.prompt], None)
    uncond = step.conditioning([SETTING.negative], None)
    step.scheduler.set_timesteps(steps)
    step.network.eval()
    for row, position in enumerate(positions):
        if row in restarted:
            continue  # now on new noise
        with step.network.multiplier_context(1.0):
            fresh, label = partial_denoise(step.predict, step.scheduler, noise[row:row + 1], position, cond, uncond, 3.0)
        assert torch.allclose(chains.latents[row:row + 1], fresh, atol=1e-4)  # batch 3 vs 1: float rounding only
        assert labels[row] == label


def test_legacy_labels_with_leco_legacy_timestep(tiny_sd_dir):
    step = make_persistent(tiny_sd_dir, LecoConfig(max_denoising_steps=6, legacy_timestep=True))
    recorder = UNetCalls(step)
    step(SETTING, torch.Generator().manual_seed(0))
    assert recorder.calls[-1]["timesteps"] == [legacy_timestep(p, 6) for p in step.last_positions]


def test_frozen_chains_sample_with_the_lora_off(tiny_sd_dir):
    step = make_persistent(tiny_sd_dir, LecoConfig(max_denoising_steps=6, denoise_with_frozen=True))
    setting = dataclasses.replace(SETTING, multiplier=-2.0)
    recorder = UNetCalls(step)
    generator = torch.Generator().manual_seed(0)
    step(setting, generator)
    recorder.calls.clear()
    step(setting, generator)
    assert [call["multiplier"] for call in recorder.calls] == [0.0, 0.0, -2.0]


def test_dynamic_resolution_keeps_one_chain_set_per_bucket(tiny_sd_dir):
    setting = dataclasses.replace(SETTING, resolution=(192, 192), dynamic_resolution=True, batch_size=2)
    step = make_persistent(tiny_sd_dir, LecoConfig(max_denoising_steps=4, denoise_guidance_scale=1.0), settings=(setting,))
    generator = torch.Generator().manual_seed(1)
    for _ in range(8):
        before = {key: chains.positions.clone() for key, chains in step.chains.items()}
        step(setting, generator)
        changed = [key for key, chains in step.chains.items() if key not in before or not torch.equal(before[key], chains.positions)]
        assert len(changed) == 1  # only the drawn bucket's chains moved
    assert len(step.chains) > 1
    for (_, height, width), chains in step.chains.items():
        assert chains.latents.shape == (2, 4, height // 8, width // 8) and (chains.height, chains.width) == (height, width)


def test_sdxl_chains_keep_their_own_time_ids(tiny_sdxl_dir):
    setting = dataclasses.replace(SETTING, prompt="girl", positive="girl, long hair", negative="", neutral="girl",
                                  resolution=(64, 128), dynamic_crops=True, batch_size=2)
    step = make_persistent(tiny_sdxl_dir, LecoConfig(max_denoising_steps=4, denoise_guidance_scale=3.0), family="sdxl",
                           settings=(setting,))
    generator = torch.Generator().manual_seed(2)
    step(setting, generator)
    recorder = UNetCalls(step)
    for _ in range(4):
        chains = next(iter(step.chains.values()))
        ids = chains.time_ids.clone()
        assert ids.shape == (2, 6) and not torch.equal(ids[0], ids[1])  # one random crop per chain
        recorder.calls.clear()
        step(setting, generator)
        advance, frozen, training = recorder.calls
        assert torch.equal(advance["time_ids"], torch.cat([ids, ids]))  # CFG halves, each chain its own ids
        assert torch.equal(frozen["time_ids"], ids.repeat(frozen["batch"] // 2, 1))
        assert torch.equal(training["time_ids"], ids)
        restarted = [row for row, position in enumerate(step.last_positions) if position == 3]
        for row in restarted:
            assert not torch.equal(chains.time_ids[row], ids[row])  # a new chain draws new size conditioning


def test_chains_keep_every_tensor_on_the_training_device(tiny_sd_dir):
    """Making, advancing and restarting chains with the U-Net, LoRA and prompt cache on the meta device:
    any CPU tensor left in an op with a device tensor raises (as it would on CUDA)."""
    step = make_persistent(tiny_sd_dir, LecoConfig(max_denoising_steps=5))
    meta = torch.device("meta")
    step.unet.to(meta)
    step.network.to(meta)
    step.cache.to(meta, torch.float32)
    step.device = meta
    generator = torch.Generator().manual_seed(0)
    chains = step.chains_for(SETTING, generator)  # warm-up advances
    for _ in range(4):
        step.advance(SETTING, chains, torch.arange(3), generator)
        step.restart_finished(SETTING, chains, generator)
    assert chains.latents.device == meta and chains.positions.device.type == "cpu"
    assert chains.positions.max() < 4


def test_each_rank_keeps_its_own_chains(tiny_sd_dir):
    """Chains come from the rank's own generator (seeded_generator differs per rank)."""
    made = {}
    for rank in (0, 1, 0):
        step = make_persistent(tiny_sd_dir, LecoConfig(max_denoising_steps=6))
        step(SETTING, seeded_generator(42, rank))
        made.setdefault(rank, []).append(next(iter(step.chains.values())).latents.clone())
    assert torch.equal(made[0][0], made[0][1])
    assert not torch.allclose(made[0][0], made[1][0])


def test_unknown_trajectory_mode_is_refused(tiny_sd_dir):
    with pytest.raises(ValueError):
        make_persistent(tiny_sd_dir, LecoConfig(), trajectory="stale")
    assert isinstance(make_persistent(tiny_sd_dir, LecoConfig(max_denoising_steps=4)), PersistentLecoStep)


# ----------------------------------------------------------------------------------------------
# End to end (train_leco.main / sdxl_train_leco.main)

PERSISTENT_SLIDER = """
resolution = 64
batch_size = 2
[[targets]]
target_class = "girl"
positive = "girl, long hair"
negative = "girl, short hair"
"""


def _check_run(out: Path, logs: Path, steps: int, trajectory: str = "persistent") -> dict:
    assert sorted(path.name for path in out.iterdir()) == ["leco-step00000002.safetensors", "leco.safetensors"]
    final = out / "leco.safetensors"
    assert lora_changed(final)
    metadata = read_lora_metadata(final)
    assert metadata["ss_leco_trajectory"] == trajectory
    assert read_lora_metadata(out / "leco-step00000002.safetensors")["ss_leco_trajectory"] == trajectory
    assert all_finite(scalars(logs, "loss")) and len(scalars(logs, "loss")) == steps
    assert all(0 <= t < 1000 for t in scalars(logs, "timestep"))
    return metadata


@pytest.mark.slow
def test_persistent_sd_run_saves_and_logs(tiny_sd_dir, tmp_path, caplog):
    out, logs = tmp_path / "out", tmp_path / "logs"
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), out, steps=3) + [
        "--leco_trajectory", "persistent", "--save_every_n_steps", "2",
        "--logging_dir", str(logs), "--max_denoising_steps", "6",
    ]
    with caplog.at_level(logging.INFO):
        assert train_leco.main(argv) == 0
    _check_run(out, logs, 3)
    summary = [record.getMessage() for record in caplog.records if record.getMessage().startswith("LECO: ")]
    assert summary and "persistent trajectories" in summary[0] and "positions 1..5 of 6" in summary[0]
    assert all(1 <= k <= 5 for k in scalars(logs, "denoise_steps"))


@pytest.mark.slow
def test_persistent_sd2_v_prediction_zero_terminal_snr_run(tiny_sd2_dir, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    prompts = tmp_path / "slider.toml"
    prompts.write_text(PERSISTENT_SLIDER, encoding="utf-8")
    argv = base_argv(tiny_sd2_dir, prompts, out, steps=4) + [
        "--leco_trajectory", "persistent", "--v_parameterization", "--zero_terminal_snr", "--min_snr_gamma", "5",
        "--save_every_n_steps", "2", "--logging_dir", str(logs), "--leco_denoise_sampler", "ddim",
    ]
    assert train_leco.main(argv) == 0
    metadata = _check_run(out, logs, 4)
    assert metadata["ss_v_parameterization"] == "True" and metadata["ss_base_model_version"] == "sd_v2_v"


@pytest.mark.slow
def test_persistent_sdxl_run_with_dynamic_crops_and_paired_poles(tiny_sdxl_dir, tmp_path, caplog):
    out, logs = tmp_path / "out", tmp_path / "logs"
    prompts = tmp_path / "slider.toml"
    prompts.write_text(PERSISTENT_SLIDER.replace("batch_size = 2", "batch_size = 2\ndynamic_crops = true"), encoding="utf-8")
    argv = base_argv(tiny_sdxl_dir, prompts, out, steps=4) + [
        "--leco_trajectory", "persistent", "--leco_denoise_with_frozen", "--leco_denoise_guidance_scale", "1",
        "--save_every_n_steps", "2", "--logging_dir", str(logs),
    ]
    with caplog.at_level(logging.INFO):
        assert sdxl_train_leco.main(argv) == 0
    metadata = _check_run(out, logs, 4)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_leco_denoise_with_frozen"] == "True"
    assert any("1 slider pole pair trained from one x_t" in record.getMessage() for record in caplog.records)


@pytest.mark.slow
def test_persistent_resume_remakes_the_chains(tiny_sd_dir, tmp_path, caplog):
    prompts = write_prompts(tmp_path, "erase")
    first = tmp_path / "first"
    argv = base_argv(tiny_sd_dir, prompts, first, steps=4) + ["--leco_trajectory", "persistent", "--save_every_n_steps", "2",
                                                              "--save_state"]
    assert train_leco.main(argv) == 0
    resumed = tmp_path / "resumed"
    argv = base_argv(tiny_sd_dir, prompts, resumed, steps=4) + ["--leco_trajectory", "persistent", "--resume",
                                                                str(first / "leco-step00000002-state")]
    with caplog.at_level(logging.INFO):
        assert train_leco.main(argv) == 0
    assert any("re-made from fresh noise" in record.getMessage() for record in caplog.records)
    assert read_lora_metadata(resumed / "leco.safetensors")["ss_steps"] == "4"
    assert lora_changed(resumed / "leco.safetensors")
