"""A LoRA baked into a checkpoint IS the LoRA: same U-Net output as diffusers' load_lora_weights, the rest bit-identical.

Every merged file is loaded back the way users load it (diffusers ``from_single_file``, offline, with
the tiny model's config folder) and compared with the base checkpoint plus the LoRA loaded through
``load_lora_weights`` at the same ratio (fp32).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from library.merge_names import checkpoint_targets, sgm_to_diffusers, unet_layers_per_block
from networks import merge_lora, sdxl_merge_lora
from tests import merge_fixtures as mf

TOLERANCE = dict(rtol=0, atol=2e-5)  # fp32 merge vs peft's separate LoRA path; the LoRA moves outputs by ~0.1-1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Per kind, built on first use: (diffusers folder, single file with VAE, LoRA, LoCon with text-encoder modules)."""
    root = tmp_path_factory.mktemp("merge")
    cache: dict[str, dict[str, Path]] = {}

    def get(kind: str) -> dict[str, Path]:
        if kind not in cache:
            folder = mf.build_folder(kind, root / kind / "model")
            cache[kind] = {
                "folder": folder,
                "file": mf.export(kind, folder, root / kind / "base.safetensors"),
                "lora": mf.random_lora(folder, root / kind / "lora.safetensors", seed=1),
                "locon": mf.random_lora(folder, root / kind / "locon.safetensors", seed=2, conv=True, dim=3, alpha=1.0, text=True),
            }
        return cache[kind]

    return get


def run(kind: str, argv: list[str]) -> int:
    return (sdxl_merge_lora.main if kind == "sdxl" else merge_lora.main)(argv)


def reference(files: dict[str, Path], loras: list[Path], ratios: list[float]):
    """Base single file + LoRAs through load_lora_weights at the ratios."""
    pipe = mf.load_single_file_pipeline(files["file"], files["folder"])
    names = []
    for index, lora in enumerate(loras):
        mf.load_lora_everywhere(pipe, lora, f"a{index}")
        names.append(f"a{index}")
    pipe.set_adapters(names, ratios)
    return pipe


@pytest.mark.parametrize("kind", mf.KINDS)
@pytest.mark.parametrize("network", ["lora", "locon"])
def test_merged_checkpoint_equals_base_plus_lora(kind, network, world, tmp_path):
    files = world(kind)
    out = tmp_path / "merged.safetensors"
    assert run(kind, ["--sd_model", str(files["file"]), "--save_to", str(out), "--models", str(files[network]),
                      "--ratios", "0.7"]) == 0
    merged = mf.load_single_file_pipeline(out, files["folder"])
    expected = reference(files, [files[network]], [0.7])
    actual = mf.unet_output(merged.unet)
    torch.testing.assert_close(actual, mf.unet_output(expected.unet), **TOLERANCE)
    expected.set_adapters(["a0"], [0.0])
    assert (actual - mf.unet_output(expected.unet)).abs().max() > 1e-2  # the LoRA really changed the output
    if network == "locon":  # text-encoder modules too (other trainers' files)
        expected.set_adapters(["a0"], [0.7])
        for a, b in zip(mf.text_outputs(merged, files["folder"]), mf.text_outputs(expected, files["folder"])):
            torch.testing.assert_close(a, b, **TOLERANCE)


@pytest.mark.parametrize("kind", mf.KINDS)
def test_untouched_tensors_are_bit_identical_and_metadata_says_what_was_merged(kind, world, tmp_path):
    files = world(kind)
    out = tmp_path / "merged.safetensors"
    assert run(kind, ["--sd_model", str(files["file"]), "--save_to", str(out), "--models", str(files["lora"]),
                      str(files["locon"]), "--ratios", "1.0", "-0.5"]) == 0
    base, merged = mf.tensors(files["file"]), mf.tensors(out)
    assert list(base) == list(merged)
    targets = checkpoint_targets({key: value.shape for key, value in base.items()}, mf.CHECKPOINT_KIND[kind])
    from networks.lora_weights import read_lora

    changed = {targets[name].key for path in (files["lora"], files["locon"]) for name in read_lora(path).modules}
    for key, value in base.items():
        assert merged[key].dtype == value.dtype, key
        if key in changed:
            assert not torch.equal(merged[key], value), key
        else:
            assert torch.equal(merged[key], value), key  # VAE, untouched U-Net layers, text-encoder parts
    assert any(key.startswith("first_stage_model.") for key in base)
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.merged_from"] == "base, lora (ratio 1), locon (ratio -0.5)"
    expected_arch = {"sd1": "stable-diffusion-v1", "sd2v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}
    assert metadata["modelspec.architecture"] == expected_arch[kind]
    recipe = json.loads(metadata["leco_merge"])
    assert [(item["file"], item["ratio"]) for item in recipe["loras"]] == [("lora.safetensors", 1.0), ("locon.safetensors", -0.5)]


def test_text_encoders_and_vae_bit_identical_for_a_unet_only_lora(world, tmp_path):
    files = world("sdxl")
    out = tmp_path / "merged.safetensors"
    assert sdxl_merge_lora.main(["--sd_model", str(files["file"]), "--save_to", str(out), "--models", str(files["lora"])]) == 0
    base, merged = mf.tensors(files["file"]), mf.tensors(out)
    for key, value in base.items():
        if not key.startswith("model.diffusion_model."):
            assert torch.equal(merged[key], value) and merged[key].dtype == value.dtype, key


def test_two_loras_at_their_ratios_and_ckpt_output(world, tmp_path):
    files = world("sd1")
    out = tmp_path / "merged.ckpt"
    assert merge_lora.main(["--sd_model", str(files["file"]), "--save_to", str(out), "--models", str(files["lora"]),
                            str(files["locon"]), "--ratios", "0.8", "-1.3"]) == 0
    merged = mf.load_single_file_pipeline(out, files["folder"])
    expected = reference(files, [files["lora"], files["locon"]], [0.8, -1.3])
    torch.testing.assert_close(mf.unet_output(merged.unet), mf.unet_output(expected.unet), **TOLERANCE)


def test_diffusers_folder_as_sd_model_writes_the_same_single_file(world, tmp_path):
    files = world("sd2v")
    from_file, from_folder = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    common = ["--models", str(files["locon"]), "--ratios", "0.5", "--no_metadata"]
    assert merge_lora.main(["--sd_model", str(files["file"]), "--save_to", str(from_file), "--v2", *common]) == 0
    assert merge_lora.main(["--sd_model", str(files["folder"]), "--save_to", str(from_folder), *common]) == 0
    a, b = mf.tensors(from_file), mf.tensors(from_folder)
    assert set(a) == set(b)
    assert all(torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype for key in a)


def test_diffusers_folder_output_for_a_diffusers_folder(world, tmp_path):
    files = world("sdxl")
    out = tmp_path / "merged_folder"
    assert sdxl_merge_lora.main(["--sd_model", str(files["folder"]), "--save_to", str(out), "--models", str(files["locon"]),
                                 "--ratios", "0.6"]) == 0
    from diffusers import StableDiffusionXLPipeline

    merged = StableDiffusionXLPipeline.from_pretrained(str(out))
    expected = reference(files, [files["locon"]], [0.6])
    torch.testing.assert_close(mf.unet_output(merged.unet), mf.unet_output(expected.unet), **TOLERANCE)
    for a, b in zip(mf.text_outputs(merged, files["folder"]), mf.text_outputs(expected, files["folder"])):
        torch.testing.assert_close(a, b, **TOLERANCE)
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (files["folder"] / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    recipe = json.loads((out / "leco_merge.json").read_text())
    assert recipe["modelspec.merged_from"] == "model, locon (ratio 0.6)"


def test_fp16_checkpoint_keeps_its_dtype_and_save_precision_casts(world, tmp_path):
    files = world("sd1")
    half = tmp_path / "half.safetensors"
    from library.ldm_convert import save_single_file

    save_single_file(half, kind="sd1", dtype=torch.float16, **mf.components(files["folder"]))
    kept, cast = tmp_path / "kept.safetensors", tmp_path / "cast.safetensors"
    assert merge_lora.main(["--sd_model", str(half), "--save_to", str(kept), "--models", str(files["lora"])]) == 0
    assert merge_lora.main(["--sd_model", str(half), "--save_to", str(cast), "--models", str(files["lora"]),
                            "--save_precision", "bf16"]) == 0
    source, kept_t, cast_t = mf.tensors(half), mf.tensors(kept), mf.tensors(cast)
    assert {v.dtype for v in kept_t.values() if v.is_floating_point()} == {torch.float16}
    assert {v.dtype for v in cast_t.values() if v.is_floating_point()} == {torch.bfloat16}
    key = next(k for k in source if k.endswith("attn1.to_q.weight"))
    from networks.lora_weights import read_lora

    module = read_lora(files["lora"]).modules["lora_unet_" + sgm_to_diffusers(key[len("model.diffusion_model."):], 2)
                                                .removesuffix(".weight").replace(".", "_")]
    expected = (source[key].float() + module.delta()).half()  # merged in fp32, stored back in fp16
    assert torch.equal(kept_t[key], expected)


def test_sgm_names_map_back_to_every_diffusers_name():
    """sgm_to_diffusers inverts the exporter's renaming for the shipped real configs (built on the meta device)."""
    from diffusers import UNet2DConditionModel

    from library.ldm_convert import convert_unet_state_dict
    from library.single_file import default_config_dir

    for kind in ("sd1", "sd2", "sdxl"):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(default_config_dir(kind), subfolder="unet"))
        state = unet.state_dict()
        converted = convert_unet_state_dict(state, unet.config)
        names = [key[len("model.diffusion_model."):] for key in converted]
        layers = unet_layers_per_block(names)
        assert layers == unet.config.layers_per_block
        assert [sgm_to_diffusers(name, layers) for name in names] == list(state)


def test_open_clip_q_k_v_rows(world):
    """SD 2.x text-encoder LoRA q/k/v land on the right rows of the fused in_proj_weight."""
    files = world("sd2v")
    with safe_open(str(files["file"]), framework="pt") as handle:
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    targets = checkpoint_targets(shapes, "sd2")
    width = shapes["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"][1]
    rows = [targets[f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj"].rows for p in "qkv"]
    assert rows == [(0, width), (width, 2 * width), (2 * width, 3 * width)]
    assert targets["lora_te_text_model_encoder_layers_0_mlp_fc1"].key.endswith("resblocks.0.mlp.c_fc.weight")


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def _bad(kind, argv, capsys, tmp_path, message):
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run(kind, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert "Traceback" not in "".join(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp file left


def test_bad_inputs_fail_with_one_line_and_write_nothing(world, tmp_path, capsys):
    sd1, sdxl = world("sd1"), world("sdxl")
    out = str(tmp_path / "out.safetensors")
    base = ["--save_to", out]
    cases = [
        ("sd1", ["--sd_model", str(sd1["file"]), *base, "--models", str(tmp_path / "missing.safetensors")], "not found"),
        ("sd1", ["--sd_model", str(tmp_path / "nope.safetensors"), *base, "--models", str(sd1["lora"])], "not found"),
        ("sd1", ["--sd_model", str(sd1["file"]), *base, "--models", str(sd1["lora"]), "--ratios", "1", "2"], "one ratio per model"),
        ("sd1", ["--sd_model", str(sd1["file"]), *base, "--models", str(sdxl["lora"])], "SDXL LoRA"),
        ("sd1", ["--sd_model", str(sdxl["file"]), *base, "--models", str(sdxl["lora"])], "sdxl_merge_lora.py"),
        ("sdxl", ["--sd_model", str(sd1["file"]), *base, "--models", str(sd1["lora"])], "merge_lora.py"),
        ("sd1", ["--sd_model", str(sd1["file"]), *base, "--models", str(sd1["lora"]), "--v2"], "not SD 2.x"),
        ("sd1", ["--sd_model", str(sd1["file"]), "--save_to", str(tmp_path / "x.bin"), "--models", str(sd1["lora"])], ".safetensors"),
        ("sd1", ["--sd_model", str(sd1["file"]), *base, "--models", str(sd1["lora"]), "--concat"], "--concat"),
        ("sd1", ["--sd_model", str(sd1["lora"]), *base, "--models", str(sd1["lora"])], "LoRA"),
    ]
    for kind, argv, message in cases:
        _bad(kind, argv, capsys, tmp_path, message)


def test_bad_lora_files_are_named(world, tmp_path, capsys):
    from safetensors.torch import save_file

    sd1 = world("sd1")
    lora = mf.tensors(sd1["lora"])
    name = next(key for key in lora if key.endswith("lora_down.weight")).split(".")[0]
    variants = {
        "unknown_key.safetensors": ({**lora, "lora_unet_foo.lora_down.weight": lora[f"{name}.lora_down.weight"].clone(),
                                     "lora_unet_foo.lora_up.weight": lora[f"{name}.lora_up.weight"].clone()}, "have no layer"),
        "odd_suffix.safetensors": ({**lora, f"{name}.lora_extra.weight": torch.zeros(1)}, "unknown LoRA key"),
        "loha.safetensors": ({f"{name}.hada_w1_a": torch.zeros(2, 2)}, "LoHa"),
        "peft.safetensors": ({"unet.x.lora_A.weight": torch.zeros(2, 2)}, "PEFT"),
        "shape.safetensors": ({**lora, f"{name}.lora_up.weight": torch.zeros(7, lora[f"{name}.lora_up.weight"].shape[1])}, "shape"),
        "no_up.safetensors": ({k: v for k, v in lora.items() if k != f"{name}.lora_up.weight"}, "no lora_up.weight"),
    }
    folder = tmp_path / "inputs"
    folder.mkdir()
    for file, (state, _) in variants.items():
        save_file(state, str(folder / file))
    (folder / "garbage.safetensors").write_bytes(b"not a file")
    variants["garbage.safetensors"] = (None, "not a readable")
    out = tmp_path / "out"
    out.mkdir()
    for file, (_, message) in variants.items():
        _bad("sd1", ["--sd_model", str(sd1["file"]), "--save_to", str(out / "m.safetensors"), "--models", str(folder / file)],
             capsys, out, message)


def test_streaming_writer_and_reader_round_trip_with_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from library.safetensors_stream import SafetensorsReader, StreamingSafetensorsWriter

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(3, 5, generator=generator),
        "b": torch.randn(7, generator=generator).to(torch.bfloat16),
        "c": torch.randn(2, 2, 3, 3, generator=generator).half(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "transposed": torch.randn(4, 6, generator=generator).t(),
    }
    ours = tmp_path / "ours.safetensors"
    with StreamingSafetensorsWriter(ours, [(k, v.dtype, v.shape) for k, v in tensors.items()], {"note": "x"}) as writer:
        for key, value in tensors.items():
            writer.write(key, value)
    loaded = load_file(str(ours))  # the reference reader accepts our file
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())
    reference = tmp_path / "reference.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(reference), {"note": "x"})
    for path in (ours, reference):  # our reader reads the reference writer's file too
        reader = SafetensorsReader(path)
        assert reader.metadata == {"note": "x"} and set(reader.keys()) == set(tensors)
        assert all(torch.equal(reader.get_tensor(k), v) and reader.get_tensor(k).dtype == v.dtype for k, v in tensors.items())

    partial = tmp_path / "partial.safetensors"
    with pytest.raises(ValueError, match="were not written"):
        with StreamingSafetensorsWriter(partial, [(k, v.dtype, v.shape) for k, v in tensors.items()]) as writer:
            writer.write("a.weight", tensors["a.weight"])
    with pytest.raises(ValueError, match="header says"):
        with StreamingSafetensorsWriter(partial, [("a.weight", torch.float16, (3, 5))]) as writer:
            writer.write("a.weight", tensors["a.weight"])
    assert not any(p.name.startswith((".partial", "partial")) for p in tmp_path.iterdir())  # no file, no temp file
    (tmp_path / "broken.safetensors").write_bytes(ours.read_bytes()[:-10])
    with pytest.raises(ValueError, match="offsets"):
        SafetensorsReader(tmp_path / "broken.safetensors")
