"""Block-wise ranks, alphas and learning rates, and LoRA+ (networks/lora_blocks.py through networks.lora).

Every expected block index and learning rate below is written out by hand from sd-scripts' layout
(SD: IN00-IN11, MID, OUT00-OUT11 = 25; SDXL: BASE, IN00-IN08, MID00-MID02, OUT00-OUT08, OUT = 23),
not computed with the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

import sdxl_train_leco
import train_leco
from library.optimizers import create_lr_scheduler, lr_logs
from networks.lora import create_network, create_network_from_weights, find_target_modules
from networks.lora_blocks import SD_LAYOUT, SDXL_LAYOUT, preset_weights
from tests.helpers import base_argv, load_lora_into_pipeline, lora_tensors, scalars, write_prompts

# (diffusers module-path prefix, sd-scripts block index) for the tiny test U-Nets (tests/tiny_models.py).
# SD: 2 levels x 2 layers; down 0 has attention, up 1 has attention; input_blocks.K -> K, mid -> 12,
# output_blocks.K -> 13 + K.
SD_BLOCKS = [
    ("down_blocks.0.resnets.0.", 1), ("down_blocks.0.attentions.0.", 1),
    ("down_blocks.0.resnets.1.", 2), ("down_blocks.0.attentions.1.", 2),
    ("down_blocks.0.downsamplers.0.", 3),
    ("down_blocks.1.resnets.0.", 4), ("down_blocks.1.resnets.1.", 5),
    ("mid_block.", 12),
    ("up_blocks.0.resnets.0.", 13), ("up_blocks.0.resnets.1.", 14),
    ("up_blocks.0.resnets.2.", 15), ("up_blocks.0.upsamplers.0.", 15),
    ("up_blocks.1.resnets.0.", 16), ("up_blocks.1.attentions.0.", 16),
    ("up_blocks.1.resnets.1.", 17), ("up_blocks.1.attentions.1.", 17),
    ("up_blocks.1.resnets.2.", 18), ("up_blocks.1.attentions.2.", 18),
]
# SDXL: 3 levels x 2 layers (the real layout); input_blocks.K -> 1 + K, middle_block.K -> 10 + K,
# output_blocks.K -> 13 + K.
SDXL_BLOCKS = [
    ("down_blocks.0.resnets.0.", 2), ("down_blocks.0.resnets.1.", 3), ("down_blocks.0.downsamplers.0.", 4),
    ("down_blocks.1.resnets.0.", 5), ("down_blocks.1.attentions.0.", 5),
    ("down_blocks.1.resnets.1.", 6), ("down_blocks.1.attentions.1.", 6), ("down_blocks.1.downsamplers.0.", 7),
    ("down_blocks.2.resnets.0.", 8), ("down_blocks.2.attentions.0.", 8),
    ("down_blocks.2.resnets.1.", 9), ("down_blocks.2.attentions.1.", 9),
    ("mid_block.resnets.0.", 10), ("mid_block.attentions.0.", 11), ("mid_block.resnets.1.", 12),
    ("up_blocks.0.resnets.0.", 13), ("up_blocks.0.attentions.0.", 13),
    ("up_blocks.0.resnets.1.", 14), ("up_blocks.0.attentions.1.", 14),
    ("up_blocks.0.resnets.2.", 15), ("up_blocks.0.attentions.2.", 15), ("up_blocks.0.upsamplers.0.", 15),
    ("up_blocks.1.resnets.0.", 16), ("up_blocks.1.attentions.0.", 16),
    ("up_blocks.1.resnets.1.", 17), ("up_blocks.1.attentions.1.", 17),
    ("up_blocks.1.resnets.2.", 18), ("up_blocks.1.attentions.2.", 18), ("up_blocks.1.upsamplers.0.", 18),
    ("up_blocks.2.resnets.0.", 19), ("up_blocks.2.resnets.1.", 20), ("up_blocks.2.resnets.2.", 21),
]
HAND = {"sd": SD_BLOCKS, "sdxl": SDXL_BLOCKS}


def hand_block(family: str, path: str) -> int:
    matches = [index for prefix, index in HAND[family] if path.startswith(prefix)]
    assert len(matches) == 1, path
    return matches[0]


def paths_by_name(unet) -> dict[str, str]:
    return {name: path for name, path, _ in find_target_modules(unet, conv=True)}


def csv(values) -> str:
    return ",".join(str(value) for value in values)


@pytest.fixture(params=["sd", "sdxl"])
def family_unet(request, tiny_sd_dir, tiny_sdxl_dir):
    folder = tiny_sd_dir if request.param == "sd" else tiny_sdxl_dir
    return request.param, UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()


# ----------------------------------------------------------------------------------------------
# layout, presets


def test_block_counts_and_names_follow_sd_scripts():
    assert (SD_LAYOUT.total, SD_LAYOUT.per_side, SD_LAYOUT.mid) == (25, 12, 1)
    assert (SDXL_LAYOUT.total, SDXL_LAYOUT.per_side, SDXL_LAYOUT.mid) == (23, 9, 3)
    assert [SD_LAYOUT.label(i).split()[0] for i in (0, 11, 12, 13, 24)] == ["IN00", "IN11", "MID", "OUT00", "OUT11"]
    assert [SDXL_LAYOUT.label(i).split()[0] for i in (0, 1, 9, 10, 12, 13, 21, 22)] == [
        "BASE", "IN00", "IN08", "MID00", "MID02", "OUT00", "OUT08", "OUT"]


def test_every_module_lands_in_its_block(family_unet):
    family, unet = family_unet
    network = create_network(1.0, 4, 1.0, None, [], unet, conv_dim="2", down_lr_weight="zeros+1")
    paths = paths_by_name(unet)
    assert len(network.block_of) == len(network.unet_loras) > 50
    for name, index in network.block_of.items():
        assert index == hand_block(family, paths[name]), name


def test_presets_by_hand():
    cosine = preset_weights("cosine", 12)
    assert cosine[0] == 1.0 and cosine[11] == pytest.approx(0.0, abs=1e-12)
    assert cosine[5] == pytest.approx(math.sin(math.pi / 2 * 6 / 11))
    sine = preset_weights("sine", 9, 0.25)
    assert sine[0] == 0.25 and sine[8] == 1.25 and sine[2] == pytest.approx(math.sin(math.pi / 8) + 0.25)
    assert preset_weights("linear", 9) == pytest.approx([k / 8 for k in range(9)])
    assert preset_weights("reverse_linear", 12)[1] == pytest.approx(10 / 11)
    assert preset_weights("zeros", 12, 0.3) == [0.3] * 12


# ----------------------------------------------------------------------------------------------
# parameter groups: learning rates by hand


def group_table(network, lr):
    groups, names = network.prepare_optimizer_params(None, lr, lr)
    assert len(groups) == len(names)
    return {name: group for name, group in zip(names, groups)}


def test_lr_groups_by_hand_sd(tiny_sd_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    network = create_network(
        1.0, 4, 1.0, None, [], unet, conv_dim="2",
        down_lr_weight="1,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,1.1", mid_lr_weight="0.25",
        up_lr_weight="1.2,1.3,1.4,1.5,1.6,1.7,1.8,1.9,2.0,2.1,2.2,2.3",
    )
    table = group_table(network, 1e-3)
    expected = {"unet_block1": 1e-4, "unet_block2": 2e-4, "unet_block3": 3e-4, "unet_block4": 4e-4, "unet_block5": 5e-4,
                "unet_block12": 2.5e-4, "unet_block13": 1.2e-3, "unet_block14": 1.3e-3, "unet_block15": 1.4e-3,
                "unet_block16": 1.5e-3, "unet_block17": 1.6e-3, "unet_block18": 1.7e-3}
    assert set(table) == set(expected)
    assert list(table) == sorted(table, key=lambda name: int(name.removeprefix("unet_block")))  # block order
    paths = paths_by_name(unet)
    for name, lr in expected.items():
        assert table[name]["lr"] == pytest.approx(lr, rel=1e-12)
        index = int(name.removeprefix("unet_block"))
        members = {id(param) for lora in network.unet_loras if hand_block("sd", paths[lora.lora_name]) == index
                   for param in lora.parameters()}
        assert {id(param) for param in table[name]["params"]} == members and members
    assert sum(len(group["params"]) for group in table.values()) == len(list(network.parameters()))


def test_lr_groups_by_hand_sdxl_with_presets(tiny_sdxl_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    network = create_network(1.0, 4, 1.0, None, [], unet, conv_dim="2", down_lr_weight="linear", mid_lr_weight="0.5,1,2",
                             up_lr_weight="reverse_linear+0.5")
    table = group_table(network, 1e-3)
    # down: input_blocks.K weight K/8 (block 1 + K); mid 0.5, 1, 2; up: output_blocks.K weight (8-K)/8 + 0.5 (block 13 + K)
    weights = {2: 1 / 8, 3: 2 / 8, 4: 3 / 8, 5: 4 / 8, 6: 5 / 8, 7: 6 / 8, 8: 7 / 8, 9: 1.0, 10: 0.5, 11: 1.0, 12: 2.0,
               13: 1.5, 14: 1.375, 15: 1.25, 16: 1.125, 17: 1.0, 18: 0.875, 19: 0.75, 20: 0.625, 21: 0.5}
    assert set(table) == {f"unet_block{index}" for index in weights}
    paths = paths_by_name(unet)
    for index, weight in weights.items():
        group = table[f"unet_block{index}"]
        assert group["lr"] == pytest.approx(1e-3 * weight, rel=1e-12)
        members = {id(p) for lora in network.unet_loras if hand_block("sdxl", paths[lora.lora_name]) == index for p in lora.parameters()}
        assert {id(param) for param in group["params"]} == members and members


@pytest.mark.parametrize("args, ratio", [({"loraplus_lr_ratio": "16"}, 16.0),
                                         ({"loraplus_lr_ratio": "16", "loraplus_unet_lr_ratio": "4"}, 4.0)])
def test_loraplus_puts_lora_up_in_its_own_group(tiny_sd_dir, args, ratio):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    network = create_network(1.0, 4, 1.0, None, [], unet, **args)
    table = group_table(network, 1e-4)
    assert list(table) == ["unet", "unet plus"]
    assert table["unet"]["lr"] == 1e-4 and table["unet plus"]["lr"] == pytest.approx(1e-4 * ratio)
    ups = {id(lora.lora_up.weight) for lora in network.unet_loras}
    downs = {id(lora.lora_down.weight) for lora in network.unet_loras}
    assert {id(p) for p in table["unet plus"]["params"]} == ups and {id(p) for p in table["unet"]["params"]} == downs
    with_blocks = create_network(1.0, 4, 1.0, None, [], unet, mid_lr_weight="0.5", **args)
    table = group_table(with_blocks, 1e-4)
    assert table["unet_block12"]["lr"] == pytest.approx(5e-5) and table["unet_block12 plus"]["lr"] == pytest.approx(5e-5 * ratio)
    mid = [lora for lora in with_blocks.unet_loras if lora.lora_name.startswith("lora_unet_mid_block_")]
    assert {id(p) for p in table["unet_block12 plus"]["params"]} == {id(lora.lora_up.weight) for lora in mid}


def test_the_schedule_moves_every_group_and_the_logs_name_them(tiny_sd_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    network = create_network(1.0, 4, 1.0, None, [], unet, down_lr_weight="zeros+0.5", mid_lr_weight="2", loraplus_lr_ratio="4")
    groups, names = network.prepare_optimizer_params(None, 1e-3, 1e-3)
    groups = [{**group, "name": name} for group, name in zip(groups, names)]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    schedule = create_lr_scheduler(optimizer, "cosine", 2, 10)
    initial = {"unet_block1": 5e-4, "unet_block1 plus": 2e-3, "unet_block12": 2e-3, "unet_block12 plus": 8e-3,
               "unet_block16": 1e-3, "unet_block16 plus": 4e-3}
    for step in range(11):
        factor = step / 2 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / 8))  # warm-up 2, cosine to 10
        logs = lr_logs(optimizer.param_groups, 1e-3)
        assert logs["lr"] == pytest.approx(1e-3 * factor, abs=1e-15)
        for name, lr in initial.items():
            assert logs[f"lr/{name}"] == pytest.approx(lr * factor, abs=1e-15), (step, name)
        optimizer.step()
        schedule.step()


@pytest.mark.parametrize("optimizer, kwargs", [
    ("AdamW8bit", {"min_8bit_size": 0}), ("Lion", {}), ("Adafactor", {}), ("AdamWScheduleFree", {}),
])
def test_named_block_groups_work_with_every_optimizer_family(optimizer, kwargs, tiny_sd_dir):
    from library.optimizers import create_optimizer

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    network = create_network(1.0, 4, 1.0, None, [], unet, mid_lr_weight="0.5", loraplus_lr_ratio="2")
    network.apply_to()
    unet.requires_grad_(False)
    groups, names = network.prepare_optimizer_params(None, 1e-3, 1e-3)
    opt = create_optimizer(optimizer, [{**group, "name": name} for group, name in zip(groups, names)], 1e-3, kwargs)
    if hasattr(opt, "train"):
        opt.train()
    before = {name: group["params"][0].detach().clone() for name, group in zip(names, opt.param_groups)}
    latents = torch.randn(1, 4, 8, 8)
    unet(latents, 500, encoder_hidden_states=torch.randn(1, 77, 32)).sample.pow(2).mean().backward()
    opt.step()
    logs = lr_logs(opt.param_groups, 1e-3)
    assert logs["lr/unet_block12"] == pytest.approx(logs["lr/unet_block16"] * 0.5)
    assert logs["lr/unet_block16 plus"] == pytest.approx(logs["lr/unet_block16"] * 2)
    moved = {name for name, group in zip(names, opt.param_groups) if not torch.equal(before[name], group["params"][0])}
    assert {"unet_block12 plus", "unet_block16 plus"} <= moved  # lora_up (zero at first) gets the first gradient


# ----------------------------------------------------------------------------------------------
# ranks and alphas per block


def test_block_dim_zero_leaves_the_block_without_modules_sd(tiny_sd_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    dims = [4] * 25
    dims[1], dims[17] = 0, 0  # IN01 (down_blocks.0.*.0), OUT04 (up_blocks.1.*.1)
    dims[2], dims[12], dims[16] = 8, 2, 6
    alphas = [1.0] * 25
    alphas[2], alphas[16] = 0, 3  # 0 means alpha = rank
    conv_dims = [2] * 25
    conv_dims[1] = conv_dims[17] = conv_dims[4] = 0  # IN04: no 3x3 LoRA (its Linear / 1x1 layers keep block_dims)
    network = create_network(1.0, 4, 1.0, None, [], unet, block_dims=csv(dims), block_alphas=csv(alphas),
                             conv_block_dims=csv(conv_dims))
    paths = paths_by_name(unet)
    blocks = {lora.lora_name: hand_block("sd", paths[lora.lora_name]) for lora in network.unet_loras}
    assert not any(index in (1, 17) for index in blocks.values())
    assert not any(name.startswith(("lora_unet_down_blocks_0_attentions_0_", "lora_unet_up_blocks_1_attentions_1_"))
                   for name in blocks)
    for lora in network.unet_loras:
        index, conv = blocks[lora.lora_name], lora.org_module.weight.dim() == 4 and lora.org_module.kernel_size != (1, 1)
        assert not (conv and index == 4)
        assert lora.lora_dim == (2 if conv else dims[index])
        assert lora.alpha.item() == (1.0 if conv else {2: 8.0, 16: 3.0}.get(index, 1.0))
    assert any(blocks[name] == 4 for name in blocks)  # IN04's time_emb_proj / shortcut still there


def test_block_dim_zero_leaves_the_block_without_modules_sdxl(tiny_sdxl_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    dims = [4] * 23
    dims[5], dims[11], dims[14] = 0, 8, 2  # input_blocks.4 none, middle_block.1 rank 8, output_blocks.1 rank 2
    network = create_network(1.0, 4, 1.0, None, [], unet, block_dims=csv(dims))
    names = [lora.lora_name for lora in network.unet_loras]
    assert not any(name.startswith("lora_unet_input_blocks_4_") for name in names)
    assert any(name.startswith("lora_unet_input_blocks_5_") for name in names)
    for lora in network.unet_loras:
        expected = 8 if lora.lora_name.startswith("lora_unet_middle_block_1_") else \
            2 if lora.lora_name.startswith("lora_unet_output_blocks_1_") else 4
        assert lora.lora_dim == expected, lora.lora_name


def test_lr_weight_at_or_below_the_threshold_removes_the_block(tiny_sd_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    network = create_network(1.0, 4, 1.0, None, [], unet, down_lr_weight="1,0.05,0.1,1,1,1,1,1,1,1,1,1", mid_lr_weight="0.2",
                             up_lr_weight=",,,,,,,,,,,", block_lr_zero_threshold="0.1")
    names = [lora.lora_name for lora in network.unet_loras]
    assert names and all(name.startswith("lora_unet_mid_block_") for name in names)  # IN01 0.05, IN02 0.1 <= 0.1; up blank = 0
    assert list(group_table(network, 1e-3)) == ["unet_block12"]
    assert group_table(network, 1e-3)["unet_block12"]["lr"] == pytest.approx(2e-4)


def test_from_weights_reads_block_ranks_back_and_applies_lr_weights(family_unet, tmp_path):
    family, unet = family_unet
    total = 25 if family == "sd" else 23
    dims = [(index % 3) * 2 for index in range(total)]  # 0, 2, 4, 0, 2, 4 ...
    network = create_network(1.0, 4, 1.0, None, [], unet, block_dims=csv(dims), conv_block_dims=csv([1] * total),
                             conv_block_alphas=csv([0.5] * total))
    path = tmp_path / "blocks.safetensors"
    network.save_weights(str(path))
    rebuilt, _ = create_network_from_weights(1.0, str(path), None, [], unet, down_lr_weight="zeros")
    assert {(lora.lora_name, lora.lora_dim, lora.alpha.item()) for lora in rebuilt.unet_loras} == {
        (lora.lora_name, lora.lora_dim, lora.alpha.item()) for lora in network.unet_loras}
    table = group_table(rebuilt, 1e-3)
    down = [lora for lora in rebuilt.unet_loras if "input_blocks" in lora.lora_name or "down_blocks" in lora.lora_name]
    assert down and not any(name.startswith("unet_block") and int(name[10:]) <= (11 if family == "sd" else 9) for name in table)
    assert all(not param.requires_grad for lora in down for param in lora.parameters())  # kept as loaded, not trained


def _unet_kwargs(family: str, unet, generator) -> dict:
    kwargs = {"encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 48, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    return kwargs


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("vary", ["ranks", "alphas"])
def test_diffusers_loads_a_file_with_per_block_ranks_and_alphas(family, vary, tiny_sd_dir, tiny_sdxl_dir, tmp_path):
    """Different ranks per block load in diffusers exactly. Different alphas load with no key unused, but diffusers
    0.42 gives the attention projections (to_q/k/v/out, whose alpha keys it misnames) the file's most common alpha;
    every other layer gets its own. Either that or an exact match (a fixed diffusers) is accepted."""
    folder = tiny_sd_dir if family == "sd" else tiny_sdxl_dir
    total = 25 if family == "sd" else 23
    ours = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    dims = [(1, 2, 4, 8)[i % 4] for i in range(total)] if vary == "ranks" else [4] * total
    alphas = [1.0] * total if vary == "ranks" else [(0, 1, 3)[i % 3] for i in range(total)]
    conv_dims = [(2, 0, 3)[i % 3] for i in range(total)]
    network = create_network(1.0, 4, 1.0, None, [], ours, block_dims=csv(dims), block_alphas=csv(alphas),
                             conv_block_dims=csv(conv_dims), conv_block_alphas=csv([1.0] * total))
    assert len({lora.lora_dim for lora in network.unet_loras}) >= (4 if vary == "ranks" else 3)
    network.apply_to()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in network.unet_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.1)
    path = tmp_path / "blocks.safetensors"
    network.save_weights(str(path))
    pipe = (StableDiffusionPipeline if family == "sd" else StableDiffusionXLPipeline).from_pretrained(folder)
    latents, kwargs = torch.randn(1, 4, 8, 8, generator=generator), _unet_kwargs(family, ours, generator)
    with torch.no_grad():
        base = pipe.unet(latents, 500, **kwargs).sample
        load_lora_into_pipeline(pipe, path)  # no key left unused
        theirs = pipe.unet(latents, 500, **kwargs).sample
        assert not torch.allclose(theirs, base, atol=1e-4)
        exact = torch.allclose(theirs, ours(latents, 500, **kwargs).sample, atol=1e-5)
        if vary == "ranks":
            assert exact
            return
        alpha_values = [lora.alpha.item() for lora in network.unet_loras]
        assert len(set(alpha_values)) == 3
        common = max(set(alpha_values), key=alpha_values.count)
        for lora in network.unet_loras:
            if lora.lora_name.endswith(("_to_q", "_to_k", "_to_v", "_to_out_0")):
                lora.scale = common / lora.lora_dim
        assert exact or torch.allclose(theirs, ours(latents, 500, **kwargs).sample, atol=1e-5)


def test_loading_weights_uses_the_files_alphas(tiny_sd_dir, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    alphas = [1.0] * 25
    alphas[16] = 3.0
    trained = create_network(1.0, 4, 1.0, None, [], unet, block_alphas=csv(alphas))
    trained.save_weights(str(tmp_path / "a.safetensors"))
    other = create_network(1.0, 4, 1.0, None, [], unet)  # built without block_alphas
    other.load_weights(str(tmp_path / "a.safetensors"))
    for lora in other.unet_loras:
        expected = 3.0 if lora.lora_name.startswith("lora_unet_up_blocks_1_attentions_0_") else 1.0
        assert lora.alpha.item() == expected and lora.scale == expected / 4


# ----------------------------------------------------------------------------------------------
# bad values: one line, exit 2, before any model is loaded


def sd_list(count: int, value: str = "1", at: int | None = None, bad: str = "") -> str:
    values = [value] * count
    if at is not None:
        values[at] = bad
    return ",".join(values)


BAD_BLOCK_ARGS = [
    ("sd", [f"block_dims={sd_list(24, '4')}"], ["block_dims", "SD 1.x/2.x needs 25", "IN00-IN11, MID, OUT00-OUT11", "got 24"]),
    ("sdxl", [f"block_dims={sd_list(25, '4')}"], ["block_dims", "SDXL needs 23", "BASE, IN00-IN08, MID00-MID02, OUT00-OUT08, OUT"]),
    ("sd", [f"block_dims={sd_list(25, '4', 6, '-2')}"], ["block_dims", "value 7 (IN06 = input_blocks.6) is -2"]),
    ("sdxl", [f"block_dims={sd_list(23, '4', 11, '2.5')}"], ["block_dims", "MID01 = middle_block.1", "whole number"]),
    ("sd", [f"block_alphas={sd_list(25, '1', 20, 'x')}"], ["block_alphas", "OUT07 = output_blocks.7", "'x' is not a number"]),
    ("sd", [f"conv_block_dims={sd_list(25, '2', 12, 'nan')}"], ["conv_block_dims", "MID = middle_block"]),
    ("sd", [f"conv_block_alphas={sd_list(25)}"], ["conv_block_alphas", "conv_block_dims or conv_dim"]),
    ("sd", [f"conv_block_dims={sd_list(25, '2')}", "train_method=xattn"], ["conv_block_dims", "train_method=xattn"]),
    ("sd", ["down_lr_weight=1,1,1"], ["down_lr_weight", "needs 12 comma-separated weights (IN00-IN11)", "preset"]),
    ("sdxl", ["up_lr_weight=" + sd_list(12)], ["up_lr_weight", "SDXL needs 9", "OUT00-OUT08"]),
    ("sdxl", ["mid_lr_weight=1"], ["mid_lr_weight", "SDXL needs 3", "MID00-MID02"]),
    ("sd", ["mid_lr_weight=1,1,1"], ["mid_lr_weight", "needs 1", "MID"]),
    ("sd", ["down_lr_weight=" + sd_list(12, "1", 3, "-0.5")], ["down_lr_weight", "value 4 (IN03 = input_blocks.3) is -0.5"]),
    ("sdxl", ["up_lr_weight=" + sd_list(9, "1", 8, "inf")], ["up_lr_weight", "OUT08 = output_blocks.8"]),
    ("sd", ["up_lr_weight=cosin"], ["up_lr_weight", "unknown preset", "did you mean 'cosine'"]),
    ("sd", ["down_lr_weight=sine+abc"], ["down_lr_weight", "'+abc' is not a number"]),
    ("sd", ["down_lr_weight=cosine+-2"], ["down_lr_weight", "IN00 = input_blocks.0", "-1"]),
    ("sd", ["block_lr_zero_threshold=0.1"], ["block_lr_zero_threshold", "needs down_lr_weight"]),
    ("sd", ["down_lr_weight=zeros", "block_lr_zero_threshold=-1"], ["block_lr_zero_threshold", "-1"]),
    ("sdxl", ["down_lr_weight=zeros", "mid_lr_weight=0,0,0", "up_lr_weight=zeros"], ["every block has rank 0 or lr weight 0"]),
    ("sd", ["block_dims=" + sd_list(25, "0")], ["every block has rank 0"]),
    ("sd", ["loraplus_lr_ratio=0"], ["loraplus_lr_ratio", "> 0"]),
    ("sdxl", ["loraplus_unet_lr_ratio=x"], ["loraplus_unet_lr_ratio", "number"]),
    ("sd", ["loraplus_text_encoder_lr_ratio=4"], ["loraplus_text_encoder_lr_ratio", "no text encoder"]),
]


@pytest.mark.parametrize("family, network_args, fragments", BAD_BLOCK_ARGS, ids=[f"{c[0]}-{c[1][0][:28]}" for c in BAD_BLOCK_ARGS])
def test_bad_block_args_exit_2_with_one_line_before_loading(family, network_args, fragments, tiny_sd_dir, tiny_sdxl_dir,
                                                            tmp_path, capsys, no_training):
    model = tiny_sd_dir if family == "sd" else tiny_sdxl_dir
    argv = base_argv(model, write_prompts(tmp_path, "erase"), tmp_path / "out") + ["--network_args", *network_args]
    script = train_leco if family == "sd" else sdxl_train_leco
    capsys.readouterr()
    assert script.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --network_args"), captured.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in captured.err + captured.out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("network_args, fragments", [
    (["loraplus_lr_ratio=16"], ["loraplus_lr_ratio", "Prodigy", "one learning rate"]),
    (["mid_lr_weight=0.5"], ["MID = middle_block has weight 0.5", "Prodigy"]),
])
def test_prodigy_refuses_different_group_learning_rates_before_loading(network_args, fragments, tiny_sd_dir, tmp_path,
                                                                       capsys, no_training):
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), tmp_path / "out") + [
        "--optimizer_type", "Prodigy", "--learning_rate", "1.0", "--network_args", *network_args]
    capsys.readouterr()
    assert train_leco.main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and all(fragment in lines[0] for fragment in fragments), lines


@pytest.mark.slow
def test_prodigy_trains_with_blocks_dropped_by_weight_zero(tiny_sd_dir, tmp_path):
    """Weights of 0 (no LoRA) and 1 keep one learning rate, which Prodigy needs."""
    argv = base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=2) + [
        "--optimizer_type", "Prodigy", "--learning_rate", "1.0", "--network_args", "down_lr_weight=zeros", "mid_lr_weight=0"]
    assert train_leco.main(argv) == 0
    names = {key.split(".")[0] for key in lora_tensors(tmp_path / "out" / "leco.safetensors")}
    assert names and all(name.startswith("lora_unet_up_blocks_") for name in names)


# ----------------------------------------------------------------------------------------------
# end to end


SD_DIMS = [4] * 25
SD_DIMS[16], SD_DIMS[17], SD_DIMS[18] = 2, 6, 8  # OUT03, OUT04, OUT05: up_blocks.1 attentions 0, 1, 2
SD_UP = "1,1,1,0.5,1,2,1,1,1,1,1,1"  # OUT03 x0.5, OUT05 x2


@pytest.mark.slow
def test_sd_run_with_block_dims_lr_weights_loraplus_and_resume(tiny_sd_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path, "erase")
    network_args = ["--network_args", f"block_dims={csv(SD_DIMS)}", "down_lr_weight=zeros", "mid_lr_weight=0",
                    f"up_lr_weight={SD_UP}", "loraplus_lr_ratio=4"]
    schedule = ["--lr_scheduler", "cosine", "--lr_warmup_steps", "1"]
    full, logs = tmp_path / "full", tmp_path / "logs"
    argv = base_argv(tiny_sd_dir, prompts, full, steps=4) + network_args + schedule + [
        "--save_every_n_steps", "2", "--save_state", "--logging_dir", str(logs)]
    assert train_leco.main(argv) == 0
    tensors = lora_tensors(full / "leco.safetensors")
    ranks = {key.split(".")[0]: value.shape[0] for key, value in tensors.items() if key.endswith("lora_down.weight")}
    assert ranks and all(name.startswith("lora_unet_up_blocks_1_attentions_") for name in ranks)  # down zeros, mid 0
    for name, rank in ranks.items():
        assert rank == {"0": 2, "1": 6, "2": 8}[name.split("_")[6]], name
    # lr after optimizer step s (warm-up 1, then cosine over the other 3 steps): 1, (1 + cos(pi/3))/2, (1 + cos(2pi/3))/2, 0
    factors = [1.0, 0.75, 0.25, 0.0]
    assert scalars(logs, "lr") == pytest.approx([1e-3 * f for f in factors], rel=1e-6, abs=1e-12)  # float32 events
    for block, weight in ((16, 0.5), (17, 1.0), (18, 2.0)):
        assert scalars(logs, f"lr/unet_block{block}") == pytest.approx([1e-3 * weight * f for f in factors], rel=1e-6, abs=1e-12)
        assert scalars(logs, f"lr/unet_block{block} plus") == pytest.approx([4e-3 * weight * f for f in factors], rel=1e-6, abs=1e-12)
    assert not scalars(logs, "lr/unet_block12") and not scalars(logs, "lr/unet_block1")
    load_lora_into_pipeline(StableDiffusionPipeline.from_pretrained(tiny_sd_dir), full / "leco.safetensors")

    resumed = tmp_path / "resumed"
    argv = base_argv(tiny_sd_dir, prompts, resumed, steps=4) + network_args + schedule + [
        "--resume", str(full / "leco-step00000002-state")]
    assert train_leco.main(argv) == 0
    again = lora_tensors(resumed / "leco.safetensors")
    assert set(again) == set(tensors) and all(torch.equal(again[key], tensors[key]) for key in tensors)

    changed = [arg.replace("up_lr_weight=1,1,1,0.5", "up_lr_weight=1,1,1,0.25") for arg in network_args]
    argv = base_argv(tiny_sd_dir, prompts, tmp_path / "refused", steps=4) + changed + schedule + [
        "--resume", str(full / "leco-step00000002-state")]
    capsys.readouterr()
    assert train_leco.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--resume" in errors[0] and "network_args" in errors[0] and "up_lr_weight" in errors[0]

    continued = tmp_path / "continued"
    argv = base_argv(tiny_sd_dir, prompts, continued, steps=1) + [
        "--network_weights", str(full / "leco.safetensors"), "--dim_from_weights", "--network_args", f"up_lr_weight={SD_UP}"]
    assert train_leco.main(argv) == 0
    assert {key: value.shape for key, value in lora_tensors(continued / "leco.safetensors").items()} == {
        key: value.shape for key, value in tensors.items()}


@pytest.mark.slow
def test_sdxl_run_with_block_dims_and_lr_weights(tiny_sdxl_dir, tmp_path):
    dims = [4] * 23
    dims[5], dims[11], dims[13] = 0, 8, 2  # input_blocks.4 none, middle_block.1 rank 8, output_blocks.0 rank 2
    conv = [0] * 23
    conv[10] = 2  # middle_block.0 (a resnet) gets a rank-2 conv LoRA
    out, logs = tmp_path / "out", tmp_path / "logs"
    argv = base_argv(tiny_sdxl_dir, write_prompts(tmp_path, "erase"), out, steps=2) + [
        "--logging_dir", str(logs), "--network_args", f"block_dims={csv(dims)}", f"conv_block_dims={csv(conv)}",
        "mid_lr_weight=1,0.5,1", "up_lr_weight=cosine"]
    assert sdxl_train_leco.main(argv) == 0
    tensors = lora_tensors(out / "leco.safetensors")
    ranks = {key.split(".")[0]: value.shape[0] for key, value in tensors.items() if key.endswith("lora_down.weight")}
    assert not any(name.startswith("lora_unet_input_blocks_4_") for name in ranks)
    assert ranks["lora_unet_middle_block_1_proj_in"] == 8 and ranks["lora_unet_output_blocks_0_1_proj_in"] == 2
    assert ranks["lora_unet_middle_block_0_in_layers_2"] == 2  # the 3x3 conv of MID00
    assert ranks["lora_unet_middle_block_0_emb_layers_1"] == 4  # its Linear takes block_dims
    assert ranks["lora_unet_input_blocks_5_1_proj_in"] == 4
    # conv_block_dims brings in the ResNet blocks; as sd-scripts, their Linear layers take block_dims
    assert "lora_unet_middle_block_2_in_layers_2" not in ranks and ranks["lora_unet_middle_block_2_emb_layers_1"] == 4
    assert "lora_unet_input_blocks_1_0_in_layers_2" not in ranks and ranks["lora_unet_input_blocks_1_0_emb_layers_1"] == 4
    assert not any(name.startswith("lora_unet_output_blocks_8_") for name in ranks)  # cosine: OUT08 weight 0
    assert scalars(logs, "lr/unet_block11") == pytest.approx([5e-4, 5e-4], rel=1e-6)  # middle_block.1 at 0.5
    assert scalars(logs, "lr/unet_block13") == pytest.approx([1e-3, 1e-3], rel=1e-6)  # cosine: OUT00 weight 1
    out05 = math.sin(math.pi / 2 * 3 / 8)  # cosine over OUT00..OUT08: OUT05 = sin(pi/2 * (8-5)/8)
    assert scalars(logs, "lr/unet_block18") == pytest.approx([1e-3 * out05] * 2, rel=1e-6)
    load_lora_into_pipeline(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir), out / "leco.safetensors")


def test_the_guides_layer_control_examples_are_valid():
    """Every --network_args example of the guide's layer-control section passes the checks for its family."""
    import re
    import shlex
    from pathlib import Path

    import tomllib

    from networks.lora import validate_network_args

    text = (Path(__file__).resolve().parents[1] / "docs" / "train_leco.md").read_text(encoding="utf-8")
    section = text[text.index("#### Layer control"):]
    section = section[:section.index("\n### ")]
    checked = 0
    for kind, block in re.findall(r"```(bash|toml)\n(.*?)```", section, re.S):
        if kind == "toml":
            items, family = tomllib.loads(block)["network"]["network_args"], "sd"
        else:
            words = shlex.split(block.replace("\\\n", " "))
            items = words[words.index("--network_args") + 1:]
            family = "sdxl" if "sdxl_train_leco.py" in words else "sd"
        kwargs = dict(item.split("=", 1) for item in items)
        validate_network_args(kwargs, family)
        checked += 1
    assert checked >= 5
