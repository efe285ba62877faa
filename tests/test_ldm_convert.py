"""Single-file export (diffusers -> original layout) and offline single-file loading, on tiny models."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library import ldm_convert, single_file
from library.ldm_convert import save_single_file
from library.single_file import (
    default_config_dir,
    detect_checkpoint_kind,
    load_single_file,
    load_single_file_vae,
    read_checkpoint_keys,
)
from tests.helpers import unet_inputs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "library" / "model_configs"

# Parameter counts of the shipped configs, instantiated on the meta device.
EXPECTED_COUNTS = {
    "sd15": {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
    "sd2_512": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863},
    "sd2_768_v": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863},
    "sdxl_base": {
        "unet": 2_567_463_684,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
        "vae": 83_653_863,
    },
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny forwards are dominated by OpenMP overhead, badly so on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tokenizers(folder: Path) -> dict[str, CLIPTokenizer]:
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), model_max_length=77)
    return {"tokenizer": tokenizer, "tokenizer_2": tokenizer}


def _components(folder: Path) -> dict[str, torch.nn.Module]:
    parts = {
        "unet": UNet2DConditionModel.from_pretrained(folder / "unet"),
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder"),
        "vae": AutoencoderKL.from_pretrained(folder / "vae"),
    }
    if (folder / "text_encoder_2").is_dir():
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
    for module in parts.values():
        module.eval()
    return parts


@pytest.fixture(scope="module")
def exported(tiny_sd_dir, tiny_sd2_dir, tiny_sdxl_dir, tmp_path_factory):
    """Per kind: (diffusers folder, original components, exported .safetensors path), built lazily."""
    folders = {"sd1": tiny_sd_dir, "sd2": tiny_sd2_dir, "sdxl": tiny_sdxl_dir}
    out_dir = tmp_path_factory.mktemp("single_files")
    cache: dict[str, tuple[Path, dict, Path]] = {}

    def get(kind: str) -> tuple[Path, dict, Path]:
        if kind not in cache:
            parts = _components(folders[kind])
            path = save_single_file(out_dir / f"{kind}.safetensors", kind=kind, **parts)
            cache[kind] = (folders[kind], parts, path)
        return cache[kind]

    return get


def _assert_same_module(original: torch.nn.Module, loaded: torch.nn.Module) -> None:
    """Weights must be bit-identical (parameters only; buffers may differ in persistence)."""
    expected = dict(original.named_parameters())
    actual = dict(loaded.named_parameters())
    assert set(expected) == set(actual)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert torch.equal(actual[name], value), name


def _assert_same_outputs(kind: str, folder: Path, original: dict, loaded: dict) -> None:
    # Weights are identical; outputs can differ by ~1e-6 only because memory-mapped safetensors
    # tensors have a different alignment, which changes the CPU kernels' summation order.
    _assert_same_module(original["unet"], loaded["unet"])
    args, kwargs = unet_inputs(original["unet"])
    with torch.no_grad():
        expected = original["unet"](*args, **kwargs).sample
        actual = loaded["unet"](*args, **kwargs).sample
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)

    ids = _tokenizers(folder)["tokenizer"](
        ["a photo of a cat", "van gogh style"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    names = ["text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
    for name in names:
        _assert_same_module(original[name], loaded[name])
        with torch.no_grad():
            expected = original[name](ids, output_hidden_states=True)
            actual = loaded[name](ids, output_hidden_states=True)
        assert len(actual.hidden_states) == len(expected.hidden_states)
        for a, b in zip(actual.hidden_states, expected.hidden_states):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        if name == "text_encoder_2":
            torch.testing.assert_close(actual.text_embeds, expected.text_embeds, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_round_trip(kind, exported):
    folder, original, path = exported(kind)
    keys = read_checkpoint_keys(path)
    assert detect_checkpoint_kind(keys) == kind
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)

    loaded = load_single_file(path, kind, folder, _tokenizers(folder))
    assert set(loaded) == {"unet", "text_encoder", "scheduler_config"} | ({"text_encoder_2"} if kind == "sdxl" else set())
    assert loaded["scheduler_config"]["num_train_timesteps"] == 1000
    assert not any(p.requires_grad for p in loaded["unet"].parameters())
    _assert_same_outputs(kind, folder, original, loaded)

    vae = load_single_file_vae(path, folder)
    _assert_same_module(original["vae"], vae)
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            vae(image, sample_posterior=False).sample,
            original["vae"](image, sample_posterior=False).sample,
            rtol=0,
            atol=1e-5,
        )


def test_original_key_layout(exported):
    """Spot-check names and shapes that other tools (A1111, ComfyUI, kohya) rely on."""
    _, _, path = exported("sdxl")
    state = load_file(str(path))
    assert "model.diffusion_model.input_blocks.0.0.weight" in state  # conv_in
    assert "model.diffusion_model.time_embed.2.bias" in state
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in state  # first downsampler
    assert "model.diffusion_model.input_blocks.1.0.in_layers.2.weight" in state
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight" in state
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in state
    assert "model.diffusion_model.middle_block.2.emb_layers.1.weight" in state
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in state  # upsampler after attention
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in state
    assert "model.diffusion_model.output_blocks.8.0.skip_connection.weight" in state
    assert "model.diffusion_model.out.2.weight" in state
    text1 = "conditioner.embedders.0.transformer.text_model."
    assert text1 + "encoder.layers.0.self_attn.q_proj.weight" in state
    text2 = "conditioner.embedders.1.model."
    assert state[text2 + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert state[text2 + "transformer.resblocks.0.attn.in_proj_bias"].shape == (3 * 48,)
    assert text2 + "transformer.resblocks.3.mlp.c_proj.weight" in state
    assert state[text2 + "positional_embedding"].shape == (77, 48)
    assert text2 + "text_projection" in state
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (8, 8, 1, 1)
    assert state["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (8, 8, 1, 1)
    assert "first_stage_model.encoder.down.0.downsample.conv.weight" in state
    assert "first_stage_model.decoder.up.3.block.0.conv1.weight" in state
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in state
    assert "first_stage_model.encoder.norm_out.weight" in state
    # SGM stores the projection transposed: x @ text_projection.
    _, original, _ = exported("sdxl")
    weight = original["text_encoder_2"].text_projection.weight
    assert torch.equal(state[text2 + "text_projection"], weight.t())


def test_vae_is_not_loaded_and_no_network(exported, monkeypatch):
    folder, original, path = exported("sd1")

    def refuse(*args, **kwargs):
        raise AssertionError("the VAE must not be loaded by load_single_file")

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(AutoencoderKL, "from_single_file", classmethod(refuse))
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    loaded = load_single_file(path, "sd1", folder, _tokenizers(folder))
    assert "vae" not in loaded
    _assert_same_module(original["unet"], loaded["unet"])


def test_ckpt_round_trip_with_state_dict_wrapper(exported, tmp_path):
    folder, original, path = exported("sd1")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(path)), "global_step": 10}, ckpt)
    keys = read_checkpoint_keys(ckpt)
    assert detect_checkpoint_kind(keys) == "sd1"
    loaded = load_single_file(ckpt, "sd1", folder, _tokenizers(folder))
    _assert_same_outputs("sd1", folder, original, loaded)
    _assert_same_module(original["vae"], load_single_file_vae(ckpt, folder))


def test_ckpt_with_pickled_object_is_refused(exported, tmp_path):
    folder, _, path = exported("sd1")
    ckpt = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": load_file(str(path)), "callbacks": argparse.Namespace(x=1)}, ckpt)
    with pytest.raises(ValueError, match="unsafe unpickling.*argparse.Namespace.*safetensors"):
        read_checkpoint_keys(ckpt)
    with pytest.raises(ValueError, match="unsafe unpickling"):
        load_single_file(ckpt, "sd1", folder, _tokenizers(folder))


def test_unreadable_files(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        read_checkpoint_keys(junk)
    junk_st = tmp_path / "junk.safetensors"
    junk_st.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        read_checkpoint_keys(junk_st)
    with pytest.raises(FileNotFoundError):
        read_checkpoint_keys(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "LoRA"),
        (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"], "LoRA"),
        (["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"], "diffusers"),
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "SD3"),
        (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], "Flux"),
        (
            ["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.text_projection"],
            "refiner",
        ),
        (["model.diffusion_model.input_blocks.0.0.weight"], "no recognised text encoder"),
        (["something.else"], "no Stable Diffusion keys"),
        ([], "no tensors"),
    ],
)
def test_unknown_layouts(keys, message):
    with pytest.raises(ValueError, match=message):
        detect_checkpoint_kind(keys)


def test_unknown_layout_file_and_kind_mismatch(exported, tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    folder, _, path = exported("sd1")
    with pytest.raises(ValueError, match="LoRA"):
        load_single_file(lora, "sd1", folder, _tokenizers(folder))
    with pytest.raises(ValueError, match="is an sd1 checkpoint, but kind 'sdxl'"):
        load_single_file(path, "sdxl", folder, _tokenizers(folder))
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        load_single_file(path, "sd3", folder, _tokenizers(folder))
    with pytest.raises(ValueError, match="tokenizer"):
        load_single_file(path, "sd1", folder, {})
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_single_file(path, "sd1", tmp_path, _tokenizers(folder))


def test_mismatched_config_is_reported(exported, tiny_sd2_dir):
    """An SD1 file loaded with a config whose U-Net has other shapes must not pass silently."""
    _, _, path = exported("sd1")
    with pytest.raises(ValueError, match=r"does not match the config folder .*proj_in\.weight"):
        load_single_file(path, "sd1", tiny_sd2_dir, _tokenizers(tiny_sd2_dir))
    with pytest.raises(ValueError, match="does not match the config folder"):
        load_single_file_vae(path, CONFIGS / "sd15")


def test_sd2_real_layout_padding(tiny_sd2_dir, tmp_path):
    """A 23-layer SD2 text encoder is written with the 24th resblock real SD2 checkpoints have."""
    config_dir = tmp_path / "config"
    shutil.copytree(tiny_sd2_dir, config_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = json.loads((config_dir / "text_encoder" / "config.json").read_text())
    config["num_hidden_layers"] = ldm_convert.SD2_HF_TEXT_LAYERS
    (config_dir / "text_encoder" / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    parts = _components(tiny_sd2_dir)
    parts["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder")).eval()
    path = save_single_file(tmp_path / "sd2.safetensors", kind="sd2", **parts)

    keys = set(read_checkpoint_keys(path))
    prefix = "cond_stage_model.model."
    assert prefix + "transformer.resblocks.23.attn.in_proj_weight" in keys
    assert prefix + "transformer.resblocks.24.attn.in_proj_weight" not in keys
    assert {prefix + "text_projection", prefix + "logit_scale"} <= keys

    loaded = load_single_file(path, "sd2", config_dir, _tokenizers(config_dir))
    _assert_same_outputs("sd2", config_dir, parts, loaded)


def test_save_options(exported, tmp_path):
    _, parts, _ = exported("sd1")
    path = save_single_file(
        tmp_path / "half.safetensors", parts["unet"], parts["text_encoder"], kind="sd1", dtype=torch.float16
    )
    state = load_file(str(path))
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    assert not any(k.startswith("first_stage_model.") for k in state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.safetensors"]  # no temp file left
    with pytest.raises(ValueError, match="first_stage_model"):
        load_single_file_vae(path, exported("sd1")[0])
    with pytest.raises(ValueError, match=".safetensors"):
        save_single_file(tmp_path / "x.ckpt", parts["unet"], parts["text_encoder"], kind="sd1")
    with pytest.raises(ValueError, match="text_encoder_2"):
        save_single_file(tmp_path / "x.safetensors", parts["unet"], parts["text_encoder"], kind="sdxl")


def test_unmappable_unet_weight_is_an_error():
    with pytest.raises(ValueError, match="class_embedding"):
        ldm_convert.convert_unet_state_dict({"class_embedding.weight": torch.zeros(1)}, {"layers_per_block": 2})


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_shipped_config_parameter_counts(name):
    folder = CONFIGS / name
    with torch.device("meta"):
        counts = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")),
        }
        if (folder / "text_encoder_2").is_dir():
            counts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2")
            )
    counts = {key: sum(p.numel() for p in model.parameters()) for key, model in counts.items()}
    assert counts == EXPECTED_COUNTS[name]


def test_default_config_dirs():
    assert default_config_dir("sd1") == CONFIGS / "sd15"
    assert default_config_dir("sd2") == CONFIGS / "sd2_512"
    assert default_config_dir("sd2", v_prediction=True) == CONFIGS / "sd2_768_v"
    assert default_config_dir("sdxl") == CONFIGS / "sdxl_base"
    index = json.loads((CONFIGS / "sd2_768_v" / "scheduler" / "scheduler_config.json").read_text())
    assert index["prediction_type"] == "v_prediction"
    for name in single_file.CONFIG_NAMES:
        assert (CONFIGS / name / "model_index.json").is_file()
        assert not list((CONFIGS / name).rglob("*.safetensors"))


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_real_architectures_invert_through_diffusers(name):
    """On the meta device (no memory), the names written for the real SD1/SD2/SDXL architectures are
    exactly what diffusers' own original->diffusers converters map back to each model's state dict."""
    from diffusers.loaders import single_file_utils as sfu

    folder = CONFIGS / name
    kind = {"sd15": "sd1", "sd2_512": "sd2", "sd2_768_v": "sd2", "sdxl_base": "sdxl"}[name]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        text_2 = None
        if kind == "sdxl":
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))

    def assert_inverts(model_state: dict, converted: dict) -> None:
        assert set(converted) == set(model_state)
        assert all(converted[k].shape == model_state[k].shape for k in model_state)

    state = ldm_convert.convert_unet_state_dict(unet.state_dict(), unet.config)
    assert_inverts(unet.state_dict(), sfu.convert_ldm_unet_checkpoint(state, unet.config))
    vae_state = ldm_convert.convert_vae_state_dict(vae.state_dict(), vae.config)
    assert_inverts(vae.state_dict(), sfu.convert_ldm_vae_checkpoint(vae_state, vae.config))
    state.update(vae_state)

    flat = {k: v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    if kind == "sd2":
        text_state = ldm_convert.convert_open_clip_state_dict(text, ldm_convert.SD2_TEXT_PREFIX, pad_extra_layer=True)
        # Real SD2 files have 24 resblocks: diffusers drops exactly the extra one and the projection.
        assert ldm_convert.SD2_TEXT_PREFIX + "transformer.resblocks.23.ln_1.weight" in text_state
        back = sfu.convert_open_clip_checkpoint(text, text_state, prefix=ldm_convert.SD2_TEXT_PREFIX)
        assert_inverts(flat, {k.removeprefix("text_model."): v for k, v in back.items()})
    else:
        prefix = ldm_convert.SD1_TEXT_PREFIX if kind == "sd1" else ldm_convert.SDXL_TEXT1_PREFIX
        text_state = ldm_convert.convert_clip_text_state_dict(text, prefix)
        back = sfu.convert_ldm_clip_checkpoint(text_state)
        assert_inverts(flat, {k.removeprefix("text_model."): v for k, v in back.items()})
    state.update(text_state)

    if text_2 is not None:
        text_2_state = ldm_convert.convert_open_clip_state_dict(text_2, ldm_convert.SDXL_TEXT2_PREFIX)
        assert text_2_state[ldm_convert.SDXL_TEXT2_PREFIX + "text_projection"].shape == (1280, 1280)
        back = sfu.convert_open_clip_checkpoint(text_2, text_2_state, prefix=ldm_convert.SDXL_TEXT2_PREFIX)
        expected = {k: v for k, v in text_2.state_dict().items() if not k.endswith("position_ids")}
        assert_inverts(expected, back)
        state.update(text_2_state)

    assert detect_checkpoint_kind(state) == kind


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_make_random_checkpoint_tool(kind, tiny_sd2_dir, tiny_sdxl_dir, tmp_path, capsys):
    """The real-size builder, run on a tiny config folder (kind inferred, fp16 storage)."""
    from tools.make_random_checkpoint import main

    folder = tiny_sdxl_dir if kind == "sdxl" else tiny_sd2_dir
    out = tmp_path / "random.safetensors"
    stats = main([str(out), "--config", str(folder), "--dtype", "fp16", "--seed", "3"])
    assert stats["file_gib"] > 0 and f"{kind} fp16" in capsys.readouterr().out
    assert detect_checkpoint_kind(read_checkpoint_keys(out)) == kind
    loaded = load_single_file(out, kind, folder, _tokenizers(folder), torch_dtype=torch.float16)
    assert loaded["unet"].dtype == torch.float16
    assert load_single_file_vae(out, folder).dtype == torch.float32
