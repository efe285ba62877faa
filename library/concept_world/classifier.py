"""A deterministic classifier for concept-world latents: colour, size and shape of the one shape.

Because the four colour vectors form an orthogonal basis of the latent channels, every latent
pixel splits exactly into "how much red, green, blue, yellow" it holds. The classifier

1. takes these per-pixel colour amounts,
2. picks the colour with the most clearly-present mass (amounts above a noise threshold),
3. compares that colour's amount map with every (shape, size, position) coverage mask the scene
   generator can draw (positions extended slightly beyond the border) by cosine similarity, which
   is insensitive to the shape's brightness, and takes the best match.

A latent with almost no coloured mass is reported as ``"none"`` for every attribute.
"""

from __future__ import annotations

import logging

import torch

from library.concept_world.scenes import ATTRIBUTE_NAMES, attribute_values, color_amounts, mask_bank

logger = logging.getLogger(__name__)

NONE = "none"
PRESENCE_THRESHOLD = 0.3
MIN_MASS = 4.0
BANK_MARGIN = -1.0


def classify_detailed(latents: torch.Tensor) -> list[dict[str, object]]:
    """Classify latents and report how confident each decision is.

    Args:
        latents: (B, 4, H, W) concept-world latents (square canvas).

    Returns:
        Per sample: ``size``, ``color``, ``shape`` (values or ``"none"``), ``mass`` (clear colour
        mass in pixel units), ``match`` (cosine similarity of the best mask, 0..1), ``cx``, ``cy``.
    """
    latents = latents.detach().float().cpu()
    if latents.ndim != 4 or latents.shape[1] != 4 or latents.shape[2] != latents.shape[3]:
        raise ValueError(f"expected (B, 4, H, H) latents, got {tuple(latents.shape)}")
    amounts = color_amounts(latents)
    present = (amounts - PRESENCE_THRESHOLD).clamp(min=0).flatten(2).sum(dim=2)  # (B, K)
    color_index = present.argmax(dim=1)
    masks, keys = mask_bank(latents.shape[-1], BANK_MARGIN)
    chosen = amounts[torch.arange(len(latents)), color_index].clamp(min=0).flatten(1)  # (B, HW)
    flat = masks.flatten(1)
    cosine = (chosen @ flat.T) / (chosen.norm(dim=1, keepdim=True) * flat.norm(dim=1)[None] + 1e-8)
    match, best = cosine.max(dim=1)
    colors = attribute_values("color")
    results: list[dict[str, object]] = []
    for i in range(len(latents)):
        mass = float(present[i, color_index[i]])
        shape, size, cx, cy = keys[int(best[i])]
        if mass < MIN_MASS:
            result: dict[str, object] = {name: NONE for name in ATTRIBUTE_NAMES}
        else:
            result = {"size": size, "color": colors[int(color_index[i])], "shape": shape}
        result.update(mass=mass, match=float(match[i]), cx=cx, cy=cy)
        results.append(result)
    return results


def classify_latents(latents: torch.Tensor) -> list[dict[str, str]]:
    """Classify latents into ``{attribute: value}`` per sample.

    Args:
        latents: (B, 4, H, W) concept-world latents.

    Returns:
        One dict per sample with keys ``size``, ``color``, ``shape``; a value is ``"none"`` when
        the latent holds no clear shape.
    """
    return [{name: str(r[name]) for name in ATTRIBUTE_NAMES} for r in classify_detailed(latents)]


def attribute_accuracy(predicted: list[dict[str, str]], expected: list[dict[str, str]]) -> dict[str, float]:
    """Fraction of samples whose predicted value matches the expected one, per attribute.

    Only attributes present in an expected dict are scored for that sample; attributes that are
    never expected are left out.
    """
    if len(predicted) != len(expected):
        raise ValueError("predicted and expected differ in length")
    accuracy: dict[str, float] = {}
    for name in ATTRIBUTE_NAMES:
        pairs = [(p[name], e[name]) for p, e in zip(predicted, expected) if name in e]
        if pairs:
            accuracy[name] = sum(p == e for p, e in pairs) / len(pairs)
    return accuracy


def value_rates(predicted: list[dict[str, str]]) -> dict[str, dict[str, float]]:
    """How often each value (including ``"none"``) was predicted, per attribute."""
    rates: dict[str, dict[str, float]] = {}
    n = max(len(predicted), 1)
    for name in ATTRIBUTE_NAMES:
        counts = {value: 0 for value in attribute_values(name) + (NONE,)}
        for p in predicted:
            counts[p[name]] = counts.get(p[name], 0) + 1
        rates[name] = {value: count / n for value, count in counts.items()}
    return rates
