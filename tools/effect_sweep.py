"""Measure how training flags move LECO's effect on the concept world (the tables in docs/evaluation.md).

Each variant trains one LoRA with ``train_leco.main`` from an ``examples/concept_*.toml`` prompt
file (TOML fields can be overridden per variant), evaluates it through diffusers'
``load_lora_weights`` and prints one Markdown row: seconds, erase/enhance/slider metrics and
preservation.

    python -m tools.effect_sweep                     # every variant below (about 25 minutes on 2 cores)
    python -m tools.effect_sweep --only erase        # variants whose name starts with "erase"
    python -m tools.effect_sweep --only erase --steps 30   # the erase variants before they saturate
    python -m tools.effect_sweep --steps 300 --json out.json
    python -m tools.effect_sweep --only "erase layers" --steps 50 --train_seed 1   # block options, another seed
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The demo's and the effect tests' settings; every variant starts from these.
BASE_FLAGS = {
    "max_denoising_steps": "20",
    "learning_rate": "2e-3",
    "network_dim": "4",
    "network_alpha": "4",
    "seed": "0",
}


@dataclass(frozen=True)
class Variant:
    """One training run: a prompt file, TOML field overrides and extra flags."""

    name: str
    prompts: str
    toml: dict = field(default_factory=dict)
    flags: dict = field(default_factory=dict)
    switches: tuple[str, ...] = ()
    eval_multipliers: tuple[float, ...] | None = None  # default: 0, 1 (and -1 for sliders)


SLIDER_WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0)

VARIANTS = (
    Variant("erase default", "concept_erase_red.toml"),
    Variant("erase guidance_scale=2", "concept_erase_red.toml", toml={"guidance_scale": 2.0}),
    Variant("erase guidance_scale=0.5", "concept_erase_red.toml", toml={"guidance_scale": 0.5}),
    Variant("erase multiplier=2", "concept_erase_red.toml", toml={"multiplier": 2.0}, eval_multipliers=(0.0, 1.0, 2.0)),
    Variant("erase train_method=xattn", "concept_erase_red.toml", flags={"network_args": "train_method=xattn"}),
    Variant("erase max_denoising_steps=5", "concept_erase_red.toml", flags={"max_denoising_steps": "5"}),
    Variant("erase max_denoising_steps=40", "concept_erase_red.toml", flags={"max_denoising_steps": "40"}),
    Variant("erase --leco_denoise_with_frozen", "concept_erase_red.toml", switches=("--leco_denoise_with_frozen",)),
    Variant("erase --leco_legacy_timestep", "concept_erase_red.toml", switches=("--leco_legacy_timestep",)),
    Variant("erase max_train_steps=50", "concept_erase_red.toml", flags={"max_train_steps": "50"}),
    # Layer control (networks.lora block options). The concept world's U-Net has transformer blocks only
    # at IN03, MID and OUT02/OUT03, so the default LoRA's 48 modules are 12 down, 12 middle, 24 up.
    Variant("erase layers: all blocks", "concept_erase_red.toml"),
    Variant("erase layers: up only", "concept_erase_red.toml", flags={"network_args": "down_lr_weight=zeros mid_lr_weight=0"}),
    Variant("erase layers: down only", "concept_erase_red.toml", flags={"network_args": "up_lr_weight=zeros mid_lr_weight=0"}),
    Variant("erase layers: down only, lr x4", "concept_erase_red.toml",
            flags={"network_args": "down_lr_weight=zeros+4 up_lr_weight=zeros mid_lr_weight=0"}),
    Variant("erase layers: middle only", "concept_erase_red.toml",
            flags={"network_args": "down_lr_weight=zeros up_lr_weight=zeros"}),
    Variant("erase layers: middle lr x2", "concept_erase_red.toml", flags={"network_args": "mid_lr_weight=2"}),
    Variant("erase layers: middle lr x0.5", "concept_erase_red.toml", flags={"network_args": "mid_lr_weight=0.5"}),
    Variant("erase layers: up + middle", "concept_erase_red.toml", flags={"network_args": "down_lr_weight=zeros"}),
    Variant("erase layers: LoRA+ ratio 4", "concept_erase_red.toml", flags={"network_args": "loraplus_lr_ratio=4"}),
    Variant("slider default", "concept_slider_size.toml", eval_multipliers=SLIDER_WEIGHTS),
    Variant("slider guidance_scale=2", "concept_slider_size.toml", toml={"guidance_scale": 2.0}, eval_multipliers=SLIDER_WEIGHTS),
    Variant("enhance default", "concept_enhance_small.toml"),
)


def override_toml(text: str, values: dict) -> str:
    """Set ``key = value`` on every line that assigns ``key`` (top level and entries); append at
    the top when the file never sets it."""
    for key, value in values.items():
        literal = json.dumps(value)
        pattern = re.compile(rf"^(\s*{re.escape(key)}\s*=\s*).*$", re.MULTILINE)
        if pattern.search(text):
            text = pattern.sub(lambda match: match.group(1) + literal, text)
        elif "[[prompts]]" in text:
            text = text.replace("[[prompts]]", f"[[prompts]]\n{key} = {literal}")
        else:
            text = f"{key} = {literal}\n" + text
    return text


def run_variant(model: Path, variant: Variant, steps: int, out: Path, seeds: int, train_seed: int = 0) -> dict:
    """Train and evaluate one variant; returns its metrics and timings."""
    import train_leco
    from library.evaluation import EvalOptions, evaluate_concept_lora, plan_from_prompt_text

    text = override_toml((ROOT / "examples" / variant.prompts).read_text(encoding="utf-8"), variant.toml)
    slug = re.sub(r"[^a-z0-9]+", "_", variant.name.lower()).strip("_")
    prompts = out / f"{slug}.toml"
    prompts.write_text(text, encoding="utf-8")
    flags = {**BASE_FLAGS, "seed": str(train_seed), "max_train_steps": str(steps), **variant.flags}
    argv = ["--pretrained_model_name_or_path", str(model), "--prompts_file", str(prompts), "--output_dir", str(out),
            "--output_name", slug, "--console_log_level", "WARNING"]
    for key, value in flags.items():
        argv += [f"--{key}", *value.split()]
    argv += list(variant.switches)
    started = time.perf_counter()
    if train_leco.main(argv) != 0:
        raise RuntimeError(f"training {variant.name} failed")
    train_seconds = time.perf_counter() - started
    plan = plan_from_prompt_text(text)
    multipliers = variant.eval_multipliers or ((-1.0, 0.0, 1.0) if plan.mode == "slider" else (0.0, 1.0))
    report, grid = evaluate_concept_lora(model, out / f"{slug}.safetensors", plan,
                                         EvalOptions(multipliers=multipliers, seeds_per_prompt=seeds))
    grid.save(out / f"{slug}.eval.png")
    return {"name": variant.name, "mode": plan.mode, "train_seconds": round(train_seconds, 1),
            "eval_seconds": round(time.perf_counter() - started - train_seconds, 1), "metrics": report["metrics"]}


def markdown_row(result: dict) -> str:
    """One table row per mode (columns differ between erase and enhance/slider)."""
    m = result["metrics"]
    per = m["per_multiplier"]
    if result["mode"] == "erase":
        rates = " → ".join(f"{per[k]['target_rate']:.2f}" for k in sorted(per))
        cells = [rates, f"{m.get('erased_to_chance', 0):.2f}",
                 f"{per[1.0]['preserved_other_attributes']:.0%}", f"{m['preservation_other_prompts']:.1%}"]
    elif result["mode"] == "slider":
        cells = [", ".join(f"{per[k]['rate']:.2f}" for k in sorted(per)), "yes" if m["monotonic"] else "no",
                 f"{m['span']:.2f}", f"{min(row['preserved_other_attributes'] for row in per.values()):.0%}"]
    else:
        cells = [f"{per[0.0]['rate']:.2f} → {per[1.0]['rate']:.2f}", f"{m['enhance_strength']:+.2f}",
                 f"{per[1.0]['preserved_other_attributes']:.0%}"]
    return f"| {result['name']} | {result['train_seconds']:.0f} s | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per LoRA (default 150, as the demo)")
    parser.add_argument("--seeds", type=int, default=4, help="evaluation seeds per prompt (default 4, as the effect tests)")
    parser.add_argument("--train_seed", type=int, default=0, help="training --seed of every variant (default 0)")
    parser.add_argument("--only", nargs="*", default=None, help="run only variants whose names start with one of these")
    parser.add_argument("--out", type=Path, default=None, help="keep LoRAs, grids and prompt files here")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this file")
    args = parser.parse_args(argv)
    from tools.study_setup import concept_study_model

    model = concept_study_model()
    variants = [v for v in VARIANTS if args.only is None or v.name.startswith(tuple(args.only))]
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        for variant in variants:
            result = run_variant(model, variant, args.steps, out, args.seeds, args.train_seed)
            results.append(result)
            print(markdown_row(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
