"""The newcomer's demo: see LECO erase a concept and make a slider, on a CPU, in minutes.

1. Build (or reuse) the concept-world model: a tiny text-to-image model the project trains itself
   on synthetic scenes (colours, sizes, shapes), saved as a normal diffusers folder.
2. Train two LoRAs with ``accelerate launch train_leco.py``: erase "red", and a large/small slider
   (prompt files in ``examples/concept_*.toml``).
3. Evaluate both through diffusers' ``load_lora_weights`` at multipliers -1, 0, 1 and print the
   before/after table; write image grids.
4. Bake the erase LoRA into a copy of the model (``networks/merge_lora.py``, a diffusers folder) and
   show that the merged model, with no LoRA loaded, erases "red" as the LoRA did.

    bash scripts/demo.sh                # or: python -m tools.demo [--steps N] [--seeds N] [--runs erase_red] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RUNS = (
    # name, prompt file, what it does, extra flags
    ("erase_red", "examples/concept_erase_red.toml", 'erase "red"', []),
    ("slider_size", "examples/concept_slider_size.toml", 'slider "large" (+) / "small" (-)', []),
)
BAKED = "erase_red"  # the run merged into the model in step 4


def train(model: Path, name: str, prompts: str, out: Path, steps: int, extra: list[str]) -> float:
    """One training run through ``accelerate launch``; returns seconds."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "train_leco.py"),
        "--pretrained_model_name_or_path", str(model),
        "--prompts_file", str(ROOT / prompts),
        "--output_dir", str(out),
        "--output_name", name,
        "--max_train_steps", str(steps),
        "--max_denoising_steps", "20",
        "--learning_rate", "2e-3",
        "--network_dim", "4",
        "--network_alpha", "4",
        "--seed", "0",
        "--logging_dir", str(out / "logs"),
        "--sample_prompts", str(ROOT / "examples/concept_sample_prompts.txt"),
        "--sample_every_n_steps", str(steps),
        *extra,
    ]
    print(f"\n$ accelerate launch train_leco.py ... --prompts_file {prompts} --output_name {name}", flush=True)
    start = time.perf_counter()
    # the child's output is relayed line by line, so it also shows in a notebook cell
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as child:
        for line in child.stdout:  # text mode splits tqdm's \r updates into lines: keep the finished bars only
            if ("it/s" in line or "s/it" in line) and "100%" not in line:
                continue
            print(line.rstrip("\r\n"), flush=True)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, command)
    return time.perf_counter() - start


def describe(name: str, what: str, report: dict, seconds: float) -> list[str]:
    """Human-readable lines for one evaluated LoRA."""
    metrics = report["metrics"]
    per = metrics["per_multiplier"]
    lines = [f"{name}: {what}  (trained in {seconds:.0f} s)"]
    if report["plan"]["mode"] == "erase":
        value = report["plan"]["value"]
        for multiplier in sorted(per):
            row = per[multiplier]
            lines.append(f"  LoRA x{multiplier:g}: {value} drawn {row['target_rate']:.0%} of the time when asked for; "
                         f"other attributes right {row['preserved_other_attributes']:.0%}; "
                         f"other prompts right {row['preserved_other_prompts']:.0%}")
        to_chance = metrics.get("erased_to_chance", 0)
        progress = "all the way to chance" if to_chance >= 1 else f"{to_chance:.0%} of the way to chance"
        lines.append(f"  erase efficacy in context {metrics['erase_efficacy']:.0%}, bare prompt \"{value}\" {metrics['bare_efficacy']:.0%} "
                     f"({value} drawn unasked: {metrics['unprompted_rate']:.0%}, so {progress}); "
                     f"other prompts keep {metrics['preservation_other_prompts']:.0%} of their base accuracy")
    else:
        plan = report["plan"]
        for multiplier in sorted(per):
            row = per[multiplier]
            lines.append(f"  LoRA x{multiplier:g}: {plan['value']} {row.get('rate', 0):.0%}, "
                         f"{plan['negative']} {row.get('negative_rate', 0):.0%}; other attributes right "
                         f"{row['preserved_other_attributes']:.0%}")
        lines.append(f"  monotonic across -1, 0, 1: {'yes' if metrics['monotonic'] else 'NO'}")
    return lines


def bake(model: Path, lora: Path, out: Path) -> Path:
    """Merge the LoRA into a copy of the concept model (a diffusers folder) with ``networks/merge_lora.py``."""
    from networks import merge_lora

    target = out / f"{lora.stem}_merged"
    print(f"$ python networks/merge_lora.py --sd_model {model} --save_to {target} --models {lora} --ratios 1", flush=True)
    if merge_lora.main(["--sd_model", str(model), "--save_to", str(target), "--models", str(lora), "--ratios", "1"]) != 0:
        raise SystemExit("merging failed")
    return target


def describe_merge(name: str, report: dict) -> list[str]:
    """Lines comparing the merged model with the LoRA."""
    lora, merged = report["lora_metrics"], report["merged_metrics"]
    value = report["plan"]["value"]
    row_lora, row_merged = lora["per_multiplier"][1.0], merged["per_multiplier"][1.0]
    return [
        f"{name} merged into the model at ratio {report['ratio']:g} ({report['merged']}, no LoRA loaded):",
        f"  merged model: {value} drawn {row_merged['target_rate']:.0%} of the time when asked for (LoRA x1: "
        f"{row_lora['target_rate']:.0%}); other prompts right {row_merged['preserved_other_prompts']:.0%} "
        f"(LoRA x1: {row_lora['preserved_other_prompts']:.0%})",
        f"  erased to chance {merged.get('erased_to_chance', 0):.2f} (LoRA: {lora.get('erased_to_chance', 0):.2f}); "
        f"same classification as the LoRA for {report['same_classification']:.0%} of {report['samples']} samples; "
        f"largest latent difference {report['max_latent_difference']:.1e}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "demo_output", help="where LoRAs, grids and reports go")
    parser.add_argument("--steps", type=int, default=150, help="training steps per LoRA (default 150)")
    parser.add_argument("--seeds", type=int, default=4, help="evaluation seeds per prompt (default 4)")
    parser.add_argument("--runs", default=",".join(name for name, *_ in RUNS),
                        help=f"comma-separated runs to train (default all: {', '.join(name for name, *_ in RUNS)})")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    from library.quiet import quiet_third_party_output

    quiet_third_party_output()
    # the concept-world build reports its progress (loss every few hundred steps) through logging
    logging.basicConfig(level=logging.WARNING, format="      %(message)s")
    logging.getLogger("library.concept_world").setLevel(logging.INFO)

    from library.concept_world.model import ensure_concept_model
    from library.evaluation import EvalOptions, evaluate_concept_lora, evaluate_merged_model, plan_from_prompt_text

    chosen = [name.strip() for name in args.runs.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in {run[0] for run in RUNS}]
    if unknown or not chosen:
        parser.error(f"--runs: unknown run {unknown[0] if unknown else '(none)'}; choose from {', '.join(run[0] for run in RUNS)}")
    runs = [run for run in RUNS if run[0] in chosen]
    started = time.perf_counter()
    print("[1/4] concept-world model (built once, then cached) ...", flush=True)
    model = ensure_concept_model()
    world = json.loads((model / "concept_world.json").read_text(encoding="utf-8"))
    print(f"      {model}  base accuracy: {world.get('base_accuracy', {}).get('accuracy')}", flush=True)

    print("[2/4] training LoRAs ...", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = {name: train(model, name, prompts, args.out, args.steps, extra) for name, prompts, _, extra in runs}

    print("\n[3/4] evaluating through diffusers (load_lora_weights) ...", flush=True)
    summary = []
    for name, prompts, what, _ in runs:
        lora = args.out / f"{name}.safetensors"
        plan = plan_from_prompt_text((ROOT / prompts).read_text(encoding="utf-8"))
        report, grid = evaluate_concept_lora(model, lora, plan, EvalOptions(seeds_per_prompt=args.seeds))
        (args.out / f"{name}.eval.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        grid.save(args.out / f"{name}.eval.png")
        summary += describe(name, what, report, seconds[name]) + [f"  grid: {args.out / f'{name}.eval.png'}", ""]
    if BAKED in chosen:
        print(f"\n[4/4] baking {BAKED} into the model and evaluating the merged model ...", flush=True)
        lora = args.out / f"{BAKED}.safetensors"
        merged = bake(model, lora, args.out)
        prompts = next(run[1] for run in RUNS if run[0] == BAKED)
        plan = plan_from_prompt_text((ROOT / prompts).read_text(encoding="utf-8"))
        report, grid = evaluate_merged_model(model, lora, merged, plan, EvalOptions(seeds_per_prompt=args.seeds))
        (args.out / f"{BAKED}.merged.eval.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        grid.save(args.out / f"{BAKED}.merged.eval.png")
        summary += describe_merge(BAKED, report) + [f"  grid: {args.out / f'{BAKED}.merged.eval.png'}", ""]
    print("\n" + "\n".join(summary))
    print(f"Done in {time.perf_counter() - started:.0f} s. LoRAs, reports, grids and TensorBoard logs are in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
