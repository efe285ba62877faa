"""Write a random-weight, real-size Stable Diffusion checkpoint in the original single-file layout.

Real weights cannot be downloaded here; benchmarks and slow tests that need the exact memory and
compute profile of a real model use this instead. The architecture comes from a shipped config
folder (``library/model_configs/sd15`` by default), the weights from the models' default
initialisation (seeded).

Example::

    python tools/make_random_checkpoint.py /tmp/sd15_random.safetensors --dtype fp16

``--streaming`` skips building the models: the tensor names and shapes come from the models
instantiated on the ``meta`` device, and each tensor is filled with N(0, 0.02) noise (tiled from a pool of 4M values) and written
as soon as it exists (peak memory: one tensor). The weights are not the models' own
initialisation, which does not matter for I/O and merge benchmarks (not for training).

Measured on a 2-core CPU machine for SD 1.5: see docs/performance.md (the script prints build
time, write time, peak RSS and file size).
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def infer_kind(config_dir: Path) -> str:
    """Guess ``sd1``/``sd2``/``sdxl`` from a diffusers config folder."""
    from transformers import CLIPTextConfig

    if (config_dir / "text_encoder_2").is_dir():
        return "sdxl"
    text = CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder")
    return "sd2" if text.hidden_act == "gelu" else "sd1"


def build_random_models(
    config_dir: Path, kind: str, seed: int = 0, dtype: torch.dtype = torch.float32, with_vae: bool = True
) -> dict[str, torch.nn.Module]:
    """Instantiate the U-Net, text encoder(s) and optionally the VAE of a config folder with random weights.

    Each model is cast to ``dtype`` right after it is built, so the peak stays near one fp32 copy.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    models: dict[str, torch.nn.Module] = {
        "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir, subfolder="unet")).to(dtype),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder")).to(dtype),
    }
    if kind == "sdxl":
        config = CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder_2")
        models["text_encoder_2"] = CLIPTextModelWithProjection(config).to(dtype)
    if with_vae:
        models["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir, subfolder="vae")).to(dtype)
    return models


def ldm_layout(config_dir: Path, kind: str, dtype: torch.dtype = torch.float32, with_vae: bool = True) -> dict[str, torch.Size]:
    """Names and shapes of the original-layout checkpoint of a config folder, without allocating weights."""
    from library import ldm_convert as lc

    with torch.device("meta"):
        models = build_random_models(config_dir, kind, dtype=dtype, with_vae=with_vae)
        unet, text = models["unet"], models["text_encoder"]
        state = lc.convert_unet_state_dict(unet.state_dict(), unet.config)
        if kind == "sd1":
            state.update(lc.convert_clip_text_state_dict(text, lc.SD1_TEXT_PREFIX))
        elif kind == "sd2":
            pad = text.config.num_hidden_layers == lc.SD2_HF_TEXT_LAYERS
            state.update(lc.convert_open_clip_state_dict(text, lc.SD2_TEXT_PREFIX, pad_extra_layer=pad))
        else:
            state.update(lc.convert_clip_text_state_dict(text, lc.SDXL_TEXT1_PREFIX))
            state.update(lc.convert_open_clip_state_dict(models["text_encoder_2"], lc.SDXL_TEXT2_PREFIX))
        if with_vae:
            state.update(lc.convert_vae_state_dict(models["vae"].state_dict(), models["vae"].config))
    return {key: value.shape for key, value in state.items()}


def write_streaming_checkpoint(path: Path, config_dir: Path, kind: str, dtype: torch.dtype = torch.float16,
                               seed: int = 0, with_vae: bool = True) -> Path:
    """Write a random-weight checkpoint tensor by tensor (N(0, 0.02) noise tiled from a 4M-value pool; peak memory one tensor)."""
    from library.safetensors_stream import StreamingSafetensorsWriter

    layout = ldm_layout(config_dir, kind, with_vae=with_vae)
    generator = torch.Generator().manual_seed(seed)
    # drawing 1e9 normal values takes ~30 s on one core; tiling a 4M-value pool from random offsets ~3 s
    pool = (torch.randn(1 << 22, generator=generator) * 0.02).to(dtype)
    entries = [(key, dtype, shape) for key, shape in layout.items()]
    with StreamingSafetensorsWriter(path, entries, {"format": "pt"}) as writer:
        for key, _, shape in entries:
            count = math.prod(shape)
            start = int(torch.randint(len(pool), (1,), generator=generator))
            if start + count <= len(pool):
                values = pool[start:start + count]
            else:
                values = pool.repeat(-(-(start + count) // len(pool)))[start:start + count]
            writer.write(key, values.reshape(shape))
    return path


BENCHMARK_CACHE = ROOT / ".cache" / "benchmark"
"""Where the measurement tools keep what they build once (random checkpoints, tokenizers, the tiny model)."""


def ensure_random_checkpoint(kind: str) -> Path:
    """A random-weight, real-size fp16 single file (no VAE) of SD 1.5 (``"sd15"``) or SDXL (``"sdxl"``),
    built once into ``BENCHMARK_CACHE``."""
    from library.ldm_convert import save_single_file
    from library.models import CONFIG_ROOT

    config, layout = {"sd15": ("sd15", "sd1"), "sdxl": ("sdxl_base", "sdxl")}[kind]
    path = BENCHMARK_CACHE / f"{kind}_random_fp16.safetensors"
    if not path.exists():
        models = build_random_models(CONFIG_ROOT / config, layout, dtype=torch.float16, with_vae=False)
        save_single_file(path, kind=layout, **models)
    return path


def ensure_tokenizer_cache() -> Path:
    """A ``--tokenizer_cache_dir`` for random single files: CLIP-shaped tokenizers saved under both hub ids
    (SD 1.x's and SDXL's second encoder's); their token ids are valid for any CLIP, which is all timing needs."""
    from transformers import CLIPTokenizer

    from library.models import CLIP_BIG_G, CLIP_L
    from library.tiny_clip import write_clip_tokenizer

    root = BENCHMARK_CACHE / "tokenizers"
    for hub_id in (CLIP_L, CLIP_BIG_G):
        folder = root / hub_id.replace("/", "_")
        if not folder.exists():
            source = write_clip_tokenizer(BENCHMARK_CACHE / "tokenizer_source", ["van", "gogh", "painting", "photo"])
            CLIPTokenizer.from_pretrained(str(source), model_max_length=77).save_pretrained(str(folder))
    return root


def _peak_rss_gib() -> float:
    """Peak resident set size of this process so far, in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line (``argv=None`` reads ``sys.argv``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="destination .safetensors file")
    parser.add_argument("--config", type=Path, default=ROOT / "library" / "model_configs" / "sd15",
                        help="diffusers config folder giving the architecture (default: shipped sd15)")
    parser.add_argument("--kind", choices=("sd1", "sd2", "sdxl"), default=None,
                        help="checkpoint layout (default: inferred from the config folder)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="storage dtype (fp16 halves the size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-vae", action="store_true", help="omit the VAE (first_stage_model.*)")
    parser.add_argument("--streaming", action="store_true",
                        help="write N(0, 0.02) noise tensor by tensor without building the models (seconds, ~no memory)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Build and write the checkpoint; return the measurements (seconds, GiB)."""
    from library.ldm_convert import save_single_file

    args = parse_args(argv)
    if not (args.config / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"{args.config} is not a diffusers config folder (no unet/config.json)")
    kind = args.kind or infer_kind(args.config)
    start = time.perf_counter()
    if args.streaming:
        path = write_streaming_checkpoint(args.output, args.config, kind, DTYPES[args.dtype], args.seed, with_vae=not args.no_vae)
        stats = {"write_s": time.perf_counter() - start, "peak_rss_gib": _peak_rss_gib(), "file_gib": path.stat().st_size / 2**30}
        print(f"{kind} {args.dtype} (streamed noise) -> {path}: {stats['write_s']:.1f} s, peak RSS {stats['peak_rss_gib']:.2f} GiB, "
              f"file {stats['file_gib']:.2f} GiB")
        return stats
    models = build_random_models(args.config, kind, args.seed, DTYPES[args.dtype], with_vae=not args.no_vae)
    built = time.perf_counter()
    path = save_single_file(args.output, kind=kind, **models)
    written = time.perf_counter()
    stats = {
        "build_s": built - start,
        "write_s": written - built,
        "peak_rss_gib": _peak_rss_gib(),
        "file_gib": path.stat().st_size / 2**30,
        "parameters": float(sum(p.numel() for m in models.values() for p in m.parameters())),
    }
    print(
        f"{kind} {args.dtype} -> {path}: build {stats['build_s']:.1f} s, write {stats['write_s']:.1f} s, "
        f"peak RSS {stats['peak_rss_gib']:.2f} GiB, file {stats['file_gib']:.2f} GiB "
        f"({int(stats['parameters']):,} parameters)"
    )
    return stats


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
