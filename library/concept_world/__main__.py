"""Command line: ``python -m library.concept_world build|eval``.

``build`` trains the concept-world model and writes a diffusers folder (default: the cache folder
that :func:`ensure_concept_model` uses). ``eval`` samples every full prompt with CFG and prints
per-attribute accuracy as JSON (optionally single-word prompt rates and a PNG grid).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m library.concept_world", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="train and save the concept-world model")
    build.add_argument("--out", type=Path, default=None, help="destination folder (default: the cache folder)")
    build.add_argument("--seed", type=int, default=None, help="training seed")
    build.add_argument("--steps", type=int, default=None, help="training steps")
    build.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    build.add_argument("--eval-seeds", type=int, default=8, help="seeds per full prompt for the stored accuracy")
    build.add_argument("--no-eval", action="store_true", help="skip the accuracy measurement")
    ev = sub.add_parser("eval", help="measure a model's per-attribute accuracy")
    ev.add_argument("--model", type=Path, default=None, help="model folder (default: the cached model, built if missing)")
    ev.add_argument("--seeds", type=int, default=8, help="seeds per full prompt")
    ev.add_argument("--guidance", type=float, default=None, help="CFG scale")
    ev.add_argument("--steps", type=int, default=None, help="DDIM steps")
    ev.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ev.add_argument("--probe", action="store_true", help="also report rates for single-attribute prompts")
    ev.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    ev.add_argument("--grid", type=Path, default=None, help="write a PNG grid of one sample per full prompt")
    return parser


def _build(args: argparse.Namespace) -> dict:
    from library.concept_world.model import VERSION, ModelConfig, build_concept_model, default_cache_dir

    config = ModelConfig()
    overrides = {k: v for k, v in (("seed", args.seed), ("train_steps", args.steps), ("threads", args.threads)) if v is not None}
    config = replace(config, **overrides)
    out = args.out or default_cache_dir() / VERSION
    folder = build_concept_model(out, config, evaluate=not args.no_eval, eval_seeds=args.eval_seeds)
    meta = json.loads((folder / "concept_world.json").read_text(encoding="utf-8"))
    return {"model": str(folder), "train_seconds": meta["train_seconds"], "base_accuracy": meta.get("base_accuracy")}


def _eval(args: argparse.Namespace) -> dict:
    from library.concept_world import scenes
    from library.concept_world.evaluate import evaluate_full_prompts, evaluate_prompt_rates
    from library.concept_world.model import ensure_concept_model, load_concept_model, torch_threads
    from library.concept_world.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, sample_latents, save_latent_grid

    folder = args.model or ensure_concept_model()
    model = load_concept_model(folder)
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    steps = args.steps or DEFAULT_STEPS
    result: dict = {"model": str(folder)}
    with torch_threads(args.threads):
        result["full_prompts"] = evaluate_full_prompts(model, args.seeds, guidance, steps)
        if args.probe:
            result["prompt_rates"] = evaluate_prompt_rates(model, guidance_scale=guidance, steps=steps)
        if args.grid:
            prompts = scenes.full_prompts()
            latents = sample_latents(
                model.unet, model.text_encoder, model.tokenizer, model.scheduler, prompts, [0] * len(prompts), guidance_scale=guidance, steps=steps
            )
            result["grid"] = str(save_latent_grid(latents, args.grid, columns=6))
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    from library.quiet import quiet_third_party_output

    quiet_third_party_output()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = _build(args) if args.command == "build" else _eval(args)
    text = json.dumps(result, indent=2)
    print(text)
    if getattr(args, "json", None):
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
