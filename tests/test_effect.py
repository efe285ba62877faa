"""Does it work? LECO LoRAs trained on the concept world change what it draws, as intended.

Each test trains a LoRA with ``train_leco.main`` from a prompt file in ``examples/`` and evaluates it
the way a user would load it (diffusers ``load_lora_weights``), classifying every sample. The
thresholds leave margin below what was measured with these exact settings (docs/evaluation.md):

| run | measured (seed 0) | asserted |
|---|---|---|
| erase "red": red rate when asked for, x0 -> x1 | 1.00 -> 0.25 (chance 0.25) | x0 >= 0.9, x1 <= 0.45 |
| erase "red": erased_to_chance | 1.20 | >= 0.7 |
| erase "red": other prompts' accuracy kept | 99.5 % | >= 90 % |
| erase "red": size/shape of red prompts right at x1 | 91.7 % | >= 75 % |
| slider large/small: large rate at -1, 0, 1 | 0.10, 0.73, 1.00 (span 0.90) | monotonic, span >= 0.5 |
| slider: other attributes right at every weight | >= 94.8 % | >= 85 % |
| enhance "small": small rate for open prompts, x0 -> x1 | 0.27 -> 0.92 | + 0.25 or more |
| enhance: other attributes right at x1 | 97.9 % | >= 85 % |

Each test also runs with ``--leco_trajectory persistent --max_denoising_steps 40`` (the same margins;
measured: erase 1.00 -> 0.21, erased_to_chance 1.19, others kept 100.9 %, size/shape 90 %; slider 0.08,
0.77, 1.00, span 0.92, others >= 95 %; enhance 0.23 -> 0.77, others 91 %), 17-22 s each.

The first test builds the concept-world model if it is not cached (about 5 minutes on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import train_leco
from library.evaluation import EvalOptions, evaluate_concept_lora, plan_from_prompt_text

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

STEPS = 150
OPTIONS = EvalOptions(seeds_per_prompt=4, steps=25, guidance_scale=5.0)


@pytest.fixture(scope="module")
def concept_model() -> Path:
    from library.concept_world.model import ensure_concept_model

    return ensure_concept_model()


# persistent trajectories at sd-scripts' default N: a step costs one CFG call instead of about N/2
PERSISTENT = ["--leco_trajectory", "persistent", "--max_denoising_steps", "40"]
TRAJECTORIES = pytest.mark.parametrize("extra", [[], PERSISTENT], ids=["fresh", "persistent"])


def train_and_evaluate(model: Path, example: str, out: Path, multipliers=(0.0, 1.0), extra=()) -> dict:
    prompts = ROOT / "examples" / example
    name = prompts.stem
    argv = [
        "--pretrained_model_name_or_path", str(model), "--prompts_file", str(prompts),
        "--output_dir", str(out), "--output_name", name, "--max_train_steps", str(STEPS),
        "--max_denoising_steps", "20", "--learning_rate", "2e-3", "--network_dim", "4", "--network_alpha", "4",
        "--seed", "0", *extra,
    ]
    assert train_leco.main(argv) == 0
    plan = plan_from_prompt_text(prompts.read_text(encoding="utf-8"))
    options = EvalOptions(**{**OPTIONS.__dict__, "multipliers": tuple(multipliers)})
    report, grid = evaluate_concept_lora(model, out / f"{name}.safetensors", plan, options)
    grid.save(out / f"{name}.eval.png")
    return report["metrics"]


@TRAJECTORIES
def test_erase_removes_the_concept_and_keeps_the_rest(concept_model, tmp_path, extra):
    metrics = train_and_evaluate(concept_model, "concept_erase_red.toml", tmp_path, extra=extra)
    base, erased = metrics["per_multiplier"][0.0], metrics["per_multiplier"][1.0]
    assert base["target_rate"] >= 0.9  # the model draws red when asked
    assert erased["target_rate"] <= 0.45
    assert metrics["erased_to_chance"] >= 0.7
    assert metrics["preservation_other_prompts"] >= 0.9
    assert erased["preserved_other_attributes"] >= 0.75


@TRAJECTORIES
def test_slider_is_monotonic_across_minus_one_zero_one(concept_model, tmp_path, extra):
    metrics = train_and_evaluate(concept_model, "concept_slider_size.toml", tmp_path, multipliers=(-1.0, 0.0, 1.0), extra=extra)
    per = metrics["per_multiplier"]
    assert metrics["monotonic"]
    assert metrics["span"] >= 0.5
    assert per[1.0]["rate"] > per[0.0]["rate"] > per[-1.0]["rate"]
    assert all(row["preserved_other_attributes"] >= 0.85 for row in per.values())


@TRAJECTORIES
def test_enhance_increases_its_attribute(concept_model, tmp_path, extra):
    metrics = train_and_evaluate(concept_model, "concept_enhance_small.toml", tmp_path, extra=extra)
    assert metrics["enhance_strength"] >= 0.25
    assert metrics["per_multiplier"][1.0]["preserved_other_attributes"] >= 0.85
