"""Runs that go wrong on a GPU box, reproduced on the CPU: NaN gradients, fp16 loss-scaler state,
resuming into different network options, pruning state folders, pasted sd-scripts flags, TF32."""

from __future__ import annotations

import datetime

import pytest
import torch

import train_leco
from library import leco_step, optimizer_step, run_setup, training
from tests.helpers import base_argv, lora_tensors, write_prompts

pytestmark = pytest.mark.slow


def test_nan_gradient_stops_before_the_optimizer_step(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    """A finite loss whose gradient is NaN (an fp16 overflow without a scaler, a bad op) must not reach the
    weights, and no file after it may be written."""
    original = leco_step.per_sample_loss
    calls = {"n": 0}

    def nan_gradient(prediction, *args, **kwargs):
        calls["n"] += 1
        loss = original(prediction, *args, **kwargs)
        if calls["n"] < 3:
            return loss
        # sqrt(u) at u = 0: value 0, derivative inf; times du/dpred = 0 gives a NaN gradient and a finite loss
        return loss + torch.sqrt((prediction - prediction.detach()).pow(2).flatten(1).sum(1))

    monkeypatch.setattr(leco_step, "per_sample_loss", nan_gradient)
    out = tmp_path / "out"
    code = train_leco.main(base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), out, steps=6) + ["--save_every_n_steps", "2"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "gradients became NaN/inf at step 3" in err and "leco-step00000002.safetensors" in err
    assert sorted(path.name for path in out.iterdir()) == ["leco-step00000002.safetensors"]
    assert all(torch.isfinite(value).all() for value in lora_tensors(out / "leco-step00000002.safetensors").values())


def test_a_lora_holding_nan_is_never_written(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    """Weights that became non-finite some other way (an optimizer's state) stop the run at the save."""
    original = optimizer_step.accumulate_and_step
    calls = {"n": 0}

    def poisoned(accelerator, compute, optimizer, lr_scheduler, params, *args, **kwargs):
        result = original(accelerator, compute, optimizer, lr_scheduler, params, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            with torch.no_grad():
                params[0].fill_(float("nan"))
        return result

    monkeypatch.setattr(training, "accumulate_and_step", poisoned)
    out = tmp_path / "out"
    code = train_leco.main(base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), out, steps=6) + ["--save_every_n_steps", "2"])
    err = capsys.readouterr().err
    assert code == 3
    assert "NaN/inf values at step 4" in err and "nothing was written" in err
    assert sorted(path.name for path in out.iterdir()) == ["leco-step00000002.safetensors"]


def _with_cpu_grad_scaler(monkeypatch, init_scale: float):
    """Give the run an fp16-style dynamic loss scaler on the CPU (doubling every step), as a CUDA fp16 run has."""
    original = run_setup.make_accelerator

    def make(config, tracker_name):
        accelerator = original(config, tracker_name)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1)
        return accelerator

    monkeypatch.setattr(training, "make_accelerator", make)


def test_fp16_loss_scaler_state_is_saved_and_resumed(tiny_sd_dir, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path, "erase")
    _with_cpu_grad_scaler(monkeypatch, 1024.0)
    first = tmp_path / "first"
    assert train_leco.main(base_argv(tiny_sd_dir, prompts, first, steps=2) + ["--save_state_on_train_end"]) == 0
    saved = torch.load(first / "leco-state" / "training_state.pt", weights_only=True)["scaler"]
    assert saved["scale"] == 1024.0 * 2 ** 2  # two finite steps, growth every step
    resumed = tmp_path / "resumed"
    argv = base_argv(tiny_sd_dir, prompts, resumed, steps=4) + ["--resume", str(first / "leco-state"), "--save_state_on_train_end"]
    assert train_leco.main(argv) == 0  # the new run's scaler starts at 1024 again unless the state is restored
    assert torch.load(resumed / "leco-state" / "training_state.pt", weights_only=True)["scaler"]["scale"] == 1024.0 * 2 ** 4


def test_resume_with_different_network_args_is_one_line(tiny_sd_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path, "erase")
    first = base_argv(tiny_sd_dir, prompts, tmp_path / "a", steps=2) + ["--network_args", "conv_dim=2", "conv_alpha=1",
                                                                        "--save_state_on_train_end"]
    assert train_leco.main(first) == 0
    capsys.readouterr()
    argv = base_argv(tiny_sd_dir, prompts, tmp_path / "b", steps=3) + ["--resume", str(tmp_path / "a" / "leco-state"),
                                                                      "--network_args", "conv_dim=4", "conv_alpha=1"]
    assert train_leco.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --resume") and "network_args" in err[-1] and "conv_dim" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_save_last_n_steps_state_prunes_state_folders(tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), out, steps=6) + [
        "--save_every_n_steps", "1", "--save_state", "--save_last_n_steps", "3", "--save_last_n_steps_state", "1"]
    assert train_leco.main(argv) == 0
    names = sorted(path.name for path in out.iterdir())
    # at the last intermediate save (step 5) files from steps >= 5 - 3 and states from steps >= 5 - 1 remain
    assert names == sorted(["leco-state", *[f"leco-step{step:08d}.safetensors" for step in (2, 3, 4, 5)],
                            "leco-step00000004-state", "leco-step00000005-state", "leco.safetensors"])


def test_save_last_n_steps_state_defaults_to_save_last_n_steps(tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), out, steps=4) + [
        "--save_every_n_steps", "1", "--save_state", "--save_last_n_steps", "1"]
    assert train_leco.main(argv) == 0
    assert sorted(path.name for path in out.iterdir() if path.name.endswith("-state")) == [
        "leco-state", "leco-step00000002-state", "leco-step00000003-state"]


def test_pasted_sd_scripts_flags_leco_already_meets_are_accepted_with_a_note(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), out, steps=1) + [
        "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk", "--no_half_vae", "--cache_latents",
        "--max_data_loader_n_workers", "8", "--persistent_data_loader_workers", "--mem_eff_attn", "--lowram"]
    assert train_leco.main(argv) == 0
    err = capsys.readouterr().err
    for flag in ("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "no_half_vae", "cache_latents",
                 "max_data_loader_n_workers", "persistent_data_loader_workers", "mem_eff_attn", "lowram"):
        assert f"--{flag}: always the case in LECO" in err
    assert (out / "leco.safetensors").exists()


@pytest.mark.parametrize("flag, value, expected", [
    ("--resolution", "1024,1024", "resolution in the prompt TOML"),
    ("--enable_bucket", None, "dynamic_resolution"),
    ("--save_last_n_epochs_state", "2", "--save_last_n_steps_state"),
    ("--sample_every_n_epochs", "1", "--sample_every_n_steps"),
    ("--shuffle_caption", None, "uses no images"),
])
def test_sd_scripts_image_flags_are_refused_with_a_reason(flag, value, expected, tiny_sd_dir, tmp_path, capsys, no_training):
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), tmp_path / "out") + [flag] + ([value] if value else [])
    assert train_leco.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag} is not supported") and expected in err[0]


def test_allow_tf32_is_on_during_training_and_restored_after(tiny_sd_dir, tmp_path, monkeypatch):
    seen = {}
    original = training.Trainer.loop

    def loop(self, *args, **kwargs):
        seen["matmul"], seen["cudnn"] = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        return original(self, *args, **kwargs)

    monkeypatch.setattr(training.Trainer, "loop", loop)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=1) + ["--allow_tf32"]
        assert train_leco.main(argv) == 0
        assert seen == {"matmul": True, "cudnn": True}
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (before[0], False)
        assert train_leco.main(argv[:-1] + ["--output_dir", str(tmp_path / "plain")]) == 0
        assert seen == {"matmul": before[0], "cudnn": False}  # without the flag nothing is switched on
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_ddp_timeout_reaches_the_process_group(tiny_sd_dir, tmp_path):
    from library.cli import build_run_config, parse_namespace

    args, _ = parse_namespace(base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), tmp_path / "out") + ["--ddp_timeout", "90"], "sd")
    accelerator = run_setup.make_accelerator(build_run_config(args, "sd"), "leco_train")
    assert accelerator.init_handler.timeout == datetime.timedelta(minutes=90)
