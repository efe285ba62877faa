"""Evaluate a LECO LoRA the way a user would use it: loaded by diffusers' ``load_lora_weights``.

For the built-in concept world (a model folder with ``concept_world.json``) every sample is
classified, so the effect is measured: erase efficacy, preservation of everything else, enhance
strength, slider monotonicity. For any other model the evaluator still writes the image grid
(decoded through the model's VAE), without metrics.

    python -m tools.evaluate --model .cache/concept_world/v1 --lora demo_output/erase_red.safetensors
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from library.errors import UserError
from library.sampling import make_grid

logger = logging.getLogger(__name__)

ADAPTER = "leco"


@dataclass(frozen=True)
class EvalPlan:
    """What the LoRA was trained to do, in concept-world terms.

    Attributes:
        mode: ``"erase"``, ``"enhance"`` or ``"slider"``.
        attribute: the attribute it acts on (``"color"``, ``"size"``, ``"shape"``).
        value: the erased/enhanced value, or the slider's positive pole (None for a negative-only slider).
        negative: the slider's negative pole (None otherwise, or for a positive-only slider).
    """

    mode: str
    attribute: str
    value: str | None
    negative: str | None = None


# ----------------------------------------------------------------------------------------------
# What to measure


def _concept_words(text: str) -> dict[str, str]:
    from library.concept_world import scenes

    lookup = {value: name for name, values in scenes.ATTRIBUTES for value in values}
    cleaned = "".join(ch if ch.isalpha() else " " for ch in text.lower())
    return {lookup[word]: word for word in cleaned.split() if word in lookup}


def plan_from_prompt_text(toml_text: str) -> EvalPlan:
    """Infer the plan from the prompt TOML stored in the LoRA's metadata (``ss_leco_prompts``)."""
    from library.prompts import parse_prompt_text

    settings = parse_prompt_text(toml_text, Path("."), "ss_leco_prompts")
    first = settings[0]
    if not first.source.startswith("[[targets]]"):
        words = _concept_words(first.positive) or _concept_words(first.target)
        context = _concept_words(first.unconditional)
        words = {attribute: value for attribute, value in words.items() if context.get(attribute) != value}
        if len(words) != 1:
            raise UserError(f"cannot tell which concept the LoRA {first.action}s from {first.positive!r}; pass --{first.action} WORD")
        (attribute, value), = words.items()
        return EvalPlan(first.action, attribute, value)
    plus = next(setting for setting in settings if setting.multiplier > 0)
    if plus.action == "enhance":
        positive, negative = _concept_words(plus.positive), _concept_words(plus.unconditional)
    else:  # a negative-only slider: its +m direction erases the negative pole
        positive, negative = {}, _concept_words(plus.positive)
    baseline = _concept_words(plus.neutral)
    moved = [attribute for attribute in sorted(set(positive) | set(negative))
             if positive.get(attribute) != negative.get(attribute)
             and (positive.get(attribute) or negative.get(attribute)) != baseline.get(attribute)]
    if len(moved) != 1:
        raise UserError("cannot tell which concept-world attribute the slider moves; pass --slider POS,NEG")
    attribute = moved[0]
    return EvalPlan("slider", attribute, positive.get(attribute), negative.get(attribute))


def plan_from_flags(erase: str | None, enhance: str | None, slider: str | None) -> EvalPlan | None:
    """The plan given on the command line (``--erase red``, ``--enhance large``, ``--slider large,small``)."""
    chosen = [(mode, text) for mode, text in (("erase", erase), ("enhance", enhance), ("slider", slider)) if text]
    if not chosen:
        return None
    if len(chosen) > 1:
        raise UserError("use only one of --erase, --enhance, --slider")
    mode, text = chosen[0]
    words = [word.strip() for word in text.split(",")]
    found = [_concept_words(word) for word in words]
    if not all(len(item) == 1 for item in found) or len({next(iter(item)) for item in found}) != 1:
        raise UserError(f"--{mode} {text}: give concept-world values of one attribute, e.g. red or large,small")
    attribute = next(iter(found[0]))
    if mode == "slider":
        if len(words) != 2:
            raise UserError(f"--slider {text}: give two values, positive,negative (e.g. large,small)")
        return EvalPlan("slider", attribute, words[0], words[1])
    return EvalPlan(mode, attribute, words[0])


def prompt_sets(plan: EvalPlan) -> dict[str, list[str]]:
    """The prompts to sample, grouped by role.

    erase: ``target`` (full prompts naming the erased value) and ``others`` (full prompts that do
    not; collateral damage shows there). enhance/slider: ``open`` prompts that name every
    attribute except the one acted on, so the model is free to choose it.
    """
    from library.concept_world import scenes

    if plan.mode == "erase":
        full = scenes.full_prompts()
        target = [prompt for prompt in full if scenes.parse_prompt(prompt)[plan.attribute] == plan.value]
        others = [prompt for prompt in full if prompt not in target]
        return {"target": target, "others": others}
    combos = {tuple(sorted((k, v) for k, v in combo.items() if k != plan.attribute)) for combo in scenes.all_attribute_combinations()}
    return {"open": sorted(scenes.make_prompt(dict(combo)) for combo in combos)}


# ----------------------------------------------------------------------------------------------
# Metrics (pure)


def _rate(predicted: Sequence[dict], attribute: str, value: str) -> float:
    return sum(item[attribute] == value for item in predicted) / max(len(predicted), 1)


def _accuracy(predicted: Sequence[dict], expected: Sequence[dict], skip: str | None = None) -> float:
    pairs = [(p[k], e[k]) for p, e in zip(predicted, expected) for k in e if k != skip]
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


def erase_metrics(plan: EvalPlan, results: dict[float, dict[str, tuple[list, list]]], unprompted_rate: float | None = None) -> dict:
    """Target rate and preservation per multiplier, and efficacy ``1 - rate(1) / rate(0)``.

    LECO's erase maps the concept onto what the frozen model draws when the concept is not asked
    for, so the erased value can only fall to its ``unprompted_rate`` (how often the model draws it
    unasked: about 1/4 for one of four colours). ``erased_to_chance`` measures against that floor:
    1.0 means "red" no longer makes red any likelier than not asking for a colour.
    """
    per = {}
    for multiplier, groups in results.items():
        target_pred, target_exp = groups["target"]
        other_pred, other_exp = groups["others"]
        per[multiplier] = {
            "target_rate": round(_rate(target_pred, plan.attribute, plan.value), 4),
            "preserved_other_attributes": round(_accuracy(target_pred, target_exp, skip=plan.attribute), 4),
            "preserved_other_prompts": round(_accuracy(other_pred, other_exp), 4),
        }
    base, on = per.get(0.0), per.get(1.0)
    summary = {}
    if base and on:
        summary = {
            "erase_efficacy": round(1 - on["target_rate"] / base["target_rate"], 4) if base["target_rate"] else None,
            "preservation_other_attributes": round(on["preserved_other_attributes"] / max(base["preserved_other_attributes"], 1e-9), 4),
            "preservation_other_prompts": round(on["preserved_other_prompts"] / max(base["preserved_other_prompts"], 1e-9), 4),
        }
        if unprompted_rate is not None:
            summary["unprompted_rate"] = round(unprompted_rate, 4)
            headroom = base["target_rate"] - unprompted_rate
            if headroom > 0:
                summary["erased_to_chance"] = round((base["target_rate"] - on["target_rate"]) / headroom, 4)
    return {"per_multiplier": per, **summary}


def open_metrics(plan: EvalPlan, results: dict[float, dict[str, tuple[list, list]]]) -> dict:
    """Enhance strength (``rate(1) - rate(0)``) or slider rates and monotonicity across multipliers."""
    per = {}
    for multiplier, groups in results.items():
        predicted, expected = groups["open"]
        row = {"preserved_other_attributes": round(_accuracy(predicted, expected), 4)}
        if plan.value:
            row["rate"] = round(_rate(predicted, plan.attribute, plan.value), 4)
        if plan.negative:
            row["negative_rate"] = round(_rate(predicted, plan.attribute, plan.negative), 4)
        per[multiplier] = row
    ordered = [per[m] for m in sorted(per)]
    summary: dict = {}
    if plan.mode == "enhance" and 0.0 in per and 1.0 in per:
        summary["enhance_strength"] = round(per[1.0]["rate"] - per[0.0]["rate"], 4)
    if plan.mode == "slider":
        rising = all(a.get("rate", 0) <= b.get("rate", 0) for a, b in zip(ordered, ordered[1:]))
        falling = all(a.get("negative_rate", 0) >= b.get("negative_rate", 0) for a, b in zip(ordered, ordered[1:]))
        summary["monotonic"] = rising and falling
        key = "rate" if plan.value else "negative_rate"
        summary["span"] = round(abs(ordered[-1][key] - ordered[0][key]), 4)
    return {"per_multiplier": per, **summary}


# ----------------------------------------------------------------------------------------------
# Sampling through diffusers


def load_pipeline(model: str | Path, lora: str | Path | None):
    """A diffusers pipeline for ``model`` with the LoRA loaded by ``load_lora_weights`` (None: no LoRA)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = json.loads((Path(model) / "model_index.json").read_text(encoding="utf-8"))
    pipeline_class = StableDiffusionXLPipeline if "text_encoder_2" in index else StableDiffusionPipeline
    extra = {} if pipeline_class is StableDiffusionXLPipeline else {"safety_checker": None, "requires_safety_checker": False}
    for name in ("vae", "feature_extractor", "image_encoder"):  # absent parts (the concept world has no VAE)
        if not (isinstance(index.get(name), list) and index[name][0]):
            extra[name] = None
    pipe = pipeline_class.from_pretrained(str(model), **extra)
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name=ADAPTER)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def concept_samples(pipe, prompts: Sequence[str], seeds: Sequence[int], multiplier: float | None, steps: int,
                    guidance_scale: float) -> torch.Tensor:
    """Concept-world latents for every (prompt, seed) with the LoRA at ``multiplier`` (None: a pipeline without LoRA)."""
    from library.concept_world.sampling import sample_latents

    if multiplier is not None:
        pipe.set_adapters([ADAPTER], [multiplier])
    flat_prompts = [prompt for prompt in prompts for _ in seeds]
    flat_seeds = [seed for _ in prompts for seed in seeds]
    return sample_latents(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, flat_prompts, flat_seeds,
                          guidance_scale=guidance_scale, steps=steps)


def image_samples(pipe, prompts: Sequence[str], seed: int, multiplier: float, steps: int, guidance_scale: float,
                  size: int | None) -> list[np.ndarray]:
    """Decoded images (through the model's VAE) for a real model, one per prompt."""
    pipe.set_adapters([ADAPTER], [multiplier])
    images = []
    for prompt in prompts:
        generator = torch.Generator().manual_seed(seed)
        output = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                      height=size, width=size, output_type="np")
        images.append((output.images[0] * 255).round().astype(np.uint8))
    return images


@dataclass(frozen=True)
class EvalOptions:
    """Sampling settings of an evaluation."""

    multipliers: tuple[float, ...] = (-1.0, 0.0, 1.0)
    seeds_per_prompt: int = 8
    steps: int = 25
    guidance_scale: float = 5.0
    grid_rows: int = 6
    base_seed: int = 0


def evaluate_concept_lora(model: str | Path, lora: str | Path, plan: EvalPlan, options: EvalOptions):
    """Sample, classify and score; returns ``(report, grid image)``."""
    from library.concept_world import scenes
    from library.concept_world.classifier import classify_latents
    from library.concept_world.sampling import latents_to_rgb

    pipe = load_pipeline(model, lora)
    groups = prompt_sets(plan)
    seeds = [options.base_seed + index for index in range(options.seeds_per_prompt)]
    first_group = next(iter(groups))
    grid_prompts = groups[first_group][: options.grid_rows]
    results: dict[float, dict[str, tuple[list, list]]] = {}
    columns: dict[float, np.ndarray] = {}
    for multiplier in options.multipliers:
        results[multiplier] = {}
        for name, prompts in groups.items():
            latents = concept_samples(pipe, prompts, seeds, multiplier, options.steps, options.guidance_scale)
            predicted = classify_latents(latents)
            expected = [scenes.parse_prompt(prompt) for prompt in prompts for _ in seeds]
            results[multiplier][name] = (predicted, expected)
            if name == first_group:
                first_seed = latents[:: len(seeds)][: len(grid_prompts)]
                columns[multiplier] = latents_to_rgb(first_seed)
    if plan.mode == "erase":
        unprompted = prompt_sets(EvalPlan("enhance", plan.attribute, plan.value))["open"]
        latents = concept_samples(pipe, unprompted, seeds, 0.0, options.steps, options.guidance_scale)
        metrics = erase_metrics(plan, results, _rate(classify_latents(latents), plan.attribute, plan.value))
    else:
        metrics = open_metrics(plan, results)
    images = [[columns[m][row] for m in options.multipliers] for row in range(len(grid_prompts))]
    grid = make_grid(images, grid_prompts, [f"x{m:g}" for m in options.multipliers])
    report = {
        "model": str(model),
        "lora": str(lora),
        "plan": asdict(plan),
        "options": asdict(options),
        "samples_per_multiplier": sum(len(prompts) for prompts in groups.values()) * len(seeds),
        "metrics": metrics,
    }
    return report, grid


def evaluate_images_only(model: str | Path, lora: str | Path, prompts: Sequence[str], options: EvalOptions,
                         size: int | None = None):
    """For real models: a grid of decoded images (rows prompts, columns multipliers), no metrics."""
    pipe = load_pipeline(model, lora)
    if getattr(pipe, "vae", None) is None:
        raise UserError(f"{model} has no VAE to decode images with")
    columns = {m: image_samples(pipe, prompts, options.base_seed, m, options.steps, options.guidance_scale, size)
               for m in options.multipliers}
    images = [[columns[m][row] for m in options.multipliers] for row in range(len(prompts))]
    grid = make_grid(images, list(prompts), [f"x{m:g}" for m in options.multipliers])
    return {"model": str(model), "lora": str(lora), "options": asdict(options), "metrics": None}, grid


def evaluate_merged_model(model: str | Path, lora: str | Path, merged: str | Path, plan: EvalPlan, options: EvalOptions,
                          ratio: float = 1.0):
    """Compare a model with the LoRA baked in (``networks/merge_lora.py``) with the LoRA loaded at ``ratio``.

    Samples the plan's prompts with the same seeds three ways: the base model (LoRA at 0), the base
    model with the LoRA at ``ratio`` (``load_lora_weights``), and the merged model alone. Both
    variants get the evaluator's metrics against the same base; ``same_classification`` is the
    share of samples classified identically (every attribute) with the LoRA and with the merge.

    Returns:
        ``(report, grid)``; grid columns: base, LoRA x ratio, merged.
    """
    from library.concept_world import scenes
    from library.concept_world.classifier import classify_latents
    from library.concept_world.sampling import latents_to_rgb

    with_lora, baked = load_pipeline(model, lora), load_pipeline(merged, None)
    groups = prompt_sets(plan)
    seeds = [options.base_seed + index for index in range(options.seeds_per_prompt)]
    runs: dict[str, dict[str, tuple[list, list]]] = {"base": {}, "lora": {}, "merged": {}}
    agree, total, largest = 0, 0, 0.0
    first_group = next(iter(groups))
    grid_prompts = groups[first_group][: options.grid_rows]
    columns = {}
    for name, prompts in groups.items():
        expected = [scenes.parse_prompt(prompt) for prompt in prompts for _ in seeds]
        latents = {
            "base": concept_samples(with_lora, prompts, seeds, 0.0, options.steps, options.guidance_scale),
            "lora": concept_samples(with_lora, prompts, seeds, ratio, options.steps, options.guidance_scale),
            "merged": concept_samples(baked, prompts, seeds, None, options.steps, options.guidance_scale),
        }
        predicted = {key: classify_latents(value) for key, value in latents.items()}
        for key in runs:
            runs[key][name] = (predicted[key], expected)
        agree += sum(a == b for a, b in zip(predicted["lora"], predicted["merged"]))
        total += len(expected)
        largest = max(largest, float((latents["lora"] - latents["merged"]).abs().max()))
        if name == first_group:
            columns = {key: latents_to_rgb(value[:: len(seeds)][: len(grid_prompts)]) for key, value in latents.items()}
    if plan.mode == "erase":
        unprompted = prompt_sets(EvalPlan("enhance", plan.attribute, plan.value))["open"]
        open_latents = concept_samples(with_lora, unprompted, seeds, 0.0, options.steps, options.guidance_scale)
        rate = _rate(classify_latents(open_latents), plan.attribute, plan.value)

        def score(variant):
            return erase_metrics(plan, {0.0: runs["base"], 1.0: runs[variant]}, rate)
    else:
        def score(variant):
            return open_metrics(plan, {0.0: runs["base"], 1.0: runs[variant]})
    images = [[columns[key][row] for key in ("base", "lora", "merged")] for row in range(len(grid_prompts))]
    grid = make_grid(images, grid_prompts, ["base", f"LoRA x{ratio:g}", "merged"])
    report = {
        "model": str(model), "lora": str(lora), "merged": str(merged), "ratio": ratio, "plan": asdict(plan),
        "options": asdict(options), "samples": total,
        "lora_metrics": score("lora"), "merged_metrics": score("merged"),
        "same_classification": round(agree / max(total, 1), 4), "max_latent_difference": largest,
    }
    return report, grid


def is_concept_world(model: str | Path) -> bool:
    return (Path(model) / "concept_world.json").is_file()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: evaluate one LoRA; prints the JSON report, writes it and the grid."""
    import argparse

    from networks.lora_files import read_lora_metadata

    parser = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="diffusers model folder (the concept world or a real model)")
    parser.add_argument("--lora", required=True, help="LoRA .safetensors to evaluate")
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
    parser.add_argument("--grid", help="grid PNG path (default: next to the LoRA, NAME.eval.png)")
    from library.cli import join_signed_lists

    args = parser.parse_args(join_signed_lists(list(sys.argv[1:] if argv is None else argv), ("--multipliers",)))
    from library.quiet import quiet_third_party_output

    quiet_third_party_output()
    try:
        multipliers = tuple(float(item) for item in args.multipliers.replace("=", "").split(","))
        lora = Path(args.lora)
        if not lora.is_file():
            raise UserError(f"--lora: not found: {lora}")
        if not (Path(args.model) / "model_index.json").is_file():
            raise UserError(f"--model: {args.model} is not a diffusers model folder")
        options = EvalOptions(multipliers=multipliers, seeds_per_prompt=args.seeds, steps=args.steps,
                              guidance_scale=args.guidance_scale)
        if is_concept_world(args.model):
            plan = plan_from_flags(args.erase, args.enhance, args.slider)
            if plan is None:
                text = read_lora_metadata(lora).get("ss_leco_prompts")
                if not text:
                    raise UserError(f"{lora.name} has no ss_leco_prompts metadata; pass --erase/--enhance/--slider")
                plan = plan_from_prompt_text(text)
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
