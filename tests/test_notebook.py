"""examples/leco_colab.ipynb runs top to bottom, headless, in concept-world mode (the real-model cells skipped).

The parameters cell is overridden as a user would edit it: RUN_REAL_MODEL = False, a shorter demo (the
erase LoRA only, 50 steps, one seed per prompt), outputs in a temporary folder. Any cell error fails the
test (nbclient raises). The demo's last step bakes the erase LoRA into the concept model; its report must
show the merged model erasing "red" exactly as the LoRA at weight 1 did.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "leco_colab.ipynb"
pytestmark = pytest.mark.slow


def test_notebook_parameters_cell_is_tagged_and_real_model_cells_are_guarded():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and "RUN_REAL_MODEL = True" in tagged[0].source
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    real = [source for source in code if "REAL_MODEL" in source and "RUN_REAL_MODEL = True" not in source]
    assert real and all("if RUN_REAL_MODEL:" in source for source in real)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean


def test_notebook_runs_headless_in_concept_world_mode(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = next(cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))
    out = tmp_path / "out"
    parameters.source += (
        "\n# test overrides\nRUN_REAL_MODEL = False\n"
        f"OUTPUT_DIR = {str(out)!r}\n"
        "DEMO_ARGS = ['--steps', '50', '--seeds', '1', '--runs', 'erase_red']\n"
    )
    client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "examples")}})
    client.execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    text = "".join(output.get("text", "") for output in outputs)
    assert "skipping the real model" in text and text.rstrip().endswith("done")
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 2  # the erase grid and the merge grid
    report = json.loads((out / "demo" / "erase_red.merged.eval.json").read_text())
    lora, merged = report["lora_metrics"]["per_multiplier"], report["merged_metrics"]["per_multiplier"]
    assert lora["1.0"]["target_rate"] < lora["0.0"]["target_rate"]  # the LoRA erases red (50 steps: 1.00 -> about 0.5)
    assert merged["1.0"] == lora["1.0"]  # ... and so does the merged model, with the same metrics
    assert report["same_classification"] == 1.0 and report["max_latent_difference"] < 1e-3
    assert (out / "demo" / "erase_red_merged" / "leco_merge.json").is_file()
