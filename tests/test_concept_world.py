"""Fast tests of the concept world: scenes, prompt grammar, classifier, display, tiny builds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from library.concept_world import scenes
from library.concept_world.classifier import (
    NONE,
    attribute_accuracy,
    classify_detailed,
    classify_latents,
    value_rates,
)


def _scenes_for_every_combination(per_combo: int, seed: int = 0) -> tuple[torch.Tensor, list[dict[str, str]]]:
    generator = torch.Generator().manual_seed(seed)
    specs = []
    for combo in scenes.all_attribute_combinations():
        specs += scenes.sample_specs(per_combo, generator, fixed=combo)
    return scenes.render_scenes(specs, generator), [s.attributes() for s in specs]


# --------------------------------------------------------------------------------------------- scenes


def test_sample_specs_honours_fixed_attributes_and_randomises_the_rest():
    generator = torch.Generator().manual_seed(1)
    specs = scenes.sample_specs(200, generator, fixed={"color": "red"})
    assert {s.color for s in specs} == {"red"}
    assert {s.size for s in specs} == set(scenes.attribute_values("size"))
    assert {s.shape for s in specs} == set(scenes.attribute_values("shape"))
    with pytest.raises(ValueError):
        scenes.sample_specs(1, generator, fixed={"color": "purple"})


def test_rendered_scene_has_colour_vector_inside_and_quiet_background():
    spec = scenes.SceneSpec(size="large", color="blue", shape="square", cx=8.0, cy=8.0, intensity=1.0)
    latent = scenes.render_scenes([spec], torch.Generator().manual_seed(0))[0]
    assert latent.shape == (4, scenes.LATENT_SIZE, scenes.LATENT_SIZE)
    blue = torch.tensor(scenes.COLOR_VECTORS[scenes.attribute_values("color").index("blue")])
    assert torch.allclose(latent[:, 8, 8], blue, atol=0.25)
    assert latent[:, 0, 0].abs().max() < 0.25
    clean = scenes.render_scenes([spec])[0]
    assert clean[:, 0, 0].abs().max() == 0
    assert 0.3 < latent.std() < 1.5


def test_sizes_and_shapes_have_distinct_areas():
    areas = {}
    for size, extent in zip(scenes.attribute_values("size"), scenes.SIZE_EXTENT):
        for shape in scenes.attribute_values("shape"):
            mask = scenes.coverage_masks(shape, extent, torch.tensor([8.0]), torch.tensor([8.0]), 16)
            areas[size, shape] = float(mask.sum())
    for shape in scenes.attribute_values("shape"):
        assert areas["large", shape] > 2 * areas["small", shape]
    for size in scenes.attribute_values("size"):
        assert areas[size, "triangle"] < areas[size, "circle"] < areas[size, "square"]


def test_random_batch_is_deterministic():
    a = scenes.random_batch(8, torch.Generator().manual_seed(3))
    b = scenes.random_batch(8, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


# --------------------------------------------------------------------------------------------- prompts


def test_prompt_grammar_round_trip_and_full_prompts():
    prompts = scenes.full_prompts()
    assert len(prompts) == len(set(prompts)) == 2 * 4 * 3
    assert "a large red circle" in prompts
    assert scenes.parse_prompt("a large red circle") == {"size": "large", "color": "red", "shape": "circle"}
    assert scenes.parse_prompt("Red!") == {"color": "red"}
    assert scenes.parse_prompt("a large circle") == {"size": "large", "shape": "circle"}
    assert scenes.parse_prompt("") == {}
    assert scenes.make_prompt({"color": "red", "shape": "circle"}) == "a red circle"
    assert scenes.make_prompt({"color": "red"}, article=False) == "red"
    assert scenes.make_prompt({}) == ""
    for prompt in prompts:
        assert scenes.make_prompt(scenes.parse_prompt(prompt)) == prompt
    with pytest.raises(ValueError):
        scenes.parse_prompt("a purple circle")
    with pytest.raises(ValueError):
        scenes.parse_prompt("red blue")


def test_training_prompts_cover_empty_partial_and_full_descriptions():
    generator = torch.Generator().manual_seed(0)
    attrs = {"size": "small", "color": "green", "shape": "triangle"}
    prompts = [scenes.training_prompt(attrs, generator) for _ in range(400)]
    assert "" in prompts and "a small green triangle" in prompts
    assert "green" in prompts or "a green" in prompts
    for prompt in prompts:
        assert scenes.parse_prompt(prompt).items() <= attrs.items()
    assert 0.03 < prompts.count("") / len(prompts) < 0.2


def test_vocabulary_words_are_single_tokens(tmp_path):
    from transformers import CLIPTokenizer

    from library.tiny_clip import write_clip_tokenizer

    write_clip_tokenizer(tmp_path, scenes.vocabulary())
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path), model_max_length=77)
    for word in scenes.vocabulary():
        assert len(tokenizer(word).input_ids) == 3, word


# --------------------------------------------------------------------------------------------- classifier


def test_classifier_is_exact_on_clean_scenes_of_every_combination():
    latents, expected = _scenes_for_every_combination(per_combo=6)
    predicted = classify_latents(latents)
    assert predicted == expected


@pytest.mark.parametrize("sigma", [0.1, 0.3])
def test_classifier_is_robust_to_noise_and_blur(sigma):
    latents, expected = _scenes_for_every_combination(per_combo=4, seed=5)
    noisy = latents + sigma * torch.randn(latents.shape, generator=torch.Generator().manual_seed(9))
    accuracy = attribute_accuracy(classify_latents(noisy), expected)
    assert min(accuracy.values()) >= 0.98, accuracy
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    blurred = torch.nn.functional.conv2d(latents.reshape(-1, 1, 16, 16), kernel[None, None], padding=1)
    accuracy = attribute_accuracy(classify_latents(blurred.reshape(latents.shape)), expected)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_classifier_reports_none_for_empty_latents_and_details():
    empty = 0.05 * torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert classify_latents(empty) == [{"size": NONE, "color": NONE, "shape": NONE}] * 2
    spec = scenes.SceneSpec(size="small", color="yellow", shape="circle", cx=5.5, cy=9.0)
    detail = classify_detailed(scenes.render_scenes([spec]))[0]
    assert detail["match"] > 0.99 and (detail["cx"], detail["cy"]) == (5.5, 9.0)
    with pytest.raises(ValueError):
        classify_latents(torch.zeros(1, 3, 16, 16))


def test_accuracy_and_rates_helpers():
    predicted = [{"size": "small", "color": "red", "shape": "circle"}, {"size": "large", "color": NONE, "shape": "square"}]
    expected = [{"color": "red"}, {"color": "red", "size": "large"}]
    assert attribute_accuracy(predicted, expected) == {"size": 1.0, "color": 0.5}
    rates = value_rates(predicted)
    assert rates["color"]["red"] == 0.5 and rates["color"][NONE] == 0.5


# --------------------------------------------------------------------------------------------- display


def test_latents_to_rgb_shape_dtype_and_colour():
    from library.concept_world.sampling import image_grid, latents_to_rgb

    spec = scenes.SceneSpec(size="large", color="red", shape="square", cx=8.0, cy=8.0)
    rgb = latents_to_rgb(scenes.render_scenes([spec, spec]))
    assert rgb.shape == (2, 128, 128, 3) and rgb.dtype == np.uint8
    red, green, blue = rgb[0, 64, 64].tolist()
    assert red > 200 and green < 80 and blue < 80
    assert rgb[0, 0, 0].tolist() == [0, 0, 0]
    assert image_grid(rgb, columns=2, gap=2).shape == (128, 258, 3)


# --------------------------------------------------------------------------------------------- model


def _tiny_config():
    from library.concept_world.model import ModelConfig

    return ModelConfig(
        block_out_channels=(16, 16),
        attention=(False, True),
        attention_heads=1,
        cross_attention_dim=16,
        text_layers=1,
        train_steps=2,
        batch_size=4,
        warmup_steps=1,
        threads=1,
        processes=1,
    )


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    """A concept-world folder trained for two steps (shape checks only, not quality)."""
    from library.concept_world.model import build_concept_model

    return build_concept_model(tmp_path_factory.mktemp("cw") / "model", _tiny_config(), evaluate=False)


def test_tiny_build_writes_a_loadable_diffusers_folder(tiny_world):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    meta = json.loads((tiny_world / "concept_world.json").read_text())
    assert meta["version"] and meta["latent_size"] == 16 and meta["attributes"]["color"][0] == "red"
    assert not [p for p in tiny_world.parent.iterdir() if p.name.startswith(".")]
    unet = UNet2DConditionModel.from_pretrained(tiny_world / "unet")
    assert any(type(m).__name__ == "Transformer2DModel" for m in unet.modules())
    # The folder has no VAE ("vae": [null, null]); diffusers only loads it when told so.
    with pytest.raises(ValueError, match="vae"):
        StableDiffusionPipeline.from_pretrained(tiny_world)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_world, vae=None)
    assert pipe.vae is None and pipe.vae_scale_factor == 8
    out = pipe("a large red circle", output_type="latent", height=128, width=128, num_inference_steps=2)
    assert out.images.shape == (1, 4, 16, 16)


def test_sample_latents_is_reproducible_and_batch_independent(tiny_world):
    from library.concept_world.model import load_concept_model
    from library.concept_world.sampling import sample_latents

    m = load_concept_model(tiny_world)
    args = (m.unet, m.text_encoder, m.tokenizer, m.scheduler)
    both = sample_latents(*args, ["red", "a large circle"], [3, 4], guidance_scale=3.0, steps=3)
    alone = sample_latents(*args, ["a large circle"], [4], guidance_scale=3.0, steps=3)
    assert both.shape == (2, 4, 16, 16)
    assert torch.allclose(both[1], alone[0], atol=1e-5)
    again = sample_latents(*args, ["red", "a large circle"], [3, 4], guidance_scale=3.0, steps=3, batch_size=1)
    assert torch.allclose(both, again, atol=1e-5)


def test_ensure_concept_model_builds_once_and_atomically(tmp_path, monkeypatch):
    from library.concept_world import model as cw_model

    config = _tiny_config()
    calls = []
    real_train = cw_model.train_concept_model

    def failing_train(*args, **kwargs):
        calls.append("fail")
        raise KeyboardInterrupt

    monkeypatch.setattr(cw_model, "train_concept_model", failing_train)
    with pytest.raises(KeyboardInterrupt):
        cw_model.ensure_concept_model(tmp_path, config)
    assert not (tmp_path / cw_model.VERSION).exists()
    assert not [p for p in tmp_path.iterdir() if "building" in p.name]

    def counting_train(*args, **kwargs):
        calls.append("train")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(cw_model, "train_concept_model", counting_train)
    monkeypatch.setattr(cw_model, "build_concept_model", _no_eval(cw_model.build_concept_model))
    first = cw_model.ensure_concept_model(tmp_path, config)
    second = cw_model.ensure_concept_model(tmp_path, config)
    assert first == second == tmp_path / cw_model.VERSION
    assert calls == ["fail", "train"]
    assert cw_model.is_complete(first)


def _no_eval(build):
    def wrapped(out, config=None, evaluate=True, eval_seeds=8):
        return build(out, config, evaluate=False)

    return wrapped


def test_pure_training_maths():
    from library.concept_world.model import build_scheduler, learning_rate_factor, snr_loss_weights

    assert learning_rate_factor(0, 100, 10) == pytest.approx(0.1)
    assert learning_rate_factor(10, 100, 10) == pytest.approx(1.0)
    assert learning_rate_factor(100, 100, 10) == pytest.approx(0.1)
    alphas_cumprod = build_scheduler().alphas_cumprod
    weights = snr_loss_weights(alphas_cumprod, torch.tensor([0, 999]), 5.0)
    assert weights[0] < 0.1 and weights[1] == pytest.approx(1.0)
    weights = snr_loss_weights(alphas_cumprod, torch.tensor([0, 999]), 5.0, floor=1.0)
    snr_999 = alphas_cumprod[999] / (1 - alphas_cumprod[999])
    assert weights[0] < 0.1 and weights[1] == pytest.approx(float(1 / snr_999), rel=1e-4)


@pytest.mark.slow
def test_data_parallel_training_is_deterministic(tmp_path):
    from dataclasses import replace

    from library.concept_world.model import train_concept_model

    config = replace(_tiny_config(), processes=2, train_steps=3)
    first = train_concept_model(config, tmp_path / "a", log_every=0)
    second = train_concept_model(config, tmp_path / "b", log_every=0)
    assert len(first.losses) == 3 and first.losses == second.losses
    for a, b in zip(first.unet.parameters(), second.unet.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_cached_concept_model_draws_what_full_prompts_ask_for():
    """Builds the real model on first use (about 5 minutes on two cores), then reuses the cache."""
    from library.concept_world.model import ensure_concept_model, load_concept_model
    from library.concept_world.sampling import sample_latents

    folder = ensure_concept_model()
    model = load_concept_model(folder)
    assert min(model.metadata["base_accuracy"]["accuracy"].values()) >= 0.9
    prompts = scenes.full_prompts()
    latents = sample_latents(model.unet, model.text_encoder, model.tokenizer, model.scheduler, prompts, [0] * len(prompts))
    accuracy = attribute_accuracy(classify_latents(latents), [scenes.parse_prompt(p) for p in prompts])
    assert min(accuracy.values()) >= 0.8, accuracy
