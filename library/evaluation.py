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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from library.errors import UserError
from library.evaluation_metrics import _rate, erase_metrics, open_metrics, value_group
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
        also_erased: further values of the same attribute that one erase LoRA erases (a
            two-concept erase such as red and blue); ``value`` is the first.
    """

    mode: str
    attribute: str
    value: str | None
    negative: str | None = None
    also_erased: tuple[str, ...] = ()

    @property
    def erased(self) -> tuple[str, ...]:
        """Every erased value (empty unless ``mode`` is erase)."""
        return (self.value, *self.also_erased) if self.mode == "erase" and self.value else ()


# ----------------------------------------------------------------------------------------------
# What to measure


def _concept_words(text: str) -> dict[str, str]:
    from library.concept_world import scenes

    lookup = {value: name for name, values in scenes.ATTRIBUTES for value in values}
    cleaned = "".join(ch if ch.isalpha() else " " for ch in text.lower())
    return {lookup[word]: word for word in cleaned.split() if word in lookup}


def _prompt_concept(setting) -> tuple[str, str]:
    """The (attribute, value) a ``[[prompts]]`` setting acts on: its positive's concept words minus
    those of its context (the words its unconditional shares)."""
    words = _concept_words(setting.positive) or _concept_words(setting.prompt)
    context = _concept_words(setting.negative)
    words = {attribute: value for attribute, value in words.items() if context.get(attribute) != value}
    if len(words) != 1:
        raise UserError(f"cannot tell which concept the LoRA {setting.action}s from {setting.positive!r}; pass --{setting.action} WORD")
    (attribute, value), = words.items()
    return attribute, value


def plan_from_prompt_text(toml_text: str) -> EvalPlan:
    """Infer the plan from the prompt TOML stored in the LoRA's metadata (``ss_leco_prompts``).

    ``preserve`` entries (anchors) are not what the LoRA does and are skipped; every erase entry
    counts, so a file erasing red and blue gives one plan with both values.
    """
    from library.prompts import parse_prompt_text

    settings = parse_prompt_text(toml_text, Path("."), "ss_leco_prompts", without_files=True)  # the files are not at hand
    settings = [setting for setting in settings if setting.action != "preserve"]
    if not settings:
        raise UserError("the prompt file only preserves (no erase, enhance or slider entry); nothing to evaluate")
    first = settings[0]
    if not first.source.startswith("[[targets]]"):
        same = [setting for setting in settings if setting.action == first.action and not setting.source.startswith("[[targets]]")]
        concepts = [_prompt_concept(setting) for setting in (same if first.action == "erase" else [first])]
        attributes = sorted({attribute for attribute, _ in concepts})
        if len(attributes) != 1:
            raise UserError(f"the LoRA {first.action}s values of several attributes ({', '.join(attributes)}); pass --{first.action} WORD")
        values = list(dict.fromkeys(value for _, value in concepts))
        return EvalPlan(first.action, attributes[0], values[0], also_erased=tuple(values[1:]))
    plus = next(setting for setting in settings if setting.multiplier > 0)
    if plus.action == "enhance":
        positive, negative = _concept_words(plus.positive), _concept_words(plus.negative)
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
    """The plan given on the command line (``--erase red`` or ``--erase red,blue``, ``--enhance large``,
    ``--slider large,small``)."""
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
    if mode == "enhance" and len(words) > 1:
        raise UserError(f"--enhance {text}: give one value (e.g. small)")
    return EvalPlan(mode, attribute, words[0], also_erased=tuple(dict.fromkeys(words[1:])))


BARE_SEED_FACTOR = 6
"""A bare prompt (``"red"``) is sampled with this many times the seeds of one in-context prompt, so
it gets as many samples as the 6 full prompts that name the value."""


def prompt_sets(plan: EvalPlan) -> dict[str, list[str]]:
    """The prompts to sample, grouped by role.

    erase: for each erased value, ``target`` (in context: the full prompts naming it, e.g.
    ``"a large red square"``) and ``bare`` (the value alone, ``"red"``), with ``/VALUE`` appended
    to the names for the second and later values; then ``others`` (full prompts naming no erased
    value; collateral damage shows there). enhance/slider: ``open`` prompts that name every
    attribute except the one acted on, so the model is free to choose it.
    """
    from library.concept_world import scenes

    if plan.mode == "erase":
        full = scenes.full_prompts()
        groups: dict[str, list[str]] = {}
        for index, value in enumerate(plan.erased):
            groups[value_group("target", index, value)] = [prompt for prompt in full
                                                           if scenes.parse_prompt(prompt)[plan.attribute] == value]
            groups[value_group("bare", index, value)] = [value]
        groups["others"] = [prompt for prompt in full if scenes.parse_prompt(prompt)[plan.attribute] not in plan.erased]
        return groups
    combos = {tuple(sorted((k, v) for k, v in combo.items() if k != plan.attribute)) for combo in scenes.all_attribute_combinations()}
    return {"open": sorted(scenes.make_prompt(dict(combo)) for combo in combos)}


def unprompted_prompts(plan: EvalPlan) -> list[str]:
    """The prompts that leave the erased value's attribute open: how often the base model draws the
    value unasked is the floor an erase can bring it down to (``erased_to_chance``)."""
    return prompt_sets(EvalPlan("enhance", plan.attribute, plan.value))["open"]


SAMPLE_BATCH = 96
"""Samples per U-Net batch when sampling a plan (measured on the 2-vCPU machine: batches of 96
were as fast per sample as any size tried, 256 the slowest)."""


def group_seeds(name: str, seeds_per_prompt: int, base_seed: int = 0) -> list[int]:
    """The noise seeds of every prompt in group ``name`` (bare groups get ``BARE_SEED_FACTOR`` times more)."""
    count = seeds_per_prompt * (BARE_SEED_FACTOR if name.startswith("bare") else 1)
    return [base_seed + index for index in range(count)]


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
    flat_prompts = [prompt for prompt in prompts for _ in seeds]
    flat_seeds = [seed for _ in prompts for seed in seeds]
    return paired_samples(pipe, flat_prompts, flat_seeds, multiplier, steps, guidance_scale)


def paired_samples(pipe, prompts: Sequence[str], seeds: Sequence[int], multiplier: float | None, steps: int,
                   guidance_scale: float, batch_size: int | None = None) -> torch.Tensor:
    """Concept-world latents, one per ``(prompts[i], seeds[i])``, with the LoRA at ``multiplier`` (None: no
    LoRA); ``batch_size`` samples per U-Net call (None: the sampler's default)."""
    from library.concept_world.sampling import sample_latents

    if multiplier is not None:
        pipe.set_adapters([ADAPTER], [multiplier])
    options = {"guidance_scale": guidance_scale, "steps": steps}
    if batch_size is not None:
        options["batch_size"] = batch_size
    return sample_latents(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, list(prompts), list(seeds), **options)


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


@dataclass
class ConceptSamples:
    """Classified samples of a plan's prompt sets at some multipliers.

    Attributes:
        results: ``{multiplier: {group: (predicted, expected)}}`` (see :func:`prompt_sets`).
        columns: ``{multiplier: (rows, H, W, 3) uint8}``: the first seed of the first group's first
            ``grid_rows`` prompts, for the grid.
        unprompted_rate: erase plans sampled at multiplier 0: how often the base model draws the
            erased value for prompts that leave its attribute open.
    """

    results: dict[float, dict[str, tuple[list, list]]]
    columns: dict[float, np.ndarray]
    unprompted_rate: float | None = None

    def merged(self, other: ConceptSamples) -> ConceptSamples:
        """These samples and ``other``'s (e.g. a LoRA's multipliers next to a shared base at 0)."""
        unprompted = self.unprompted_rate if self.unprompted_rate is not None else other.unprompted_rate
        return ConceptSamples({**self.results, **other.results}, {**self.columns, **other.columns}, unprompted)


def sample_concept_plan(pipe, plan: EvalPlan, options: EvalOptions, multipliers: Sequence[float]) -> ConceptSamples:
    """Sample and classify every prompt set of ``plan`` at each multiplier, one batched call per multiplier.

    The same (prompt, seed) gives the same sample whatever else is in the batch, so splitting or
    merging these calls does not change the results. Bare-prompt groups are sampled at
    non-negative multipliers only.
    """
    from library.concept_world import scenes
    from library.concept_world.classifier import classify_latents
    from library.concept_world.sampling import latents_to_rgb

    groups = prompt_sets(plan)
    first_group = next(iter(groups))
    grid_count = min(options.grid_rows, len(groups[first_group]))
    samples = ConceptSamples({}, {})
    for multiplier in multipliers:
        # bare rates count at 0 and 1 (efficacy); a negative weight only shows in the grid
        named = {name: prompts for name, prompts in groups.items() if multiplier >= 0 or not name.startswith("bare")}
        if plan.mode == "erase" and multiplier == 0.0:
            named["unprompted"] = unprompted_prompts(plan)
        flat_prompts: list[str] = []
        flat_seeds: list[int] = []
        spans: dict[str, tuple[int, int, int]] = {}
        for name, prompts in named.items():
            seeds = group_seeds(name, options.seeds_per_prompt, options.base_seed)
            start = len(flat_prompts)
            flat_prompts += [prompt for prompt in prompts for _ in seeds]
            flat_seeds += [seed for _ in prompts for seed in seeds]
            spans[name] = (start, len(flat_prompts), len(seeds))
        latents = paired_samples(pipe, flat_prompts, flat_seeds, multiplier, options.steps, options.guidance_scale, SAMPLE_BATCH)
        predicted = classify_latents(latents)
        samples.results[multiplier] = {}
        for name, (start, end, seed_count) in spans.items():
            group = (predicted[start:end], [scenes.parse_prompt(prompt) for prompt in flat_prompts[start:end]])
            if name == "unprompted":
                samples.unprompted_rate = _rate(group[0], plan.attribute, plan.value)
                continue
            samples.results[multiplier][name] = group
            if name == first_group:
                samples.columns[multiplier] = latents_to_rgb(latents[start:end:seed_count][:grid_count])
    return samples


def plan_metrics(plan: EvalPlan, samples: ConceptSamples) -> dict:
    """The plan's metrics (:func:`erase_metrics` or :func:`open_metrics`) of classified samples."""
    if plan.mode == "erase":
        return erase_metrics(plan, samples.results, samples.unprompted_rate)
    return open_metrics(plan, samples.results)


def evaluate_concept_lora(model: str | Path, lora: str | Path, plan: EvalPlan, options: EvalOptions):
    """Sample, classify and score; returns ``(report, grid image)``."""
    pipe = load_pipeline(model, lora)
    groups = prompt_sets(plan)
    samples = sample_concept_plan(pipe, plan, options, options.multipliers)
    grid_prompts = next(iter(groups.values()))[: options.grid_rows]
    images = [[samples.columns[m][row] for m in options.multipliers] for row in range(len(grid_prompts))]
    grid = make_grid(images, grid_prompts, [f"x{m:g}" for m in options.multipliers])
    report = {
        "model": str(model),
        "lora": str(lora),
        "plan": asdict(plan),
        "options": asdict(options),
        "samples_per_multiplier": sum(len(prompts) * len(group_seeds(name, options.seeds_per_prompt))
                                      for name, prompts in groups.items()),
        "metrics": plan_metrics(plan, samples),
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
    groups = {name: prompts for name, prompts in prompt_sets(plan).items() if not name.startswith("bare")}  # as before issue 12
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
        open_latents = concept_samples(with_lora, unprompted_prompts(plan), seeds, 0.0, options.steps, options.guidance_scale)
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
    """The command line (``python -m tools.evaluate``), kept here for callers; see ``library.evaluation_cli``."""
    from library.evaluation_cli import main as cli_main

    return cli_main(argv)
