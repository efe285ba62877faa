"""Measure what a concept-world model draws: per-attribute accuracy and value rates per prompt."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

import torch

from library.concept_world import scenes
from library.concept_world.classifier import attribute_accuracy, classify_latents, value_rates
from library.concept_world.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, sample_latents

logger = logging.getLogger(__name__)

DEFAULT_PROBE_PROMPTS: tuple[str, ...] = (
    "red",
    "green",
    "blue",
    "yellow",
    "small",
    "large",
    "circle",
    "square",
    "triangle",
    "a large circle",
    "a small square",
    "a red circle",
    "",
)
"""Partial prompts whose sampled attribute rates show that single words carry meaning."""


class Components(Protocol):
    """Anything with the four sampling components (e.g. ``ConceptModel``)."""

    unet: object
    text_encoder: object
    tokenizer: object
    scheduler: object


def prompt_seeds(count: int, base_seed: int = 0) -> list[int]:
    """The noise seeds used for each prompt: ``base_seed .. base_seed + count - 1``."""
    return [base_seed + i for i in range(count)]


def sample_prompts(
    model: Components,
    prompts: Sequence[str],
    seeds_per_prompt: int,
    guidance_scale: float = DEFAULT_GUIDANCE,
    steps: int = DEFAULT_STEPS,
    base_seed: int = 0,
) -> tuple[torch.Tensor, list[str]]:
    """Sample every prompt with the same ``seeds_per_prompt`` seeds.

    Returns:
        ``(latents, prompt_per_sample)``, prompt-major.
    """
    seeds = prompt_seeds(seeds_per_prompt, base_seed)
    flat_prompts = [p for p in prompts for _ in seeds]
    flat_seeds = [s for _ in prompts for s in seeds]
    latents = sample_latents(
        model.unet,
        model.text_encoder,
        model.tokenizer,
        model.scheduler,
        flat_prompts,
        flat_seeds,
        guidance_scale=guidance_scale,
        steps=steps,
    )
    return latents, flat_prompts


def evaluate_full_prompts(
    model: Components,
    seeds_per_prompt: int = 8,
    guidance_scale: float = DEFAULT_GUIDANCE,
    steps: int = DEFAULT_STEPS,
    base_seed: int = 0,
) -> dict[str, object]:
    """Per-attribute accuracy of samples from every full prompt (``"a small red circle"`` ...).

    Returns:
        ``{"accuracy": {attribute: fraction}, "all_correct": fraction, "samples": n,
        "seeds_per_prompt", "guidance_scale", "steps", "sampler", "seconds"}``.
    """
    start = time.perf_counter()
    prompts = scenes.full_prompts()
    latents, flat_prompts = sample_prompts(model, prompts, seeds_per_prompt, guidance_scale, steps, base_seed)
    predicted = classify_latents(latents)
    expected = [scenes.parse_prompt(p) for p in flat_prompts]
    accuracy = attribute_accuracy(predicted, expected)
    all_correct = sum(all(p[k] == e[k] for k in e) for p, e in zip(predicted, expected)) / len(expected)
    result = {
        "accuracy": {k: round(v, 4) for k, v in accuracy.items()},
        "all_correct": round(all_correct, 4),
        "samples": len(expected),
        "prompts": len(prompts),
        "seeds_per_prompt": seeds_per_prompt,
        "guidance_scale": guidance_scale,
        "steps": steps,
        "sampler": "DDIM eta=0, classifier-free guidance with the empty prompt",
        "seconds": round(time.perf_counter() - start, 1),
    }
    logger.info("full-prompt accuracy %s (all three right: %.3f)", result["accuracy"], all_correct)
    return result


def evaluate_prompt_rates(
    model: Components,
    prompts: Sequence[str] = DEFAULT_PROBE_PROMPTS,
    seeds_per_prompt: int = 16,
    guidance_scale: float = DEFAULT_GUIDANCE,
    steps: int = DEFAULT_STEPS,
    base_seed: int = 1000,
) -> dict[str, dict[str, object]]:
    """For each prompt: how often each attribute value is drawn, and the hit rate on what it names.

    Returns:
        ``{prompt: {"requested": {...}, "hit_rate": {attribute: fraction}, "rates": {attribute:
        {value: fraction}}}}``.
    """
    latents, flat_prompts = sample_prompts(model, prompts, seeds_per_prompt, guidance_scale, steps, base_seed)
    predicted = classify_latents(latents)
    report: dict[str, dict[str, object]] = {}
    for i, prompt in enumerate(prompts):
        chunk = predicted[i * seeds_per_prompt : (i + 1) * seeds_per_prompt]
        requested = scenes.parse_prompt(prompt)
        report[prompt] = {
            "requested": requested,
            "hit_rate": attribute_accuracy(chunk, [requested] * len(chunk)),
            "rates": {k: {v: round(r, 3) for v, r in rates.items() if r > 0} for k, rates in value_rates(chunk).items()},
        }
    return report
