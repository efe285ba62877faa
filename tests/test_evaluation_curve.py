"""Efficacy against steps (``library/evaluation_curve.py``) and its plot (``library/plot.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from library.errors import UserError
from library.evaluation import EvalPlan
from library.evaluation_curve import curve_series, curve_table, find_checkpoints
from library.plot import PALETTE, line_plot, nice_ticks, plot_frame


def test_nice_ticks():
    assert nice_ticks(0.0, 1.0, 6) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.0, 600.0, 8) == [0.0, 100.0, 200.0, 300.0, 400.0, 500.0, 600.0]
    assert nice_ticks(0.0, 1.1, 6) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(5.0, 5.0) == [5.0]


def test_plot_frame_maps_data_to_pixels():
    series = {"a": [(0.0, 0.0), (200.0, 1.0)]}
    frame = plot_frame(series, (760, 420), (0.0, 1.0))
    assert frame.to_pixel(0, 0) == (frame.left, frame.bottom)
    assert frame.to_pixel(200, 1) == (frame.right, frame.top)
    assert frame.to_pixel(100, 0.5) == ((frame.left + frame.right) / 2, (frame.top + frame.bottom) / 2)
    assert frame.to_pixel(100, 7.0)[1] == frame.top  # clamped to the shown range


def test_line_plot_draws_each_series_in_its_colour():
    series = {"rising": [(0.0, 0.0), (200.0, 1.0)], "flat": [(0.0, 0.25), (100.0, None), (200.0, 0.25)]}
    image = line_plot(series, "title", "step", "share", guides=(0.95,))
    frame = plot_frame(series, image.size, (0.0, 1.0))
    x, y = frame.to_pixel(100, 0.5)  # the middle of the rising line
    assert image.getpixel((round(x), round(y))) == PALETTE[0]
    x, y = frame.to_pixel(150, 0.25)  # on the flat line (its None point is skipped, the line joins 0 and 200)
    assert image.getpixel((round(x), round(y))) == PALETTE[1]
    x, y = frame.to_pixel(10, 0.95)  # a dashed guide
    row = [image.getpixel((px, round(y))) for px in range(frame.left + 1, frame.left + 40)]
    assert (120, 120, 120) in row and (255, 255, 255) in row


def _lora(path: Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(path), metadata=metadata)
    return path


def test_find_checkpoints(tmp_path, caplog):
    for step in (100, 50):
        _lora(tmp_path / f"erase-step{step:08d}.safetensors")
    _lora(tmp_path / "erase.safetensors", {"ss_steps": "150"})
    (tmp_path / "erase-step00000050-state").mkdir()  # state folders are not LoRAs
    found = find_checkpoints(tmp_path)
    assert [(c.step, c.path.name) for c in found] == [
        (50, "erase-step00000050.safetensors"), (100, "erase-step00000100.safetensors"), (150, "erase.safetensors")]
    _lora(tmp_path / "other-step00000010.safetensors")
    with pytest.raises(UserError, match="several runs"):
        find_checkpoints(tmp_path)
    assert [c.step for c in find_checkpoints(tmp_path, "other")] == [10]
    with pytest.raises(UserError, match="missing-stepNNNNNNNN"):
        find_checkpoints(tmp_path, "missing")
    _lora(tmp_path / "other.safetensors")  # no metadata: left out, with a warning
    assert [c.step for c in find_checkpoints(tmp_path, "other")] == [10]
    assert "no ss_steps" in caplog.text
    only_final = tmp_path / "only_final"
    only_final.mkdir()
    _lora(only_final / "run.safetensors", {"ss_steps": "600"})
    assert [(c.step, c.path.name) for c in find_checkpoints(only_final, "run")] == [(600, "run.safetensors")]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="--save_every_n_steps"):
        find_checkpoints(empty)


def test_curve_table_and_series_of_an_erase():
    plan = EvalPlan("erase", "color", "red", also_erased=("blue",))

    def metrics(bare: float, context: float) -> dict:
        return {"bare_efficacy": bare, "erase_efficacy": context, "preservation_other_attributes": 0.96,
                "preservation_other_prompts": 1.0, "kept_ratio": {"green": 1.0, "yellow": 0.9}, "min_kept_ratio": 0.9,
                "efficacy": {"red": {"bare": bare, "in_context": context}, "blue": {"bare": 0.5, "in_context": None}}}

    rows = [{"step": 50, "metrics": metrics(0.5, 0.25)}, {"step": 100, "metrics": metrics(1.0, 0.96)}]
    table = curve_table(plan, rows).splitlines()
    assert table[0] == ("| step | efficacy bare | efficacy in context | blue bare | blue in context | other attributes kept "
                        "| other prompts kept | least-kept other color |")
    assert table[3] == "| 100 | 100% | 96% | 50% | – | 96% | 100% | yellow 90% |"
    series = curve_series(plan, rows)
    assert series["efficacy red in context"] == [(50, 0.25), (100, 0.96)]
    assert series["efficacy blue in context"] == [(50, None), (100, None)]
    assert series["least-kept other color"] == [(50, 0.9), (100, 0.9)]


@pytest.mark.slow
def test_evaluator_command_on_a_folder_of_step_files(tmp_path, capsys):
    """A run saved every step: the evaluator prints one row per step and writes the report, plot and grid."""
    from PIL import Image

    import train_leco
    from library.concept_world.model import ensure_concept_model
    from library.evaluation_cli import main

    model = ensure_concept_model()
    prompts = Path(__file__).resolve().parents[1] / "examples" / "concept_erase_red.toml"
    argv = ["--pretrained_model_name_or_path", str(model), "--prompts_file", str(prompts), "--output_dir", str(tmp_path),
            "--output_name", "run", "--max_train_steps", "2", "--save_every_n_steps", "1", "--max_denoising_steps", "4",
            "--seed", "0"]
    assert train_leco.main(argv) == 0
    capsys.readouterr()
    assert main(["--model", str(model), "--lora", str(tmp_path), "--seeds", "1", "--steps", "4", "--multipliers", "0,1"]) == 0
    out = capsys.readouterr().out
    assert "| step | efficacy bare | efficacy in context |" in out and "\n| 1 | " in out and "\n| 2 | " in out
    report = json.loads((tmp_path / "run.curve.json").read_text(encoding="utf-8"))
    assert [row["step"] for row in report["curve"]] == [1, 2]
    assert [row["file"] for row in report["curve"]] == ["run-step00000001.safetensors", "run.safetensors"]
    assert {"erase_efficacy", "bare_efficacy", "kept_ratio"} <= set(report["curve"][0]["metrics"])
    assert report["plan"]["value"] == "red" and report["options"]["multipliers"] == [0.0, 1.0]
    assert Image.open(tmp_path / "run.curve.png").size == (760, 420)
    grid = Image.open(tmp_path / "run.curve-grid.png")
    assert grid.height > 3 * 128  # rows: base, step 1, step 2
