"""Block-wise ranks, alphas and learning rates for ``networks.lora``, with sd-scripts' names and meaning.

A *block* is one entry of the original (LDM/SGM) U-Net's ``input_blocks`` / ``middle_block`` /
``output_blocks`` lists, the unit kohya users address with ``--network_args``:

* **SD 1.x / 2.x: 25 blocks** for ``block_dims`` and friends, in this order: ``IN00``-``IN11``
  (``input_blocks.0``-``.11``; ``IN00`` is ``conv_in``, which never gets a LoRA), ``MID`` (the whole
  middle block), ``OUT00``-``OUT11`` (``output_blocks.0``-``.11``). ``down_lr_weight`` /
  ``up_lr_weight`` have 12 values, ``mid_lr_weight`` 1.
* **SDXL: 23 blocks**: ``BASE`` (time/label embeddings, never wrapped), ``IN00``-``IN08``,
  ``MID00``-``MID02`` (resnet, transformer, resnet), ``OUT00``-``OUT08``, ``OUT`` (the final norm
  and conv, never wrapped). ``down_lr_weight`` / ``up_lr_weight`` have 9 values, ``mid_lr_weight`` 3.

These are sd-scripts' ``LoRANetwork.NUM_OF_BLOCKS`` (12, mid 1) and ``SDXL_NUM_OF_BLOCKS`` (9, mid 3)
layouts, and a module's block index is sd-scripts' ``get_block_index``: for SD ``input_blocks.K`` ->
K, middle -> 12, ``output_blocks.K`` -> 13 + K; for SDXL ``input_blocks.K`` -> 1 + K,
``middle_block.K`` -> 10 + K, ``output_blocks.K`` -> 13 + K. The index is computed from the SGM
name of the module (:func:`networks.sgm_names.diffusers_to_sgm`), so smaller U-Nets of the same
family (tests, the concept world) use a subset of the same slots.

What the values mean (as sd-scripts): a rank of 0 leaves the block without LoRA; an alpha of 0
means alpha = rank; an lr weight multiplies the U-Net learning rate for the block's modules, and a
weight of 0 (or at/below ``block_lr_zero_threshold``) removes the block's LoRA entirely. Where
sd-scripts pads a short list, truncates a long one or ignores a value it cannot read, this module
refuses it with a message that names the block.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

DIM_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_WEIGHT_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
BLOCK_ARG_KEYS = DIM_KEYS + LR_WEIGHT_KEYS + ("block_lr_zero_threshold",)
LORAPLUS_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio")
LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
_PRESET = re.compile(r"^\s*(" + "|".join(LR_WEIGHT_PRESETS) + r")\s*(?:\+\s*(.*))?$")


@dataclass(frozen=True)
class BlockLayout:
    """The block list of one model family (sd-scripts' counts)."""

    family: str  # "sd" (SD 1.x / 2.x) or "sdxl"
    per_side: int  # input (= output) blocks
    mid: int  # middle entries

    @property
    def total(self) -> int:
        """Length of ``block_dims`` and friends: 25 for SD, 23 for SDXL (with BASE and OUT)."""
        return self.per_side * 2 + self.mid + (2 if self.family == "sdxl" else 0)

    @property
    def first_input(self) -> int:
        """Index of ``input_blocks.0`` (SDXL's index 0 is the embedding ``BASE``)."""
        return 1 if self.family == "sdxl" else 0

    @property
    def first_mid(self) -> int:
        return self.first_input + self.per_side

    @property
    def first_output(self) -> int:
        return self.first_mid + self.mid

    @property
    def never_wrapped(self) -> frozenset[int]:
        """Entries no LoRA module can fall in: ``conv_in`` (IN00), and SDXL's BASE and OUT."""
        if self.family == "sdxl":
            return frozenset((0, self.first_input, self.total - 1))
        return frozenset((self.first_input,))

    @property
    def title(self) -> str:
        return "SDXL" if self.family == "sdxl" else "SD 1.x/2.x"

    def label(self, index: int) -> str:
        """A block's name for messages, e.g. ``IN04 = input_blocks.4``."""
        if self.family == "sdxl" and index == 0:
            return "BASE = time/label embedding"
        if self.family == "sdxl" and index == self.total - 1:
            return "OUT = final out layers"
        if index < self.first_mid:
            k = index - self.first_input
            return f"IN{k:02d} = input_blocks.{k}"
        if index < self.first_output:
            k = index - self.first_mid
            return "MID = middle_block" if self.mid == 1 else f"MID{k:02d} = middle_block.{k}"
        k = index - self.first_output
        return f"OUT{k:02d} = output_blocks.{k}"

    def order(self) -> str:
        """The value order, for length errors."""
        side = self.per_side - 1
        mid = "MID" if self.mid == 1 else f"MID00-MID{self.mid - 1:02d}"
        base, out = ("BASE, ", ", OUT") if self.family == "sdxl" else ("", "")
        return f"{base}IN00-IN{side:02d}, {mid}, OUT00-OUT{side:02d}{out}"

    def index_of(self, sgm_name: str) -> int:
        """The block index of a module from its SGM name (``input_blocks.4.1.proj_in`` -> 4 for SD, 5 for SDXL).

        Raises:
            ValueError: the module is outside the input/middle/output blocks, or the U-Net has more
                blocks than this family's layout.
        """
        match = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)", sgm_name)
        if not match:
            raise ValueError(f"block-wise network_args: module {sgm_name} is not in an input/middle/output block")
        kind, k = match[1], int(match[2])
        limit = {"input_blocks": self.per_side, "middle_block": 3, "output_blocks": self.per_side}[kind]
        if k >= limit:
            raise ValueError(f"block-wise network_args: this U-Net has {kind}.{k}, more blocks than {self.title}'s layout "
                             f"({self.order()}); block_dims and lr weights need an SD 1.x/2.x- or SDXL-shaped U-Net")
        if kind == "input_blocks":
            return self.first_input + k
        if kind == "middle_block":
            return self.first_mid + (k if self.mid > 1 else 0)
        return self.first_output + k


SD_LAYOUT = BlockLayout("sd", 12, 1)
SDXL_LAYOUT = BlockLayout("sdxl", 9, 3)


def layout_for(family: str) -> BlockLayout:
    """``"sd"`` (SD 1.x/2.x) or ``"sdxl"``."""
    return SDXL_LAYOUT if family == "sdxl" else SD_LAYOUT


@dataclass(frozen=True)
class BlockSettings:
    """Per-block values, each a full-length tuple (``layout.total``) or None when not used.

    ``dims``/``alphas`` apply to Linear and 1x1 layers, ``conv_dims``/``conv_alphas`` to 3x3 convs
    (None: no 3x3 LoRA). ``lr_weights`` multiply the U-Net learning rate per block (None: no
    per-block groups). A rank of 0 means no LoRA in that block.
    """

    layout: BlockLayout
    dims: tuple[int, ...] | None = None
    alphas: tuple[float, ...] | None = None
    conv_dims: tuple[int, ...] | None = None
    conv_alphas: tuple[float, ...] | None = None
    lr_weights: tuple[float, ...] | None = None

    def rank(self, index: int, conv_3x3: bool) -> tuple[int, float | None]:
        """(rank, alpha) of a module in block ``index``; rank 0 means no LoRA."""
        if conv_3x3:
            return (self.conv_dims[index], self.conv_alphas[index]) if self.conv_dims is not None else (0, None)
        return self.dims[index], self.alphas[index]

    def describe(self, loras: Sequence[nn.Module], block_of: dict[str, int]) -> str:
        """What each block got, for the log: ``IN01: 15 modules, rank 4, lr x0.5; ...; no LoRA: MID``
        (blocks with layers this network could wrap but did not: rank or lr weight 0, or not in the file)."""
        members: dict[int, list[nn.Module]] = {}
        for lora in loras:
            members.setdefault(block_of[lora.lora_name], []).append(lora)
        parts = []
        for index in sorted(members):
            ranks = sorted({lora.lora_dim for lora in members[index]})
            part = f"{self.layout.label(index).split()[0]}: {len(members[index])} modules, rank {'/'.join(map(str, ranks))}"
            if self.lr_weights is not None:
                part += f", lr x{self.lr_weights[index]:g}"
            parts.append(part)
        empty = sorted(set(block_of.values()) - set(members))
        if empty:
            parts.append("no LoRA: " + ", ".join(self.layout.label(index).split()[0] for index in empty))
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# parsing (pure, no model needed)


def _number(key: str, text: str, layout: BlockLayout, index: int | None, what: str, position: int | None = None) -> float:
    """``text`` as a finite number >= 0; errors name the list position and the block (``index``)."""
    position = index if position is None else position
    where = f" value {position + 1} ({layout.label(index)})" if index is not None else ""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--network_args {key}:{where} '{text}' is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"--network_args {key}:{where} is {text}; {what} must be a finite number >= 0")
    return value


def _split(key: str, text: str, expected: int, layout: BlockLayout, names: str) -> list[str]:
    items = [item.strip() for item in str(text).split(",")]
    if len(items) != expected:
        raise ValueError(f"--network_args {key}: {layout.title} needs {expected} comma-separated values ({names}), got {len(items)}")
    return items


def parse_block_values(key: str, text: str, layout: BlockLayout) -> tuple[int, ...] | tuple[float, ...]:
    """``block_dims`` / ``conv_block_dims`` (integers >= 0) or ``block_alphas`` / ``conv_block_alphas``
    (numbers >= 0): exactly ``layout.total`` comma-separated values."""
    items = _split(key, text, layout.total, layout, layout.order())
    is_dim = key.endswith("dims")
    values = []
    for index, item in enumerate(items):
        value = _number(key, item, layout, index, "a rank" if is_dim else "an alpha")
        if is_dim and value != int(value):
            raise ValueError(f"--network_args {key}: value {index + 1} ({layout.label(index)}) is {item}; "
                             "a rank must be a whole number >= 0")
        values.append(int(value) if is_dim else value)
    return tuple(values)


def preset_weights(name: str, count: int, offset: float = 0.0) -> list[float]:
    """sd-scripts' lr-weight presets for ``count`` blocks (shallow to deep for down, deep to shallow for up).

    ``sine`` rises 0 -> 1 as ``sin(pi/2 * i/(count-1))``, ``cosine`` is its mirror (1 -> 0),
    ``linear`` rises ``i/(count-1)``, ``reverse_linear`` falls, ``zeros`` is all 0; ``offset`` (the
    ``+number`` suffix) is added to every value.
    """
    steps = [i / (count - 1) for i in range(count)]
    if name == "sine":
        values = [math.sin(math.pi / 2 * s) for s in steps]
    elif name == "cosine":
        values = [math.sin(math.pi / 2 * s) for s in reversed(steps)]
    elif name == "linear":
        values = steps
    elif name == "reverse_linear":
        values = list(reversed(steps))
    elif name == "zeros":
        values = [0.0] * count
    else:
        raise ValueError(name)
    return [value + offset for value in values]


def parse_lr_weight(key: str, text: str, layout: BlockLayout) -> list[float]:
    """One of ``down_lr_weight`` / ``mid_lr_weight`` / ``up_lr_weight``: a comma list (an empty entry
    is 0, as sd-scripts) or, for down/up, a preset ``NAME[+number]``."""
    if key == "mid_lr_weight":
        count, first = layout.mid, layout.first_mid
        names = "MID" if layout.mid == 1 else f"MID00-MID{layout.mid - 1:02d}"
    else:
        count = layout.per_side
        first = layout.first_input if key == "down_lr_weight" else layout.first_output
        side = "IN" if key == "down_lr_weight" else "OUT"
        names = f"{side}00-{side}{count - 1:02d}"
    text = str(text)
    preset = _PRESET.match(text)
    if preset and key != "mid_lr_weight":
        offset = 0.0
        if preset[2] is not None:
            try:
                offset = float(preset[2])
            except ValueError:
                raise ValueError(f"--network_args {key}={text}: '+{preset[2]}' is not a number (example: cosine+0.25)") from None
        weights = preset_weights(preset[1], count, offset)
    else:
        items = [item.strip() for item in text.split(",")]
        if key != "mid_lr_weight" and re.fullmatch(r"[A-Za-z_]+(\+.*)?", text.strip()):
            import difflib

            close = difflib.get_close_matches(text.strip().split("+")[0].lower(), LR_WEIGHT_PRESETS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"--network_args {key}={text}: unknown preset{hint}; use {', '.join(LR_WEIGHT_PRESETS)} "
                             f"(optionally +number) or {count} comma-separated weights ({names})")
        if len(items) != count:
            hint = "" if key == "mid_lr_weight" else f", or a preset: {', '.join(LR_WEIGHT_PRESETS)} (optionally +number)"
            raise ValueError(f"--network_args {key}={text}: {layout.title} needs {count} comma-separated weights ({names}){hint}; "
                             f"got {len(items)}")
        weights = [_number(key, item, layout, first + i, "an lr weight", i) if item else 0.0 for i, item in enumerate(items)]
    for offset_index, weight in enumerate(weights):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"--network_args {key}={text}: the weight of {layout.label(first + offset_index)} is {weight:g}; "
                             "lr weights must be finite numbers >= 0")
    return weights


def parse_block_lr_weights(kwargs: dict[str, Any], layout: BlockLayout) -> tuple[float, ...] | None:
    """The full-length per-block lr weights (``layout.total``), or None when no lr weight is given.

    As sd-scripts: a weight not above ``block_lr_zero_threshold`` becomes 0; lists not given are
    all 1; SDXL's BASE and OUT entries are 1.
    """
    given = {key: kwargs[key] for key in LR_WEIGHT_KEYS if kwargs.get(key) not in (None, "")}
    threshold_text = kwargs.get("block_lr_zero_threshold")
    threshold = 0.0
    if threshold_text not in (None, ""):
        threshold = _number("block_lr_zero_threshold", str(threshold_text), layout, None, "the threshold")
        if not given:
            raise ValueError("--network_args block_lr_zero_threshold: needs down_lr_weight, mid_lr_weight or up_lr_weight")
    if not given:
        return None
    parts = {}
    for key, count in (("down_lr_weight", layout.per_side), ("mid_lr_weight", layout.mid), ("up_lr_weight", layout.per_side)):
        if key in given:
            parts[key] = [weight if weight > threshold else 0.0 for weight in parse_lr_weight(key, given[key], layout)]
        else:
            parts[key] = [1.0] * count
    weights = parts["down_lr_weight"] + parts["mid_lr_weight"] + parts["up_lr_weight"]
    if layout.family == "sdxl":
        weights = [1.0] + weights + [1.0]
    return tuple(weights)


def parse_block_settings(kwargs: dict[str, Any], layout: BlockLayout, network_dim: int, network_alpha: float,
                         conv_dim: int | None, conv_alpha: float | None) -> BlockSettings | None:
    """Everything block-wise from ``--network_args`` strings, or None when no block option is given.

    Defaults as sd-scripts: ranks ``network_dim``, alphas ``network_alpha``; 3x3 convs only with
    ``conv_dim`` or ``conv_block_dims`` (alphas ``conv_alpha``, default 1). A block whose lr weight
    is 0 gets rank 0 (no LoRA) for both.

    Raises:
        ValueError: naming the option and the block.
    """
    lr_weights = parse_block_lr_weights(kwargs, layout)
    given = {key: kwargs[key] for key in DIM_KEYS if kwargs.get(key) not in (None, "")}
    if not given and lr_weights is None:
        return None
    total = layout.total
    dims = parse_block_values("block_dims", given["block_dims"], layout) if "block_dims" in given else (network_dim,) * total
    alphas = parse_block_values("block_alphas", given["block_alphas"], layout) if "block_alphas" in given else (network_alpha,) * total
    conv_dims = conv_alphas = None
    if "conv_block_dims" in given:
        conv_dims = parse_block_values("conv_block_dims", given["conv_block_dims"], layout)
    elif conv_dim:
        conv_dims = (int(conv_dim),) * total
    if "conv_block_alphas" in given:
        if conv_dims is None:
            raise ValueError("--network_args conv_block_alphas: needs conv_block_dims or conv_dim (3x3 convs get no LoRA without a rank)")
        conv_alphas = parse_block_values("conv_block_alphas", given["conv_block_alphas"], layout)
    elif conv_dims is not None:
        conv_alphas = (conv_alpha if conv_alpha is not None else 1.0,) * total
    if lr_weights is not None:
        dims = tuple(0 if weight == 0 else dim for dim, weight in zip(dims, lr_weights))
        if conv_dims is not None:
            conv_dims = tuple(0 if weight == 0 else dim for dim, weight in zip(conv_dims, lr_weights))
    usable = [index for index in range(total) if index not in layout.never_wrapped]
    conv = conv_dims or (0,) * total
    if not any(dims[index] or conv[index] for index in usable):
        raise ValueError("--network_args: every block has rank 0 or lr weight 0, so no layer would get a LoRA")
    return BlockSettings(layout, dims, alphas, conv_dims, conv_alphas, lr_weights)


def float_arg(kwargs: dict, key: str) -> float | None:
    """A ``--network_args`` number (None when absent or empty)."""
    value = kwargs.get(key)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--network_args {key}={value}: must be a number") from None


def parse_loraplus_ratio(kwargs: dict[str, Any]) -> float | None:
    """LoRA+ ratio: ``loraplus_unet_lr_ratio`` wins over ``loraplus_lr_ratio`` (as sd-scripts)."""
    for key in reversed(LORAPLUS_KEYS):
        value = float_arg(kwargs, key)
        if value is None:
            continue
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"--network_args {key}={kwargs[key]}: must be a number > 0 (16 is the LoRA+ paper's choice)")
        return value
    return None


def validate_block_args(kwargs: dict[str, Any], family: str | None, train_method: str) -> None:
    """The block options' checks that need no model (lengths need the family; without one, both
    layouts are tried and the values are checked against the first that fits)."""
    if "loraplus_text_encoder_lr_ratio" in kwargs:
        raise ValueError("--network_args loraplus_text_encoder_lr_ratio: LECO trains no text encoder; "
                         "use loraplus_lr_ratio or loraplus_unet_lr_ratio")
    parse_loraplus_ratio(kwargs)
    if any(kwargs.get(key) not in (None, "") for key in ("conv_block_dims", "conv_block_alphas")) and train_method in (
            "xattn", "xattn_strict", "selfattn"):
        raise ValueError(f"--network_args: conv_block_dims adds ResNet convs, which train_method={train_method} excludes")
    layouts = [layout_for(family)] if family else [SD_LAYOUT, SDXL_LAYOUT]
    conv_dim = kwargs.get("conv_dim")
    conv_dim = int(float(conv_dim)) if conv_dim not in (None, "") else None  # validate_network_args checked it
    error = None
    for layout in layouts:
        try:
            parse_block_settings(kwargs, layout, 4, 1.0, conv_dim, None)
            return
        except ValueError as exc:
            error = error or exc
    raise error


# ----------------------------------------------------------------------------------------------
# optimizer parameter groups


def block_param_groups(loras: Sequence[nn.Module], block_of: dict[str, int] | None, lr: float | None,
                       lr_weights: Sequence[float] | None, loraplus_ratio: float | None) -> tuple[list[dict], list[str]]:
    """Optimizer parameter groups and sd-scripts' descriptions for them.

    Without lr weights: one group ``unet`` (LoRA+: ``unet`` for ``lora_down``, ``unet plus`` for
    ``lora_up`` at ``lr * ratio``). With lr weights: the same per block, ``unet_block{index}`` and
    ``unet_block{index} plus``, at ``lr * weight``, in block order. A block whose rate is 0 gets no
    group and its parameters stop requiring gradients (possible only for modules read from a file
    with ``--dim_from_weights``; otherwise such blocks have no modules).
    """
    buckets: dict[int | None, list[nn.Module]] = {}
    for lora in loras:
        index = block_of[lora.lora_name] if lr_weights is not None else None
        buckets.setdefault(index, []).append(lora)
    groups, names = [], []
    for index in sorted(buckets, key=lambda value: -1 if value is None else value):
        name = "unet" if index is None else f"unet_block{index}"
        rate = lr if index is None or lr is None else lr * lr_weights[index]
        members = buckets[index]
        if rate == 0:
            for lora in members:
                lora.requires_grad_(False)
            continue
        down = [param for lora in members for key, param in lora.named_parameters() if "lora_up" not in key]
        up = [param for lora in members for key, param in lora.named_parameters() if "lora_up" in key]
        if loraplus_ratio:
            groups += [{"params": down, "lr": rate}, {"params": up, "lr": None if rate is None else rate * loraplus_ratio}]
            names += [name, f"{name} plus"]
        else:
            groups.append({"params": down + up, "lr": rate})
            names.append(name)
    return groups, names


def check_optimizer_accepts_groups(kwargs: dict[str, Any], optimizer_type: str, family: str | None) -> None:
    """Prodigy and D-Adaptation refuse parameter groups with different learning rates (they raise at
    the first step), so LoRA+ and lr weights other than 0 and 1 are refused with them before loading."""
    name = optimizer_type.lower()
    if "prodigy" not in name and "dadapt" not in name:
        return
    for key in LORAPLUS_KEYS:
        if kwargs.get(key) not in (None, ""):
            raise ValueError(f"--network_args {key}: --optimizer_type {optimizer_type} needs one learning rate for every "
                             "parameter group; LoRA+ cannot be used with it")
    layout = layout_for(family or "sd")
    weights = parse_block_lr_weights(kwargs, layout) or ()
    for index, weight in enumerate(weights):
        if weight not in (0.0, 1.0):
            raise ValueError(f"--network_args lr weights: --optimizer_type {optimizer_type} needs one learning rate for every "
                             f"parameter group; {layout.label(index)} has weight {weight:g} (only 0, to drop a block, or 1 work)")
