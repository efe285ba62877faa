"""The newcomer's demo: see LECO erase a concept and make a slider, on a CPU, in minutes.

1. Build (or reuse) the concept-world model: a tiny text-to-image model the project trains itself
   on synthetic scenes (colours, sizes, shapes), saved as a normal diffusers folder.
2. Train two LoRAs with ``accelerate launch train_leco.py``: erase "red", and a large/small slider
   (prompt files in ``examples/concept_*.toml``).
3. Evaluate both through diffusers' ``load_lora_weights`` at multipliers -1, 0, 1 and print the
   before/after table; write image grids.

    bash scripts/demo.sh                # or: python -m tools.demo [--steps N] [--out DIR]
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
    subprocess.run(command, cwd=ROOT, check=True)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "demo_output", help="where LoRAs, grids and reports go")
    parser.add_argument("--steps", type=int, default=150, help="training steps per LoRA (default 150)")
    parser.add_argument("--seeds", type=int, default=4, help="evaluation seeds per prompt (default 4)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    from library.quiet import quiet_third_party_output

    quiet_third_party_output()
    # the concept-world build reports its progress (loss every few hundred steps) through logging
    logging.basicConfig(level=logging.WARNING, format="      %(message)s")
    logging.getLogger("library.concept_world").setLevel(logging.INFO)

    from library.concept_world.model import ensure_concept_model
    from library.evaluation import EvalOptions, evaluate_concept_lora, plan_from_prompt_text

    started = time.perf_counter()
    print("[1/3] concept-world model (built once, then cached) ...", flush=True)
    model = ensure_concept_model()
    world = json.loads((model / "concept_world.json").read_text(encoding="utf-8"))
    print(f"      {model}  base accuracy: {world.get('base_accuracy', {}).get('accuracy')}", flush=True)

    print("[2/3] training LoRAs ...", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = {name: train(model, name, prompts, args.out, args.steps, extra) for name, prompts, _, extra in RUNS}

    print("\n[3/3] evaluating through diffusers (load_lora_weights) ...", flush=True)
    summary = []
    for name, prompts, what, _ in RUNS:
        lora = args.out / f"{name}.safetensors"
        plan = plan_from_prompt_text((ROOT / prompts).read_text(encoding="utf-8"))
        report, grid = evaluate_concept_lora(model, lora, plan, EvalOptions(seeds_per_prompt=args.seeds))
        (args.out / f"{name}.eval.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        grid.save(args.out / f"{name}.eval.png")
        summary += describe(name, what, report, seconds[name]) + [f"  grid: {args.out / f'{name}.eval.png'}", ""]
    print("\n" + "\n".join(summary))
    print(f"Done in {time.perf_counter() - started:.0f} s. LoRAs, reports, grids and TensorBoard logs are in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
