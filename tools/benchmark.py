"""Seconds per LECO step and peak memory, for this trainer and for sd-scripts' cost model.

    python -m tools.benchmark                       # real-size random SD 1.5 (built once, ~2 GB)
    python -m tools.benchmark --model PATH          # any model the trainer loads
    python -m tools.benchmark --tiny                # the tiny test model (seconds)
    python -m tools.benchmark --mode legacy         # the same step computed the way sd-scripts does
    python -m tools.benchmark --mode persistent     # --leco_trajectory persistent (one CFG call per step)
    python -m tools.benchmark --compare 8,20,40     # fresh / legacy / persistent at each N, interleaved, one process

``--mode legacy`` reproduces sd-scripts' LECO cost model for comparison only: gradient kept
through the whole partial-denoising trajectory (every U-Net call checkpointed), the three frozen
predictions as separate CFG-doubled calls, and a CFG-doubled training forward. Both modes use
the same k (``--fixed_k``) so their times compare. ``--compare`` loads the model once and times
fresh and legacy at k = N/2 (the mean of k ~ U{1..N-1}) and persistent (whose cost does not depend
on N) round-robin, so all three see the same machine load. Nothing here is asserted in tests;
results are written to docs/performance.md by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from library.config import LecoConfig  # noqa: E402
from library.diffusion import cfg_combine, initial_latents  # noqa: E402
from library.leco_step import LecoStep, StepResult  # noqa: E402
from library.prompts import PromptSetting  # noqa: E402
from library.targets import build_target, per_sample_loss  # noqa: E402
from library.text_encoding import Conditioning  # noqa: E402
from library.trajectories import PersistentLecoStep  # noqa: E402
from tools.make_random_checkpoint import BENCHMARK_CACHE, ensure_random_checkpoint, ensure_tokenizer_cache  # noqa: E402


class FixedKStep(LecoStep):
    """Our step with k fixed instead of drawn, so both modes do the same amount of denoising."""

    fixed_k = 4

    def draw_denoise_steps(self, generator: torch.Generator) -> int:
        return self.fixed_k


class LegacyLecoStep(FixedKStep):
    """sd-scripts' way of computing the same step (for timing comparisons only)."""

    def _cfg_call(self, latents, timesteps, cond: Conditioning, uncond: Conditioning, scale: float):
        both = self.predict(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), Conditioning.cat([uncond, cond]))
        uncond_out, cond_out = both.chunk(2)
        return cfg_combine(uncond_out, cond_out, scale)

    def __call__(self, setting: PromptSetting, generator: torch.Generator) -> StepResult:
        steps = self.config.max_denoising_steps
        k = self.draw_denoise_steps(generator)
        height, width = setting.resolution
        self.scheduler.set_timesteps(steps, device=self.device)
        latents = initial_latents(setting.batch_size, height, width, generator).to(self.device)
        cond, uncond = self.trajectory_conditioning(setting, setting.batch_size, None)
        self.network.set_multiplier(setting.multiplier)
        for index in range(k):  # with gradient, each call checkpointed, nothing detached
            t = self.scheduler.timesteps[index]
            timesteps = t.expand(latents.shape[0]).to(self.device)
            output = torch.utils.checkpoint.checkpoint(self._cfg_call, latents, timesteps, cond, uncond,
                                                       self.config.denoise_guidance_scale, use_reentrant=False)
            latents = self.scheduler.step(output, t, latents, generator=generator).prev_sample
        timestep = self.scheduler.timesteps[k]
        timesteps = torch.full((latents.shape[0],), int(timestep), device=self.device)
        frozen = {}
        with torch.no_grad(), self.network.multiplier_context(0.0):
            for prompt in (setting.positive, setting.neutral, setting.negative):
                frozen[prompt] = self._cfg_call(latents, timesteps, self.conditioning([prompt] * latents.shape[0], None),
                                                uncond, 1.0)
        target = build_target(frozen[setting.neutral], frozen[setting.positive], frozen[setting.negative],
                              setting.guidance_scale, setting.action)
        prediction = self._cfg_call(latents, timesteps, cond, uncond, 1.0)
        loss = per_sample_loss(prediction, target).mean() * setting.weight
        return StepResult(loss=loss, setting=setting, timestep=int(timestep), denoise_steps=k)


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def load_parts(args) -> dict:
    """Model, prompt cache and LoRA, loaded once (steps of every mode share them)."""
    from library.family import family_for
    from library.models import load_base_model
    from library.run_setup import prepare_unet
    from networks.lora import create_network

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    model = load_base_model(str(args.model), "sd", tokenizer_cache_dir=str(args.tokenizer_cache_dir) if args.tokenizer_cache_dir else None)
    family = family_for("sd")
    setting = PromptSetting(prompt="van gogh", positive="van gogh", negative="", neutral="", action="erase",
                            guidance_scale=1.0, resolution=(args.resolution, args.resolution), batch_size=args.batch_size,
                            multiplier=1.0, weight=1.0)
    cache = family.encode(model, list(setting.prompts), device, dtype).to(device, dtype)
    unet = prepare_unet(model.load_unet(dtype), device, dtype, "xformers" if args.xformers else "sdpa", args.gradient_checkpointing)
    network = create_network(1.0, args.network_dim, args.network_dim / 2, None, [], unet)
    network.apply_to()
    network.to(device)
    network.train()
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else None
    return {"unet": unet, "network": network, "cache": cache, "model": model, "family": family, "device": device,
            "setting": setting, "autocast": autocast}


def make_step(parts: dict, mode: str, max_denoising_steps: int, fixed_k: int):
    """A step of ``mode`` ("ours" = fresh, "legacy", "persistent") on the loaded parts."""
    config = LecoConfig(max_denoising_steps=max_denoising_steps, denoise_guidance_scale=3.0,
                        trajectory="persistent" if mode == "persistent" else "fresh")
    step_class = {"legacy": LegacyLecoStep, "persistent": PersistentLecoStep}.get(mode, FixedKStep)
    kwargs = {"autocast": parts["autocast"]} if parts["autocast"] else {}
    model = parts["model"]
    step = step_class(parts["unet"], parts["network"], parts["cache"], model.scheduler_config, model.prediction_type, config,
                      parts["family"].time_ids, parts["device"], **kwargs)
    step.fixed_k = fixed_k
    return step


def build_step(args, mode: str):
    parts = load_parts(args)
    step = make_step(parts, mode, args.max_denoising_steps, args.fixed_k)
    return step, parts["setting"], parts["network"], parts["device"]


def run(args) -> dict:
    step, setting, network, device = build_step(args, args.mode)
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    calls = []
    step.unet.register_forward_pre_hook(lambda module, inputs: calls.append(inputs[0].shape[0]))
    times = []
    for index in range(args.warmup + args.steps):
        if index == args.warmup:
            _reset_peak_rss()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            calls.clear()
        seconds = _one_step(step, setting, generator, optimizer, device)
        if index >= args.warmup:
            times.append(seconds)
    report = {
        "mode": args.mode,
        "model": str(args.model),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "max_denoising_steps": args.max_denoising_steps,
        "k": args.fixed_k,
        "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "seconds_per_step_mean": statistics.mean(times),
        "seconds_per_step_median": statistics.median(times),
        "unet_calls_per_step": len(calls) / args.steps,
        "unet_samples_per_step": sum(calls) / args.steps,
        "peak_rss_gib": _peak_rss_gib(),
    }
    if device.type == "cuda":
        report["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return report


def _one_step(step, setting, generator, optimizer, device) -> float:
    start = time.perf_counter()
    result = step(setting, generator)
    result.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(args) -> list[dict]:
    """fresh (k = N/2), legacy (k = N/2) and persistent at each N, interleaved round-robin in one process."""
    parts = load_parts(args)
    network, device, setting = parts["network"], parts["device"], parts["setting"]
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-4)
    sizes = [int(value) for value in args.compare.split(",")]
    modes = ("ours", "legacy", "persistent")
    steps = {(n, mode): make_step(parts, mode, n, max(1, n // 2)) for n in sizes for mode in modes}
    generators = {key: torch.Generator().manual_seed(index) for index, key in enumerate(steps)}
    calls: list[int] = []
    parts["unet"].register_forward_pre_hook(lambda module, inputs: calls.append(inputs[0].shape[0]))
    warmup_seconds = {}
    for key, step in steps.items():  # warm-up: allocator, and the persistent chains' staggered start
        warmup_seconds[key] = sum(_one_step(step, setting, generators[key], optimizer, device) for _ in range(args.warmup))
    times = {key: [] for key in steps}
    counted = {key: [] for key in steps}
    for round_index in range(args.steps):
        for key, step in steps.items():
            calls.clear()
            times[key].append(_one_step(step, setting, generators[key], optimizer, device))
            counted[key].append((len(calls), sum(calls)))
        logger_line = " ".join(f"{n}/{mode}={times[(n, mode)][-1]:.1f}s" for n, mode in steps)
        print(f"round {round_index + 1}/{args.steps}: {logger_line}", file=sys.stderr, flush=True)
    rows = []
    for (n, mode), values in times.items():
        rows.append({
            "max_denoising_steps": n, "mode": "fresh" if mode == "ours" else mode,
            "k": None if mode == "persistent" else max(1, n // 2),
            "seconds_per_step_mean": statistics.mean(values), "seconds_per_step_median": statistics.median(values),
            "seconds_per_step_all": [round(value, 2) for value in values],
            "warmup_seconds": round(warmup_seconds[(n, mode)], 2),
            "unet_calls_per_step": statistics.mean(c for c, _ in counted[(n, mode)]),
            "unet_samples_per_step": statistics.mean(s for _, s in counted[(n, mode)]),
            "threads": torch.get_num_threads(), "resolution": args.resolution, "device": str(device),
            "peak_rss_gib": _peak_rss_gib(),
        })
    return rows


def compare_table(rows: list[dict]) -> str:
    """Markdown: one row per N with each mode's seconds per step and the ratios to persistent."""
    by_n: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_n.setdefault(row["max_denoising_steps"], {})[row["mode"]] = row
    lines = ["| N | fresh (k = N/2) | legacy (k = N/2) | persistent | fresh / persistent | legacy / persistent |",
             "|---|---|---|---|---|---|"]
    for n, modes in sorted(by_n.items()):
        fresh, legacy, persistent = (modes[m]["seconds_per_step_mean"] for m in ("fresh", "legacy", "persistent"))
        lines.append(f"| {n} | {fresh:.1f} s | {legacy:.1f} s | {persistent:.1f} s | {fresh / persistent:.1f}x | "
                     f"{legacy / persistent:.1f}x |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model to load (default: random real-size SD 1.5, built once)")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random model (fast sanity run)")
    parser.add_argument("--tokenizer_cache_dir", type=Path)
    parser.add_argument("--mode", choices=["ours", "legacy", "persistent"], default="ours",
                        help="ours = --leco_trajectory fresh (k fixed); persistent ignores --fixed_k")
    parser.add_argument("--compare", metavar="N,N,...",
                        help="time fresh, legacy (both k = N/2) and persistent at each N, interleaved in one process")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--max_denoising_steps", type=int, default=8)
    parser.add_argument("--fixed_k", type=int, default=4, help="denoising steps per training step (same in both modes)")
    parser.add_argument("--network_dim", type=int, default=4)
    parser.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--xformers", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is available")
    parser.add_argument("--json", type=Path, help="also append the result as a JSON line to this file")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tiny:
        from tests.tiny_models import save_tiny_sd

        folder = BENCHMARK_CACHE / "tiny_sd"
        if not folder.exists():
            save_tiny_sd(folder)
        args.model = folder
    elif args.model is None:
        args.model = ensure_random_checkpoint("sd15")
        args.tokenizer_cache_dir = args.tokenizer_cache_dir or ensure_tokenizer_cache()
    if args.compare:
        rows = compare(args)
        print(compare_table(rows))
        if args.json:
            with open(args.json, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows)
        return {"rows": rows}
    report = run(args)
    line = json.dumps(report)
    print(line)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    return report


if __name__ == "__main__":
    main()
