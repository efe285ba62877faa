"""The prompt TOML: a strict schema for ``[[prompts]]`` and ``[[targets]]``, and its expansion.

A prompt file describes *what* LECO trains. It is read once, validated completely (unknown keys,
types, ranges) and expanded into a flat list of :class:`PromptSetting`; each training step draws
one setting uniformly. Every error names the file, the entry and the key::

    prompts.toml: [[targets]][2]: unknown key 'negitive' (did you mean 'negative'?)

Formats (see ``docs/train_leco.md``):

* ``[[prompts]]`` (original LECO): one setting per entry, or one per context with ``contexts``
  (``library.prompt_contexts``); ``action = "preserve"`` entries are anchors the LoRA must leave as
  the frozen model has them.
* ``[[targets]]`` (slider): each target expands to one setting per neutral x resolution x
  direction. With both poles P and N, the ``+multiplier`` setting trains toward
  ``eps(neutral) + g * (eps(P) - eps(N))`` and the ``-multiplier`` one toward
  ``eps(neutral) - g * (eps(P) - eps(N))``; with one pole, that pole is set against ``""``.
"""

from __future__ import annotations

import difflib
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from library.errors import UserError
from library.prompt_contexts import (
    ANCHOR_KEYS,
    CONTEXT_KEYS,
    anchors_of,
    check_preserve_entry,
    context_label,
    contexts_of,
    drop_file_keys,
    put_in_context,
    read_prompt_lines,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ACTIONS = ("erase", "enhance", "preserve")

# Keys an entry of each table may hold; top-level defaults are listed separately below.
PROMPT_KEYS = (
    "target", "positive", "unconditional", "neutral", "action", "guidance_scale", "resolution",
    "batch_size", "multiplier", "weight", "dynamic_resolution", "dynamic_crops",
) + CONTEXT_KEYS + ANCHOR_KEYS
TARGET_KEYS = (
    "target_class", "positive", "negative", "multiplier", "weight", "guidance_scale", "resolution",
    "resolutions", "batch_size", "neutral", "neutrals", "neutral_prompt_file", "dynamic_resolution",
    "dynamic_crops",
)
# Top-level keys that are defaults for both tables, and those that only [[targets]] read.
SHARED_DEFAULT_KEYS = ("guidance_scale", "resolution", "batch_size", "dynamic_resolution", "dynamic_crops")
TARGET_ONLY_DEFAULT_KEYS = ("resolutions", "neutral", "neutrals", "neutral_prompt_file")
TOP_LEVEL_KEYS = ("prompts", "targets") + SHARED_DEFAULT_KEYS + TARGET_ONLY_DEFAULT_KEYS + CONTEXT_KEYS + ANCHOR_KEYS

BUILTIN_DEFAULTS: dict[str, Any] = {
    "guidance_scale": 1.0,
    "resolution": 512,
    "batch_size": 1,
    "multiplier": 1.0,
    "weight": 1.0,
    "dynamic_resolution": False,
    "dynamic_crops": False,
    "action": "erase",
    "unconditional": "",
    "neutral": "",
}


@dataclass(frozen=True)
class PromptSetting:
    """One expanded training setting; a training step draws one of these uniformly.

    The regression target for the LoRA's prediction on ``prompt`` is
    ``eps(neutral) -/+ guidance_scale * (eps(positive) - eps(negative))`` (erase/enhance),
    and the partial denoising pass uses ``prompt`` as its prompt and ``negative`` as its CFG negative.

    Attributes:
        prompt: what the LoRA is trained at and the trajectory is denoised towards (a ``[[prompts]]``
            entry's ``target``, a slider's ``target_class``).
        positive: the concept's side of the direction.
        negative: the other side of the direction and the trajectory's CFG negative: a ``[[prompts]]``
            entry's ``unconditional``, or a slider's opposite pole (``""`` for a one-pole slider).
        neutral: the frozen prediction the target starts from.
    """

    prompt: str
    positive: str
    negative: str
    neutral: str
    action: str
    guidance_scale: float
    resolution: tuple[int, int]  # (height, width) in pixels
    batch_size: int
    multiplier: float
    weight: float
    dynamic_resolution: bool = False
    dynamic_crops: bool = False
    source: str = ""  # where it came from, e.g. "[[targets]][1] +"
    anchors: tuple[str, ...] = ()  # prompts held at the frozen prediction at this setting's x_t (issue 12)
    anchor_weight: float = 1.0

    @property
    def log_group(self) -> str:
        """The TensorBoard group of this setting's loss: its action, or ``slider+``/``slider-`` for the
        two directions of a ``[[targets]]`` slider (whose settings all "enhance")."""
        if self.source.startswith("[[targets]]"):
            return "slider+" if self.source.endswith("+") else "slider-"
        return self.action

    @property
    def prompts(self) -> tuple[str, ...]:
        """Every prompt this setting needs encoded."""
        return (self.prompt, self.positive, self.negative, self.neutral, *self.anchors)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (used in metadata and logs)."""
        return {  # the prompt file's words (target, unconditional), which metadata readers know
            "target": self.prompt,
            "positive": self.positive,
            "unconditional": self.negative,
            "neutral": self.neutral,
            "action": self.action,
            "guidance_scale": self.guidance_scale,
            "resolution": list(self.resolution),
            "batch_size": self.batch_size,
            "multiplier": self.multiplier,
            "weight": self.weight,
            "dynamic_resolution": self.dynamic_resolution,
            "dynamic_crops": self.dynamic_crops,
            "source": self.source,
            "anchors": list(self.anchors),
            "anchor_weight": self.anchor_weight,
        }


@dataclass(frozen=True)
class PromptFile:
    """A parsed prompt file: its expanded settings and its raw text (stored in the LoRA's metadata)."""

    path: Path
    text: str
    settings: tuple[PromptSetting, ...]

    @property
    def all_prompts(self) -> list[str]:
        """Distinct prompts over all settings, in first-seen order."""
        seen: dict[str, None] = {}
        for setting in self.settings:
            for prompt in setting.prompts:
                seen.setdefault(prompt, None)
        return list(seen)


# ----------------------------------------------------------------------------------------------
# Field checking


class _Where:
    """Formats error locations: ``file: entry: key: message``."""

    def __init__(self, file_label: str, entry: str):
        self.file_label = file_label
        self.entry = entry

    def error(self, message: str, key: str | None = None) -> UserError:
        parts = [self.file_label, self.entry] + ([key] if key else []) + [message]
        return UserError(": ".join(parts))


def _suggest(key: str, valid: tuple[str, ...], noun: str = "keys") -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (valid {noun}: {', '.join(valid)})"


def _check_keys(table: dict, valid: tuple[str, ...], where: _Where) -> None:
    for key in table:
        if key not in valid:
            raise where.error(f"unknown key '{key}'{_suggest(key, valid)}")
    if "resolution" in table and "resolutions" in table:
        raise where.error("set either 'resolution' or 'resolutions', not both", "resolutions")


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return f"{type(value).__name__} {value!r}"


def _as_str(value: Any, key: str, where: _Where) -> str:
    if not isinstance(value, str):
        raise where.error(f"must be a string, got {_type_name(value)}", key)
    return value


def _as_bool(value: Any, key: str, where: _Where) -> bool:
    if not isinstance(value, bool):
        raise where.error(f"must be true or false (without quotes), got {_type_name(value)}", key)
    return value


def _as_int(value: Any, key: str, where: _Where, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(f"must be an integer, got {_type_name(value)}", key)
    if value < minimum:
        raise where.error(f"must be >= {minimum}, got {value}", key)
    return value


def _as_float(value: Any, key: str, where: _Where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(f"must be a number, got {_type_name(value)}", key)
    if not math.isfinite(value):
        raise where.error(f"must be a finite number, got {value}", key)
    return float(value)


def _check_side(value: Any, key: str, where: _Where) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(f"sizes must be integers, got {_type_name(value)}", key)
    if value <= 0 or value % 8:
        raise where.error(f"sizes must be positive multiples of 8, got {value}", key)
    return value


def _as_resolution(value: Any, key: str, where: _Where) -> tuple[int, int]:
    """An int (square) or ``[height, width]``."""
    if isinstance(value, list):
        if len(value) != 2:
            raise where.error(f"must be an integer or [height, width], got an array of {len(value)} items", key)
        return (_check_side(value[0], key, where), _check_side(value[1], key, where))
    side = _check_side(value, key, where)
    return (side, side)


def _as_resolutions(value: Any, key: str, where: _Where) -> list[tuple[int, int]]:
    """A list whose items are each an int (square) or ``[height, width]``."""
    if not isinstance(value, list) or not value:
        raise where.error("must be a non-empty array of resolutions, e.g. [512, [512, 768]]", key)
    return [_as_resolution(item, key, where) for item in value]


def _as_str_list(value: Any, key: str, where: _Where) -> list[str]:
    if not isinstance(value, list) or not value:
        raise where.error("must be a non-empty array of strings", key)
    return [_as_str(item, key, where) for item in value]


# ----------------------------------------------------------------------------------------------
# Neutral prompts


def _read_neutral_file(value: Any, base_dir: Path, where: _Where) -> list[str]:
    return [line for _, line in read_prompt_lines(value, base_dir, "neutral_prompt_file", where)]


def _neutrals_of(table: dict, base_dir: Path, where: _Where) -> list[str] | None:
    """The neutral prompts a table declares (``neutral`` + ``neutrals`` + file lines), or None."""
    found: list[str] = []
    declared = False
    if "neutral" in table:
        found.append(_as_str(table["neutral"], "neutral", where))
        declared = True
    if "neutrals" in table:
        found += _as_str_list(table["neutrals"], "neutrals", where)
        declared = True
    if "neutral_prompt_file" in table:
        found += _read_neutral_file(table["neutral_prompt_file"], base_dir, where)
        declared = True
    if not declared:
        return None
    return list(dict.fromkeys(found))  # de-duplicated, order kept: duplicates would be over-sampled


# ----------------------------------------------------------------------------------------------
# Entries


@dataclass(frozen=True)
class _Common:
    """Fields shared by both entry formats, after defaults and validation."""

    guidance_scale: float
    resolutions: tuple[tuple[int, int], ...]
    batch_size: int
    multiplier: float
    weight: float
    dynamic_resolution: bool
    dynamic_crops: bool


def _common_fields(merged: dict, where: _Where) -> _Common:
    guidance = _as_guidance(merged["guidance_scale"], where)
    multiplier = _as_float(merged["multiplier"], "multiplier", where)
    if multiplier == 0:
        raise where.error("must not be 0 (the LoRA would have no effect to train)", "multiplier")
    weight = _as_float(merged["weight"], "weight", where)
    if weight <= 0:
        raise where.error(f"must be > 0, got {weight}", "weight")
    if "resolutions" in merged:
        resolutions = _as_resolutions(merged["resolutions"], "resolutions", where)
    else:
        resolutions = [_as_resolution(merged["resolution"], "resolution", where)]
    return _Common(
        guidance_scale=guidance,
        resolutions=tuple(dict.fromkeys(resolutions)),
        batch_size=_as_int(merged["batch_size"], "batch_size", where, minimum=1),
        multiplier=multiplier,
        weight=weight,
        dynamic_resolution=_as_bool(merged["dynamic_resolution"], "dynamic_resolution", where),
        dynamic_crops=_as_bool(merged["dynamic_crops"], "dynamic_crops", where),
    )


def _as_guidance(value: Any, where: _Where) -> float:
    guidance = _as_float(value, "guidance_scale", where)
    if guidance < 0:
        raise where.error(f"must be >= 0, got {guidance}", "guidance_scale")
    return guidance


def _check_top_level_defaults(data: dict, where: _Where) -> None:
    """Validate top-level defaults where they are written, so errors name the top level."""
    if "guidance_scale" in data:
        _as_guidance(data["guidance_scale"], where)
    if "resolution" in data:
        _as_resolution(data["resolution"], "resolution", where)
    if "resolutions" in data:
        _as_resolutions(data["resolutions"], "resolutions", where)
    if "batch_size" in data:
        _as_int(data["batch_size"], "batch_size", where, minimum=1)
    for key in ("dynamic_resolution", "dynamic_crops"):
        if key in data:
            _as_bool(data[key], key, where)


def _expand_prompt_entry(entry: dict, defaults: dict, default_contexts: list[str] | None, base_dir: Path,
                         where: _Where) -> list[PromptSetting]:
    _check_keys(entry, PROMPT_KEYS, where)
    if "target" not in entry:
        raise where.error("missing required key 'target'")
    merged = {**BUILTIN_DEFAULTS, **defaults, **entry}
    target = _as_str(merged["target"], "target", where)
    positive = _as_str(merged.get("positive", target), "positive", where)
    action = _as_str(merged["action"], "action", where)
    if action not in ACTIONS:
        raise where.error(f"must be 'erase', 'enhance' or 'preserve', got {action!r}{_suggest(action, ACTIONS, 'values')}",
                          "action")
    common = _common_fields(merged, where)
    unconditional = _as_str(merged["unconditional"], "unconditional", where)
    neutral = _as_str(merged["neutral"], "neutral", where)
    anchors, anchor_weight = anchors_of(entry, defaults, target, action, where)
    if action == "preserve":  # an anchor: regress onto the frozen prediction for the target itself
        check_preserve_entry(entry, where)
        positive = neutral = target
        common = replace(common, guidance_scale=0.0)
    contexts = contexts_of(entry, base_dir, where)
    if contexts is None:
        contexts = default_contexts
    prompts = {"prompt": target, "positive": positive, "negative": unconditional, "neutral": neutral}
    return [
        replace(_setting(common, resolution, common.multiplier, where.entry + context_label(context), action=action,
                         **{name: put_in_context(context, text) for name, text in prompts.items()}),
                anchors=tuple(dict.fromkeys(put_in_context(context, anchor) for anchor in anchors)), anchor_weight=anchor_weight)
        for context in contexts or [None]
        for resolution in common.resolutions
    ]


def _setting(common: _Common, resolution: tuple[int, int], multiplier: float, source: str, **prompts: str) -> PromptSetting:
    """A setting from its prompts/action and the entry's shared numeric fields."""
    return PromptSetting(
        **prompts,
        guidance_scale=common.guidance_scale,
        resolution=resolution,
        batch_size=common.batch_size,
        multiplier=multiplier,
        weight=common.weight,
        dynamic_resolution=common.dynamic_resolution,
        dynamic_crops=common.dynamic_crops,
        source=source,
    )


def _slider_directions(positive: str, negative: str, multiplier: float) -> list[tuple[str, str, str, float, str]]:
    """(positive, unconditional, action, multiplier, label) for each trained direction.

    Both poles: ``+m`` enhances P against N and ``-m`` enhances N against P, so the targets are
    ``eps_neu + g(eps_P - eps_N)`` and ``eps_neu - g(eps_P - eps_N)``, and each direction's
    denoising pass uses the opposite pole as its CFG negative. One pole: that pole against "".
    """
    if positive and negative:
        return [
            (positive, negative, "enhance", multiplier, "+"),
            (negative, positive, "enhance", -multiplier, "-"),
        ]
    if positive:
        return [
            (positive, "", "enhance", multiplier, "+"),
            (positive, "", "erase", -multiplier, "-"),
        ]
    return [
        (negative, "", "erase", multiplier, "+"),
        (negative, "", "enhance", -multiplier, "-"),
    ]


def _expand_target_entry(entry: dict, defaults: dict, default_neutrals: list[str] | None, base_dir: Path,
                         where: _Where) -> list[PromptSetting]:
    _check_keys(entry, TARGET_KEYS, where)
    if "target_class" not in entry:
        raise where.error("missing required key 'target_class' (it may be \"\")")
    merged = {**BUILTIN_DEFAULTS, **defaults, **entry}
    if "resolution" in entry and "resolutions" in merged and "resolutions" not in entry:
        merged.pop("resolutions")  # an entry's own resolution beats a top-level resolutions list
    target_class = _as_str(entry["target_class"], "target_class", where)
    positive = _as_str(entry.get("positive", ""), "positive", where)
    negative = _as_str(entry.get("negative", ""), "negative", where)
    if not positive and not negative:
        raise where.error("needs 'positive' or 'negative' (or both)")
    common = _common_fields(merged, where)
    neutrals = _neutrals_of(entry, base_dir, where)
    if neutrals is None:
        # Without a neutral, the class itself is the baseline: the slider moves "1girl" along
        # P-N instead of also pulling it toward the empty prompt (which would erase the class).
        neutrals = default_neutrals if default_neutrals is not None else [target_class]
    settings = []
    for neutral in neutrals:
        for resolution in common.resolutions:
            for pole, anti_pole, action, multiplier, label in _slider_directions(positive, negative, common.multiplier):
                settings.append(_setting(common, resolution, multiplier, f"{where.entry} {label}", prompt=target_class,
                                         positive=pole, negative=anti_pole, neutral=neutral, action=action))
    return settings


# ----------------------------------------------------------------------------------------------
# File


def _entries(data: dict, table: str, where: _Where) -> list[dict]:
    if table not in data:
        return []
    value = data[table]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise where.error(f"'{table}' must be written as [[{table}]] tables")
    if not value:
        raise where.error(f"[[{table}]] is empty")
    return value


def parse_prompt_text(text: str, base_dir: Path, file_label: str = "prompts.toml", without_files: bool = False
                      ) -> tuple[PromptSetting, ...]:
    """Parse prompt-file text and expand it into settings.

    Args:
        text: the TOML text.
        base_dir: folder that relative ``neutral_prompt_file`` / ``context_prompt_file`` paths are resolved against.
        file_label: name used in error messages.
        without_files: ignore ``neutral_prompt_file`` and ``context_prompt_file`` (the text of a LoRA's
            metadata, read where those files are not at hand: what each entry trains stays the same).

    Raises:
        UserError: on invalid TOML, unknown keys, wrong types or out-of-range values.
    """
    top = _Where(file_label, "top level")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{file_label}: invalid TOML: {exc}") from None
    if without_files:
        drop_file_keys(data)
    _check_keys(data, TOP_LEVEL_KEYS, top)
    prompt_entries = _entries(data, "prompts", top)
    target_entries = _entries(data, "targets", top)
    if not prompt_entries and not target_entries:
        raise top.error("no [[prompts]] or [[targets]] entries found (see docs/train_leco.md)")
    if not prompt_entries:
        for key in CONTEXT_KEYS + ANCHOR_KEYS:
            if key in data:
                raise top.error(f"'{key}' is a default for [[prompts]] only and the file has no [[prompts]] entry", key)
    if not target_entries:
        for key in TARGET_ONLY_DEFAULT_KEYS:
            if key in data:
                fix = ("write one [[prompts]] entry per resolution" if key == "resolutions"
                       else "set it inside each [[prompts]] entry instead")
                raise top.error(f"'{key}' is a default for [[targets]] only; {fix}", key)
    _check_top_level_defaults(data, top)
    shared = {key: data[key] for key in SHARED_DEFAULT_KEYS if key in data}
    target_defaults = {**shared, **({"resolutions": data["resolutions"]} if "resolutions" in data else {})}
    anchors_of(data, {}, None, "erase", top)  # top-level anchors are checked where they are written
    prompt_defaults = {**shared, **{key: data[key] for key in ANCHOR_KEYS if key in data}}
    default_neutrals = _neutrals_of(data, base_dir, top)
    default_contexts = contexts_of(data, base_dir, top)

    settings: list[PromptSetting] = []
    for index, entry in enumerate(prompt_entries, start=1):
        settings += _expand_prompt_entry(entry, prompt_defaults, default_contexts, base_dir,
                                         _Where(file_label, f"[[prompts]][{index}]"))
    for index, entry in enumerate(target_entries, start=1):
        where = _Where(file_label, f"[[targets]][{index}]")
        settings += _expand_target_entry(entry, target_defaults, default_neutrals, base_dir, where)
    return tuple(settings)


def load_prompt_file(path: str | Path) -> PromptFile:
    """Read, validate and expand a prompt TOML file.

    Raises:
        UserError: if the file is missing or invalid (the message names file, entry and key).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--prompts_file: file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path.name}: not a UTF-8 text file") from None
    settings = parse_prompt_text(text, path.resolve().parent, file_label=path.name)
    return PromptFile(path=path, text=text, settings=settings)
