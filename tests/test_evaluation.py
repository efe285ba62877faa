"""The evaluator's pure parts: what it infers from a LoRA's prompt file, what it samples, its metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from library.errors import UserError
from library.evaluation import (
    EvalPlan,
    erase_metrics,
    open_metrics,
    plan_from_flags,
    plan_from_prompt_text,
    prompt_sets,
)


def test_plan_from_an_erase_prompt_file():
    assert plan_from_prompt_text('[[prompts]]\ntarget = "red"\naction = "erase"') == EvalPlan("erase", "color", "red")
    assert plan_from_prompt_text('[[prompts]]\ntarget = "large"\naction = "enhance"') == EvalPlan("enhance", "size", "large")
    enhance_in_context = '[[prompts]]\ntarget = "a circle"\npositive = "a small circle"\nunconditional = "a circle"\naction = "enhance"'
    assert plan_from_prompt_text(enhance_in_context) == EvalPlan("enhance", "size", "small")


@pytest.mark.parametrize("poles, expected", [
    ('positive = "a large circle"\nnegative = "a small circle"', EvalPlan("slider", "size", "large", "small")),
    ('positive = "a large circle"', EvalPlan("slider", "size", "large", None)),
    ('negative = "a small circle"', EvalPlan("slider", "size", None, "small")),
])
def test_plan_from_a_slider_prompt_file(poles, expected):
    text = f'[[targets]]\ntarget_class = "a circle"\n{poles}'
    assert plan_from_prompt_text(text) == expected


def test_plan_from_flags():
    assert plan_from_flags(None, None, "large,small") == EvalPlan("slider", "size", "large", "small")
    assert plan_from_flags("blue", None, None) == EvalPlan("erase", "color", "blue")
    assert plan_from_flags(None, None, None) is None
    with pytest.raises(UserError):
        plan_from_flags("red", "large", None)
    with pytest.raises(UserError):
        plan_from_flags(None, None, "large,red")  # two different attributes


def test_prompt_sets():
    erase = prompt_sets(EvalPlan("erase", "color", "red"))
    assert len(erase["target"]) == 6 and all("red" in prompt for prompt in erase["target"])
    assert len(erase["others"]) == 18 and not any("red" in prompt for prompt in erase["others"])
    open_prompts = prompt_sets(EvalPlan("slider", "size", "large", "small"))["open"]
    assert len(open_prompts) == 12 and not any("large" in p or "small" in p for p in open_prompts)
    assert "a red circle" in open_prompts


def _samples(values: list[tuple[str, str, str]]) -> list[dict]:
    return [{"size": s, "color": c, "shape": h} for s, c, h in values]


def test_erase_metrics_by_hand():
    plan = EvalPlan("erase", "color", "red")
    expected_target = _samples([("large", "red", "circle")] * 4)
    expected_other = _samples([("small", "blue", "square")] * 2)
    results = {
        0.0: {"target": (_samples([("large", "red", "circle")] * 4), expected_target),
              "others": (_samples([("small", "blue", "square")] * 2), expected_other)},
        1.0: {"target": (_samples([("large", "red", "circle"), ("large", "green", "circle"),
                                   ("large", "green", "circle"), ("small", "none", "circle")]), expected_target),
              "others": (_samples([("small", "blue", "square"), ("small", "blue", "circle")]), expected_other)},
    }
    metrics = erase_metrics(plan, results, unprompted_rate=0.25)
    assert metrics["per_multiplier"][1.0]["target_rate"] == 0.25
    assert metrics["erase_efficacy"] == 0.75  # 1 - 0.25 / 1.0
    assert metrics["erased_to_chance"] == 1.0  # down to how often red comes unasked
    # other attributes of target prompts: size right 3/4, shape right 4/4 -> 7/8
    assert metrics["per_multiplier"][1.0]["preserved_other_attributes"] == 0.875
    assert metrics["preservation_other_prompts"] == pytest.approx(5 / 6, abs=1e-4)


def test_plan_skips_preserve_anchors_and_collects_every_erased_value():
    """Contexts and anchors (issue 12): the concept is read in context, anchors are not what the
    LoRA does, and a file erasing red and blue gives one plan with both."""
    in_context = 'contexts = ["{}", "a large {} square"]\n[[prompts]]\ntarget = "red"\n'
    assert plan_from_prompt_text(in_context) == EvalPlan("erase", "color", "red")
    two = in_context + '[[prompts]]\ntarget = "blue"\n[[prompts]]\ntarget = "green"\naction = "preserve"\n'
    plan = plan_from_prompt_text(two)
    assert plan == EvalPlan("erase", "color", "red", also_erased=("blue",)) and plan.erased == ("red", "blue")
    anchor_first = ('[[prompts]]\ntarget = "yellow"\naction = "preserve"\n'
                    '[[prompts]]\ntarget = "a circle"\npositive = "a large circle"\nunconditional = "a circle"\naction = "enhance"\n')
    assert plan_from_prompt_text(anchor_first) == EvalPlan("enhance", "size", "large")
    # a LoRA's metadata holds the prompt file's text, not the files it names: what is trained is read without them
    with_files = 'context_prompt_file = "missing.txt"\nneutral_prompt_file = "gone.txt"\n[[prompts]]\ntarget = "blue"\n'
    assert plan_from_prompt_text(with_files) == EvalPlan("erase", "color", "blue")
    slider = '[[targets]]\ntarget_class = "a circle"\npositive = "a large circle"\nneutral_prompt_file = "n.txt"\n'
    assert plan_from_prompt_text(slider) == EvalPlan("slider", "size", "large", None)
    with pytest.raises(UserError, match="only preserves"):
        plan_from_prompt_text('[[prompts]]\ntarget = "red"\naction = "preserve"\n')
    with pytest.raises(UserError, match="several attributes"):
        plan_from_prompt_text('[[prompts]]\ntarget = "red"\n[[prompts]]\ntarget = "large"\n')
    assert plan_from_flags("red,blue", None, None) == EvalPlan("erase", "color", "red", also_erased=("blue",))
    with pytest.raises(UserError):
        plan_from_flags(None, "large,small", None)


def test_prompt_sets_bare_and_in_context_for_each_erased_value():
    from library.evaluation import group_seeds

    groups = prompt_sets(EvalPlan("erase", "color", "red", also_erased=("blue",)))
    assert list(groups) == ["target", "bare", "target/blue", "bare/blue", "others"]
    assert groups["bare"] == ["red"] and groups["bare/blue"] == ["blue"]
    assert len(groups["target/blue"]) == 6 and all("blue" in prompt for prompt in groups["target/blue"])
    assert len(groups["others"]) == 12 and not any("red" in p or "blue" in p for p in groups["others"])
    assert group_seeds("target", 4) == [0, 1, 2, 3] and group_seeds("bare/blue", 4, base_seed=10) == list(range(10, 34))


def test_erase_metrics_bare_kept_and_two_values_by_hand():
    plan = EvalPlan("erase", "color", "red", also_erased=("blue",))
    red, blue = _samples([("large", "red", "circle")] * 4), _samples([("large", "blue", "circle")] * 4)
    green, yellow = _samples([("small", "green", "square")] * 2), _samples([("small", "yellow", "square")] * 2)
    other_expected = green + yellow

    def groups(red_drawn: list, red_bare: list, blue_drawn: list, blue_bare: list, others: list) -> dict:
        return {"target": (red_drawn, red), "bare": (red_bare, red[:2]), "target/blue": (blue_drawn, blue),
                "bare/blue": (blue_bare, blue[:2]), "others": (others, other_expected)}

    results = {
        0.0: groups(red, red[:2], blue, blue[:2], other_expected),
        1.0: groups(red[:1] + green[:1] * 3, green, blue[:2] + green[:1] * 2, blue[:1] + green[:1],
                    green + yellow[:1] + green[:1]),
    }
    metrics = erase_metrics(plan, results, unprompted_rate=0.25)
    on = metrics["per_multiplier"][1.0]
    assert (on["target_rate"], on["bare_rate"]) == (0.25, 0.0)
    assert on["values"] == {"red": {"target_rate": 0.25, "bare_rate": 0.0}, "blue": {"target_rate": 0.5, "bare_rate": 0.5}}
    assert (metrics["erase_efficacy"], metrics["bare_efficacy"]) == (0.75, 1.0)
    assert metrics["efficacy"] == {"red": {"in_context": 0.75, "bare": 1.0}, "blue": {"in_context": 0.5, "bare": 0.5}}
    # kept: green asked 2x, drawn 2x; yellow asked 2x, drawn 1x -> 0.5 of its base rate 1.0
    assert on["kept_rates"] == {"green": 1.0, "yellow": 0.5}
    assert metrics["kept_ratio"] == {"green": 1.0, "yellow": 0.5} and metrics["min_kept_ratio"] == 0.5


def test_slider_metrics_and_monotonicity():
    plan = EvalPlan("slider", "size", "large", "small")
    expected = _samples([("", "red", "circle")] * 4)
    for key in expected:
        del key["size"]

    def at(n_large: int):
        sizes = ["large"] * n_large + ["small"] * (4 - n_large)
        return {"open": (_samples([(size, "red", "circle") for size in sizes]), expected)}

    metrics = open_metrics(plan, {-1.0: at(0), 0.0: at(2), 1.0: at(4)})
    assert metrics["monotonic"] and metrics["span"] == 1.0
    assert metrics["per_multiplier"][0.0] == {"preserved_other_attributes": 1.0, "rate": 0.5, "negative_rate": 0.5}
    assert not open_metrics(plan, {-1.0: at(3), 0.0: at(2), 1.0: at(4)})["monotonic"]
    enhance = open_metrics(EvalPlan("enhance", "size", "large"), {0.0: at(1), 1.0: at(3)})
    assert enhance["enhance_strength"] == 0.5


def test_effect_sweep_overrides_toml_fields_everywhere_they_are_set():
    from library.prompts import parse_prompt_text
    from tools.effect_sweep import VARIANTS, override_toml

    prompts = '# guidance_scale = 9 in a comment stays\n[[prompts]]\ntarget = "red"\nguidance_scale = 1.0\n'
    changed = override_toml(prompts, {"guidance_scale": 2.0, "multiplier": 2.0})
    (setting,) = parse_prompt_text(changed, Path("."), "t.toml")
    assert (setting.guidance_scale, setting.multiplier) == (2.0, 2.0)
    assert changed.startswith("# guidance_scale = 9 in a comment stays")
    slider = 'guidance_scale = 1.0\n[[targets]]\ntarget_class = "a"\npositive = "b"\n'
    assert {s.guidance_scale for s in parse_prompt_text(override_toml(slider, {"guidance_scale": 3.0}), Path("."), "s.toml")} == {3.0}
    examples = Path(__file__).resolve().parents[1] / "examples"
    for variant in VARIANTS:  # every variant's prompt file exists and still parses after its overrides
        text = override_toml((examples / variant.prompts).read_text(encoding="utf-8"), variant.toml)
        assert parse_prompt_text(text, examples, variant.prompts)


# ----------------------------------------------------------------------------------------------
# the command line (python -m tools.evaluate)


@pytest.mark.slow
def test_evaluator_command_on_a_real_model_writes_a_vae_decoded_grid(tiny_sd_dir, tmp_path, capsys):
    """A model that is not the concept world: no metrics, a grid decoded by the model's VAE."""
    import json

    from PIL import Image

    import train_leco
    from library.evaluation_cli import main
    from tests.helpers import base_argv, write_prompts

    assert train_leco.main(base_argv(tiny_sd_dir, write_prompts(tmp_path, "erase"), tmp_path / "out", steps=1)) == 0
    lora = tmp_path / "out" / "leco.safetensors"
    argv = ["--model", str(tiny_sd_dir), "--lora", str(lora), "--prompts", "van gogh", "a photo", "--steps", "2",
            "--multipliers", "-1,0,1"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "leco.eval.json").read_text(encoding="utf-8"))
    assert report["metrics"] is None and report["options"]["multipliers"] == [-1.0, 0.0, 1.0]
    grid = Image.open(tmp_path / "out" / "leco.eval.png")
    assert grid.width > 3 * 64 and grid.height > 2 * 64  # 3 columns x 2 rows of 64 px images
    capsys.readouterr()
    assert main(["--model", str(tiny_sd_dir), "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --lora: not found: {tmp_path / 'missing.safetensors'}"


@pytest.mark.slow
def test_evaluator_command_reads_the_plan_from_the_lora_metadata(tmp_path, capsys):
    """On the concept world the evaluator infers erase/enhance/slider from ss_leco_prompts."""
    import json

    import train_leco
    from library.concept_world.model import ensure_concept_model
    from library.evaluation_cli import main

    model = ensure_concept_model()
    prompts = Path(__file__).resolve().parents[1] / "examples" / "concept_slider_size.toml"
    argv = ["--pretrained_model_name_or_path", str(model), "--prompts_file", str(prompts), "--output_dir", str(tmp_path),
            "--max_train_steps", "2", "--max_denoising_steps", "4", "--seed", "0"]
    assert train_leco.main(argv) == 0
    assert main(["--model", str(model), "--lora", str(tmp_path / "leco.safetensors"), "--seeds", "1", "--steps", "5"]) == 0
    report = json.loads((tmp_path / "leco.eval.json").read_text(encoding="utf-8"))
    assert report["plan"] == {"mode": "slider", "attribute": "size", "value": "large", "negative": "small", "also_erased": []}
    assert set(report["metrics"]["per_multiplier"]) == {"-1.0", "0.0", "1.0"} and "monotonic" in report["metrics"]
    assert (tmp_path / "leco.eval.png").is_file()
