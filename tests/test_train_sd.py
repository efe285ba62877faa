"""End to end: ``train_leco.main([...])`` on tiny SD models, from a diffusers folder and a single file."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel

import train_leco
from library import leco_step, training
from library.cli import build_run_config, parse_namespace
from library.config import LecoConfig
from library.optimizer_step import accumulate_and_step
from library.run_setup import optimizer_and_schedule
from networks.lora import create_network, read_lora_metadata
from tests.helpers import (
    all_finite,
    base_argv,
    export_single_file,
    image_tags,
    lora_changed,
    lora_tensors,
    scalars,
    write_prompts,
)
from tests.test_leco_step import SETTING, make_step

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["erase", "enhance", "slider"])
def test_train_from_a_diffusers_folder(kind, tiny_sd_dir, tmp_path):
    prompts = write_prompts(tmp_path, kind)
    out, logs = tmp_path / "out", tmp_path / "logs"
    argv = base_argv(tiny_sd_dir, prompts, out, name=f"my_{kind}") + [
        "--save_every_n_steps", "2", "--logging_dir", str(logs), "--network_dim", "4", "--network_alpha", "2",
        "--training_comment", "test run",
    ]
    assert train_leco.main(argv) == 0
    assert sorted(path.name for path in out.iterdir()) == [f"my_{kind}-step00000002.safetensors", f"my_{kind}.safetensors"]
    final = out / f"my_{kind}.safetensors"
    tensors = lora_tensors(final)
    assert tensors and all(key.startswith("lora_unet_") for key in tensors)
    assert {key.split(".", 1)[1] for key in tensors} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert any("attn2_to_k" in key for key in tensors)
    assert lora_changed(final)
    metadata = read_lora_metadata(final)
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["ss_steps"] == "4" and metadata["ss_max_train_steps"] == "4"
    assert metadata["ss_leco_prompts"] == prompts.read_text(encoding="utf-8")
    assert metadata["ss_leco_prompt_count"] == ("2" if kind == "slider" else "1")
    assert metadata["ss_training_comment"] == "test run"
    assert metadata["ss_leco_trajectory"] == "fresh"
    assert metadata["ss_seed"] == "42"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.title"] == f"my_{kind}" and metadata["modelspec.resolution"] == "64x64"
    assert "ss_training_finished_at" in metadata
    assert read_lora_metadata(out / f"my_{kind}-step00000002.safetensors")["ss_steps"] == "2"
    assert all_finite(scalars(logs, "loss")) and len(scalars(logs, "loss")) == 4
    assert scalars(logs, "lr") == pytest.approx([1e-3] * 4)
    groups = {"erase": ["erase"], "enhance": ["enhance"], "slider": ["slider+", "slider-"]}[kind]
    per_group = [scalars(logs, f"loss/{group}") for group in groups]
    assert all(per_group) and sum(len(values) for values in per_group) == 4  # each step lands in exactly one group
    timesteps = scalars(logs, "timestep")
    assert len(timesteps) == 4 and all(0 <= t < 1000 and t == int(t) for t in timesteps)


def test_same_seed_gives_identical_lora(tiny_sd_dir, tmp_path):
    prompts = write_prompts(tmp_path, "slider")
    for run in ("a", "b"):
        assert train_leco.main(base_argv(tiny_sd_dir, prompts, tmp_path / run, steps=3)) == 0
    first, second = lora_tensors(tmp_path / "a" / "leco.safetensors"), lora_tensors(tmp_path / "b" / "leco.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert train_leco.main(base_argv(tiny_sd_dir, prompts, tmp_path / "c", steps=3)[:-1] + ["7"]) == 0
    third = lora_tensors(tmp_path / "c" / "leco.safetensors")
    assert not all(torch.equal(first[key], third[key]) for key in first)


def test_train_from_a_single_file_offline(tiny_sd_single_file, tiny_sd_dir, tmp_path, monkeypatch):
    """Loading is the same whatever the prompts ask for (erase/enhance/slider each train from a folder above),
    so one single-file run: a slider, both directions."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint, configs, cache = tiny_sd_single_file
    prompts = write_prompts(tmp_path, "slider")
    out, logs = tmp_path / "out", tmp_path / "logs"
    argv = base_argv(checkpoint, prompts, out) + [
        "--tokenizer_cache_dir", str(cache), "--model_config_dir", str(configs), "--save_every_n_steps", "2",
        "--logging_dir", str(logs),
    ]
    assert train_leco.main(argv) == 0
    final = out / "leco.safetensors"
    assert sorted(path.name for path in out.iterdir()) == ["leco-step00000002.safetensors", "leco.safetensors"]
    assert lora_changed(final)
    tensors = lora_tensors(final)
    assert {key.split(".", 1)[1] for key in tensors} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert any(key.startswith("lora_unet_down_blocks_") and "attn2_to_k" in key for key in tensors)
    # the same U-Net loaded from its diffusers folder gets exactly the same LoRA layout
    folder_unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    assert create_network(1.0, 4, 1.0, None, [], folder_unet).lora_state_dict().keys() == tensors.keys()
    metadata = read_lora_metadata(final)
    assert metadata["ss_sd_model_name"] == "tiny_sd.safetensors"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_leco_prompts"] == prompts.read_text(encoding="utf-8")
    assert len(metadata["ss_sd_model_hash"]) == 8 and len(metadata["ss_new_sd_model_hash"]) == 64
    assert all_finite(scalars(logs, "loss")) and len(scalars(logs, "loss")) == 4


def test_zero_terminal_snr_needs_a_v_prediction_model(tiny_sd_dir, tmp_path, capsys):
    """At zero terminal SNR an epsilon model's first DDPM/DDIM step divides by sqrt(alpha_bar) = 0."""
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=1) + ["--zero_terminal_snr"]
    assert train_leco.main(argv) == 2
    err = capsys.readouterr().err
    assert "--zero_terminal_snr needs a v-prediction model" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_full_bf16_trains_a_bf16_lora(tiny_sd_dir, tmp_path, monkeypatch):
    dtypes = set()
    original = training.Trainer.build_network

    def spy(self, unet):
        network = original(self, unet)
        dtypes.update(param.dtype for param in network.parameters())
        return network

    monkeypatch.setattr(training.Trainer, "build_network", spy)
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=2) + [
        "--mixed_precision", "bf16", "--full_bf16", "--save_precision", "bf16", "--learning_rate", "1e-2"]
    assert train_leco.main(argv) == 0
    assert dtypes == {torch.bfloat16}
    tensors = lora_tensors(tmp_path / "out" / "leco.safetensors")
    assert {value.dtype for value in tensors.values()} == {torch.bfloat16}
    assert lora_changed(tmp_path / "out" / "leco.safetensors")
    assert read_lora_metadata(tmp_path / "out" / "leco.safetensors")["ss_full_bf16"] == "True"


def test_single_file_without_tokenizer_offline_is_one_clear_line(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = export_single_file(tiny_sd_dir, tmp_path / "m.safetensors", "sd1")
    argv = base_argv(checkpoint, write_prompts(tmp_path, "erase"), tmp_path / "out") + ["--tokenizer_cache_dir", str(tmp_path / "empty")]
    assert train_leco.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "openai/clip-vit-large-patch14" in errors[0] and "--tokenizer_cache_dir" in errors[0]


def test_v_prediction_model_metadata_and_training(tiny_sd2_dir, tmp_path):
    argv = base_argv(tiny_sd2_dir, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=2) + [
        "--v_parameterization", "--zero_terminal_snr", "--min_snr_gamma", "5",
    ]
    assert train_leco.main(argv) == 0
    metadata = read_lora_metadata(tmp_path / "out" / "leco.safetensors")
    assert metadata["ss_v2"] == "True" and metadata["ss_v_parameterization"] == "True"
    assert metadata["ss_base_model_version"] == "sd_v2_v"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert metadata["modelspec.prediction_type"] == "v"


def test_resume_continues_exactly(tiny_sd_dir, tmp_path):
    prompts = write_prompts(tmp_path, "slider")
    full = tmp_path / "full"
    argv = base_argv(tiny_sd_dir, prompts, full, steps=4) + ["--save_every_n_steps", "2", "--save_state",
                                                             "--lr_scheduler", "cosine", "--lr_warmup_steps", "1"]
    assert train_leco.main(argv) == 0
    state = full / "leco-step00000002-state"
    assert (state / "network.safetensors").exists() and (state / "training_state.pt").exists()
    assert (full / "leco-state").exists()
    resumed = tmp_path / "resumed"
    argv = base_argv(tiny_sd_dir, prompts, resumed, steps=4) + ["--resume", str(state), "--lr_scheduler", "cosine",
                                                                "--lr_warmup_steps", "1"]
    assert train_leco.main(argv) == 0
    a, b = lora_tensors(full / "leco.safetensors"), lora_tensors(resumed / "leco.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_into_a_different_network_is_refused(tiny_sd_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path, "erase")
    assert train_leco.main(base_argv(tiny_sd_dir, prompts, tmp_path / "a", steps=2) + ["--save_state_on_train_end"]) == 0
    argv = base_argv(tiny_sd_dir, prompts, tmp_path / "b", steps=3) + ["--resume", str(tmp_path / "a" / "leco-state"),
                                                                      "--network_dim", "8"]
    assert train_leco.main(argv) == 2
    assert "network_dim" in capsys.readouterr().err


def test_sigterm_saves_the_lora_and_exits_130(tiny_sd_dir, tmp_path, monkeypatch):
    original = leco_step.LecoStep.__call__
    calls = {"n": 0}

    def call(self, setting, generator):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, setting, generator)

    monkeypatch.setattr(leco_step.LecoStep, "__call__", call)
    out = tmp_path / "out"
    code = train_leco.main(base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), out, steps=50) + ["--save_state"])
    assert code == 130
    assert (out / "leco-step00000002.safetensors").exists() and (out / "leco-step00000002-state").exists()
    assert not (out / "leco.safetensors").exists()
    assert calls["n"] == 2  # stopped right after the step in which the signal arrived
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_nan_loss_stops_and_keeps_the_last_good_file(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    original = leco_step.per_sample_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(leco_step, "per_sample_loss", poisoned)
    out = tmp_path / "out"
    code = train_leco.main(base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), out, steps=6) + ["--save_every_n_steps", "2"])
    assert code == 3
    assert sorted(path.name for path in out.iterdir()) == ["leco-step00000002.safetensors"]
    err = capsys.readouterr().err
    assert "step 3" in err and "leco-step00000002.safetensors" in err


@pytest.fixture(scope="module")
def lora_step(tiny_sd_dir):
    """A LECO step on the tiny SD U-Net, a fixed x_t and the LoRA's initial weights (each test resets them)."""
    step = make_step(tiny_sd_dir, LecoConfig(max_denoising_steps=4), seed=3)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return step, latents, {key: value.clone() for key, value in step.network.state_dict().items()}


@pytest.mark.parametrize(
    "optimizer, extra, class_name",
    [
        ("AdamW8bit", ["--optimizer_args", "min_8bit_size=0"], "AdamW8bit"),
        ("Lion", [], "Lion"),
        ("Prodigy", ["--learning_rate", "1.0", "--optimizer_args", "decouple=True", "weight_decay=0.01"], "Prodigy"),
        ("Adafactor", [], "Adafactor"),
        ("SGDNesterov", [], "SGD"),
        ("torch.optim.RAdam", [], "RAdam"),
        ("PagedAdamW8bit", ["--optimizer_args", "min_8bit_size=0"], "PagedAdamW8bit"),
        ("Lion8bit", ["--optimizer_args", "min_8bit_size=0"], "Lion8bit"),
    ],
)
def test_optimizers_train(optimizer, extra, class_name, lora_step, tiny_sd_dir, tmp_path):
    """Each --optimizer_type, built from the flags by the trainer's own optimizer_and_schedule, prepared by
    accelerate and stepped once by the trainer's accumulate_and_step on a LECO loss, moves every LoRA
    parameter. (Full trainings run with AdamW and AdamWScheduleFree in the other tests here.)"""
    step, latents, initial = lora_step
    step.network.load_state_dict(initial)
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=2)
    config = build_run_config(parse_namespace(argv + ["--optimizer_type", optimizer] + extra, "sd")[0], "sd")
    built, lr_scheduler = optimizer_and_schedule(config, step.network)
    assert type(built).__name__ == class_name
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(built)
    params = [param for param in step.network.parameters() if param.requires_grad]
    before = [param.detach().clone() for param in params]
    accumulate_and_step(accelerator, lambda: step.loss_at(SETTING, latents, 300, None), prepared, lr_scheduler, params,
                        config.optimizer.max_grad_norm)
    assert all(not torch.equal(old, param) for old, param in zip(before, params))
    assert all(torch.isfinite(param).all() for param in params)
    assert all(param.grad is None for param in params)  # zeroed after the step, ready for the next
    if "8bit" in class_name:  # min_8bit_size=0 reached the optimizer: even these small tensors get 8-bit state
        assert {built.state[param]["state1"].dtype for param in params} == {torch.uint8}
    if optimizer == "Prodigy":
        assert built.param_groups[0]["decouple"] is True and built.param_groups[0]["weight_decay"] == 0.01


def test_schedule_free_saves_the_averaged_weights(tiny_sd_dir, tmp_path, monkeypatch):
    """The saved file must come from eval mode (x), not the training iterate (y): sd-scripts' bug."""
    import schedulefree

    events = []
    for name in ("train", "eval"):
        original = getattr(schedulefree.AdamWScheduleFree, name)

        def record(self, _original=original, _name=name):
            events.append(_name)
            return _original(self)

        monkeypatch.setattr(schedulefree.AdamWScheduleFree, name, record)
    save = training.save_network_file

    def spy(*args, **kwargs):
        events.append("save")
        return save(*args, **kwargs)

    monkeypatch.setattr(training, "save_network_file", spy)
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=2)
    assert train_leco.main(argv + ["--optimizer_type", "AdamWScheduleFree"]) == 0
    saves = [index for index, event in enumerate(events) if event == "save"]
    assert saves and all(events[index - 1] == "eval" and events[index + 1] == "train" for index in saves)


def test_precision_checkpointing_and_file_options(tiny_sd_dir, tmp_path, monkeypatch):
    """Also: the trainer really turns on checkpointing and trains with the dropout on (what each does is
    shown in tests/test_step_options.py)."""
    seen = {"checkpointing": [], "training_forward": []}
    prepare = training.prepare_unet

    def spy_prepare(unet, *args):
        unet = prepare(unet, *args)
        seen["checkpointing"].append(unet.is_gradient_checkpointing)
        return unet

    loss_at = leco_step.LecoStep.loss_at

    def spy_loss_at(self, *args, **kwargs):
        seen["training_forward"].append({(lora.training, lora.dropout) for lora in self.network.unet_loras})
        return loss_at(self, *args, **kwargs)

    monkeypatch.setattr(training, "prepare_unet", spy_prepare)
    monkeypatch.setattr(leco_step.LecoStep, "loss_at", spy_loss_at)
    out = tmp_path / "out"
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), out, steps=4) + [
        "--mixed_precision", "bf16", "--gradient_checkpointing", "--save_precision", "fp16",
        "--save_every_n_steps", "1", "--save_last_n_steps", "1", "--network_args", "conv_dim=2", "conv_alpha=1",
        "--gradient_accumulation_steps", "2", "--scale_weight_norms", "1.0", "--network_dropout", "0.1",
    ]
    assert train_leco.main(argv) == 0
    assert seen["checkpointing"] == [True]
    assert seen["training_forward"] == [{(True, 0.1)}] * 8  # 4 steps x 2 accumulated micro-steps
    assert sorted(path.name for path in out.iterdir()) == ["leco-step00000002.safetensors", "leco-step00000003.safetensors",
                                                           "leco.safetensors"]
    tensors = lora_tensors(out / "leco.safetensors")
    assert {value.dtype for value in tensors.values()} == {torch.float16}
    assert any("resnets_0_conv1" in key for key in tensors)
    metadata = read_lora_metadata(out / "leco.safetensors")
    assert metadata["ss_mixed_precision"] == "bf16" and metadata["ss_gradient_accumulation_steps"] == "2"
    assert '"conv_dim": "2"' in metadata["ss_network_args"] and metadata["ss_scale_weight_norms"] == "1.0"


def test_fp16_without_cuda_records_the_precision_really_used(tiny_sd_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 runs as fp16 with CUDA")
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=1) + ["--mixed_precision", "fp16"]
    assert train_leco.main(argv) == 0
    assert read_lora_metadata(tmp_path / "out" / "leco.safetensors")["ss_mixed_precision"] == "no"


def test_scale_weight_norms_are_logged(tiny_sd_dir, tmp_path):
    logs = tmp_path / "logs"
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=3) + [
        "--scale_weight_norms", "1e-4", "--learning_rate", "1e-2", "--logging_dir", str(logs)]
    assert train_leco.main(argv) == 0
    scaled, mean_norms = scalars(logs, "max_norm/keys_scaled"), scalars(logs, "max_norm/average_key_norm")
    assert len(scaled) == 3 and scaled[-1] > 0  # a tiny cap: trained deltas exceed it and get scaled
    assert all(value <= 1e-4 * (1 + 1e-3) for value in scalars(logs, "max_norm/max_key_norm"))
    assert len(mean_norms) == 3 and all(value > 0 for value in mean_norms[1:])


def test_ckpt_output_and_continuing_from_weights(tiny_sd_dir, tmp_path):
    prompts = write_prompts(tmp_path, "erase")
    assert train_leco.main(base_argv(tiny_sd_dir, prompts, tmp_path / "a", steps=2) + ["--save_model_as", "ckpt"]) == 0
    state = torch.load(tmp_path / "a" / "leco.ckpt", weights_only=True)
    assert all(key.startswith("lora_unet_") for key in state)
    argv = base_argv(tiny_sd_dir, prompts, tmp_path / "b", steps=2) + ["--network_weights", str(tmp_path / "a" / "leco.ckpt"),
                                                                      "--dim_from_weights"]
    assert train_leco.main(argv) == 0
    assert lora_tensors(tmp_path / "b" / "leco.safetensors").keys() == state.keys()


def test_sample_images_during_training(tiny_sd_dir, tmp_path):
    from PIL import Image

    samples = tmp_path / "samples.txt"
    samples.write_text("# comment\nvan gogh --n blurry --s 3 --l 4 --d 1\na photo --s 2\n", encoding="utf-8")
    out, logs = tmp_path / "out", tmp_path / "logs"
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), out, steps=2) + [
        "--sample_prompts", str(samples), "--sample_every_n_steps", "2", "--sample_at_first",
        "--sample_multipliers", "-1,0,1", "--logging_dir", str(logs),
    ]
    assert train_leco.main(argv) == 0
    grids = sorted(path.name for path in (out / "sample").iterdir())
    assert grids == ["leco_000000.png", "leco_000002.png"]
    image = Image.open(out / "sample" / "leco_000002.png")
    assert image.width > 3 * 64 and image.height > 2 * 64  # 3 multipliers x 2 prompts of 64 px tiles
    assert sum(image_tags(logs).values()) == 2  # the same two grids, in TensorBoard


def test_stop_during_the_first_sample_grid_exits_without_files(tiny_sd_dir, tmp_path, monkeypatch):
    from library import sampling

    original = sampling.SampleGridMaker._one

    def one(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sampling.SampleGridMaker, "_one", one)
    samples = tmp_path / "samples.txt"
    samples.write_text("van gogh --s 2\na photo --s 2\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), out, steps=5) + [
        "--sample_prompts", str(samples), "--sample_at_first", "--sample_every_n_steps", "5"]
    assert train_leco.main(argv) == 130
    assert not out.exists() or not any(out.rglob("*.safetensors")) and not any(out.rglob("*.png"))


def test_many_step_options_together(tiny_sd_dir, tmp_path, monkeypatch):
    """Options that change the step but not the files run together end to end and reach the metadata.

    What each does is tested on its own: --noise_offset, --gradient_checkpointing and the LoRA dropouts in
    tests/test_step_options.py, the timestep label and samplers in tests/test_diffusion.py, the losses in
    tests/test_targets.py. Here --noise_offset is also followed into the run's trajectories."""
    offsets = []
    initial_latents = leco_step.initial_latents

    def spy(batch, height, width, generator, noise_offset=None, *args, **kwargs):
        offsets.append(noise_offset)
        return initial_latents(batch, height, width, generator, noise_offset, *args, **kwargs)

    monkeypatch.setattr(leco_step, "initial_latents", spy)
    prompts = tmp_path / "dyn.toml"
    prompts.write_text('[[prompts]]\ntarget = "van gogh"\nresolution = 128\ndynamic_resolution = true\nbatch_size = 2\n',
                       encoding="utf-8")
    out = tmp_path / "out"
    argv = base_argv(tiny_sd_dir, prompts, out, steps=3) + [
        "--max_token_length", "150", "--clip_skip", "2", "--noise_offset", "0.05", "--leco_legacy_timestep",
        "--leco_denoise_sampler", "ddim", "--loss_type", "huber", "--huber_schedule", "exponential",
        "--leco_denoise_with_frozen", "--lr_scheduler", "cosine_with_restarts", "--lr_warmup_steps", "0.5",
        "--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99", "--network_args", "train_method=xattn",
        "--unet_lr", "5e-4",
    ]
    assert train_leco.main(argv) == 0
    assert offsets == [0.05] * 3
    metadata = read_lora_metadata(out / "leco.safetensors")
    assert metadata["ss_max_token_length"] == "150" and metadata["ss_clip_skip"] == "2"
    assert metadata["ss_loss_type"] == "huber" and metadata["ss_leco_legacy_timestep"] == "True"
    assert metadata["ss_leco_denoise_sampler"] == "ddim" and metadata["ss_unet_lr"] == "0.0005"
    assert "weight_decay=0.1" in metadata["ss_optimizer"]
    keys = lora_tensors(out / "leco.safetensors").keys()
    assert keys and all("attn2" in key for key in keys)  # train_method=xattn
