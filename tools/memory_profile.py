"""Peak memory of loading a model and of the first LECO step, split into anonymous and file-backed pages.

    python -m tools.memory_profile --kind sdxl                       # random real-size SDXL (fp16 file, built once)
    python -m tools.memory_profile --kind sd15 --mixed_precision no
    python -m tools.memory_profile --model PATH --family sdxl --tokenizer_cache_dir DIR
    python -m tools.memory_profile --kind sdxl --load_only fp16      # load in fp16 without training (CPUs cannot train in fp16)

A thread samples ``/proc/self/status`` every 50 ms while ``train_leco.main`` / ``sdxl_train_leco.main``
runs one step (64 px, ``--max_denoising_steps 2``) in this process. It reports, for the loading phase
(until the training loop starts) and the first step separately:

- **RssAnon**: anonymous memory (weights converted in RAM, activations, optimizer). This is what runs
  a Colab runtime out of memory.
- **RssFile**: file-backed pages, here the memory-mapped checkpoint. They are clean: the kernel drops
  them under pressure and reads them again if needed.
- On CUDA also **CUDA allocated**: ``torch.cuda.max_memory_allocated`` of each phase
  (``--resolution 1024 --gradient_checkpointing`` for SDXL's real training size).

With ``--load_only DTYPE`` the components are loaded in DTYPE in the trainer's order (text encoders one
after the other, then the U-Net) without training; that is how fp16 loading is measured on a CPU,
where training itself falls back to float32. Nothing here is asserted in tests; results go to
docs/performance.md by hand. Run one at a time: the numbers are this process's own.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIELDS = ("RssAnon", "RssFile", "VmRSS")


def read_status() -> dict[str, float]:
    """This process's anonymous, file-backed and total resident memory, in GiB (and on CUDA, the peak
    of allocated device memory since the phase began)."""
    import torch

    text = Path("/proc/self/status").read_text()
    values = {field: int(re.search(rf"^{field}:\s+(\d+)", text, re.M)[1]) / 2**20 for field in FIELDS}
    if torch.cuda.is_available():
        values["cuda_max_allocated"] = torch.cuda.max_memory_allocated() / 2**30
    return values


class MemorySampler:
    """Samples :func:`read_status` every ``interval`` seconds and keeps the peaks of each phase."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.phase = "load"
        self.peaks: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _record(self) -> None:
        peaks = self.peaks.setdefault(self.phase, {})
        for field, value in read_status().items():
            peaks[field] = max(peaks.get(field, 0.0), value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._record()
            time.sleep(self.interval)

    def enter(self, phase: str) -> None:
        import torch

        self._record()
        self.phase = phase
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._record()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._record()
        self._stop.set()
        self._thread.join()
        return False


def profile_training(args, model: Path, tokenizers: Path | None) -> dict:
    """One training step through the entry script, with the loading and step phases sampled separately."""
    import sdxl_train_leco
    import train_leco
    from library import training

    work = Path(tempfile.mkdtemp(prefix="memory_profile-"))
    prompts = work / "prompts.toml"
    prompts.write_text(f'[[prompts]]\ntarget = "van gogh"\naction = "erase"\nresolution = {args.resolution}\n', encoding="utf-8")
    argv = ["--pretrained_model_name_or_path", str(model), "--prompts_file", str(prompts), "--output_dir", str(work / "out"),
            "--max_train_steps", "1", "--max_denoising_steps", "2", "--mixed_precision", args.mixed_precision, "--seed", "0",
            "--console_log_level", "WARNING"]
    if tokenizers:
        argv += ["--tokenizer_cache_dir", str(tokenizers)]
    argv += {"bf16": ["--full_bf16"], "fp16": ["--full_fp16"]}.get(args.mixed_precision, [])
    argv += ["--gradient_checkpointing"] if args.gradient_checkpointing else []
    entry = sdxl_train_leco if args.family == "sdxl" else train_leco
    original_loop = training.Trainer.loop
    with MemorySampler() as sampler:
        def loop(self, *loop_args, **loop_kwargs):
            sampler.enter("first step")
            return original_loop(self, *loop_args, **loop_kwargs)

        training.Trainer.loop = loop
        try:
            code = entry.main(argv)
        finally:
            training.Trainer.loop = original_loop
    if code != 0:
        raise SystemExit(f"training exited with {code}")
    return sampler.peaks


def profile_loading(args, model: Path, tokenizers: Path | None) -> dict:
    """Load the components in DTYPE in the trainer's order (text encoders one by one, then the U-Net)."""
    import torch

    from library.family import family_for
    from library.models import load_base_model

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.load_only]
    with MemorySampler() as sampler:
        loaded = load_base_model(str(model), args.family, tokenizer_cache_dir=str(tokenizers) if tokenizers else None)
        family_for(args.family).encode(loaded, ["van gogh", ""], torch.device("cpu"), dtype)
        sampler.enter("U-Net")
        unet = loaded.load_unet(dtype)
        assert next(unet.parameters()).dtype == dtype
    return sampler.peaks


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["sd15", "sdxl"], help="random real-size model (built once into .cache/)")
    parser.add_argument("--model", type=Path, help="any model the trainer loads (instead of --kind)")
    parser.add_argument("--family", choices=["sd", "sdxl"], help="default: from --kind")
    parser.add_argument("--tokenizer_cache_dir", type=Path)
    parser.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="bf16",
                        help="bf16/fp16 also pass --full_bf16/--full_fp16 (default bf16)")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--resolution", type=int, default=64, help="training resolution in pixels (default 64; 1024 for SDXL on a GPU)")
    parser.add_argument("--load_only", choices=["fp32", "fp16", "bf16"], help="only load, in this dtype")
    parser.add_argument("--json", type=Path, help="also append the result as a JSON line to this file")
    args = parser.parse_args(argv)
    if not (args.kind or args.model):
        parser.error("give --kind or --model")
    args.family = args.family or ("sdxl" if args.kind == "sdxl" else "sd")
    from tools.make_random_checkpoint import ensure_random_checkpoint, ensure_tokenizer_cache

    model = args.model or ensure_random_checkpoint(args.kind)
    tokenizers = args.tokenizer_cache_dir or (ensure_tokenizer_cache() if model.is_file() else None)
    start = time.perf_counter()
    peaks = profile_loading(args, model, tokenizers) if args.load_only else profile_training(args, model, tokenizers)
    report = {"model": str(model), "family": args.family, "file_gib": model.stat().st_size / 2**30 if model.is_file() else None,
              "mode": f"load {args.load_only}" if args.load_only else f"train {args.mixed_precision}",
              "seconds": round(time.perf_counter() - start, 1),
              "peaks_gib": {phase: {field: round(value, 2) for field, value in values.items()} for phase, values in peaks.items()}}
    for phase, values in report["peaks_gib"].items():
        cuda = f"   CUDA allocated {values['cuda_max_allocated']:6.2f} GiB" if "cuda_max_allocated" in values else ""
        print(f"{phase:>11}: RssAnon {values['RssAnon']:6.2f} GiB   RssFile {values['RssFile']:6.2f} GiB   "
              f"RSS {values['VmRSS']:6.2f} GiB{cuda}")
    print(json.dumps(report))
    if args.json:
        with open(args.json, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(report) + "\n")
    return report


if __name__ == "__main__":
    main()
