"""networks/lora.py: invariants, the kohya file format, and diffusers as a real client."""

from __future__ import annotations

import hashlib

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from networks.lora import (
    LoRAModule,
    create_network,
    create_network_from_weights,
    find_target_modules,
    read_lora_metadata,
)
from networks.sgm_names import diffusers_to_sgm
from tests.helpers import load_lora_into_pipeline

# ----------------------------------------------------------------------------------------------
# helpers


def unet_inputs(unet, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([500] * batch)
    kwargs = {"encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)}
    if unet.config.addition_embed_type == "text_time":
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled_dim, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return latents, timesteps, kwargs


@torch.no_grad()
def run(unet, inputs):
    latents, timesteps, kwargs = inputs
    return unet(latents, timesteps, **kwargs).sample


def randomize_up(network, std: float = 0.05, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.unet_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * std)


@pytest.fixture(params=["sd", "sdxl"])
def unet(request, tiny_sd_dir, tiny_sdxl_dir):
    folder = tiny_sd_dir if request.param == "sd" else tiny_sdxl_dir
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()


# ----------------------------------------------------------------------------------------------
# invariants


def test_zero_up_and_zero_multiplier_give_the_base_output_bit_for_bit(unet):
    inputs = unet_inputs(unet)
    base = run(unet, inputs)
    network = create_network(1.0, 4, 1.0, None, [], unet, conv_dim="4")
    network.apply_to()
    assert torch.equal(run(unet, inputs), base)  # lora_up starts at zero
    randomize_up(network)
    assert not torch.equal(run(unet, inputs), base)
    network.set_multiplier(0.0)
    assert torch.equal(run(unet, inputs), base)
    with network.multiplier_context(1.0):
        assert not torch.equal(run(unet, inputs), base)
    assert network.multiplier == 0.0


def test_restore_gives_back_the_exact_original_forward(unet):
    inputs = unet_inputs(unet)
    base = run(unet, inputs)
    network = create_network(1.0, 4, 1.0, None, [], unet, conv_dim="4")
    network.apply_to()
    randomize_up(network)
    wrapped = [lora.org_module for lora in network.unet_loras]
    assert all("forward" in module.__dict__ for module in wrapped)
    network.restore()
    assert all("forward" not in module.__dict__ for module in wrapped)  # the class method again
    assert torch.equal(run(unet, inputs), base)


def test_one_optimizer_step_changes_only_lora_parameters(unet):
    network = create_network(1.0, 4, 1.0, None, [], unet)
    network.apply_to()
    unet.requires_grad_(False)
    before_unet = {name: value.clone() for name, value in unet.state_dict().items()}
    before_lora = {name: value.clone() for name, value in network.state_dict().items()}
    params, _ = network.prepare_optimizer_params(None, 1e-2, 1e-2)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    latents, timesteps, kwargs = unet_inputs(unet)
    unet(latents, timesteps, **kwargs).sample.pow(2).mean().backward()
    optimizer.step()
    assert all(torch.equal(before_unet[name], value) for name, value in unet.state_dict().items())
    changed = [name for name, value in network.state_dict().items() if not torch.equal(before_lora[name], value)]
    assert any(name.endswith("lora_up.weight") for name in changed)
    assert not any(name.endswith(".alpha") for name in changed)


def test_merged_weight_equals_w_plus_scale_up_down(unet):
    inputs = unet_inputs(unet)
    network = create_network(1.0, 4, 2.0, None, [], unet, conv_dim="4", conv_alpha="1")
    network.apply_to()
    randomize_up(network)
    expected = run(unet, inputs)
    linear = next(lora for lora in network.unet_loras if isinstance(lora.org_module, torch.nn.Linear))
    conv = next(lora for lora in network.unet_loras if lora.org_module.weight.dim() == 4 and lora.org_module.kernel_size == (3, 3))
    by_hand = {}
    for lora in (linear, conv):
        up = lora.lora_up.weight.detach()
        down = lora.lora_down.weight.detach()
        if down.dim() == 2:
            delta = up @ down
        else:  # (out, r, 1, 1) x (r, in, 3, 3): sum over the rank
            delta = (up[:, :, 0, 0].unsqueeze(-1).unsqueeze(-1).unsqueeze(-1) * down.unsqueeze(0)).sum(1)
        by_hand[lora.lora_name] = lora.org_module.weight.detach() + delta * (lora.alpha.item() / lora.lora_dim)
    network.merge_to(1.0)
    for lora in (linear, conv):
        assert torch.allclose(lora.org_module.weight, by_hand[lora.lora_name], atol=1e-6)
    assert torch.allclose(run(unet, inputs), expected, atol=1e-5)


def test_per_sample_multipliers_match_separate_calls(tiny_sd_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").eval()
    network = create_network(1.0, 4, 1.0, None, [], unet)
    network.apply_to()
    randomize_up(network)
    latents, timesteps, kwargs = unet_inputs(unet, batch=2)
    network.set_multiplier(torch.tensor([1.0, -0.5]))
    both = run(unet, (latents, timesteps, kwargs))
    for index, multiplier in enumerate((1.0, -0.5)):
        network.set_multiplier(multiplier)
        single = run(unet, (latents[index:index + 1], timesteps[index:index + 1],
                            {"encoder_hidden_states": kwargs["encoder_hidden_states"][index:index + 1]}))
        assert torch.allclose(both[index:index + 1], single, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dropouts_act_only_in_training_mode(kind):
    """Dropout, rank dropout and module dropout give exactly the output a seeded generator predicts in
    training mode, each rescaling what it keeps by 1 / (1 - p), and none of them acts (or draws a random
    number) in eval mode.

    Draws in ``LoRAModule.forward``, in order: module dropout's ``rand(())`` (skip the LoRA if < p), the
    dropout's Bernoulli(1 - p) keep mask on the rank activations, rank dropout's ``rand > p`` keep mask
    over (sample, rank channel), shared by all tokens/pixels of a sample."""
    p_drop, p_rank, p_module, multiplier = 0.5, 0.25, 0.5, -0.7
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5) if kind == "linear" else torch.nn.Conv2d(6, 5, 1)
    lora = LoRAModule("lora_unet_x", layer, multiplier, 4, 2.0, dropout=p_drop, rank_dropout=p_rank, module_dropout=p_module)
    torch.nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    x = torch.randn(3, 7, 6) if kind == "linear" else torch.randn(3, 6, 2, 2)  # (B, tokens, C) or (B, C, H, W)
    rank_mask_shape = (3, 1, 4) if kind == "linear" else (3, 4, 1, 1)
    with torch.no_grad():
        base = lora._org_forward(x)
        down = lora.lora_down(x)  # rank activations: (3, 7, 4) or (3, 4, 2, 2)

        def by_hand(hidden: torch.Tensor, scale: float) -> torch.Tensor:
            return base + multiplier * scale * lora.lora_up(hidden)

        lora.eval()
        rng = torch.get_rng_state()
        assert torch.allclose(layer(x), by_hand(down, 2.0 / 4), rtol=1e-5, atol=1e-6)  # alpha / rank, no dropout
        assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn
        lora.train()
        outcomes = []
        for seed in range(4):
            torch.manual_seed(seed)
            out = layer(x)
            generator = torch.Generator().manual_seed(seed)
            if torch.rand((), generator=generator) < p_module:
                assert torch.equal(out, base)  # module dropout: the base layer's output, bit for bit
                outcomes.append("skipped")
                continue
            keep = torch.empty_like(down).bernoulli_(1 - p_drop, generator=generator)
            ranks = (torch.rand(rank_mask_shape, generator=generator) > p_rank).float()
            assert 0 < keep.mean() < 1 and 0 < ranks.mean() < 1  # each mask drops some and keeps some
            hidden = down * keep * 2.0 * ranks  # dropout keeps with 1 / (1 - 0.5) = 2
            expected = by_hand(hidden, 2.0 / 4 * 4 / 3)  # rank dropout: scale * 1 / (1 - 0.25)
            assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(out, by_hand(down, 2.0 / 4), rtol=1e-3, atol=1e-3)
            outcomes.append("applied")
    assert "skipped" in outcomes and "applied" in outcomes


# ----------------------------------------------------------------------------------------------
# layer selection


def test_default_targets_are_transformer_linears_and_1x1_convs(tiny_sd_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    names = [name for name, _, _ in find_target_modules(unet)]
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names  # 1x1 conv in SD1
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in names
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in names
    assert "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0" in names
    assert not any("resnets" in name or "samplers" in name for name in names)
    with_conv = [name for name, _, _ in find_target_modules(unet, conv=True)]
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in with_conv
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in with_conv
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in with_conv


@pytest.mark.parametrize(
    "method, must_have, must_not",
    [
        ("xattn", ".attn2.", (".attn1.", ".ff.", "proj_in")),
        ("xattn_strict", ".attn2.to_k", (".attn2.to_q", ".attn2.to_out", ".attn1.")),
        ("selfattn", ".attn1.", (".attn2.", ".ff.")),
        ("noxattn", ".attn1.", (".attn2.",)),
    ],
)
def test_train_method_presets(tiny_sd_dir, method, must_have, must_not):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    paths = [path for _, path, _ in find_target_modules(unet, train_method=method)]
    assert any(must_have in path for path in paths)
    assert not any(part in path for path in paths for part in must_not)


def test_include_and_exclude_patterns(tiny_sd_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    network = create_network(1.0, 4, 1.0, None, [], unet, include="attn2", exclude="to_out")
    names = [lora.lora_name for lora in network.unet_loras]
    assert names and all("attn2" in name and "to_out" not in name for name in names)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_dims": "1,2"}, "block_dims: SD 1.x/2.x needs 25"),
        ({"train_method": "everything"}, "train_method"),
        ({"conv_dim": "4", "train_method": "xattn"}, "conv_dim"),
        ({"conv_dim": "x"}, "conv_dim"),
        ({"rank_dropout": "1.5"}, "rank_dropout"),
        ({"include": "nothing-matches-this"}, "selects no U-Net layers"),
    ],
)
def test_bad_network_args_raise_clear_errors(tiny_sd_dir, kwargs, message):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    with pytest.raises(ValueError, match=message):
        create_network(1.0, 4, 1.0, None, [], unet, **kwargs)


# ----------------------------------------------------------------------------------------------
# SDXL names


def test_sgm_names_for_the_real_sdxl_layout():
    config = {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
    cases = {
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": "input_blocks.4.1.transformer_blocks.1.attn1.to_q",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_v": "input_blocks.8.1.transformer_blocks.9.attn2.to_v",
        "mid_block.resnets.0.time_emb_proj": "middle_block.0.emb_layers.1",
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
        "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2": "output_blocks.2.1.transformer_blocks.0.ff.net.2",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.resnets.0.conv1": "output_blocks.3.0.in_layers.2",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    for diffusers_path, sgm in cases.items():
        assert diffusers_to_sgm(diffusers_path, config) == sgm


def test_sdxl_network_uses_sgm_names_for_every_block_type(tiny_sdxl_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    names = {lora.lora_name for lora in create_network(1.0, 4, 1.0, None, [], unet, conv_dim="4").unet_loras}
    expected = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # down attention
        "lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_k",  # down attention, 2nd layer
        "lora_unet_input_blocks_4_1_proj_in",
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",  # mid attention
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_out_0",  # up attention
        "lora_unet_output_blocks_5_1_proj_out",
        "lora_unet_input_blocks_1_0_in_layers_2",  # LoCon: resnet convs
        "lora_unet_input_blocks_1_0_emb_layers_1",
        "lora_unet_input_blocks_3_0_op",  # downsampler
        "lora_unet_middle_block_2_out_layers_3",
        "lora_unet_output_blocks_2_2_conv",  # upsampler after an attention level
        "lora_unet_output_blocks_8_0_skip_connection",
    }
    assert expected <= names
    assert not any("down_blocks" in name or "up_blocks" in name or "mid_block_" in name for name in names)


# ----------------------------------------------------------------------------------------------
# files


@pytest.mark.parametrize("precision", [None, torch.float16, torch.bfloat16])
def test_save_load_round_trip_keys_values_dtype_metadata(unet, tmp_path, precision):
    network = create_network(1.0, 4, 2.0, None, [], unet, conv_dim="2", conv_alpha="1")
    network.apply_to()
    randomize_up(network)
    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path), precision, {"ss_network_dim": "4", "modelspec.title": "x"})
    saved = load_file(str(path))
    assert set(saved) == set(network.state_dict())
    assert all(key.startswith("lora_unet_") and key.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight", "alpha")
               for key in saved)
    expected_dtype = precision or torch.float32
    assert {value.dtype for value in saved.values()} == {expected_dtype}
    metadata = read_lora_metadata(path)
    assert metadata["ss_network_dim"] == "4" and metadata["modelspec.title"] == "x"
    assert len(metadata["sshs_model_hash"]) == 64 and len(metadata["sshs_legacy_hash"]) == 8
    # the model hash covers the tensor bytes only: it matches the file's own tensor section
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()

    other = create_network(1.0, 4, 2.0, None, [], unet, conv_dim="2", conv_alpha="1")
    other.load_weights(str(path))
    for key, value in other.state_dict().items():
        assert torch.equal(value, saved[key].to(value.dtype))
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left behind


def test_network_from_weights_reads_dims_and_alphas(unet, tmp_path):
    network = create_network(1.0, 8, 4.0, None, [], unet, conv_dim="2", conv_alpha="1")
    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path))
    rebuilt, weights = create_network_from_weights(1.0, str(path), None, [], unet)
    assert {lora.lora_name for lora in rebuilt.unet_loras} == {lora.lora_name for lora in network.unet_loras}
    for lora in rebuilt.unet_loras:
        expected = 2 if lora.org_module.weight.dim() == 4 and lora.org_module.kernel_size != (1, 1) else 8
        assert lora.lora_dim == expected
        assert lora.alpha.item() == (1.0 if expected == 2 else 4.0)


def test_loading_mismatched_weights_names_the_keys(tiny_sd_dir, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    big = create_network(1.0, 8, 1.0, None, [], unet)
    path = tmp_path / "big.safetensors"
    big.save_weights(str(path))
    small = create_network(1.0, 4, 1.0, None, [], unet)
    with pytest.raises(ValueError, match=r"has shape \(8, .*expects \(4, .*--dim_from_weights"):
        small.load_weights(str(path))
    weights = load_file(str(path))
    weights["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(8, 4)
    partial = {key: value for key, value in weights.items() if "mid_block" not in key}
    save_file(partial, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match="lora_unet_not_a_layer.*missing from the file"):
        big.load_weights(str(tmp_path / "odd.safetensors"))


def test_sdxl_loads_diffusers_style_kohya_names(tiny_sdxl_dir, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    network = create_network(1.0, 4, 1.0, None, [], unet)
    randomize_up(network)
    renamed = {}
    names = {lora.lora_name: path for lora, (_, path, _) in zip(network.unet_loras, find_target_modules(unet))}
    for key, value in network.state_dict().items():
        name, _, suffix = key.partition(".")
        renamed[f"lora_unet_{names[name].replace('.', '_')}.{suffix}"] = value
    assert any("down_blocks" in key for key in renamed)
    save_file(renamed, str(tmp_path / "diffusers_names.safetensors"))
    other = create_network(1.0, 4, 1.0, None, [], unet)
    other.load_weights(str(tmp_path / "diffusers_names.safetensors"))
    for key, value in network.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)


def test_max_norm_regularization_caps_every_delta(tiny_sd_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    network = create_network(1.0, 4, 4.0, None, [], unet)
    randomize_up(network, std=1.0)
    norms = [lora.delta_weight().norm().item() for lora in network.unet_loras]
    cap = sorted(norms)[len(norms) // 2]
    scaled, mean_norm, max_norm = network.apply_max_norm_regularization(cap)
    assert scaled == sum(norm > cap for norm in norms)
    after = [lora.delta_weight().norm().item() for lora in network.unet_loras]
    assert max(after) <= cap * (1 + 1e-5) and max_norm == pytest.approx(max(after), rel=1e-5)
    assert mean_norm == pytest.approx(sum(after) / len(after), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# a real client: diffusers' load_lora_weights


def _peft_lora_layers(unet) -> int:
    return sum(1 for name, _ in unet.named_modules() if name.endswith("lora_A.leco"))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_diffusers_loads_the_file_with_no_key_unused_and_matches(family, tiny_sd_dir, tiny_sdxl_dir, tmp_path):
    folder = tiny_sd_dir if family == "sd" else tiny_sdxl_dir
    pipeline_class = StableDiffusionPipeline if family == "sd" else StableDiffusionXLPipeline
    pipe = pipeline_class.from_pretrained(folder)
    ours = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    network = create_network(1.0, 4, 2.0, None, [], ours, conv_dim="4", conv_alpha="2")
    network.apply_to()
    randomize_up(network, std=0.1)
    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path), None, {"ss_network_module": "networks.lora"})
    with safe_open(str(path), framework="pt") as handle:  # FACTS: any non-kohya key disables kohya loading
        assert all(key.startswith("lora_unet_") for key in handle.keys())

    inputs = unet_inputs(ours)
    base = run(pipe.unet, inputs)
    load_lora_into_pipeline(pipe, path)  # no key unused: warnings captured, every weight element landed
    assert _peft_lora_layers(pipe.unet) == len(network.unet_loras)  # every module of the file landed
    for scale in (1.0, -1.0):
        pipe.set_adapters(["leco"], [scale])
        network.set_multiplier(scale)
        theirs = run(pipe.unet, inputs)
        assert not torch.allclose(theirs, base, atol=1e-4)  # the LoRA really changed the output
        assert torch.allclose(theirs, run(ours, inputs), atol=1e-5)  # and exactly as ours does
    pipe.set_adapters(["leco"], [0.0])
    assert torch.allclose(run(pipe.unet, inputs), base, atol=1e-6)


def test_the_client_check_fails_on_a_key_diffusers_leaves_unused(tiny_sd_dir, tmp_path):
    """``load_lora_into_pipeline`` is what proves "no key left unused"; it must catch a key that is."""
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    network = create_network(1.0, 4, 2.0, None, [], unet)
    network.apply_to()
    good = tmp_path / "good.safetensors"
    network.save_weights(str(good), None, {})
    tensors = load_file(str(good))
    module = next(key.split(".")[0] for key in tensors if "attn1_to_q" in key)
    for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):  # a module the U-Net does not have
        tensors[f"{module.replace('to_q', 'to_zz')}.{suffix}"] = tensors[f"{module}.{suffix}"].clone()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    load_lora_into_pipeline(StableDiffusionPipeline.from_pretrained(tiny_sd_dir), good)
    with pytest.raises(AssertionError, match="unexpected keys"):
        load_lora_into_pipeline(StableDiffusionPipeline.from_pretrained(tiny_sd_dir), bad)

