"""Erase in context and over long runs: the curves of docs/evaluation.md section 9.

Each variant trains one erase LoRA on the concept world for ``--steps`` steps (600) with the demo's
settings, saving every ``--every`` steps (50), then evaluates every saved file through diffusers
(``library.evaluation_curve``: the base model sampled once, each step at weight 1) and prints the
curve table. Variants differ in the prompt file (``examples/concept_*.toml`` or TOML text below)
and flags.

    python -m tools.erase_study                          # every variant (about 1.5 hours on 2 cores)
    python -m tools.erase_study --only defaults contexts # some of them (names as in RUNS)
    python -m tools.erase_study --out study --json study.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.effect_sweep import BASE_FLAGS  # noqa: E402  (the demo's settings)


@dataclass(frozen=True)
class StudyRun:
    """One training run: a prompt file in ``examples/`` (or prompt TOML text) and extra flags."""

    name: str
    prompts: str  # a file name in examples/, or TOML text (contains a newline)
    flags: tuple[str, ...] = ()


# Variants without their own example file. "{contexts}" becomes the path of examples/concept_contexts.txt.
_HEAD = 'resolution = 128\nbatch_size = 4\n'
_CONTEXTS = _HEAD + 'context_prompt_file = "{contexts}"\n'
_RED = '\n[[prompts]]\ntarget = "red"\n'
_BLUE = '\n[[prompts]]\ntarget = "blue"\n'


def _preserve(*prompts: str) -> str:
    return "".join(f'\n[[prompts]]\ntarget = "{prompt}"\naction = "preserve"\n' for prompt in prompts)


RUNS = (
    StudyRun("defaults", "concept_erase_red.toml"),
    StudyRun("contexts", "concept_erase_red_contexts.toml"),
    StudyRun("preserve entry \"\"", _HEAD + _RED + _preserve("")),
    StudyRun("contexts + preserve entry \"\"", _CONTEXTS + _RED + _preserve("")),
    StudyRun("contexts + preserve entries blue, yellow", _CONTEXTS + _RED + _preserve("blue", "yellow")),
    StudyRun("contexts + preserve entries \"\", green, blue, yellow", _CONTEXTS + _RED + _preserve("", "green", "blue", "yellow")),
    StudyRun("contexts + anchors \"\"", _CONTEXTS + _RED + 'anchors = [""]\n'),
    StudyRun("contexts + anchors blue, yellow", _CONTEXTS + _RED + 'anchors = ["blue", "yellow"]\n'),
    StudyRun("contexts + anchors \"\", blue, yellow", "concept_erase_red_anchored.toml"),
    StudyRun("--leco_denoise_with_frozen", "concept_erase_red.toml", ("--leco_denoise_with_frozen",)),
    StudyRun("--lr_scheduler cosine", "concept_erase_red.toml", ("--lr_scheduler", "cosine")),
    StudyRun("anchored, --lr_scheduler cosine", "concept_erase_red_anchored.toml", ("--lr_scheduler", "cosine")),
    StudyRun("red+blue, contexts", _CONTEXTS + _RED + _BLUE),
    StudyRun("red+blue, contexts + preserve entries \"\", green, yellow", _CONTEXTS + _RED + _BLUE + _preserve("", "green", "yellow")),
    StudyRun("red+blue, contexts + anchors \"\", green, yellow", "concept_erase_red_blue.toml"),
)


def prompt_file(run: StudyRun, out: Path) -> Path:
    """The run's prompt file: the example, or its TOML text written into ``out``."""
    if "\n" not in run.prompts:
        return ROOT / "examples" / run.prompts
    out.mkdir(parents=True, exist_ok=True)
    path = out / "prompts.toml"
    path.write_text(run.prompts.replace("{contexts}", str(ROOT / "examples" / "concept_contexts.txt")), encoding="utf-8")
    return path


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


def train_run(model: Path, run: StudyRun, out: Path, steps: int, every: int) -> float:
    """Train one run with ``train_leco.main``; returns seconds."""
    import train_leco

    argv = ["--pretrained_model_name_or_path", str(model), "--prompts_file", str(prompt_file(run, out)),
            "--output_dir", str(out), "--output_name", "erase", "--max_train_steps", str(steps),
            "--save_every_n_steps", str(every), "--console_log_level", "WARNING", *run.flags]
    for key, value in BASE_FLAGS.items():
        argv += [f"--{key}", value]
    started = time.perf_counter()
    if train_leco.main(argv) != 0:
        raise RuntimeError(f"training {run.name} failed")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps per run (default 600)")
    parser.add_argument("--every", type=int, default=50, help="save and evaluate every N steps (default 50)")
    parser.add_argument("--seeds", type=int, default=4, help="evaluation seeds per prompt (default 4, as the effect tests)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants (names as in RUNS)")
    parser.add_argument("--out", type=Path, default=None, help="keep LoRAs, curves and plots here")
    parser.add_argument("--json", type=Path, default=None, help="also write all curves to this file")
    args = parser.parse_args(argv)
    from tools.study_setup import concept_study_model

    model = concept_study_model()
    from library.evaluation import EvalOptions, plan_from_prompt_text
    from library.evaluation_curve import curve_table, evaluate_concept_curve, find_checkpoints

    runs = [run for run in RUNS if args.only is None or run.name in args.only]
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        base = args.out or Path(scratch)
        for run in runs:
            out = base / slug(run.name)
            seconds = train_run(model, run, out, args.steps, args.every)
            plan = plan_from_prompt_text(prompt_file(run, out).read_text(encoding="utf-8"))
            report, plot, grid = evaluate_concept_curve(model, find_checkpoints(out, "erase"), plan,
                                                        EvalOptions(multipliers=(0.0, 1.0), seeds_per_prompt=args.seeds))
            plot.save(out / "erase.curve.png")
            grid.save(out / "erase.curve-grid.png")
            results.append({"name": run.name, "train_seconds": round(seconds, 1), **report})
            print(f"\n{run.name} (trained in {seconds:.0f} s)\n{curve_table(plan, report['curve'])}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
