"""The sample prompt file (``--sample_prompts``), in sd-scripts' one-prompt-per-line format::

    a red circle --n blurry --s 20 --l 7.5 --d 42 --w 512 --h 512

Options: ``--n`` negative prompt, ``--s`` sampling steps, ``--l`` guidance scale, ``--d`` seed,
``--w``/``--h`` size in pixels. Blank lines and lines starting with ``#`` are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError


@dataclass(frozen=True)
class SamplePrompt:
    """One line of the sample prompt file."""

    prompt: str
    negative: str = ""
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int | None = None
    width: int | None = None
    height: int | None = None


_OPTION = re.compile(r"\s--([A-Za-z]+)(?=\s)")


def parse_sample_line(line: str, where: str) -> SamplePrompt:
    """Parse one sample prompt line; ``where`` ("file:line") prefixes error messages."""
    pieces = _OPTION.split(f" {line.strip()} ")
    prompt = pieces[0].strip()
    fields: dict = {}
    for name, raw in zip(pieces[1::2], pieces[2::2]):
        name, value = name.lower(), raw.strip()
        try:
            if name == "n":
                fields["negative"] = value
            elif name == "s":
                fields["steps"] = int(value)
            elif name == "l":
                fields["guidance_scale"] = float(value)
            elif name == "d":
                fields["seed"] = int(value)
            elif name in ("w", "h"):
                size = int(value)
                if size <= 0 or size % 8:
                    raise UserError(f"{where}: --{name} must be a positive multiple of 8, got {value}")
                fields["width" if name == "w" else "height"] = size
            else:
                raise UserError(f"{where}: unknown option --{name} (use --n, --s, --l, --d, --w, --h)")
        except ValueError as exc:
            if isinstance(exc, UserError):
                raise
            raise UserError(f"{where}: --{name} needs a number, got {value!r}") from None
    if fields.get("steps", 1) < 1:
        raise UserError(f"{where}: --s must be >= 1")
    return SamplePrompt(prompt=prompt, **fields)


def load_sample_prompts(path: str | Path) -> tuple[SamplePrompt, ...]:
    """Read a sample prompt text file.

    Raises:
        UserError: if the file is missing, empty or has a bad option.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--sample_prompts: file not found: {path}")
    if path.suffix.lower() in (".toml", ".json"):
        raise UserError(f"--sample_prompts: {path.name}: use a text file with one prompt per line")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip() and not line.strip().startswith("#"):
            prompts.append(parse_sample_line(line, f"{path.name}:{number}"))
    if not prompts:
        raise UserError(f"--sample_prompts: {path.name} holds no prompts")
    return tuple(prompts)
