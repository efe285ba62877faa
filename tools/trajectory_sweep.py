"""Fresh vs persistent trajectories on the concept world: effect at equal steps, at equal wall time,
and the wall time to first reach the fresh mode's effect (the tables in docs/evaluation.md).

For each example (erase red, slider large/small, enhance small) and each ``--max_denoising_steps``:

1. ``fresh``: train ``--steps`` steps (the demo's settings), saving every ``--every`` steps; its final
   LoRA is the reference effect.
2. ``persistent``: train long enough to cover the fresh run's wall time, saving every ``--every`` steps.
3. Evaluate through diffusers (as the effect tests): persistent at the same step count, persistent at
   the fresh run's wall time, and, for both modes, the checkpoints in order until one reaches the
   reference: its primary metric (``erased_to_chance`` / slider ``span`` / ``enhance_strength``) at
   least ``--reach`` (0.9) of the fresh final's, with the tests' preservation margins.

Times are taken when each checkpoint is written, from the start of ``train_leco.main`` (model load
included, the same in both modes): wall seconds and CPU seconds of the process. The tables use CPU
seconds, which other processes on a shared machine do not stretch; the JSON has both.

    python -m tools.trajectory_sweep                              # 3 examples x N = 20, 40 (about 40 minutes)
    python -m tools.trajectory_sweep --only erase --n 40 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.effect_sweep import BASE_FLAGS  # noqa: E402

EXAMPLES = {  # name: (prompt file, evaluation multipliers)
    "erase": ("concept_erase_red.toml", (0.0, 1.0)),
    "slider": ("concept_slider_size.toml", (-1.0, 0.0, 1.0)),
    "enhance": ("concept_enhance_small.toml", (0.0, 1.0)),
}


def primary(mode: str, metrics: dict) -> float:
    """The effect's size: erased_to_chance, slider span (0 unless monotonic), or enhance strength."""
    if mode == "erase":
        return float(metrics.get("erased_to_chance", 0.0))
    if mode == "slider":
        return float(metrics["span"]) if metrics["monotonic"] else 0.0
    return float(metrics["enhance_strength"])


def within_margins(mode: str, metrics: dict) -> bool:
    """The effect tests' preservation margins (tests/test_effect.py)."""
    per = metrics["per_multiplier"]
    if mode == "erase":
        return metrics["preservation_other_prompts"] >= 0.9 and per[1.0]["preserved_other_attributes"] >= 0.75
    if mode == "slider":
        return all(row["preserved_other_attributes"] >= 0.85 for row in per.values())
    return per[1.0]["preserved_other_attributes"] >= 0.85


def train(model: Path, example: str, trajectory: str, denoising_steps: int, steps: int, every: int, out: Path,
          extra: tuple[str, ...] = ()) -> dict:
    """One run; returns step -> (file, wall seconds, CPU seconds of this process) for each checkpoint."""
    import train_leco
    from library import training

    prompts, _ = EXAMPLES[example]
    name = f"{example}_{trajectory}_n{denoising_steps}"
    flags = {**BASE_FLAGS, "max_denoising_steps": str(denoising_steps), "max_train_steps": str(steps)}
    argv = ["--pretrained_model_name_or_path", str(model), "--prompts_file", str(ROOT / "examples" / prompts),
            "--output_dir", str(out), "--output_name", name, "--console_log_level", "WARNING",
            "--leco_trajectory", trajectory, "--save_every_n_steps", str(every), *extra]
    for key, value in flags.items():
        argv += [f"--{key}", value]
    marks: dict[int, tuple[float, float]] = {}  # step -> (wall seconds, CPU seconds) when its file was written
    original = training.Trainer.save

    def save(self, network, optimizer, lr_scheduler, step, final):
        path = original(self, network, optimizer, lr_scheduler, step, final)
        marks[step] = (time.time() - started, time.process_time() - cpu_started)
        return path

    training.Trainer.save = save
    started, cpu_started = time.time(), time.process_time()
    try:
        if train_leco.main(argv) != 0:
            raise RuntimeError(f"training {name} failed")
    finally:
        training.Trainer.save = original
    total = time.time() - started
    checkpoints = {}
    for path in out.glob(f"{name}-step*.safetensors"):
        step = int(re.search(r"step(\d+)", path.name).group(1))
        checkpoints[step] = (path, *marks[step])
    checkpoints[steps] = (out / f"{name}.safetensors", *marks[steps])
    return {"name": name, "seconds": total, "checkpoints": dict(sorted(checkpoints.items()))}


def evaluate(model: Path, example: str, path: Path, seeds: int) -> dict:
    from library.evaluation import EvalOptions, evaluate_concept_lora, plan_from_prompt_text

    prompts, multipliers = EXAMPLES[example]
    plan = plan_from_prompt_text((ROOT / "examples" / prompts).read_text(encoding="utf-8"))
    report, _ = evaluate_concept_lora(model, path, plan, EvalOptions(multipliers=multipliers, seeds_per_prompt=seeds,
                                                                    steps=25, guidance_scale=5.0))
    return report["metrics"]


def summary(mode: str, metrics: dict) -> dict:
    """The numbers a table row shows."""
    per = metrics["per_multiplier"]
    row = {"primary": round(primary(mode, metrics), 3), "margins": within_margins(mode, metrics)}
    if mode == "erase":
        row.update(rates=[round(per[m]["target_rate"], 3) for m in sorted(per)], efficacy=round(metrics["erase_efficacy"], 3),
                   preservation=round(metrics["preservation_other_prompts"], 3),
                   other_attributes=round(per[1.0]["preserved_other_attributes"], 3))
    elif mode == "slider":
        row.update(rates=[round(per[m]["rate"], 3) for m in sorted(per)], monotonic=bool(metrics["monotonic"]),
                   other_attributes=round(min(r["preserved_other_attributes"] for r in per.values()), 3))
    else:
        row.update(rates=[round(per[m]["rate"], 3) for m in sorted(per)],
                   other_attributes=round(per[1.0]["preserved_other_attributes"], 3))
    return row


def _times(wall: float, cpu: float) -> dict:
    return {"seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}


def first_reach(model: Path, example: str, run: dict, goal: float, seeds: int, cache: dict) -> dict | None:
    """The first checkpoint (in step order) whose effect reaches ``goal`` within the margins."""
    for step, (path, wall, cpu) in run["checkpoints"].items():
        if path not in cache:
            cache[path] = evaluate(model, example, path, seeds)
        metrics = cache[path]
        if primary(example, metrics) >= goal and within_margins(example, metrics):
            return {"step": step, **_times(wall, cpu), **summary(example, metrics)}
    return None


def sweep_one(model: Path, example: str, denoising_steps: int, args, out: Path) -> dict:
    cache: dict = {}
    fresh = train(model, example, "fresh", denoising_steps, args.steps, args.every, out)
    fresh_path, fresh_wall, fresh_cpu = fresh["checkpoints"][args.steps]
    cache[fresh_path] = evaluate(model, example, fresh_path, args.seeds)
    reference = summary(example, cache[fresh_path])
    goal = args.reach * reference["primary"]
    # persistent: enough steps to cover the fresh run's training time (its step costs about 3 U-Net calls
    # instead of about N/2 + 2), rounded up to a multiple of --steps
    factor = max(1, math.ceil((denoising_steps / 2 + 2) / 3))
    persistent = train(model, example, "persistent", denoising_steps, args.steps * factor, args.every, out)
    equal_steps = persistent["checkpoints"][args.steps]
    cache[equal_steps[0]] = evaluate(model, example, equal_steps[0], args.seeds)
    # equal time in CPU seconds of the training process: the machine is shared, so its wall clock is
    # stretched by other processes' load; CPU time is not
    in_budget = [step for step, (_, _, cpu) in persistent["checkpoints"].items() if cpu <= fresh_cpu]
    equal_time_step = max(in_budget) if in_budget else args.steps
    equal_time = persistent["checkpoints"][equal_time_step]
    if equal_time[0] not in cache:
        cache[equal_time[0]] = evaluate(model, example, equal_time[0], args.seeds)
    return {
        "example": example, "max_denoising_steps": denoising_steps, "steps": args.steps, "goal": round(goal, 3),
        "fresh": {"step": args.steps, **_times(fresh_wall, fresh_cpu), **reference,
                  "first_reach": first_reach(model, example, fresh, goal, args.seeds, cache)},
        "persistent_equal_steps": {"step": args.steps, **_times(*equal_steps[1:]), **summary(example, cache[equal_steps[0]])},
        "persistent_equal_time": {"step": equal_time_step, **_times(*equal_time[1:]),
                                  **summary(example, cache[equal_time[0]])},
        "persistent_first_reach": first_reach(model, example, persistent, goal, args.seeds, cache),
        "persistent_run": {"steps": args.steps * factor, "seconds": round(persistent["seconds"], 1)},
    }


def markdown(result: dict) -> str:
    """One row: effect (rates, primary metric) and CPU seconds of training for each column."""
    def reach(row):
        return "not reached" if row is None else f"{row['cpu_seconds']:.0f} s (step {row['step']})"

    def effect(row):
        rates = " / ".join(f"{r:.2f}" for r in row["rates"])
        extra = f", kept {row['preservation']:.0%}" if "preservation" in row else ""
        return f"{rates} ({row['primary']:.2f}{extra}), {row['cpu_seconds']:.0f} s"

    fresh, equal, timed = result["fresh"], result["persistent_equal_steps"], result["persistent_equal_time"]
    return (f"| {result['example']} | {result['max_denoising_steps']} | {effect(fresh)} | {effect(equal)} | "
            f"{effect(timed)} at step {timed['step']} | {reach(fresh['first_reach'])} | "
            f"{reach(result['persistent_first_reach'])} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(EXAMPLES), default=["erase", "slider", "enhance"])
    parser.add_argument("--n", nargs="*", type=int, default=[20, 40], help="--max_denoising_steps values (default 20 40)")
    parser.add_argument("--steps", type=int, default=150, help="fresh training steps (default 150, as the demo)")
    parser.add_argument("--every", type=int, default=10, help="checkpoint interval in steps (default 10)")
    parser.add_argument("--seeds", type=int, default=4, help="evaluation seeds per prompt (default 4, as the effect tests)")
    parser.add_argument("--reach", type=float, default=0.9, help="fraction of the fresh effect that counts as reached")
    parser.add_argument("--out", type=Path, default=None, help="keep LoRAs here")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this file")
    args = parser.parse_args(argv)
    from tools.study_setup import concept_study_model

    model = concept_study_model()
    results = []
    print("| example | N | fresh, 150 steps: rates (effect), CPU time | persistent, 150 steps | persistent at fresh's "
          "CPU time | fresh: first reach | persistent: first reach |\n|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        for example in args.only:
            for denoising_steps in args.n:
                result = sweep_one(model, example, denoising_steps, args, out)
                results.append(result)
                print(markdown(result), flush=True)
                if args.json:
                    args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
