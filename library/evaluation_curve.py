"""Efficacy against training steps: evaluate every ``--save_every_n_steps`` file of a run.

``python -m tools.evaluate --model DIR --lora OUTPUT_DIR`` (a folder instead of a file) finds
``NAME-stepNNNNNNNN.safetensors`` and the final ``NAME.safetensors``, evaluates each the same way
as one LoRA (the base model, multiplier 0, is sampled once and shared), prints one table row per
step and writes ``NAME.curve.json``, a plot ``NAME.curve.png`` and a grid ``NAME.curve-grid.png``
(rows: steps, columns: prompts) into the folder, so a user can pick the step. For a real model
(not the concept world) it writes the grid only, decoded through the model's VAE.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from library.errors import UserError
from library.evaluation import (
    ADAPTER,
    EvalOptions,
    EvalPlan,
    image_samples,
    load_pipeline,
    plan_metrics,
    prompt_sets,
    sample_concept_plan,
)
from library.plot import line_plot
from library.sampling import make_grid

logger = logging.getLogger(__name__)

STEP_FILE = re.compile(r"^(?P<name>.+)-step(?P<step>\d{8})\.(?P<ext>safetensors|ckpt|pt)$")


@dataclass(frozen=True)
class Checkpoint:
    """One saved LoRA of a run and the step it was saved at."""

    step: int
    path: Path


def find_checkpoints(folder: str | Path, name: str | None = None) -> list[Checkpoint]:
    """The run's ``NAME-stepNNNNNNNN`` files and its final ``NAME`` file, sorted by step.

    The final file's step is its ``ss_steps`` metadata; without metadata it is left out (logged). With
    ``name`` given, a run whose only file is the final one is a one-point curve.

    Raises:
        UserError: no files of the run, or several run names in the folder and no ``name``.
    """
    from networks.lora_files import read_lora_metadata

    folder = Path(folder)
    found: dict[str, list[Checkpoint]] = {}
    for path in sorted(folder.iterdir()):
        match = STEP_FILE.match(path.name)
        if match and path.is_file():
            found.setdefault(match["name"], []).append(Checkpoint(int(match["step"]), path))
    if name is None:
        if len(found) > 1:
            raise UserError(f"{folder} holds several runs ({', '.join(sorted(found))}); pass --name NAME")
        name = next(iter(found), None)
    checkpoints = list(found.get(name, [])) if name else []
    for ext in ("safetensors", "ckpt", "pt"):
        final = folder / f"{name}.{ext}"
        if name and final.is_file():
            steps = read_lora_metadata(final).get("ss_steps")
            if steps and steps.isdigit():
                checkpoints.append(Checkpoint(int(steps), final))
            else:
                logger.warning("%s has no ss_steps metadata; left out of the curve", final.name)
            break
    if not checkpoints:
        what = f"{name}-stepNNNNNNNN" if name else "NAME-stepNNNNNNNN"
        raise UserError(f"no {what}.safetensors files in {folder} (train with --save_every_n_steps N)")
    return sorted({c.step: c for c in checkpoints}.values(), key=lambda c: c.step)


def swap_lora(pipe, path: Path) -> None:
    """Replace the pipeline's LoRA with the one in ``path`` (same adapter name)."""
    pipe.delete_adapters([ADAPTER])
    pipe.load_lora_weights(str(path), adapter_name=ADAPTER)


# ----------------------------------------------------------------------------------------------
# What a row shows


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _columns(plan: EvalPlan) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, cell) pairs of the curve table for the plan's mode; a cell reads one step's metrics."""
    if plan.mode == "erase":
        columns = [
            ("efficacy bare", lambda m: _percent(m.get("bare_efficacy"))),
            ("efficacy in context", lambda m: _percent(m.get("erase_efficacy"))),
        ]
        for value in plan.also_erased:
            columns += [(f"{value} bare", lambda m, v=value: _percent(m["efficacy"][v]["bare"])),
                        (f"{value} in context", lambda m, v=value: _percent(m["efficacy"][v]["in_context"]))]
        return columns + [
            ("other attributes kept", lambda m: _percent(m.get("preservation_other_attributes"))),
            ("other prompts kept", lambda m: _percent(m.get("preservation_other_prompts"))),
            (f"least-kept other {plan.attribute}", _least_kept),
        ]
    if plan.mode == "enhance":
        return [("enhance strength", lambda m: f"{m.get('enhance_strength', 0):+.2f}"),
                ("other attributes x1", lambda m: _percent(m["per_multiplier"].get(1.0, {}).get("preserved_other_attributes")))]
    return [("span", lambda m: f"{m.get('span', 0):.2f}"), ("monotonic", lambda m: "yes" if m.get("monotonic") else "no"),
            ("other attributes (min)", lambda m: _percent(min(r["preserved_other_attributes"] for r in m["per_multiplier"].values())))]


def _least_kept(metrics: dict) -> str:
    kept = metrics.get("kept_ratio") or {}
    if not kept:
        return "–"
    value = min(kept, key=kept.get)
    return f"{value} {kept[value]:.0%}"


def curve_table(plan: EvalPlan, rows: Sequence[dict]) -> str:
    """A Markdown table: one row per step."""
    columns = _columns(plan)
    lines = ["| step | " + " | ".join(header for header, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row['step']} | " + " | ".join(cell(row["metrics"]) for _, cell in columns) + " |")
    return "\n".join(lines)


def curve_series(plan: EvalPlan, rows: Sequence[dict]) -> dict[str, list[tuple[float, float | None]]]:
    """The plotted lines: efficacy (bare, in context) and preservation for erase; strength/span otherwise."""
    def line(read: Callable[[dict], float | None]) -> list[tuple[float, float | None]]:
        return [(row["step"], read(row["metrics"])) for row in rows]

    if plan.mode == "erase":
        series = {f"efficacy {plan.value} bare": line(lambda m: m.get("bare_efficacy")),
                  f"efficacy {plan.value} in context": line(lambda m: m.get("erase_efficacy"))}
        for value in plan.also_erased:
            series[f"efficacy {value} bare"] = line(lambda m, v=value: m["efficacy"][v]["bare"])
            series[f"efficacy {value} in context"] = line(lambda m, v=value: m["efficacy"][v]["in_context"])
        series["other attributes kept"] = line(lambda m: m.get("preservation_other_attributes"))
        series["other prompts kept"] = line(lambda m: m.get("preservation_other_prompts"))
        series[f"least-kept other {plan.attribute}"] = line(lambda m: m.get("min_kept_ratio"))
        return series
    if plan.mode == "enhance":
        return {"enhance strength": line(lambda m: m.get("enhance_strength"))}
    return {"span": line(lambda m: m.get("span"))}


# ----------------------------------------------------------------------------------------------
# Running it


def evaluate_concept_curve(model: str | Path, checkpoints: Sequence[Checkpoint], plan: EvalPlan,
                           options: EvalOptions) -> tuple[dict, Image.Image, Image.Image]:
    """Evaluate every checkpoint on the concept world; returns ``(report, plot, grid)``.

    The base model (multiplier 0) is sampled once; each checkpoint is sampled at the other
    multipliers of ``options``. The grid shows the first seed of the first prompt set at the
    largest multiplier: a row per step (step 0 is the base model).
    """
    if not checkpoints:
        raise UserError("no checkpoints to evaluate")
    pipe = load_pipeline(model, checkpoints[0].path)
    base = sample_concept_plan(pipe, plan, options, [0.0])
    lora_multipliers = [m for m in options.multipliers if m != 0.0] or [1.0]
    shown = max(lora_multipliers, key=abs)
    grid_prompts = next(iter(prompt_sets(plan).values()))[: options.grid_rows]
    grid_rows, rows = [list(base.columns[0.0])], []
    for index, checkpoint in enumerate(checkpoints):
        if index:
            swap_lora(pipe, checkpoint.path)
        samples = sample_concept_plan(pipe, plan, options, lora_multipliers).merged(base)
        metrics = plan_metrics(plan, samples)
        rows.append({"step": checkpoint.step, "file": checkpoint.path.name, "metrics": metrics})
        grid_rows.append(list(samples.columns[shown]))
        logger.info("step %d evaluated", checkpoint.step)
    options_used = {**asdict(options), "multipliers": [0.0, *lora_multipliers]}
    report = {"model": str(model), "plan": asdict(plan), "options": options_used, "curve": rows}
    title = f"{plan.mode} {', '.join(plan.erased) or plan.value or plan.negative}: x{shown:g} against training steps"
    y_range = (0.0, 1.1) if plan.mode == "erase" else (-1.0, 1.0)
    plot = line_plot(curve_series(plan, rows), title, "training step", "share", y_range=y_range,
                     guides=(0.95,) if plan.mode == "erase" else (0.0,))
    labels = ["base"] + [f"step {row['step']}" for row in rows]
    grid = make_grid(grid_rows, labels, grid_prompts)
    return report, plot, grid


def evaluate_image_curve(model: str | Path, checkpoints: Sequence[Checkpoint], prompts: Sequence[str], options: EvalOptions,
                         size: int | None = None) -> tuple[dict, Image.Image]:
    """For a real model: a grid of decoded images, a row per step (and the base model), a column per prompt."""
    if not checkpoints:
        raise UserError("no checkpoints to evaluate")
    pipe = load_pipeline(model, checkpoints[0].path)
    if getattr(pipe, "vae", None) is None:
        raise UserError(f"{model} has no VAE to decode images with")
    shown = max(options.multipliers, key=abs)
    rows = [image_samples(pipe, prompts, options.base_seed, 0.0, options.steps, options.guidance_scale, size)]
    for index, checkpoint in enumerate(checkpoints):
        if index:
            swap_lora(pipe, checkpoint.path)
        rows.append(image_samples(pipe, prompts, options.base_seed, shown, options.steps, options.guidance_scale, size))
    labels = ["base"] + [f"step {c.step} x{shown:g}" for c in checkpoints]
    report = {"model": str(model), "options": asdict(options), "steps": [c.step for c in checkpoints], "metrics": None}
    return report, make_grid(rows, labels, list(prompts))


def run_curve(args, options: EvalOptions) -> int:
    """``tools.evaluate`` with a folder as ``--lora``: evaluate, print the table, write the files."""
    import json

    from library.evaluation import is_concept_world
    from library.evaluation_cli import plan_for

    folder = Path(args.lora)
    checkpoints = find_checkpoints(folder, args.name)
    name = next(match["name"] for match in map(STEP_FILE.match, (c.path.name for c in checkpoints)) if match)
    out = Path(args.out) if args.out else folder / f"{name}.curve.json"
    grid_path = Path(args.grid) if args.grid else folder / f"{name}.curve-grid.png"
    written = [f"report: {out}", f"grid: {grid_path}"]
    if is_concept_world(args.model):
        plan = plan_for(args, checkpoints[-1].path)
        report, plot, grid = evaluate_concept_curve(args.model, checkpoints, plan, options)
        plot_path = Path(args.plot) if args.plot else folder / f"{name}.curve.png"
        plot.save(plot_path)
        written.append(f"plot: {plot_path}")
        print(curve_table(plan, report["curve"]))
    else:
        report, grid = evaluate_image_curve(args.model, checkpoints, args.prompts, options)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    grid.save(grid_path)
    print("\n".join(written))
    return 0
