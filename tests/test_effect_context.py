"""Erase that holds in every context and over long runs, and keeps what should stay (issue 12).

The goals of issue 12, asserted on two LoRAs trained from ``examples/`` on the concept world and
evaluated through diffusers (``load_lora_weights``) with 4 seeds, DDIM 25 steps, CFG 5 (one
sample is 4 % of a rate); the base model is sampled once per run. One test per run, so that
pytest-xdist never trains a run twice. To keep CI time small both runs use ``--leco_trajectory
persistent`` (one CFG call per step), the single-colour run at ``--max_denoising_steps 10``;
otherwise the demo's settings (lr 2e-3, dim 4, alpha 4, seed 0). docs/evaluation.md section 9 has the curves of
both at 50-step intervals and the same examples at N = 20 with fresh trajectories.

| goal | threshold | measured (seed 0) |
|---|---|---|
| red erased in context at 300 steps (`erase_efficacy`) | >= 0.95 | 1.00 (bare prompt 1.00) |
| size/shape of the red prompts, other prompts, other colours at 300 steps | >= 95 % of base | 102 %, 100 %, 100 % |
| in-context efficacy at 600 steps | at most 0.05 below 300 | 1.00 (bare 1.00), 97.9 %, 100 %, 100 % |
| red + blue in one LoRA, 450 steps: each erased, bare and in context | >= 0.9 | 1.00, 1.00; 1.00, 1.00 (0.92 at 350-400) |
| red + blue: green and yellow drawn when asked for, other prompts | >= 95 % of base | 100 %, 100 % |
"""

from __future__ import annotations

from pathlib import Path

import pytest

import train_leco
from library.evaluation import EvalOptions, plan_from_prompt_text
from library.evaluation_curve import evaluate_concept_curve, find_checkpoints

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

OPTIONS = EvalOptions(multipliers=(0.0, 1.0), seeds_per_prompt=4, steps=25, guidance_scale=5.0)
DEMO_FLAGS = ["--learning_rate", "2e-3", "--network_dim", "4", "--network_alpha", "4", "--seed", "0"]


@pytest.fixture(scope="module")
def concept_model() -> Path:
    from library.concept_world.model import ensure_concept_model

    return ensure_concept_model()


def train_curve(model: Path, example: str, out: Path, steps: int, every: int, flags: list[str]) -> dict[int, dict]:
    """Train an example with a checkpoint every ``every`` steps; the metrics of each, by step."""
    prompts = ROOT / "examples" / example
    argv = ["--pretrained_model_name_or_path", str(model), "--prompts_file", str(prompts), "--output_dir", str(out),
            "--output_name", "erase", "--max_train_steps", str(steps), "--save_every_n_steps", str(every), *DEMO_FLAGS,
            *flags]
    assert train_leco.main(argv) == 0
    plan = plan_from_prompt_text(prompts.read_text(encoding="utf-8"))
    report, _, grid = evaluate_concept_curve(model, find_checkpoints(out, "erase"), plan, OPTIONS)
    grid.save(out / "erase.curve-grid.png")
    return {row["step"]: row["metrics"] for row in report["curve"]}


def test_erase_holds_in_context_keeps_the_rest_and_does_not_drift_back(concept_model, tmp_path):
    """Erase red in the contexts of concept_contexts.txt with anchors "", blue, yellow: 600 steps,
    persistent trajectories (one test, so that pytest-xdist never trains this run twice)."""
    curve = train_curve(concept_model, "concept_erase_red_anchored.toml", tmp_path, 600, 300,
                        ["--max_denoising_steps", "10", "--leco_trajectory", "persistent"])
    early, late = curve[300], curve[600]
    assert early["per_multiplier"][0.0]["target_rate"] >= 0.9  # the base model draws red when asked
    assert early["erase_efficacy"] >= 0.95
    assert early["bare_efficacy"] >= 0.9
    for metrics in (early, late):
        assert metrics["preservation_other_attributes"] >= 0.95  # size and shape of the red prompts
        assert metrics["preservation_other_prompts"] >= 0.95
        assert metrics["min_kept_ratio"] >= 0.95  # green, blue, yellow still drawn when asked for
    assert late["erase_efficacy"] >= early["erase_efficacy"] - 0.05
    assert late["bare_efficacy"] >= early["bare_efficacy"] - 0.05


def test_two_concept_erase_keeps_the_other_colours(concept_model, tmp_path):
    """Erase red and blue with one LoRA, anchors "", green, yellow: 450 steps, persistent trajectories."""
    curve = train_curve(concept_model, "concept_erase_red_blue.toml", tmp_path, 450, 450,
                        ["--max_denoising_steps", "20", "--leco_trajectory", "persistent"])
    metrics = curve[450]
    for value in ("red", "blue"):
        assert metrics["efficacy"][value]["in_context"] >= 0.9, value
        assert metrics["efficacy"][value]["bare"] >= 0.9, value
    assert set(metrics["kept_ratio"]) == {"green", "yellow"}
    assert metrics["min_kept_ratio"] >= 0.95
    assert metrics["preservation_other_prompts"] >= 0.95
