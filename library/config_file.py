"""``--config_file``: a TOML of flags (sections only group them), read strictly; ``--output_config`` writes one."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path
from typing import Any

from library.arguments import positive_int
from library.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib



def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.dest != "help"}


def _config_value(action: argparse.Action, key: str, value: Any, file_label: str) -> Any:
    """Check a TOML value against its flag's type and choices."""
    where = f"{file_label}: {key}"
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise UserError(f"{where}: must be true or false (without quotes), got {value!r}")
        return value
    if action.nargs == "*":
        items = value if isinstance(value, list) else [value]
        return [str(item) for item in items]
    if isinstance(value, (list, dict)):
        raise UserError(f"{where}: must be a single value, got {type(value).__name__}")
    numeric = action.type is not None and action.type is not str
    if numeric and (isinstance(value, (bool, str))):
        raise UserError(f"{where}: must be a number (without quotes), got {value!r}")
    converted = value
    if numeric:
        wants_int = action.type in (int, positive_int)
        if wants_int and isinstance(value, float):
            raise UserError(f"{where}: must be an integer, got {value}")
        try:
            converted = action.type(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise UserError(f"{where}: {exc}") from None
    elif not isinstance(value, str):
        converted = str(value)
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(str(choice) for choice in action.choices)
        raise UserError(f"{where}: {value!r} is not one of {choices}")
    return converted


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a ``--config_file`` TOML into flag defaults, strictly (unknown keys are errors)."""
    config_path = Path(path).expanduser()
    if not config_path.is_file() and config_path.suffix != ".toml" and Path(f"{path}.toml").is_file():
        config_path = Path(f"{path}.toml")
    if not config_path.is_file():
        raise UserError(f"--config_file: file not found: {config_path}")
    try:
        data = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{config_path.name}: invalid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for flag, flag_value in items:
            flag = flag.lstrip("-").replace("-", "_")
            if flag in flat:
                raise UserError(f"{config_path.name}: '{flag}' is set twice")
            flat[flag] = flag_value
    actions = _actions_by_dest(parser)
    values = {}
    for flag, value in flat.items():
        if flag in ("config_file", "output_config"):
            raise UserError(f"{config_path.name}: '{flag}' cannot be set inside a config file")
        if flag not in actions:
            close = difflib.get_close_matches(flag, list(actions), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{config_path.name}: unknown flag '{flag}'{hint}")
        values[flag] = _config_value(actions[flag], flag, value, config_path.name)
    return values


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and every control character escaped."""
    escaped = []
    for char in text:
        if char in ('"', "\\"):
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def write_config_file(path: str, args: dict[str, Any]) -> Path:
    """Write the effective flags as a TOML that ``--config_file`` reads back."""
    target = Path(path).expanduser()
    if target.suffix != ".toml":
        target = target.with_name(target.name + ".toml")
    lines = [f"{key} = {_toml_value(value)}" for key, value in sorted(args.items()) if value is not None and value is not False]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


# ----------------------------------------------------------------------------------------------
