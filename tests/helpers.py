"""Shared helpers for end-to-end tests: prompt files, running the scripts in-process, reading outputs."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file

ERASE_TOML = """
[[prompts]]
target = "van gogh"
positive = "van gogh"
unconditional = ""
neutral = ""
action = "erase"
guidance_scale = 1.5
resolution = 64
batch_size = 2
"""

ENHANCE_TOML = """
[[prompts]]
target = "detailed"
positive = "high detail"
action = "enhance"
guidance_scale = 2.0
resolution = 64
"""

SLIDER_TOML = """
guidance_scale = 1.0
resolution = 64

[[targets]]
target_class = "girl"
positive = "girl, long hair"
negative = "girl, short hair"
"""

PROMPTS = {"erase": ERASE_TOML, "enhance": ENHANCE_TOML, "slider": SLIDER_TOML}


def write_prompts(folder: Path, kind: str, resolution: int = 64) -> Path:
    path = folder / f"{kind}.toml"
    path.write_text(PROMPTS[kind].replace("resolution = 64", f"resolution = {resolution}"), encoding="utf-8")
    return path


def base_argv(model: Path | str, prompts: Path, output: Path, name: str = "leco", steps: int = 4) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model),
        "--prompts_file", str(prompts),
        "--output_dir", str(output),
        "--output_name", name,
        "--max_train_steps", str(steps),
        "--max_denoising_steps", "4",
        "--learning_rate", "1e-3",
        "--seed", "42",
    ]


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def lora_changed(path: Path) -> bool:
    """lora_up starts at zero: any non-zero up weight means training moved the LoRA."""
    return any(value.abs().sum() > 0 for key, value in lora_tensors(path).items() if key.endswith("lora_up.weight"))


def _event_files(log_dir: Path, **size_guidance):
    """A loaded TensorBoard ``EventAccumulator`` for every event file under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance=size_guidance or None)
        accumulator.Reload()
        yield accumulator


def scalars(log_dir: Path, tag: str) -> list[float]:
    """All values of a TensorBoard scalar written anywhere under ``log_dir``."""
    values: list[float] = []
    for accumulator in _event_files(log_dir):
        if tag in accumulator.Tags().get("scalars", []):
            values += [event.value for event in accumulator.Scalars(tag)]
    return values


def image_tags(log_dir: Path) -> dict[str, int]:
    """TensorBoard image tags written under ``log_dir`` and how many images each has."""
    counts: dict[str, int] = {}
    for accumulator in _event_files(log_dir, images=0):
        for tag in accumulator.Tags().get("images", []):
            counts[tag] = counts.get(tag, 0) + len(accumulator.Images(tag))
    return counts


def all_finite(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(value) for value in values)


def export_single_file(tiny_dir: Path, path: Path, kind: str) -> Path:
    """Write a tiny diffusers folder as one original-layout .safetensors (no VAE)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from library.ldm_convert import save_single_file

    extra = {}
    if kind == "sdxl":
        extra["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(tiny_dir, subfolder="text_encoder_2")
    return save_single_file(path, UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet"),
                            CLIPTextModel.from_pretrained(tiny_dir, subfolder="text_encoder"), kind=kind, **extra)


def tokenizer_cache(tiny_dir: Path, cache: Path) -> Path:
    """Save the tiny model's tokenizer(s) under ``cache`` by hub id, as ``--tokenizer_cache_dir`` expects
    (SDXL folders have a second one for bigG)."""
    from transformers import CLIPTokenizer

    from library.models import CLIP_BIG_G, CLIP_L

    for sub, hub_id in (("tokenizer", CLIP_L), ("tokenizer_2", CLIP_BIG_G)):
        if (tiny_dir / sub).is_dir():
            CLIPTokenizer.from_pretrained(str(tiny_dir / sub)).save_pretrained(str(cache / hub_id.replace("/", "_")))
    return cache


def config_only_copy(tiny_dir: Path, destination: Path) -> Path:
    """The configs of a tiny diffusers folder without weights or tokenizers (for --model_config_dir)."""
    for config in tiny_dir.glob("*/*config.json"):
        target = destination / config.parent.name / config.name
        if config.parent.name.startswith("tokenizer") or config.parent.name == "vae":
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(config.read_text())
    (destination / "model_index.json").write_text((tiny_dir / "model_index.json").read_text())
    return destination


def load_lora_into_pipeline(pipe, path: Path, adapter_name: str = "leco", text_encoders: bool = False) -> None:
    """``pipe.load_lora_weights`` as a user calls it, asserting that **no key of the file was left unused**.

    Three checks, because diffusers can fail quietly: (1) it treats the file as kohya format only if
    every key is ``lora_unet_*``/``lora_te*`` (FACTS), (2) it reports unexpected/missing LoRA keys
    only as a warning on its own logger, which does not propagate to pytest's caplog, so the warning
    is captured with a handler on that logger, and (3) every ``lora_down``/``lora_up`` element of the
    file must reappear as a ``lora_A``/``lora_B`` element of the adapter. Our training files hold U-Net
    modules only; ``text_encoders`` admits ``lora_te*`` keys too (other trainers' files, merges) and
    counts the adapter's elements in the text encoders as well.
    """
    import logging

    from diffusers.utils import logging as diffusers_logging

    from networks.lora_weights import KOHYA_PREFIXES

    tensors = lora_tensors(path)
    prefixes = KOHYA_PREFIXES if text_encoders else ("lora_unet_",)
    assert all(key.startswith(prefixes) for key in tensors), "a non-kohya key makes diffusers skip the file"
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, library_logger = Collect(level=logging.WARNING), logging.getLogger("diffusers")
    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()  # a finished training run turned it down to errors
    library_logger.addHandler(handler)
    try:
        pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    finally:
        library_logger.removeHandler(handler)
        diffusers_logging.set_verbosity(previous)
    # peft lists the *other* adapters' keys as "missing" when a second adapter is loaded: only this one's count
    unhandled = [text for text in messages if "unexpected keys" in text or ("missing keys" in text and f".{adapter_name}." in text)]
    assert not unhandled, unhandled
    models = (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if text_encoders else (pipe.unet,)
    loaded = sum(param.numel() for model in models if model is not None for name, param in model.named_parameters()
                 if f".{adapter_name}." in f"{name}." and (".lora_A." in name or ".lora_B." in name))
    in_file = sum(value.numel() for key, value in tensors.items() if key.endswith(("lora_down.weight", "lora_up.weight")))
    assert loaded == in_file, (loaded, in_file)


def unet_inputs(unet) -> tuple[tuple, dict]:
    """Seeded random inputs for one call of a (tiny) U-Net, ``unet(*args, **kwargs)``: batch 2, 8x8
    latents at timesteps 10 and 500, random text context, and SDXL's pooled embedding and time ids."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return (sample, torch.tensor([10, 500]), context), kwargs
