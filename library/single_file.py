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


def check_config_dir(config_dir: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """Check that ``config_dir`` holds the configs a ``kind`` checkpoint needs; return its scheduler config.

    Raises:
        FileNotFoundError: the folder lacks ``model_index.json`` or a component's config.
    """
    from diffusers import DDPMScheduler

    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; use one of {', '.join(KINDS)}")
    config_dir = Path(config_dir)
    names = ("unet", "text_encoder", "scheduler") + (("text_encoder_2",) if kind == "sdxl" else ())
    _require_configs(config_dir, names)
    return dict(DDPMScheduler.load_config(str(config_dir), subfolder="scheduler"))


def open_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, memory-mapped: nothing is copied until a tensor is converted.

    ``.safetensors`` tensors are views of the file's pages (which the kernel can drop again);
    zip-format ``.ckpt`` files are mapped by ``torch.load(mmap=True)``. Drop the dict to unmap.
    """
    path = _check_file(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        return load_file(str(path))
    return load_ckpt_state_dict(path)


def load_single_file_unet(path: str | os.PathLike[str], config_dir: str | os.PathLike[str],
                          torch_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The U-Net of an original-layout checkpoint, each weight converted straight into ``torch_dtype``.

    The model is built on the meta device (no weights are allocated or randomly initialised), the
    memory-mapped file's U-Net tensors are renamed with diffusers' converter and cast one by one,
    and the results become the parameters (``assign``). The only copy in memory is therefore the
    U-Net in ``torch_dtype``: a bf16 run never holds float32 weights, and a file already in
    ``torch_dtype`` is used in place. Frozen, eval mode.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    path, config_dir = Path(path), Path(config_dir)
    dtype = torch_dtype or torch.float32
    config = UNet2DConditionModel.load_config(str(config_dir), subfolder="unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    checkpoint = open_state_dict(path)
    try:
        converted = convert_ldm_unet_checkpoint(checkpoint, unet.config)
        del checkpoint  # the converted dict keeps only the U-Net's views of the file
        weights = {}
        for name in list(converted):
            value = converted.pop(name)
            weights[name] = value.to(dtype) if value.is_floating_point() else value
        unet.load_state_dict(weights, strict=True, assign=True)
    except (KeyError, RuntimeError) as error:
        raise _state_dict_mismatch(error, path, config_dir) from None
    _check_loaded(unet, "unet", path)
    return unet.requires_grad_(False).eval()


def _state_dict_mismatch(error: Exception, path: Path, config_dir: Path) -> ValueError:
    """Reword torch's ``load_state_dict`` error (or a converter's KeyError) as one line naming the first mismatch."""
    message = str(error)
    size = re.search(r"size mismatch for (\S+): copying a param with shape (.+?) from checkpoint, "
                     r"the shape in current model is (.+?)\.", message)
    missing = re.search(r"Missing key\(s\) in state_dict: \"([^\"]+)\"", message)
    if size:
        detail = f"{size[1]}: config expects {size[3]}, file has {size[2]}"
    elif missing:
        detail = f"the file has no {missing[1]}"
    else:
        detail = f"{type(error).__name__}: {message.strip().splitlines()[0][:200] if message.strip() else ''}"
    return ValueError(f"{path.name} does not match the config folder {config_dir} ({detail}); "
                      "use the config folder of this model family")


def load_single_file_text_encoder(path: str | os.PathLike[str], kind: str, config_dir: str | os.PathLike[str], index: int = 0,
                                  torch_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Text encoder ``index`` of an original-layout checkpoint (1 = SDXL's OpenCLIP-bigG), in ``torch_dtype``.

    Only this encoder's weights are converted; the rest of the file stays unread. Frozen, eval mode.
    """
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path, config_dir = Path(path), Path(config_dir)
    if index not in ((0, 1) if kind == "sdxl" else (0,)):
        raise ValueError(f"a {kind} checkpoint has no text encoder {index}")
    cls, subfolder = (CLIPTextModelWithProjection, "text_encoder_2") if index == 1 else (CLIPTextModel, "text_encoder")
    checkpoint = open_state_dict(path)
    try:
        encoder = create_diffusers_clip_model_from_ldm(cls, checkpoint, subfolder=subfolder, config=str(config_dir),
                                                       torch_dtype=torch_dtype, local_files_only=True)
    except ValueError as error:
        raise _config_mismatch(error, path, config_dir) from error
    finally:
        del checkpoint
    _check_loaded(encoder, subfolder, path)
    return encoder.requires_grad_(False).eval()


def load_single_file(
    path: str | os.PathLike[str],
    kind: str,
    config_dir: str | os.PathLike[str],
    tokenizers: Mapping[str, Any],
    torch_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Load the U-Net and text encoder(s) of an original-layout checkpoint, without the VAE.

    Each component is converted from the memory-mapped file with diffusers' single-file
    converters and a local ``config`` folder, so no network access is needed and the VAE
    weights are neither converted nor loaded. (Training loads the components one at a time
    through :func:`load_single_file_text_encoder` and :func:`load_single_file_unet`.)

    Args:
        path: ``.safetensors`` or ``.ckpt`` single file.
        kind: ``"sd1"``, ``"sd2"`` or ``"sdxl"`` (checked against the file's keys).
        config_dir: diffusers-layout config folder (``model_index.json``, ``unet/``,
            ``text_encoder/``, ``scheduler/`` and for SDXL ``text_encoder_2/``), e.g.
            :func:`default_config_dir`.
        tokenizers: ``{"tokenizer": ...}`` and for SDXL also ``"tokenizer_2"`` (checked to be
            present: a model without its tokenizers cannot encode prompts).
        torch_dtype: optional dtype for the loaded models (default float32).

    Returns:
        ``{"unet", "text_encoder", "scheduler_config"}`` plus ``"text_encoder_2"`` for SDXL; the
        models are frozen (``requires_grad`` off) and in eval mode, the scheduler config is a plain
        dict (from ``config_dir/scheduler``).
    """
    path = _check_file(path)
    config_dir = Path(config_dir)
    _checked_kind(path, kind)
    scheduler_config = check_config_dir(config_dir, kind)
    needed = ("tokenizer", "tokenizer_2") if kind == "sdxl" else ("tokenizer",)
    absent = [name for name in needed if tokenizers.get(name) is None]
    if absent:
        raise ValueError(f"load_single_file needs tokenizers {', '.join(absent)} for a {kind} checkpoint")
    logger.info("loading %s checkpoint %s (configs from %s, VAE skipped)", kind, path, config_dir)
    dtype = torch_dtype or torch.float32
    result: dict[str, Any] = {
        "unet": load_single_file_unet(path, config_dir, dtype),
        "text_encoder": load_single_file_text_encoder(path, kind, config_dir, 0, dtype),
        "scheduler_config": scheduler_config,
    }
    if kind == "sdxl":
        result["text_encoder_2"] = load_single_file_text_encoder(path, kind, config_dir, 1, dtype)
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
