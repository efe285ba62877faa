"""Bake LoRAs into a Stable Diffusion checkpoint: ``W <- W + sum_i ratio_i * (alpha_i / r_i) * up_i @ down_i``.

Inputs: an original-layout single file (``.safetensors``/``.ckpt``) or a diffusers folder. Output:
a single file in the original LDM/SGM layout (``.safetensors`` streamed tensor by tensor, or
``.ckpt``), or, for a diffusers-folder input, a diffusers folder (see
:mod:`library.diffusers_merge`). Every tensor no LoRA touches (text encoders, VAE, the rest of
the U-Net) is copied unchanged; changed tensors are computed in the merge precision and stored
in their original dtype unless ``--save_precision`` says otherwise.

The whole plan (which tensor each LoRA module changes, shapes, unknown modules) is checked
before anything is written; the output appears under its final name only when complete.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.errors import UserError
from library.merge_names import Target, checkpoint_targets
from networks.lora_weights import FAMILY_NAMES, LoRAFile, LoRAWeights, guess_family

logger = logging.getLogger(__name__)

PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_ARCHITECTURES = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2_v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
_RESOLUTIONS = {"sd1": "512x512", "sd2": "512x512", "sd2_v": "768x768", "sdxl": "1024x1024"}


@dataclass
class Checkpoint:
    """An opened checkpoint: names, shapes and dtypes up front, tensors on demand.

    Attributes:
        path: the file or folder.
        kind: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        shapes: tensor name -> shape, in file order.
        dtypes: tensor name -> dtype.
        get: returns one tensor by name.
        metadata: the file's safetensors metadata ({} otherwise).
        prediction_type: ``"epsilon"``/``"v"`` when the source says so (diffusers scheduler
            config, or the file's ``modelspec.prediction_type``), else None.
    """

    path: Path
    kind: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    get: Callable[[str], torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    prediction_type: str | None = None


def _from_state_dict(path: Path, state: dict[str, torch.Tensor], kind: str, **extra) -> Checkpoint:
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    return Checkpoint(path, kind, {k: tuple(v.shape) for k, v in tensors.items()}, {k: v.dtype for k, v in tensors.items()},
                      tensors.__getitem__, **extra)


def _open_safetensors(path: Path) -> Checkpoint:
    from library.safetensors_stream import SafetensorsReader
    from library.single_file import detect_checkpoint_kind

    try:
        reader = SafetensorsReader(path)
    except (OSError, ValueError) as error:
        raise UserError(f"--sd_model: {path.name} is not a readable .safetensors file ({error})") from None
    keys = reader.keys()
    shapes = {key: reader.entries[key][1] for key in keys}
    dtypes = {key: reader.entries[key][0] for key in keys}
    try:
        kind = detect_checkpoint_kind(keys)
    except ValueError as error:
        raise UserError(f"--sd_model: {path.name}: {error}") from None
    prediction = reader.metadata.get("modelspec.prediction_type")
    return Checkpoint(path, kind, shapes, dtypes, reader.get_tensor, reader.metadata,
                      prediction if prediction in ("epsilon", "v") else None)


def _open_ckpt(path: Path) -> Checkpoint:
    from library.single_file import detect_checkpoint_kind, load_ckpt_state_dict

    try:
        state = load_ckpt_state_dict(path)
        kind = detect_checkpoint_kind(state)
    except ValueError as error:
        raise UserError(f"--sd_model: {path.name}: {error}") from None
    return _from_state_dict(path, state, kind)


def diffusers_kind(folder: Path) -> str:
    """``sd1``/``sd2``/``sdxl`` of a diffusers folder (SD 2.x's text encoder uses ``gelu``)."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    if isinstance(index.get("text_encoder_2"), list) and index["text_encoder_2"][0]:
        return "sdxl"
    config = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))
    return "sd2" if config.get("hidden_act") == "gelu" else "sd1"


def stored_dtype(folder: Path) -> torch.dtype | None:
    """The floating dtype a diffusers component's weights are stored in (None if unknown)."""
    from safetensors import safe_open

    from library.safetensors_stream import DTYPES_BY_NAME

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                dtype = DTYPES_BY_NAME.get(handle.get_slice(key).get_dtype())
                if dtype is not None and dtype.is_floating_point:
                    return dtype
    return None


def load_diffusers_components(folder: Path, kind: str) -> dict[str, torch.nn.Module]:
    """Load a diffusers folder's U-Net, text encoder(s) and VAE (if any) in their stored dtypes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def load(cls, sub):
        return cls.from_pretrained(str(folder), subfolder=sub, torch_dtype=stored_dtype(folder / sub) or torch.float32).eval()

    parts = {"unet": load(UNet2DConditionModel, "unet"), "text_encoder": load(CLIPTextModel, "text_encoder")}
    if kind == "sdxl":
        parts["text_encoder_2"] = load(CLIPTextModelWithProjection, "text_encoder_2")
    if (folder / "vae" / "config.json").is_file():
        parts["vae"] = load(AutoencoderKL, "vae")
    return parts


def _prediction_of_folder(folder: Path) -> str | None:
    config = folder / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return None
    prediction = json.loads(config.read_text(encoding="utf-8")).get("prediction_type", "epsilon")
    return "v" if prediction == "v_prediction" else "epsilon"


def _open_diffusers(folder: Path) -> Checkpoint:
    from library.ldm_convert import build_ldm_state_dict

    if not (folder / "unet" / "config.json").is_file() or not (folder / "text_encoder" / "config.json").is_file():
        raise UserError(f"--sd_model: {folder} is a folder but not a diffusers model (needs model_index.json, unet/, text_encoder/)")
    kind = diffusers_kind(folder)
    parts = load_diffusers_components(folder, kind)
    try:
        state = build_ldm_state_dict(parts["unet"], parts["text_encoder"], parts.get("vae"), parts.get("text_encoder_2"), kind=kind)
    except ValueError as error:
        raise UserError(f"--sd_model: {folder} cannot be written in the original layout ({error})") from None
    return _from_state_dict(folder, state, kind, prediction_type=_prediction_of_folder(folder))


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open ``--sd_model``: a single file (header only for ``.safetensors``) or a diffusers folder.

    Raises:
        UserError: missing path, unreadable file, or not an SD 1.x/2.x/XL checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"--sd_model: {path} is a folder without model_index.json (not a diffusers model)")
        return _open_diffusers(path)
    if not path.is_file():
        raise UserError(f"--sd_model: not found: {path}")
    if path.suffix == ".safetensors":
        return _open_safetensors(path)
    return _open_ckpt(path)


# ---------------------------------------------------------------------------------------------
# The plan: which tensor every LoRA module changes
# ---------------------------------------------------------------------------------------------

Contribution = tuple[float, LoRAWeights, "tuple[int, int] | None"]


def _squeeze(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def _family_hint(lora: LoRAFile, kind: str, script_hint: Callable[[str], str] | None) -> str:
    family = guess_family(lora)
    if family is None or family == kind or (family in ("sd1", "sd2") and kind in ("sd1", "sd2")):
        return "; is it a LoRA for another model?"
    hint = f"; it looks like an {FAMILY_NAMES[family]} LoRA"
    return hint + (f" ({script_hint(family)})" if script_hint else "")


def plan_merge(
    targets: dict[str, Target],
    kind: str,
    loras: Sequence[LoRAFile],
    ratios: Sequence[float],
    where: str,
    script_hint: Callable[[str], str] | None = None,
) -> dict[str, list[Contribution]]:
    """Match every LoRA module to a tensor and check shapes, before anything is loaded or written.

    Args:
        targets: from :func:`library.merge_names.checkpoint_targets` (or ``module_targets``).
        kind: the checkpoint's kind (for messages).
        loras, ratios: the LoRAs and their ratios.
        where: how to name the model in messages, e.g. ``"this SD 1.x checkpoint"``.
        script_hint: for a LoRA of another family, the advice to add (e.g. which script to use).

    Returns:
        tensor name -> ``[(ratio, module, rows)]`` in LoRA order (modules with ratio 0 left out).

    Raises:
        UserError: a module with no layer in the model, a shape mismatch, or two names in one
            file for the same layer.
    """
    plan: dict[str, list[Contribution]] = {}
    for lora, ratio in zip(loras, ratios):
        unknown = [name for name in lora.modules if name not in targets]
        if unknown:
            raise UserError(
                f"{lora.path.name}: {len(unknown)} of its {len(lora.modules)} modules have no layer in {where} "
                f"(first: {unknown[0]}){_family_hint(lora, kind, script_hint)}"
            )
        seen: dict[tuple[str, tuple[int, int] | None], str] = {}
        for name, module in lora.modules.items():
            target = targets[name]
            if _squeeze(module.delta_shape) != _squeeze(target.shape):
                raise UserError(
                    f"{lora.path.name}: {name} changes a layer of shape {module.delta_shape}, but the model's layer "
                    f"is {target.shape}{_family_hint(lora, kind, script_hint)}"
                )
            slot = (target.key, target.rows)
            if slot in seen:
                raise UserError(f"{lora.path.name}: {seen[slot]} and {name} name the same layer; the file is inconsistent")
            seen[slot] = name
            if ratio != 0:
                plan.setdefault(target.key, []).append((ratio, module, target.rows))
    return plan


def merged_tensor(original: torch.Tensor, contributions: Sequence[Contribution], merge_dtype: torch.dtype,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """``original + sum ratio * delta`` computed in ``merge_dtype``, returned in ``out_dtype``."""
    weight = original.to(dtype=merge_dtype, copy=True)
    for ratio, module, rows in contributions:
        view = weight if rows is None else weight[rows[0]: rows[1]]
        view.add_(module.delta(merge_dtype, weight.device).reshape(view.shape), alpha=ratio)
    return weight.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Metadata and writing
# ---------------------------------------------------------------------------------------------


def architecture_key(kind: str, prediction_type: str | None) -> str:
    return "sd2_v" if kind == "sd2" and prediction_type == "v" else kind


def merge_metadata(base: str | None, loras: Sequence[LoRAFile], ratios: Sequence[float], title: str, kind: str,
                   prediction_type: str, precision: str, tool: str, adapter: str | None = None) -> dict[str, str]:
    """modelspec metadata of a merge result, saying what was merged at which ratio.

    ``modelspec.merged_from`` lists the titles as sd-scripts does (base model first), each LoRA with
    its ratio; ``leco_merge`` repeats it as JSON (files, titles, ratios, hashes, precision, tool).
    """
    key = architecture_key(kind, prediction_type)
    architecture = _ARCHITECTURES[key] + (f"/{adapter}" if adapter else "")
    items = ([base] if base else []) + [f"{lora.title} (ratio {ratio:g})" for lora, ratio in zip(loras, ratios)]
    recipe = {
        "tool": tool,
        "base": base,
        "loras": [{"file": lora.path.name, "title": lora.title, "ratio": ratio,
                   "sshs_model_hash": lora.metadata.get("sshs_model_hash")} for lora, ratio in zip(loras, ratios)],
        "precision": precision,
        "time": time.time(),
    }
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": _RESOLUTIONS[key],
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": prediction_type,
        "modelspec.merged_from": ", ".join(items),
        "leco_merge": json.dumps(recipe, ensure_ascii=False),
    }


def prediction_type_for(checkpoint: Checkpoint, loras: Sequence[LoRAFile]) -> str:
    """The checkpoint's own statement, else the LoRAs' (``ss_v_parameterization``), else SD 2.x: ``v``."""
    if checkpoint.prediction_type:
        return checkpoint.prediction_type
    for lora in loras:
        flag = lora.metadata.get("ss_v_parameterization") or ""
        stated = lora.metadata.get("modelspec.prediction_type")
        if flag in ("True", "False"):
            return "v" if flag == "True" else "epsilon"
        if stated in ("v", "epsilon"):
            return stated
    if checkpoint.kind == "sd2":
        logger.warning("cannot tell whether this SD 2.x model predicts v or epsilon; the metadata says v (as sd-scripts)")
        return "v"
    return "epsilon"


def _output_dtype(dtype: torch.dtype, save_dtype: torch.dtype | None) -> torch.dtype:
    return save_dtype if save_dtype is not None and dtype.is_floating_point else dtype


def write_merged_checkpoint(
    checkpoint: Checkpoint,
    plan: dict[str, list[Contribution]],
    save_to: Path,
    merge_dtype: torch.dtype,
    save_dtype: torch.dtype | None,
    metadata: dict[str, str] | None,
) -> Path:
    """Write the merged checkpoint atomically (``.safetensors`` streamed; ``.ckpt`` via ``torch.save``)."""
    from library.safetensors_stream import StreamingSafetensorsWriter

    def produce(key: str) -> torch.Tensor:
        out_dtype = _output_dtype(checkpoint.dtypes[key], save_dtype)
        tensor = checkpoint.get(key)
        if key in plan:
            return merged_tensor(tensor, plan[key], merge_dtype, out_dtype)
        return tensor if tensor.dtype == out_dtype else tensor.to(out_dtype)

    keys = list(checkpoint.shapes)
    if save_to.suffix == ".safetensors":
        layout = [(key, _output_dtype(checkpoint.dtypes[key], save_dtype), checkpoint.shapes[key]) for key in keys]
        with StreamingSafetensorsWriter(save_to, layout, {"format": "pt", **(metadata or {})}) as writer:
            for key in keys:
                writer.write(key, produce(key))
        return save_to
    state = {key: produce(key) for key in keys}
    save_to.parent.mkdir(parents=True, exist_ok=True)
    temp = save_to.with_name(f".{save_to.name}.{os.getpid()}.tmp")
    try:
        torch.save({"state_dict": state}, temp)
        os.replace(temp, save_to)
    finally:
        temp.unlink(missing_ok=True)
    return save_to


def describe_kind(kind: str) -> str:
    return FAMILY_NAMES[kind]


def targets_for(checkpoint: Checkpoint) -> dict[str, Target]:
    return checkpoint_targets(checkpoint.shapes, checkpoint.kind)
