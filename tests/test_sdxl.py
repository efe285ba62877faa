"""sdxl_train_leco.py: conditioning in the step, end-to-end runs, SGM keys, diffusers loading."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

import sdxl_train_leco
import train_leco
from library.config import LecoConfig
from library.family import SDXLFamily
from library.prompts import PromptSetting
from networks.lora import read_lora_metadata
from tests.helpers import (
    all_finite,
    base_argv,
    config_only_copy,
    export_single_file,
    load_lora_into_pipeline,
    lora_changed,
    lora_tensors,
    scalars,
    tokenizer_cache,
    write_prompts,
)
from tests.test_leco_step import make_step


def test_both_scripts_hand_their_config_to_the_one_shared_trainer(tiny_sd_dir, tiny_sdxl_dir, tmp_path, monkeypatch):
    """Each entry script's main() reaches the same library.training.train with a config of its own family."""
    import library.training

    seen = []

    def train(config):
        seen.append(config.model.family)
        return library.training.TrainResult(final_file=None, steps=0, files=[], last_loss=None)

    monkeypatch.setattr(library.training, "train", train)
    prompts = write_prompts(tmp_path, "erase")
    assert sdxl_train_leco.main(base_argv(tiny_sdxl_dir, prompts, tmp_path / "a")) == 0
    assert train_leco.main(base_argv(tiny_sd_dir, prompts, tmp_path / "b")) == 0
    assert seen == ["sdxl", "sd"]


def test_dynamic_crops_time_ids_stay_inside_the_original():
    family = SDXLFamily()
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        orig_h, orig_w, top, left, height, width = family.time_ids(64, 128, generator, True).tolist()
        assert (height, width) == (64, 128)
        assert 64 <= orig_h <= 3 * 64 and 128 <= orig_w <= 3 * 128
        assert 0 <= top <= orig_h - 64 and 0 <= left <= orig_w - 128
    assert family.time_ids(64, 128, generator, False).tolist() == [64, 128, 0, 0, 64, 128]


def test_cfg_half_uses_the_unconditional_pooled_embedding(tiny_sdxl_dir):
    setting = PromptSetting(prompt="girl", positive="girl, long hair", negative="girl, short hair", neutral="girl",
                            action="enhance", guidance_scale=1.0, resolution=(64, 128), batch_size=2, multiplier=1.0,
                            weight=1.0)
    step = make_step(tiny_sdxl_dir, LecoConfig(max_denoising_steps=4, denoise_guidance_scale=3.0), family="sdxl",
                     settings=(setting,))
    seen = []
    step.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append((args[0].shape, kwargs["added_cond_kwargs"])),
                                        with_kwargs=True)
    step(setting, torch.Generator().manual_seed(0))
    shape, added = seen[0]
    assert shape == (4, 4, 8, 16)  # non-square 64 x 128 px
    uncond = step.cache.conditioning([setting.negative], torch.zeros(1, 6)).pooled[0]
    cond = step.cache.conditioning([setting.prompt], torch.zeros(1, 6)).pooled[0]
    assert torch.equal(added["text_embeds"][0], uncond) and torch.equal(added["text_embeds"][1], uncond)
    assert torch.equal(added["text_embeds"][2], cond) and torch.equal(added["text_embeds"][3], cond)
    assert added["time_ids"].tolist() == [[64, 128, 0, 0, 64, 128]] * 4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["erase", "slider"])
def test_train_sdxl_from_a_diffusers_folder(kind, tiny_sdxl_dir, tmp_path, caplog):
    prompts = write_prompts(tmp_path, kind)
    out, logs = tmp_path / "out", tmp_path / "logs"
    argv = base_argv(tiny_sdxl_dir, prompts, out, steps=3) + ["--save_every_n_steps", "2", "--logging_dir", str(logs)]
    with caplog.at_level(logging.WARNING):
        assert sdxl_train_leco.main(argv) == 0
    assert any("1024" in record.getMessage() for record in caplog.records)  # resolution 64 < 768 warns
    assert sorted(path.name for path in out.iterdir()) == ["leco-step00000002.safetensors", "leco.safetensors"]
    final = out / "leco.safetensors"
    keys = lora_tensors(final).keys()
    assert any(key.startswith("lora_unet_input_blocks_") for key in keys)
    assert any(key.startswith("lora_unet_middle_block_1_") for key in keys)
    assert any(key.startswith("lora_unet_output_blocks_") for key in keys)
    assert not any("down_blocks" in key or "up_blocks" in key for key in keys)
    assert lora_changed(final)
    metadata = read_lora_metadata(final)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert all_finite(scalars(logs, "loss"))


@pytest.mark.slow
def test_sdxl_output_loads_in_diffusers_and_changes_the_output(tiny_sdxl_dir, tmp_path):
    argv = base_argv(tiny_sdxl_dir, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=3) + ["--learning_rate", "1e-2"]
    assert sdxl_train_leco.main(argv) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    kwargs = {"encoder_hidden_states": torch.randn(1, 77, 80, generator=generator),
              "added_cond_kwargs": {"text_embeds": torch.randn(1, 48, generator=generator),
                                    "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    with torch.no_grad():
        base = pipe.unet(latents, 500, **kwargs).sample
    load_lora_into_pipeline(pipe, tmp_path / "out" / "leco.safetensors")
    modules = len({key.split(".")[0] for key in lora_tensors(tmp_path / "out" / "leco.safetensors")})
    assert sum(1 for name, _ in pipe.unet.named_modules() if name.endswith("lora_A.leco")) == modules
    with torch.no_grad():
        assert not torch.allclose(pipe.unet(latents, 500, **kwargs).sample, base, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_sdxl_single_file(tiny_sdxl_dir, tmp_path_factory):
    """The tiny SDXL model as one SGM-layout file, its configs and both tokenizers cached by hub id."""
    folder = tmp_path_factory.mktemp("sdxl_single_file")
    checkpoint = export_single_file(tiny_sdxl_dir, folder / "tiny_xl.safetensors", "sdxl")
    configs = config_only_copy(tiny_sdxl_dir, folder / "configs")
    return checkpoint, configs, tokenizer_cache(tiny_sdxl_dir, folder / "tokenizers")


@pytest.mark.slow
@pytest.mark.parametrize("kind, v_prediction", [("erase", False), ("slider", True)])
def test_train_sdxl_from_a_single_file_with_cached_tokenizers(kind, v_prediction, tiny_sdxl_single_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint, configs, cache = tiny_sdxl_single_file
    out, logs = tmp_path / "out", tmp_path / "logs"
    argv = base_argv(checkpoint, write_prompts(tmp_path, kind, resolution=128), out, steps=3) + [
        "--tokenizer_cache_dir", str(cache), "--model_config_dir", str(configs), "--save_every_n_steps", "2",
        "--logging_dir", str(logs),
    ] + (["--v_parameterization", "--zero_terminal_snr"] if v_prediction else [])
    assert sdxl_train_leco.main(argv) == 0
    assert sorted(path.name for path in out.iterdir()) == ["leco-step00000002.safetensors", "leco.safetensors"]
    final = out / "leco.safetensors"
    assert lora_changed(final)
    keys = lora_tensors(final).keys()
    for block in ("input_blocks_", "middle_block_1_", "output_blocks_"):
        assert any(key.startswith(f"lora_unet_{block}") for key in keys), block
    assert not any("down_blocks" in key or "up_blocks" in key for key in keys)
    metadata = read_lora_metadata(final)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_sd_model_name"] == "tiny_xl.safetensors"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_v_parameterization"] == str(v_prediction)
    assert metadata["modelspec.prediction_type"] == ("v" if v_prediction else "epsilon")
    assert all_finite(scalars(logs, "loss")) and len(scalars(logs, "loss")) == 3


@pytest.mark.slow
def test_sdxl_script_refuses_an_sd_model(tiny_sd_dir, tmp_path, capsys):
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=1)
    assert sdxl_train_leco.main(argv) == 2
    assert "train_leco.py" in capsys.readouterr().err


@pytest.mark.slow
def test_lycoris_network_module_trains_and_sdxl_keys_use_sgm_names(tiny_sdxl_dir, tmp_path):
    pytest.importorskip("lycoris")
    argv = base_argv(tiny_sdxl_dir, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=2) + [
        "--network_module", "lycoris.kohya", "--network_args", "algo=lokr", "--network_dim", "4",
    ]
    assert sdxl_train_leco.main(argv) == 0
    keys = lora_tensors(tmp_path / "out" / "leco.safetensors").keys()
    assert any(key.startswith("lora_unet_input_blocks_") and key.endswith(".lokr_w1") for key in keys)
    assert not any("down_blocks" in key or "up_blocks" in key for key in keys)
    metadata = read_lora_metadata(tmp_path / "out" / "leco.safetensors")
    assert metadata["ss_network_module"] == "lycoris.kohya" and len(metadata["sshs_model_hash"]) == 64
