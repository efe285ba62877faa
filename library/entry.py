"""``main(argv)`` for both entry scripts: parse, validate, train; user errors become one line + exit 2."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from library.errors import UserError
from library.quiet import quiet_import_warnings, quiet_third_party_output

logger = logging.getLogger("leco")

EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_INTERRUPTED = 130


def _console_handler(level: str) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    handler.setLevel(level)
    return handler


def main(argv: Sequence[str] | None, family: str) -> int:
    """Run one training from command-line arguments; returns the process exit code.

    0 success (or --help / --output_config), 2 a user error (one line on stderr), 3 the loss became
    NaN/inf, 130 interrupted (the LoRA was saved first). Callable repeatedly from Python/Colab.
    """
    from library.cli import build_run_config, check_flags, effective_args, implied_flag_notes, parse_namespace, write_config_file

    quiet_import_warnings()  # checks import optional packages (lycoris, bitsandbytes) that warn on import
    try:
        args, _ = parse_namespace(argv, family)
        if args.output_config:
            if not args.config_file:
                raise UserError("--output_config needs --config_file PATH to write to")
            check_flags(args, family)
            target = Path(args.config_file).expanduser()
            target = target if target.suffix == ".toml" else target.with_name(target.name + ".toml")
            if target.exists():
                raise UserError(f"--output_config: {target} exists; remove it or give another --config_file path")
            path = write_config_file(args.config_file, effective_args(args))
            print(f"wrote {path}")
            return 0
        config = build_run_config(args, family)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR

    root = logging.getLogger()
    # in multi-process runs only rank 0 narrates; other ranks report warnings and errors
    level = config.log.console_log_level if int(os.environ.get("RANK", "0")) == 0 else "WARNING"
    handler = _console_handler(level)
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(config.log.console_log_level)
    try:
        for note in implied_flag_notes(args):
            logger.info(note)
        quiet_third_party_output()
        from library.training import NonFiniteLoss, TrainingInterrupted, train

        result = train(config)
        if result.final_file:
            logger.info("done: %s", result.final_file)
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NON_FINITE
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
