"""Test material for the merge tools: tiny checkpoints (SD 1.x, SD 2.x v-prediction, SDXL) and random LoRA files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests import tiny_models
from tests.helpers import unet_inputs

KINDS = ("sd1", "sd2v", "sdxl")
CHECKPOINT_KIND = {"sd1": "sd1", "sd2v": "sd2", "sdxl": "sdxl"}
TEXT_PREFIXES = {"sd1": {"text_encoder": "lora_te"}, "sd2v": {"text_encoder": "lora_te"},
                 "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}


def build_folder(kind: str, folder: Path) -> Path:
    """A tiny diffusers folder of the kind (SD 2.x gets a v-prediction scheduler)."""
    if kind == "sdxl":
        return tiny_models.save_tiny_sdxl(folder)
    tiny_models.save_tiny_sd(folder, v2=kind == "sd2v")
    if kind == "sd2v":
        config_path = folder / "scheduler" / "scheduler_config.json"
        config = json.loads(config_path.read_text())
        config["prediction_type"] = "v_prediction"
        config_path.write_text(json.dumps(config))
    return folder


def components(folder: Path) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
    }
    if (folder / "text_encoder_2").is_dir():
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
    return {name: module.eval() for name, module in parts.items()}


def export(kind: str, folder: Path, path: Path) -> Path:
    """The folder as one original-layout single file, VAE included."""
    from library.ldm_convert import save_single_file

    return save_single_file(path, kind=CHECKPOINT_KIND[kind], **components(folder))


def random_lora(folder: Path, path: Path, seed: int, conv: bool = False, dim: int = 4, alpha: float = 2.0,
                text: bool = False, include: str | None = None, metadata: dict[str, str] | None = None) -> Path:
    """A kohya-format LoRA (or LoCon with ``conv``) with random non-zero factors.

    ``text=True`` adds text-encoder modules as other kohya trainers write them (``lora_te_*``, SDXL
    ``lora_te1_*``/``lora_te2_*``) for every attention and MLP Linear.
    """
    from diffusers import UNet2DConditionModel

    from networks.lora import create_network
    from networks.lora_files import save_lora_file

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    args = {"conv_dim": "3", "conv_alpha": "1.5"} if conv else {}
    if include:
        args["include"] = include
    network = create_network(1.0, dim, alpha, None, None, unet, **args)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    state = network.lora_state_dict()
    if text:
        state.update(random_text_lora(folder, generator, dim, alpha))
    save_lora_file(state, path, metadata or {})
    return path


def random_text_lora(folder: Path, generator: torch.Generator, dim: int, alpha: float) -> dict[str, torch.Tensor]:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    state = {}
    kind = "sdxl" if (folder / "text_encoder_2").is_dir() else "sd1"
    prefixes = TEXT_PREFIXES["sdxl" if kind == "sdxl" else "sd1"]
    for sub, prefix in prefixes.items():
        cls = CLIPTextModelWithProjection if sub == "text_encoder_2" else CLIPTextModel
        model = cls.from_pretrained(folder, subfolder=sub)
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in path:
                path = path if path.startswith("text_model.") else "text_model." + path
                name = f"{prefix}_{path.replace('.', '_')}"
                state[f"{name}.lora_down.weight"] = torch.randn(dim, module.in_features, generator=generator) * 0.1
                state[f"{name}.lora_up.weight"] = torch.randn(module.out_features, dim, generator=generator) * 0.1
                state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def unet_output(unet) -> torch.Tensor:
    args, kwargs = unet_inputs(unet)
    with torch.no_grad():
        return unet(*args, **kwargs).sample


def text_outputs(pipe, folder: Path) -> list[torch.Tensor]:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), model_max_length=77)
    ids = tokenizer(["a photo of a cat", "van gogh style"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    outputs = []
    with torch.no_grad():
        for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if encoder is not None:
                result = encoder(ids, output_hidden_states=True)
                outputs += [result.hidden_states[-2], result.hidden_states[-1]]
    return outputs


def load_single_file_pipeline(path: Path, folder: Path):
    """The pipeline diffusers builds from a single file, offline, with the tiny folder as config."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if (folder / "text_encoder_2").is_dir():
        return StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    return StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_lora_everywhere(pipe, path: Path, adapter_name: str) -> None:
    """``load_lora_weights`` for files that may hold text-encoder modules too, with no key left unused."""
    from tests.helpers import load_lora_into_pipeline

    load_lora_into_pipeline(pipe, path, adapter_name, text_encoders=True)
