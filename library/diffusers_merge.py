"""Bake LoRAs into a diffusers model folder and write the result as a diffusers folder.

Used when ``--sd_model`` is a diffusers folder and ``--save_to`` is not a ``.safetensors``/``.ckpt``
file. Only the components a LoRA changes (the U-Net; a text encoder if a file has ``lora_te*``
modules) are loaded, changed and saved again with ``save_pretrained`` in their stored dtype;
every other file of the folder (tokenizers, scheduler, VAE, ``model_index.json``, extra files
such as the concept world's ``concept_world.json``) is copied byte for byte. The folder is
built under a temporary name and renamed into place at the end; ``leco_merge.json`` records
what was merged at which ratio.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from library.atomic import replace_folder
from library.checkpoint_merge import diffusers_kind, merged_tensor, plan_merge, stored_dtype
from library.errors import UserError
from library.merge_names import module_targets
from networks.lora_weights import FAMILY_NAMES, LoRAFile

logger = logging.getLogger(__name__)

RECIPE_FILE = "leco_merge.json"
_TEXT_PREFIXES = {"sd1": {"text_encoder": "lora_te"}, "sd2": {"text_encoder": "lora_te"},
                  "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}


def _load(folder: Path, namespace: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}[namespace]
    dtype = stored_dtype(folder / namespace) or torch.float32
    return cls.from_pretrained(str(folder), subfolder=namespace, torch_dtype=dtype).eval()


def check_folder_output(save_to: Path, source: Path) -> None:
    """``--save_to`` for a folder output: not the source itself, and only replacing a diffusers folder."""
    if save_to.resolve() == source.resolve():
        raise UserError("--save_to: the output folder must differ from --sd_model")
    if save_to.exists() and not (save_to.is_dir() and (save_to / "model_index.json").is_file()):
        raise UserError(f"--save_to: {save_to} exists and is not a diffusers model folder; choose another path")


def merge_into_diffusers_folder(
    folder: Path,
    loras: Sequence[LoRAFile],
    ratios: Sequence[float],
    save_to: Path,
    merge_dtype: torch.dtype,
    metadata: Callable[[str, str], dict[str, str]] | None,
    script_hint: Callable[[str], str] | None = None,
) -> Path:
    """Merge the LoRAs into the folder's models and write a new diffusers folder at ``save_to``.

    Args:
        folder: the diffusers model folder (``--sd_model``).
        loras, ratios: LoRAs and their ratios.
        save_to: the output folder (replaced if it is an existing diffusers folder).
        merge_dtype: precision of the arithmetic.
        metadata: ``(kind, prediction_type) -> metadata`` written to ``leco_merge.json``, or None.
        script_hint: advice for LoRAs of another family (see :func:`plan_merge`).
    """
    check_folder_output(save_to, folder)
    kind = diffusers_kind(folder)
    wanted = {"unet": "lora_unet"}
    if any(name.startswith("lora_te") for lora in loras for name in lora.modules):
        wanted.update(_TEXT_PREFIXES[kind])
    models = {namespace: (prefix, _load(folder, namespace)) for namespace, prefix in wanted.items()}
    plan = plan_merge(module_targets(models), kind, loras, ratios, f"the {FAMILY_NAMES[kind]} model {folder.name}", script_hint)
    parameters = {f"{namespace}/{name}": parameter for namespace, (_, model) in models.items()
                  for name, parameter in model.named_parameters()}
    changed = set()
    with torch.no_grad():
        for key, contributions in plan.items():
            parameter = parameters[key]
            parameter.data = merged_tensor(parameter.data, contributions, merge_dtype, parameter.dtype)
            changed.add(key.split("/", 1)[0])
    temp = save_to.with_name(f".{save_to.name}.tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    try:
        temp.mkdir(parents=True)
        for entry in folder.iterdir():
            if entry.name in changed or entry.name == RECIPE_FILE:
                continue
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, temp / entry.name)
        for namespace in sorted(changed):
            models[namespace][1].save_pretrained(str(temp / namespace))
        if metadata is not None:
            scheduler = folder / "scheduler" / "scheduler_config.json"
            prediction = "epsilon"
            if scheduler.is_file() and json.loads(scheduler.read_text(encoding="utf-8")).get("prediction_type") == "v_prediction":
                prediction = "v"
            (temp / RECIPE_FILE).write_text(json.dumps(metadata(kind, prediction), indent=2), encoding="utf-8")
        replace_folder(temp, save_to)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    logger.info("wrote diffusers folder %s (rewritten: %s; everything else copied)", save_to, ", ".join(sorted(changed)) or "nothing")
    return save_to
