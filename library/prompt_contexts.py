"""Contexts and preservation anchors for ``[[prompts]]`` entries (issue 12).

A **context** is a prompt with one ``{}`` where the concept goes, e.g. ``"a large {} square"``.
An entry with contexts expands into one setting per context, with ``target``, ``positive``,
``neutral`` and ``unconditional`` each put into the context, so erasing ``red`` in
``"a large {} square"`` regresses ``"a large red square"`` towards ``"a large square"`` and away
from red. Contexts come from a ``contexts`` list and/or a ``context_prompt_file`` (one per
line), given on the entry or at the top level (an entry that declares either key uses only its
own contexts).

Preservation anchors come in two forms. A **preserve** entry (``action = "preserve"``) is a
setting of its own: the LoRA's prediction for its ``target`` is regressed onto the frozen model's
prediction for the same prompt, at x_t from its own trajectory. An entry's **anchors** list is
trained along with the entry, at the same x_t: every step that draws the entry also regresses the
LoRA's prediction for each anchor (put into the context like the other prompts) onto the frozen
one, with ``anchor_weight``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Protocol

CONTEXT_KEYS = ("contexts", "context_prompt_file")
ANCHOR_KEYS = ("anchors", "anchor_weight")
PLACEHOLDER = "{}"
# Keys a preserve entry must not set: it has no concept offset to build.
PRESERVE_FORBIDDEN_KEYS = ("positive", "neutral", "guidance_scale")


class Where(Protocol):
    """The error-location formatter of ``library.prompts`` (``file: entry: key: message``)."""

    def error(self, message: str, key: str | None = None) -> Exception: ...


def tidy_prompt(text: str) -> str:
    """Tidy the whitespace a substitution leaves behind.

    Runs of whitespace become one space, spaces before ``, . ; :`` are dropped, repeated commas
    collapse into one, and leading/trailing spaces and commas are stripped:
    ``"a large  square"`` -> ``"a large square"``, ``", oil painting"`` -> ``"oil painting"``.
    """
    text = " ".join(text.split())
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    text = re.sub(r",(\s*,)+", ",", text)
    return text.strip(" ,")


def put_in_context(context: str | None, prompt: str) -> str:
    """``context`` with its ``{}`` replaced by ``prompt``, tidied (see :func:`tidy_prompt`); no context
    (None) leaves ``prompt`` exactly as written."""
    return prompt if context is None else tidy_prompt(context.replace(PLACEHOLDER, prompt))


def check_context(context: str, key: str, where: Where, origin: str = "") -> str:
    """One context, stripped; an error unless it holds exactly one ``{}``."""
    count = context.count(PLACEHOLDER)
    if count != 1:
        problem = "has no '{}'" if count == 0 else f"has {count} '{{}}'"
        raise where.error(f"{origin}context {context!r} {problem}; it needs exactly one '{{}}' where the concept goes "
                          "(e.g. 'a large {} square')", key)
    return context.strip()


def read_prompt_lines(value: Any, base_dir: Path, key: str, where: Where, noun: str = "prompts") -> list[tuple[int, str]]:
    """The non-blank, non-``#`` lines of a UTF-8 text file named by ``key``, stripped, with line numbers.

    Relative paths are resolved against ``base_dir`` (the prompt TOML's folder).

    Raises:
        UserError (from ``where``): not a string, missing, not UTF-8, or no lines left.
    """
    if not isinstance(value, str):
        raise where.error(f"must be a string (a path), got {type(value).__name__} {value!r}", key)
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise where.error(f"file not found: {path}", key)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise where.error(f"{path} is not a UTF-8 text file", key) from None
    found = [(number, line.strip()) for number, line in enumerate(lines, start=1)
             if line.strip() and not line.strip().startswith("#")]
    if not found:
        raise where.error(f"{path} holds no {noun} (blank lines and # lines are skipped)", key)
    return found


def _read_context_file(value: Any, base_dir: Path, where: Where) -> list[str]:
    key = "context_prompt_file"
    lines = read_prompt_lines(value, base_dir, key, where, "contexts")
    name = Path(str(value)).name
    return [check_context(line, key, where, f"{name} line {number}: ") for number, line in lines]


def string_items(value: Any, key: str, hint: str, where: Where) -> list[str]:
    """``value`` checked to be a non-empty array of strings (``hint`` ends the message: what they are for)."""
    if not isinstance(value, list) or not value:
        raise where.error(f"must be a non-empty array of strings{hint}", key)
    for item in value:
        if not isinstance(item, str):
            raise where.error(f"must be an array of strings, got an item {item!r}", key)
    return value


def contexts_of(table: dict, base_dir: Path, where: Where) -> list[str] | None:
    """The contexts a table declares (``contexts`` then the file's lines, duplicates dropped), or None.

    Raises:
        UserError (from ``where``): a context without ``{}`` or with several, a wrong type, an
            empty list, a missing or empty file.
    """
    if not any(key in table for key in CONTEXT_KEYS):
        return None
    found: list[str] = []
    if "contexts" in table:
        for item in string_items(table["contexts"], "contexts", ", each with one '{}'", where):
            found.append(check_context(item, "contexts", where))
    if "context_prompt_file" in table:
        found += _read_context_file(table["context_prompt_file"], base_dir, where)
    return list(dict.fromkeys(found))


def check_preserve_entry(entry: dict, where: Where) -> None:
    """A preserve entry keeps the frozen prediction of ``target``: concept-offset keys are errors."""
    for key in PRESERVE_FORBIDDEN_KEYS:
        if key in entry:
            raise where.error(f"a preserve entry keeps the frozen model's prediction for 'target'; remove '{key}'", key)


def context_label(context: str | None) -> str:
    """The suffix of a setting's ``source`` for one context (empty without contexts)."""
    return "" if context is None else f" context {context!r}"


def anchors_of(entry: dict, defaults: dict, target: str | None, action: str, where: Where) -> tuple[list[str], float]:
    """The anchors and anchor weight of an entry: its own ``anchors``, else the top-level ones.

    Args:
        entry: the ``[[prompts]]`` table (or the top-level table, to check the defaults).
        defaults: the top-level values (``{}`` when checking the top level itself).
        target: the entry's target; an anchor equal to it is an error (None: not checked).
        action: the entry's action; a preserve entry is an anchor itself and takes no anchors.
        where: error location.

    Returns:
        ``(anchors, anchor_weight)``, anchors de-duplicated in order (empty when none are declared).
    """
    if action == "preserve":
        for key in ANCHOR_KEYS:
            if key in entry:
                raise where.error(f"a preserve entry is an anchor itself; remove '{key}'", key)
        return [], 1.0
    source = entry if "anchors" in entry else defaults
    anchors: list[str] = []
    if "anchors" in source:
        for item in string_items(source["anchors"], "anchors", " (prompts the LoRA must leave as they are)", where):
            if target is not None and item.strip() == target.strip():
                raise where.error(f"anchor {item!r} is the entry's own target; the LoRA cannot both change and keep it", "anchors")
            anchors.append(item)
    weight = entry.get("anchor_weight", defaults.get("anchor_weight", 1.0))
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise where.error(f"must be a finite number, got {weight!r}", "anchor_weight")
    if weight <= 0:
        raise where.error(f"must be > 0, got {weight}", "anchor_weight")
    if "anchor_weight" in entry and not anchors and target is not None:
        raise where.error("anchor_weight needs an 'anchors' list (here or at the top level)", "anchor_weight")
    return list(dict.fromkeys(anchors)), float(weight)


def drop_file_keys(data: dict) -> None:
    """Remove ``neutral_prompt_file`` and ``context_prompt_file`` from a parsed prompt TOML (top level and
    every entry), for text read where the files it names are not at hand (a LoRA's metadata)."""
    entries = [entry for key in ("prompts", "targets") if isinstance(data.get(key), list) for entry in data[key]]
    for table in [data, *entries]:
        if isinstance(table, dict):
            table.pop("neutral_prompt_file", None)
            table.pop("context_prompt_file", None)
