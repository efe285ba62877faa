"""The evaluator's command line: ``python -m tools.evaluate --model DIR --lora FILE_OR_FOLDER``.

A LoRA file is evaluated at ``--multipliers`` (JSON metrics printed, a report and a grid written
next to it); a training output folder is evaluated step by step (``library.evaluation_curve``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from library.errors import UserError
from library.evaluation import (
    EvalOptions,
    EvalPlan,
    evaluate_concept_lora,
    evaluate_images_only,
    evaluate_merged_model,
    is_concept_world,
    plan_from_flags,
    plan_from_prompt_text,
)


def plan_for(args, lora: Path) -> EvalPlan:
    """The plan from ``--erase/--enhance/--slider``, else from the LoRA's ``ss_leco_prompts`` metadata."""
    from networks.lora_files import read_lora_metadata

    plan = plan_from_flags(args.erase, args.enhance, args.slider)
    if plan is None:
        text = read_lora_metadata(lora).get("ss_leco_prompts")
        if not text:
            raise UserError(f"{lora.name} has no ss_leco_prompts metadata; pass --erase/--enhance/--slider")
        plan = plan_from_prompt_text(text)
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: evaluate one LoRA (prints the JSON metrics, writes the report and the grid) or a
    folder of step files (prints the curve table, writes the report, a plot and a grid)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tools.evaluate", description="Evaluate a LECO LoRA through diffusers")
    parser.add_argument("--model", required=True, help="diffusers model folder (the concept world or a real model)")
    parser.add_argument("--lora", required=True, help="LoRA .safetensors to evaluate, or a training output folder: then every "
                        "NAME-stepNNNNNNNN file and the final NAME file (efficacy against steps, a table and a plot)")
    parser.add_argument("--name", help="with a folder: the run's --output_name (needed when the folder holds several runs)")
    parser.add_argument("--multipliers", default="-1,0,1", help="LoRA weights to sample at (default -1,0,1)")
    parser.add_argument("--erase", help="concept-world value the LoRA erases (default: read from its metadata)")
    parser.add_argument("--enhance", help="concept-world value the LoRA enhances")
    parser.add_argument("--slider", help="slider poles positive,negative (e.g. large,small)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt (default 8)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    parser.add_argument("--guidance_scale", type=float, default=5.0, help="CFG scale (default 5)")
    parser.add_argument("--prompts", nargs="*", default=["a photo"], help="prompts for real models (grid only)")
    parser.add_argument("--merged", help="concept world: a model folder with this LoRA merged in (networks/merge_lora.py); "
                                         "compare it with the LoRA at --ratio instead of sampling --multipliers")
    parser.add_argument("--ratio", type=float, default=1.0, help="the ratio the LoRA was merged at (with --merged; default 1)")
    parser.add_argument("--out", help="report path (default: next to the LoRA, NAME.eval.json)")
    parser.add_argument("--grid", help="grid PNG path (default: next to the LoRA, NAME.eval.png; NAME.curve-grid.png for a folder)")
    parser.add_argument("--plot", help="with a folder: plot PNG path (default: NAME.curve.png in the folder)")
    from library.cli import join_signed_lists

    args = parser.parse_args(join_signed_lists(list(sys.argv[1:] if argv is None else argv), ("--multipliers",)))
    from library.quiet import quiet_third_party_output

    quiet_third_party_output()
    try:
        multipliers = tuple(float(item) for item in args.multipliers.replace("=", "").split(","))
        lora = Path(args.lora)
        if not lora.exists():
            raise UserError(f"--lora: not found: {lora}")
        if not (Path(args.model) / "model_index.json").is_file():
            raise UserError(f"--model: {args.model} is not a diffusers model folder")
        options = EvalOptions(multipliers=multipliers, seeds_per_prompt=args.seeds, steps=args.steps,
                              guidance_scale=args.guidance_scale)
        if lora.is_dir():
            if args.merged:
                raise UserError("--merged compares one LoRA file with its merge; give --lora FILE")
            from library.evaluation_curve import run_curve

            return run_curve(args, options)
        if is_concept_world(args.model):
            plan = plan_for(args, lora)
            if args.merged:
                if not (Path(args.merged) / "model_index.json").is_file():
                    raise UserError(f"--merged: {args.merged} is not a diffusers model folder")
                report, grid = evaluate_merged_model(args.model, lora, args.merged, plan, options, args.ratio)
            else:
                report, grid = evaluate_concept_lora(args.model, lora, plan, options)
        elif args.merged:
            raise UserError("--merged compares metrics, which only the concept world has")
        else:
            report, grid = evaluate_images_only(args.model, lora, args.prompts, options)
    except (UserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    suffix = ".merged.eval" if args.merged else ".eval"
    out = Path(args.out) if args.out else lora.with_suffix(suffix + ".json")
    grid_path = Path(args.grid) if args.grid else lora.with_suffix(suffix + ".png")
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    grid.save(grid_path)
    report["grid"] = str(grid_path)
    shown = report["metrics"] if "metrics" in report else {key: report[key] for key in ("lora_metrics", "merged_metrics",
                                                                                       "same_classification")}
    print(json.dumps(shown, indent=2))
    print(f"report: {out}\ngrid: {grid_path}")
    return 0
