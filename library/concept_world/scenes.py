"""Synthetic scenes drawn straight into Stable Diffusion's 4-channel latent layout.

A scene is one flat shape on a near-zero, slightly noisy background. Three attributes each have a
clear signature in the latent:

* ``color``: the 4-channel vector every covered pixel carries. The four colour vectors are the
  non-constant and constant rows of a 4x4 Hadamard matrix, so they are mutually orthogonal and
  every latent pixel decomposes uniquely into "how much of each colour" it holds.
* ``size``: the shape's extent in latent pixels (``small`` 8, ``large`` 12 on a 16x16 canvas).
* ``shape``: circle, square or an upward triangle, drawn with anti-aliased edges (4x4
  super-sampling) so the three fill their bounding boxes by about 79 %, 100 % and 50 %.

Shapes sit near the canvas centre (at most ``POSITION_JITTER`` pixels off, in half-pixel steps),
which keeps the generative task small enough to learn in minutes on a CPU; the classifier still
searches every half-pixel position, so it also reads off-centre generations.

The prompt grammar is ``[a] [size] [color] [shape]``; any subset of the three attribute words may
be present. Attributes a prompt leaves out are drawn at random, so a model trained on these
prompts learns what a single word such as ``red`` or ``large`` means on its own.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

LATENT_SIZE = 16
"""Default canvas side in latent pixels (a "128 px" image in SD terms)."""

ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("size", ("small", "large")),
    ("color", ("red", "green", "blue", "yellow")),
    ("shape", ("circle", "square", "triangle")),
)
"""Attribute names with their values, in prompt word order."""

ATTRIBUTE_NAMES: tuple[str, ...] = tuple(name for name, _ in ATTRIBUTES)

COLOR_VECTORS: tuple[tuple[float, float, float, float], ...] = (
    (1.0, -1.0, 1.0, -1.0),  # red
    (1.0, 1.0, -1.0, -1.0),  # green
    (1.0, -1.0, -1.0, 1.0),  # blue
    (1.0, 1.0, 1.0, 1.0),  # yellow
)
"""Latent vector of each colour, in the order of the ``color`` attribute (orthogonal, norm 2)."""

DISPLAY_RGB: tuple[tuple[float, float, float], ...] = (
    (0.95, 0.15, 0.1),
    (0.15, 0.8, 0.2),
    (0.15, 0.3, 0.95),
    (0.95, 0.85, 0.1),
)
"""The RGB colour (0..1) each latent colour vector is displayed as by ``latents_to_rgb``."""

SIZE_EXTENT: tuple[float, ...] = (8.0, 12.0)
"""Extent (diameter / side / base and height) in latent pixels of ``small`` and ``large``."""

MENTION_PROBS: tuple[float, ...] = (0.1, 0.25, 0.2, 0.45)
"""Chances that a training prompt names 0 (empty), 1, 2 or all 3 attributes."""

ARTICLE = "a"
STOP_WORDS: frozenset[str] = frozenset({"a", "an", "the", "of"})
BACKGROUND_NOISE = 0.05
INTENSITY_RANGE = (0.85, 1.15)
POSITION_JITTER = 0.5
"""Largest offset (latent pixels, half-pixel steps) of a shape's centre from the canvas centre."""
SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneSpec:
    """One scene: attribute values plus where and how strongly the shape is drawn.

    Attributes:
        size: ``small`` or ``large``.
        color: one of the colour names.
        shape: ``circle``, ``square`` or ``triangle``.
        cx: centre column in latent pixels (a multiple of 0.5).
        cy: centre row in latent pixels (a multiple of 0.5).
        intensity: multiplier of the colour vector.
    """

    size: str
    color: str
    shape: str
    cx: float
    cy: float
    intensity: float = 1.0

    def attributes(self) -> dict[str, str]:
        """The scene's attribute values as ``{attribute: value}``."""
        return {"size": self.size, "color": self.color, "shape": self.shape}


def attribute_values(name: str) -> tuple[str, ...]:
    """Values of attribute ``name`` (raises ``KeyError`` for an unknown attribute)."""
    for attr, values in ATTRIBUTES:
        if attr == name:
            return values
    raise KeyError(f"unknown attribute {name!r}; known: {ATTRIBUTE_NAMES}")


def vocabulary() -> list[str]:
    """Every word of the prompt grammar (attribute values and the article)."""
    return [ARTICLE] + [value for _, values in ATTRIBUTES for value in values]


def color_matrix() -> torch.Tensor:
    """The colour vectors as a (num_colors, 4) float tensor."""
    return torch.tensor(COLOR_VECTORS, dtype=torch.float32)


def color_amounts(latents: torch.Tensor) -> torch.Tensor:
    """Per-pixel amount of each colour vector in latents.

    The colour vectors are an orthogonal basis of the 4 latent channels, so every latent pixel is
    exactly ``sum_c amount_c * color_c``.

    Args:
        latents: (B, 4, H, W).

    Returns:
        (B, num_colors, H, W) float32 amounts (1 inside a clean shape of that colour, 0 outside).
    """
    colors = color_matrix().to(latents.device)
    norms = (colors * colors).sum(dim=1)
    return torch.einsum("bchw,kc->bkhw", latents.float(), colors) / norms[None, :, None, None]


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def make_prompt(attributes: Mapping[str, str], article: bool = True) -> str:
    """Write a prompt mentioning the given attributes in grammar order.

    Args:
        attributes: ``{attribute: value}`` for the attributes to mention; others are omitted.
        article: prefix ``a`` when at least one word is present.

    Returns:
        e.g. ``"a large red circle"``, ``"red"``, ``"a small square"`` or ``""``.
    """
    words = [attributes[name] for name in ATTRIBUTE_NAMES if attributes.get(name)]
    if words and article:
        words.insert(0, ARTICLE)
    return " ".join(words)


def parse_prompt(prompt: str) -> dict[str, str]:
    """Read the attributes a prompt asks for.

    Args:
        prompt: text such as ``"a large red circle"`` or ``"red"``; case and punctuation are
            ignored, as are articles.

    Returns:
        ``{attribute: value}`` for each attribute the prompt names.

    Raises:
        ValueError: on an unknown word or two values of the same attribute.
    """
    lookup = {value: name for name, values in ATTRIBUTES for value in values}
    cleaned = "".join(ch if ch.isalpha() else " " for ch in prompt.lower())
    found: dict[str, str] = {}
    for word in cleaned.split():
        if word in STOP_WORDS:
            continue
        if word not in lookup:
            raise ValueError(f"unknown word {word!r} in prompt {prompt!r}")
        name = lookup[word]
        if name in found and found[name] != word:
            raise ValueError(f"prompt {prompt!r} names two values of {name}")
        found[name] = word
    return found


def full_prompts() -> list[str]:
    """All prompts naming every attribute (``"a small red circle"`` ...), in a fixed order."""
    prompts = [""]
    for _, values in ATTRIBUTES:
        prompts = [f"{prefix} {value}".strip() for prefix in prompts for value in values]
    return [f"{ARTICLE} {p}" for p in prompts]


def all_attribute_combinations() -> list[dict[str, str]]:
    """Every ``{attribute: value}`` combination, in the order of :func:`full_prompts`."""
    return [parse_prompt(p) for p in full_prompts()]


def training_prompt(attributes: Mapping[str, str], generator: torch.Generator, mention_probs: Sequence[float] = MENTION_PROBS) -> str:
    """Describe a scene with a random, possibly partial or empty, prompt.

    The number of attributes named is drawn from ``mention_probs`` (for 0, 1, 2, 3 attributes),
    which attributes from a random permutation, and the article is added half of the time. The
    empty prompt is the classifier-free guidance dropout.

    Args:
        attributes: the scene's full attributes.
        generator: torch random generator.
        mention_probs: probabilities of naming 0..len(ATTRIBUTES) attributes.

    Returns:
        The prompt.
    """
    if len(mention_probs) != len(ATTRIBUTE_NAMES) + 1:
        raise ValueError(f"mention_probs needs {len(ATTRIBUTE_NAMES) + 1} entries")
    count = int(torch.multinomial(torch.tensor(mention_probs, dtype=torch.float64), 1, generator=generator))
    order = torch.randperm(len(ATTRIBUTE_NAMES), generator=generator).tolist()
    named = {ATTRIBUTE_NAMES[i] for i in order[:count]}
    article = bool(torch.rand((), generator=generator) < 0.5)
    return make_prompt({n: v for n, v in attributes.items() if n in named}, article=article)


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def scene_centres(canvas: int, jitter: float = POSITION_JITTER) -> torch.Tensor:
    """Centre coordinates the generator uses: the canvas centre plus/minus ``jitter`` in 0.5 steps."""
    steps = int(round(jitter / 0.5))
    return canvas / 2 + 0.5 * torch.arange(-steps, steps + 1, dtype=torch.float64)


def centre_grid(extent: float, canvas: int, margin: float) -> torch.Tensor:
    """Allowed centre coordinates (half-pixel steps) for a shape of ``extent`` on ``canvas``.

    ``margin`` is the smallest gap to the border; a negative margin lets the shape leave the
    canvas (used by the classifier to tolerate off-centre generations).
    """
    low = extent / 2 + margin
    high = canvas - extent / 2 - margin
    steps = int(round((high - low) / 0.5))
    if steps < 0:
        raise ValueError(f"a shape of extent {extent} does not fit a canvas of {canvas}")
    return low + 0.5 * torch.arange(steps + 1, dtype=torch.float64)


def coverage_masks(shape: str, extent: float, cx: torch.Tensor, cy: torch.Tensor, canvas: int, supersample: int = SUPERSAMPLE) -> torch.Tensor:
    """Anti-aliased coverage (0..1) of shapes centred at ``(cx, cy)``.

    Args:
        shape: ``circle``, ``square`` or ``triangle``.
        extent: diameter / side / base (= height) in pixels.
        cx: (N,) centre columns.
        cy: (N,) centre rows.
        canvas: canvas side in pixels.
        supersample: sub-samples per pixel side.

    Returns:
        (N, canvas, canvas) float32 coverage fractions.
    """
    offsets = (torch.arange(supersample, dtype=torch.float64) + 0.5) / supersample
    coords = (torch.arange(canvas, dtype=torch.float64)[:, None] + offsets[None, :]).reshape(-1)
    dx = coords[None, None, :] - cx.to(torch.float64)[:, None, None]
    dy = coords[None, :, None] - cy.to(torch.float64)[:, None, None]
    half = extent / 2
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = (dx.abs() <= half) & (dy.abs() <= half)
    elif shape == "triangle":
        depth = dy + half  # 0 at the apex row, ``extent`` at the base
        inside = (depth >= 0) & (depth <= extent) & (dx.abs() <= depth / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    n = inside.shape[0]
    blocks = inside.to(torch.float32).reshape(n, canvas, supersample, canvas, supersample)
    return blocks.mean(dim=(2, 4))


@functools.lru_cache(maxsize=8)
def mask_bank(canvas: int = LATENT_SIZE, margin: float = 0.0) -> tuple[torch.Tensor, tuple[tuple[str, str, float, float], ...]]:
    """Every (shape, size, centre) coverage mask on the half-pixel grid of centres.

    Cached: treat the returned tensor as read-only.

    Args:
        canvas: canvas side.
        margin: smallest gap between shape and border (negative: may leave the canvas).

    Returns:
        ``(masks, keys)``: masks (K, canvas, canvas) and, per mask, ``(shape, size, cx, cy)``.
    """
    masks: list[torch.Tensor] = []
    keys: list[tuple[str, str, float, float]] = []
    for size, extent in zip(attribute_values("size"), SIZE_EXTENT):
        grid = centre_grid(extent, canvas, margin)
        cy, cx = torch.meshgrid(grid, grid, indexing="ij")
        cx, cy = cx.reshape(-1), cy.reshape(-1)
        for shape in attribute_values("shape"):
            masks.append(coverage_masks(shape, extent, cx, cy, canvas))
            keys.extend((shape, size, float(x), float(y)) for x, y in zip(cx.tolist(), cy.tolist()))
    return torch.cat(masks), tuple(keys)


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


def sample_specs(
    n: int,
    generator: torch.Generator,
    fixed: Mapping[str, str] | None = None,
    canvas: int = LATENT_SIZE,
    jitter: float = POSITION_JITTER,
) -> list[SceneSpec]:
    """Draw ``n`` random scene specifications.

    Args:
        n: number of scenes.
        generator: torch random generator.
        fixed: attributes every scene must have (e.g. ``parse_prompt("red")``); the others are
            drawn uniformly.
        canvas: canvas side.
        jitter: largest centre offset from the canvas centre (see :func:`scene_centres`).

    Returns:
        The specifications.
    """
    fixed = dict(fixed or {})
    for name, value in fixed.items():
        if value not in attribute_values(name):
            raise ValueError(f"{value!r} is not a value of {name}")
    specs = []
    for _ in range(n):
        attrs = {}
        for name, values in ATTRIBUTES:
            pick = int(torch.randint(len(values), (1,), generator=generator))
            attrs[name] = fixed.get(name, values[pick])
        grid = scene_centres(canvas, jitter)
        ix, iy = torch.randint(len(grid), (2,), generator=generator).tolist()
        low, high = INTENSITY_RANGE
        intensity = low + (high - low) * float(torch.rand((), generator=generator))
        specs.append(SceneSpec(cx=float(grid[ix]), cy=float(grid[iy]), intensity=intensity, **attrs))
    return specs


def render_scenes(
    specs: Sequence[SceneSpec],
    generator: torch.Generator | None = None,
    canvas: int = LATENT_SIZE,
    noise: float = BACKGROUND_NOISE,
) -> torch.Tensor:
    """Draw scenes as latents.

    Args:
        specs: scene specifications.
        generator: generator for the background noise (``None``: no noise).
        canvas: canvas side.
        noise: standard deviation of the Gaussian noise added to every latent value.

    Returns:
        (len(specs), 4, canvas, canvas) float32 latents.
    """
    if not specs:
        return torch.zeros(0, 4, canvas, canvas)
    masks = []
    for spec in specs:
        extent = SIZE_EXTENT[attribute_values("size").index(spec.size)]
        cx = torch.tensor([spec.cx], dtype=torch.float64)
        cy = torch.tensor([spec.cy], dtype=torch.float64)
        masks.append(coverage_masks(spec.shape, extent, cx, cy, canvas))
    coverage = torch.cat(masks)  # (B, H, W)
    colors = color_matrix()[[attribute_values("color").index(s.color) for s in specs]]
    colors = colors * torch.tensor([s.intensity for s in specs])[:, None]
    latents = coverage[:, None] * colors[:, :, None, None]
    if generator is not None and noise > 0:
        latents = latents + noise * torch.randn(latents.shape, generator=generator)
    return latents


def random_batch(
    n: int,
    generator: torch.Generator,
    canvas: int = LATENT_SIZE,
    mention_probs: Sequence[float] = MENTION_PROBS,
    jitter: float = POSITION_JITTER,
) -> tuple[torch.Tensor, list[str], list[SceneSpec]]:
    """A training batch: random scenes with random (partial or empty) prompts describing them.

    Args:
        n: batch size.
        generator: torch random generator.
        canvas: canvas side.
        mention_probs: see :func:`training_prompt`.
        jitter: see :func:`sample_specs`.

    Returns:
        ``(latents, prompts, specs)``.
    """
    specs = sample_specs(n, generator, canvas=canvas, jitter=jitter)
    prompts = [training_prompt(s.attributes(), generator, mention_probs) for s in specs]
    return render_scenes(specs, generator, canvas), prompts, specs
