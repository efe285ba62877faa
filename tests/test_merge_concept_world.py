"""The evaluator's --merged comparison on the concept world: a merged diffusers folder samples like the LoRA."""

from __future__ import annotations

import json

import pytest

from library import evaluation
from networks import merge_lora
from tests import merge_fixtures as mf

pytestmark = pytest.mark.slow


def test_evaluator_compares_a_merged_concept_model_with_the_lora(tmp_path, capsys):
    from library.concept_world.model import ensure_concept_model

    model = ensure_concept_model()
    lora = mf.random_lora(model, tmp_path / "random.safetensors", seed=3, dim=2, alpha=1.0)
    merged = tmp_path / "merged"
    assert merge_lora.main(["--sd_model", str(model), "--save_to", str(merged), "--models", str(lora), "--ratios", "0.5"]) == 0
    assert (merged / "concept_world.json").read_bytes() == (model / "concept_world.json").read_bytes()
    assert (merged / "text_encoder" / "model.safetensors").read_bytes() == (model / "text_encoder" / "model.safetensors").read_bytes()
    report_path = tmp_path / "report.json"
    assert evaluation.main(["--model", str(model), "--lora", str(lora), "--merged", str(merged), "--ratio", "0.5",
                            "--erase", "red", "--seeds", "1", "--steps", "10", "--out", str(report_path),
                            "--grid", str(tmp_path / "grid.png")]) == 0
    report = json.loads(report_path.read_text())
    assert report["samples"] == 24 and report["same_classification"] == 1.0
    assert report["max_latent_difference"] < 1e-3
    assert report["merged_metrics"]["per_multiplier"]["1.0"] == report["lora_metrics"]["per_multiplier"]["1.0"]
    assert (tmp_path / "grid.png").is_file()
    capsys.readouterr()
    assert evaluation.main(["--model", str(tmp_path), "--lora", str(lora), "--merged", str(merged)]) == 2
    assert "not a diffusers model folder" in capsys.readouterr().err
