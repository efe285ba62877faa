"""Combining LoRAs into one LoRA: --concat is the weighted sum, the plain merge is exact or refuses, SVD reports what it drops."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from networks import merge_lora, resize_lora, sdxl_merge_lora, svd_merge_lora
from networks.lora_combine import kept_rank
from networks.lora_weights import read_lora
from tests import merge_fixtures as mf


@pytest.fixture(scope="module")
def loras(tiny_sd_dir, tiny_sdxl_dir, tmp_path_factory):
    """SD1: a rank-4 LoRA, a rank-3 LoCon with text-encoder modules, a cross-attention-only rank-2 LoRA."""
    root = tmp_path_factory.mktemp("combine")
    return {
        "folder": tiny_sd_dir,
        "a": mf.random_lora(tiny_sd_dir, root / "a.safetensors", seed=1, metadata={"ss_base_model_version": "sd_v1"}),
        "b": mf.random_lora(tiny_sd_dir, root / "b.safetensors", seed=2, conv=True, dim=3, alpha=1.0, text=True),
        "x": mf.random_lora(tiny_sd_dir, root / "x.safetensors", seed=3, dim=2, alpha=8.0, include="attn2"),
        "xl": mf.random_lora(tiny_sdxl_dir, root / "xl.safetensors", seed=4),
        "xl_folder": tiny_sdxl_dir,
    }


def deltas(path: Path) -> dict[str, torch.Tensor]:
    return {name: module.delta() for name, module in read_lora(path).modules.items()}


def weighted_sum(paths: list[Path], ratios: list[float]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for path, ratio in zip(paths, ratios):
        for name, delta in deltas(path).items():
            total[name] = total.get(name, torch.zeros_like(delta)) + ratio * delta
    return total


def assert_same_deltas(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name].reshape(expected[name].shape), expected[name], rtol=0, atol=atol)


def test_concat_is_exactly_the_weighted_sum(loras, tmp_path):
    out = tmp_path / "concat.safetensors"
    paths, ratios = [loras["a"], loras["b"], loras["x"]], [0.8, -1.5, 2.0]
    assert merge_lora.main(["--save_to", str(out), "--models", *map(str, paths), "--ratios", *map(str, ratios), "--concat"]) == 0
    assert_same_deltas(deltas(out), weighted_sum(paths, ratios))
    combined = read_lora(out).modules
    shared = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert combined[shared].rank == 4 + 3 + 2 and combined[shared].alpha == 9  # ranks add up; scale 1


def test_concat_file_in_diffusers_equals_the_inputs_as_two_adapters(loras, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "concat.safetensors"
    assert merge_lora.main(["--save_to", str(out), "--models", str(loras["a"]), str(loras["b"]), "--ratios", "0.7", "-0.4",
                            "--concat"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(loras["folder"]), safety_checker=None, requires_safety_checker=False)
    mf.load_lora_everywhere(pipe, out, "combined")
    mf.load_lora_everywhere(pipe, loras["a"], "a")
    mf.load_lora_everywhere(pipe, loras["b"], "b")
    pipe.set_adapters(["combined"], [1.0])
    combined = mf.unet_output(pipe.unet), mf.text_outputs(pipe, loras["folder"])
    pipe.set_adapters(["a", "b"], [0.7, -0.4])
    separate = mf.unet_output(pipe.unet), mf.text_outputs(pipe, loras["folder"])
    torch.testing.assert_close(combined[0], separate[0], rtol=0, atol=2e-5)
    for x, y in zip(combined[1], separate[1]):
        torch.testing.assert_close(x, y, rtol=0, atol=2e-5)


def test_plain_merge_is_exact_for_disjoint_modules_and_scales(loras, tmp_path):
    only_self = tmp_path / "self.safetensors"
    # a LoRA on the self-attention layers only: disjoint from "x" (cross-attention only)
    mf.random_lora(loras["folder"], only_self, seed=5, dim=4, alpha=1.0, include="attn1")
    out = tmp_path / "plain.safetensors"
    assert merge_lora.main(["--save_to", str(out), "--models", str(only_self), str(loras["x"]), "--ratios", "0.5", "-2"]) == 0
    assert_same_deltas(deltas(out), weighted_sum([only_self, loras["x"]], [0.5, -2.0]))
    merged = read_lora(out).modules
    assert {module.rank for module in merged.values()} == {4, 2}  # ranks and alphas kept
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == "Dynamic" and metadata["modelspec.merged_from"] == "self (ratio 0.5), x (ratio -2)"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora" and len(metadata["sshs_model_hash"]) == 64


def test_plain_merge_refuses_two_loras_on_one_layer(loras, tmp_path, capsys):
    out = tmp_path / "plain.safetensors"
    assert merge_lora.main(["--save_to", str(out), "--models", str(loras["a"]), str(loras["x"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "both change" in err[0] and "--concat" in err[0]
    assert not out.exists()


def test_svd_at_full_rank_is_exact_and_reports_all_energy_kept(loras, tmp_path, caplog):
    out = tmp_path / "svd.safetensors"
    paths, ratios = [loras["a"], loras["b"]], [1.0, 0.5]
    with caplog.at_level(logging.INFO):
        assert svd_merge_lora.main(["--save_to", str(out), "--models", *map(str, paths), "--ratios", "1", "0.5",
                                    "--new_rank", "7", "--new_conv_rank", "7"]) == 0
    assert_same_deltas(deltas(out), weighted_sum(paths, ratios), atol=1e-5)
    lines = [record.getMessage() for record in caplog.records if "kept energy" in record.getMessage()]
    assert len(lines) == len(read_lora(out).modules) + 1  # one per module and a summary
    assert all("100.000%" in line for line in lines)


def test_svd_at_lower_rank_reports_the_error_it_makes(loras, tmp_path, caplog):
    out = tmp_path / "svd2.safetensors"
    paths, ratios = [loras["a"], loras["b"]], [1.0, 0.5]
    with caplog.at_level(logging.INFO):
        assert svd_merge_lora.main(["--save_to", str(out), "--models", *map(str, paths), "--ratios", "1", "0.5",
                                    "--new_rank", "2", "--new_conv_rank", "1"]) == 0
    expected, actual = weighted_sum(paths, ratios), deltas(out)
    reported = {}
    for record in caplog.records:
        text = record.getMessage()
        if "relative error" in text and not text.startswith(tuple("0123456789")):
            reported[text.split()[0]] = float(text.rsplit(" ", 1)[1])
    for name, target in expected.items():
        matrix = target.reshape(target.shape[0], -1).double()
        singular = torch.linalg.svdvals(matrix)
        rank = read_lora(out).modules[name].rank
        optimum = math.sqrt(float((singular[rank:] ** 2).sum() / (singular ** 2).sum()))  # Eckart-Young
        error = float((actual[name].reshape(matrix.shape).double() - matrix).norm() / matrix.norm())
        assert error == pytest.approx(optimum, abs=1e-5), name
        assert reported[name] == pytest.approx(optimum, rel=1e-2, abs=1e-6), name
        assert rank == (1 if target.ndim == 4 and target.shape[2:] != (1, 1) else 2)
    assert max(reported.values()) > 0.1  # rank 2 of a rank-7 sum loses something


def test_resize_keeps_metadata_and_dynamic_rank(loras, tmp_path, caplog):
    out = tmp_path / "resized.safetensors"
    assert resize_lora.main(["--model", str(loras["a"]), "--save_to", str(out), "--new_rank", "4"]) == 0
    assert_same_deltas(deltas(out), deltas(loras["a"]), atol=1e-5)  # rank 4 of a rank-4 LoRA: exact
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_network_dim"] == "4"
    assert "resized from rank 4 to 4" in metadata["ss_training_comment"]
    dynamic = tmp_path / "dynamic.safetensors"
    assert resize_lora.main(["--model", str(loras["a"]), "--save_to", str(dynamic), "--new_rank", "3",
                             "--dynamic_method", "sv_fro", "--dynamic_param", "0.5"]) == 0
    ranks = {module.rank for module in read_lora(dynamic).modules.values()}
    assert ranks and max(ranks) <= 3


def test_kept_rank_by_hand():
    singular = torch.tensor([4.0, 2.0, 1.0, 0.5])  # squares 16, 4, 1, 0.25 (total 21.25); sum 7.5
    assert kept_rank(singular, 3) == 3
    assert kept_rank(singular, 8) == 4  # never more than the values there are
    assert kept_rank(singular, 4, "sv_ratio", 3.0) == 2  # values > 4/3: 4 and 2
    assert kept_rank(singular, 4, "sv_fro", math.sqrt(20 / 21.25)) == 2  # 16+4 = 20 of 21.25
    assert kept_rank(singular, 4, "sv_fro", math.sqrt(20.5 / 21.25)) == 3
    assert kept_rank(singular, 4, "sv_cumulative", 6 / 7.5) == 2  # 4+2 = 6 of 7.5
    assert kept_rank(singular, 1, "sv_cumulative", 1.0) == 1
    assert kept_rank(torch.zeros(3), 2, "sv_ratio", 2.0) == 1


def test_combined_files_load_in_diffusers_with_no_key_unused(loras, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "svd.safetensors"
    assert svd_merge_lora.main(["--save_to", str(out), "--models", str(loras["a"]), str(loras["b"]), "--new_rank", "3"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(loras["folder"]), safety_checker=None, requires_safety_checker=False)
    mf.load_lora_everywhere(pipe, out, "svd")


def test_sdxl_concat_renames_diffusers_style_names_to_sgm(loras, tmp_path):
    from networks.sgm_names import kohya_aliases

    tensors = mf.tensors(loras["xl"])
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(loras["xl_folder"], subfolder="unet")
    to_diffusers = {sgm: diffusers for diffusers, sgm in kohya_aliases(unet).items()}
    renamed = {to_diffusers[key.split(".")[0]] + "." + key.split(".", 1)[1]: value for key, value in tensors.items()}
    diffusers_style = tmp_path / "diffusers_names.safetensors"
    save_file(renamed, str(diffusers_style))
    out = tmp_path / "xl.safetensors"
    assert sdxl_merge_lora.main(["--save_to", str(out), "--models", str(loras["xl"]), str(diffusers_style),
                                 "--ratios", "1", "-1", "--concat"]) == 0
    for name, delta in deltas(out).items():
        assert "_input_blocks_" in name or "_output_blocks_" in name or "_middle_block_" in name, name
        assert delta.abs().max() < 1e-6, name  # the same LoRA under both names, at +1 and -1, cancels


def test_combine_bad_inputs(loras, tmp_path, capsys):
    cases = [
        (merge_lora, ["--save_to", str(tmp_path / "o.txt"), "--models", str(loras["a"])], ".safetensors"),
        (merge_lora, ["--save_to", str(tmp_path / "o.safetensors"), "--models", str(loras["a"]), str(loras["xl"]), "--concat"],
         "different model families"),
        (merge_lora, ["--save_to", str(tmp_path / "o.safetensors"), "--models", str(loras["a"]), "--ratios", "0", "--concat"],
         "every ratio is 0"),
        (merge_lora, ["--save_to", str(tmp_path / "o.safetensors"), "--models"], "at least one"),
        (svd_merge_lora, ["--save_to", str(tmp_path / "o.safetensors"), "--models", str(loras["a"]), "--new_rank", "0"], "at least 1"),
        (resize_lora, ["--save_to", str(tmp_path / "o.safetensors"), "--model", str(loras["a"]), "--dynamic_method", "sv_fro"],
         "--dynamic_param"),
        (resize_lora, ["--save_to", str(tmp_path / "o.safetensors"), "--model", str(tmp_path / "none.safetensors")], "not found"),
    ]
    for tool, argv, message in cases:
        assert tool.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], (argv, err)
        assert len([line for line in err if line.startswith("error:")]) == 1
    assert not [p for p in tmp_path.iterdir()]
