"""Load original-layout (LDM/SGM) single-file Stable Diffusion checkpoints, fully offline.

Real checkpoints (``v1-5-pruned-emaonly.safetensors``, ``sd_xl_base_1.0.safetensors``, merges from
the community) carry no diffusers config, and diffusers' ``from_single_file`` asks the hub for one
unless ``config=<local diffusers folder>`` is given. The project ships config skeletons in
``library/model_configs`` (see :func:`default_config_dir`); tests pass tiny config folders.

The VAE is not loaded by :func:`load_single_file` (LECO training never decodes images);
:func:`load_single_file_vae` reads it on demand.

``.ckpt`` files are read with ``torch.load(weights_only=True)``: a file that needs arbitrary
unpickling is refused with a clear message instead of being executed.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
KINDS = ("sd1", "sd2", "sdxl")

# Shipped config skeletons by name (folders under library/model_configs).
CONFIG_NAMES = ("sd15", "sd2_512", "sd2_768_v", "sdxl_base")

_UNET_PREFIX = "model.diffusion_model."
_SD1_TEXT = "cond_stage_model.transformer."
_SD2_TEXT = "cond_stage_model.model."
_SDXL_TEXT1 = "conditioner.embedders.0.transformer."
_SDXL_TEXT2 = "conditioner.embedders.1.model."
_SDXL_REFINER_TEXT = "conditioner.embedders.0.model."


def model_configs_root() -> Path:
    """Return the folder holding the shipped diffusers config skeletons."""
    return Path(__file__).resolve().parent / "model_configs"


def default_config_dir(kind: str, v_prediction: bool = False) -> Path:
    """Return the shipped config folder for a checkpoint kind.

    Args:
        kind: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        v_prediction: for ``sd2``, pick the 768-v (stable-diffusion-2) config instead of the
            512 epsilon (stable-diffusion-2-base) one.
    """
    names = {"sd1": "sd15", "sd2": "sd2_768_v" if v_prediction else "sd2_512", "sdxl": "sdxl_base"}
    if kind not in names:
        raise ValueError(f"unknown checkpoint kind {kind!r}; use one of {', '.join(KINDS)}")
    return model_configs_root() / names[kind]


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _check_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path


def _unwrap(state: Any, path: Path) -> dict[str, Any]:
    """Return the tensor dict of a loaded ``.ckpt``, unwrapping nested ``state_dict`` keys."""
    while isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path.name} does not contain a state dict (found {type(state).__name__})")
    return dict(state)


def load_ckpt_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a pickled PyTorch checkpoint safely (``weights_only=True``), memory-mapped when possible.

    Args:
        path: a ``.ckpt``/``.pt``/``.pth``/``.bin`` file.

    Raises:
        ValueError: the file needs unsafe unpickling (it contains Python objects other than
            tensors and plain containers) or is not a PyTorch checkpoint.
    """
    path = _check_file(path)
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # Legacy (non-zip) serialization cannot be memory-mapped.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if found:
            raise ValueError(
                f"{path.name} needs unsafe unpickling of Python objects ({found[1]}), which is refused; "
                "convert it to .safetensors with a tool you trust and pass that file instead"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\n", message + "\n")
        raise ValueError(
            f"{path.name} is not a readable PyTorch checkpoint with weights_only=True "
            f"({detail[1].strip() if detail else message.splitlines()[0]}); "
            "if it is one, convert it to .safetensors with a tool you trust"
        ) from None
    except Exception as error:  # torch raises many types for files that are not checkpoints
        raise ValueError(f"{path.name} is not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from None
    return _unwrap(state, path)


def read_checkpoint_keys(path: str | os.PathLike[str]) -> list[str]:
    """Return the tensor names of a checkpoint without loading its weights where possible.

    ``.safetensors``: reads the JSON header only. Other files are loaded with
    :func:`load_ckpt_state_dict` (memory-mapped for zip-format files, so still cheap).
    """
    path = _check_file(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{path.name} is not a readable .safetensors file ({error})") from None
    return list(load_ckpt_state_dict(path).keys())


# --------------------------------------------------------------------------------------------
# Detecting the checkpoint family
# --------------------------------------------------------------------------------------------


def _describe_unknown(keys: list[str]) -> str:
    """Say what a state dict that is not an SD1/SD2/SDXL single file seems to be."""
    if not keys:
        return "the file contains no tensors"
    if any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        return "this is a LoRA/LyCORIS file, not a full Stable Diffusion checkpoint"
    if any("joint_blocks." in k for k in keys):
        return "this looks like an SD3 checkpoint, which is not supported (SD1, SD2, SDXL only)"
    if any("double_blocks." in k or "single_blocks." in k for k in keys):
        return "this looks like a Flux checkpoint, which is not supported (SD1, SD2, SDXL only)"
    if any(k.startswith(_SDXL_REFINER_TEXT) for k in keys):
        return "this is an SDXL refiner checkpoint; use an SDXL base model"
    if any(k.startswith(("down_blocks.", "unet.", "text_model.", "encoder.layers.")) for k in keys):
        return "this is a diffusers/transformers-format state dict; pass the diffusers model folder instead"
    if any(k.startswith(_UNET_PREFIX) for k in keys):
        return "the checkpoint has a U-Net but no recognised text encoder"
    return f"no Stable Diffusion keys found (first key: {keys[0]!r})"


def detect_checkpoint_kind(keys: Iterable[str]) -> str:
    """Tell SD1, SD2 and SDXL original-layout checkpoints apart from their key names.

    Args:
        keys: tensor names of an original-layout (LDM/SGM) state dict.

    Returns:
        ``"sd1"`` (OpenAI CLIP under ``cond_stage_model.transformer``), ``"sd2"`` (OpenCLIP under
        ``cond_stage_model.model``) or ``"sdxl"`` (``conditioner.embedders.0/1``).

    Raises:
        ValueError: the keys are not those of a full SD1/SD2/SDXL checkpoint (a LoRA, a
            diffusers state dict, SD3/Flux, an SDXL refiner, a U-Net-only file...).
    """
    keys = list(keys)
    has_unet = any(k.startswith(_UNET_PREFIX + "input_blocks.") for k in keys)
    if has_unet:
        if any(k.startswith(_SDXL_TEXT2) for k in keys) and any(k.startswith(_SDXL_TEXT1) for k in keys):
            return "sdxl"
        if any(k.startswith(_SD2_TEXT) for k in keys):
            return "sd2"
        if any(k.startswith(_SD1_TEXT) for k in keys):
            return "sd1"
    raise ValueError(f"not a Stable Diffusion 1/2/XL single-file checkpoint: {_describe_unknown(keys)}")


# --------------------------------------------------------------------------------------------
# Loading models
# --------------------------------------------------------------------------------------------


def _require_configs(config_dir: Path, subfolders: Iterable[str]) -> None:
    """Fail early, with the missing path, when the config folder is incomplete."""
    if not (config_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"config folder {config_dir} has no model_index.json (need a diffusers-layout config folder)")
    for name in subfolders:
        folder = config_dir / name
        if not any((folder / f).is_file() for f in ("config.json", "scheduler_config.json")):
            raise FileNotFoundError(f"config folder {config_dir} lacks {name}/config.json")


def _check_loaded(model: torch.nn.Module, name: str, path: Path) -> None:
    """Raise if the checkpoint left parameters uninitialised (still on the meta device)."""
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise ValueError(
            f"{path.name} has no weights for {len(missing)} {name} tensors (e.g. {missing[0]}); "
            "the config folder probably does not match this checkpoint"
        )


def _config_mismatch(error: ValueError, path: Path, config_dir: Path) -> ValueError:
    """Reword diffusers' shape-mismatch error (its advice about ``low_cpu_mem_usage`` does not apply)."""
    message = str(error)
    found = re.search(r"because (\S+) expected shape (.+?), but got (.+?)\.", message)
    if not found:
        return error
    return ValueError(
        f"{path.name} does not match the config folder {config_dir} ({found[1]}: config expects "
        f"{found[2]}, file has {found[3]}); use the config folder of this model family"
    )


def _checked_kind(path: Path, kind: str) -> None:
    """Validate ``kind`` and that the file really is a checkpoint of that kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; use one of {', '.join(KINDS)}")
    found = detect_checkpoint_kind(read_checkpoint_keys(path))
    if found != kind:
        raise ValueError(f"{path.name} is an {found} checkpoint, but kind {kind!r} was requested")


def load_single_file(
    path: str | os.PathLike[str],
    kind: str,
    config_dir: str | os.PathLike[str],
    tokenizers: Mapping[str, Any],
    torch_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Load the U-Net and text encoder(s) of an original-layout checkpoint, without the VAE.

    Uses diffusers' ``StableDiffusionPipeline``/``StableDiffusionXLPipeline.from_single_file`` with a
    local ``config`` folder, ``local_files_only=True`` and ``vae=None`` (the VAE weights are
    neither converted nor loaded), so no network access is needed.

    Args:
        path: ``.safetensors`` or ``.ckpt`` single file.
        kind: ``"sd1"``, ``"sd2"`` or ``"sdxl"`` (checked against the file's keys).
        config_dir: diffusers-layout config folder (``model_index.json``, ``unet/``,
            ``text_encoder/``, ``scheduler/`` and for SDXL ``text_encoder_2/``), e.g.
            :func:`default_config_dir`.
        tokenizers: ``{"tokenizer": ...}`` and for SDXL also ``"tokenizer_2"``; handed to the
            pipeline so that no tokenizer files are needed in ``config_dir``.
        torch_dtype: optional dtype for the loaded models.

    Returns:
        ``{"unet", "text_encoder", "scheduler_config"}`` plus ``"text_encoder_2"`` for SDXL; the
        models are frozen (``requires_grad`` off) and in eval mode, the scheduler config is a plain
        dict (from ``config_dir/scheduler``). Without ``torch_dtype`` the models are float32 and,
        for ``.safetensors``, backed by a copy-on-write memory map of the file (fast, lazily paged).
    """
    path = _check_file(path)
    config_dir = Path(config_dir)
    _checked_kind(path, kind)
    is_xl = kind == "sdxl"
    names = ("unet", "text_encoder", "scheduler") + (("text_encoder_2",) if is_xl else ())
    _require_configs(config_dir, names)
    needed = ("tokenizer", "tokenizer_2") if is_xl else ("tokenizer",)
    absent = [name for name in needed if tokenizers.get(name) is None]
    if absent:
        raise ValueError(f"load_single_file needs tokenizers {', '.join(absent)} for a {kind} checkpoint")

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    extra: dict[str, Any] = {"tokenizer": tokenizers["tokenizer"]}
    if is_xl:
        pipeline_class = StableDiffusionXLPipeline
        extra.update(tokenizer_2=tokenizers["tokenizer_2"], image_encoder=None, feature_extractor=None)
    else:
        pipeline_class = StableDiffusionPipeline
        extra.update(safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    logger.info("loading %s checkpoint %s (configs from %s, VAE skipped)", kind, path, config_dir)
    try:
        pipe = pipeline_class.from_single_file(
            str(path),
            config=str(config_dir),
            vae=None,
            local_files_only=True,
            torch_dtype=torch_dtype,
            **extra,
        )
    except ValueError as error:
        raise _config_mismatch(error, path, config_dir) from error
    result: dict[str, Any] = {
        "unet": pipe.unet,
        "text_encoder": pipe.text_encoder,
        "scheduler_config": dict(pipe.scheduler.config),
    }
    if is_xl:
        result["text_encoder_2"] = pipe.text_encoder_2
    for name in ("unet", "text_encoder", "text_encoder_2"):
        if name in result:
            _check_loaded(result[name], name, path)
            result[name].requires_grad_(False)
    return result


def load_single_file_vae(
    path: str | os.PathLike[str],
    config_dir: str | os.PathLike[str],
    torch_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Load only the VAE (``first_stage_model.*``) of a single-file checkpoint, offline.

    Args:
        path: ``.safetensors`` or ``.ckpt`` single file.
        config_dir: diffusers-layout config folder with ``vae/config.json``.
        torch_dtype: optional dtype for the VAE.

    Returns:
        A diffusers ``AutoencoderKL`` in eval mode.
    """
    path = _check_file(path)
    config_dir = Path(config_dir)
    keys = read_checkpoint_keys(path)
    if not any(k.startswith("first_stage_model.") for k in keys):
        raise ValueError(f"{path.name} contains no VAE weights (first_stage_model.*); load a VAE separately")
    if not (config_dir / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"config folder {config_dir} lacks vae/config.json")

    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_single_file(
            str(path), config=str(config_dir), subfolder="vae", local_files_only=True, torch_dtype=torch_dtype
        )
    except ValueError as error:
        raise _config_mismatch(error, path, config_dir) from error
    _check_loaded(vae, "VAE", path)
    vae.requires_grad_(False)
    return vae
