"""LoRA files: names, precision, atomic writes and the metadata every UI reads (``ss_*``, modelspec).

File names follow sd-scripts: ``NAME-step00000100.safetensors`` while training, ``NAME.safetensors``
at the end. Writes go to a temporary file in the same folder and are renamed into place, so an
interrupted run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from library.config import RunConfig

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_ARCHITECTURES = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2_v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
_IMPLEMENTATIONS = {
    "sd1": "https://github.com/CompVis/stable-diffusion",
    "sd2": "https://github.com/Stability-AI/stablediffusion",
    "sdxl": "https://github.com/Stability-AI/generative-models",
}
SETTINGS_IN_METADATA = 256  # expanded settings listed in ss_leco_settings


def step_file_name(output_name: str, step: int, extension: str) -> str:
    """Intermediate file name, e.g. ``my_leco-step00000100.safetensors``."""
    return f"{output_name}-step{step:08d}.{extension}"


def final_file_name(output_name: str, extension: str) -> str:
    return f"{output_name}.{extension}"


def legacy_model_hash(path: Path) -> str:
    """AUTOMATIC1111's old model hash: sha256 of 64 KiB at 1 MiB, first 8 hex digits."""
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


class BaseModelHashes:
    """Hashes of a single-file base model, computed in a background thread while training starts."""

    def __init__(self, model_path: str):
        path = Path(model_path).expanduser()
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future | None = None
        self.legacy = ""
        if path.is_file():
            self.legacy = legacy_model_hash(path)
            self._executor = ThreadPoolExecutor(max_workers=1)
            self._future = self._executor.submit(file_sha256, path)

    def full(self) -> str:
        """The full sha256 (A1111's new hash); waits for the thread the first time."""
        if self._future is None:
            return ""
        value = self._future.result()
        self._executor.shutdown(wait=False)
        return value


def _plain(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def build_metadata(config: RunConfig, kind: str, prediction_type: str, started_at: float, session_id: int,
                   hashes: BaseModelHashes, network_args: dict[str, Any], optimizer_name: str,
                   network_dim: int, network_alpha: float) -> dict[str, str]:
    """The static part of a LoRA's metadata (``ss_*`` as sd-scripts writes, LECO keys, modelspec).

    ``network_dim``/``network_alpha`` are the built network's (read from the file with --dim_from_weights).
    """
    opt, net, leco, train, out, model = (config.optimizer, config.network, config.leco, config.train,
                                         config.output, config.model)
    resolutions = sorted({setting.resolution for setting in config.prompts.settings})
    v_pred = prediction_type == "v_prediction"
    from library.models import model_version

    metadata = {
        "ss_session_id": str(session_id),
        "ss_training_started_at": str(started_at),
        "ss_output_name": out.output_name,
        "ss_learning_rate": str(opt.learning_rate),
        "ss_unet_lr": str(opt.unet_learning_rate),
        "ss_text_encoder_lr": "None",
        "ss_max_train_steps": str(train.max_train_steps),
        "ss_lr_warmup_steps": str(opt.lr_warmup_steps),
        "ss_lr_scheduler": opt.lr_scheduler,
        "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": str(opt.max_grad_norm),
        "ss_network_module": net.module,
        "ss_network_dim": str(network_dim),
        "ss_network_alpha": str(network_alpha),
        "ss_network_dropout": str(net.dropout),
        "ss_network_args": json.dumps(network_args, ensure_ascii=False),
        "ss_mixed_precision": train.mixed_precision,
        "ss_full_fp16": str(train.full_fp16),
        "ss_full_bf16": str(train.full_bf16),
        "ss_gradient_checkpointing": str(train.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_seed": str(train.seed),
        "ss_v2": str(kind == "sd2"),
        "ss_v_parameterization": str(v_pred),
        "ss_base_model_version": model_version(kind, prediction_type),
        "ss_sd_model_name": Path(model.path).name if Path(model.path).expanduser().exists() else model.path,
        "ss_clip_skip": str(model.clip_skip),
        "ss_max_token_length": str(model.max_token_length),
        "ss_zero_terminal_snr": str(model.zero_terminal_snr),
        "ss_noise_offset": str(leco.noise_offset),
        "ss_min_snr_gamma": str(leco.min_snr_gamma),
        "ss_scale_weight_norms": str(net.scale_weight_norms),
        "ss_loss_type": leco.loss_type,
        "ss_huber_c": str(leco.huber_c),
        "ss_huber_schedule": leco.huber_schedule,
        "ss_huber_scale": str(leco.huber_scale),
        "ss_resolution": _plain([list(resolution) for resolution in resolutions]),
        "ss_num_train_images": "0",
        "ss_leco_prompts_file": config.prompts.path.name,
        "ss_leco_prompts": config.prompts.text,
        "ss_leco_prompt_count": str(len(config.prompts.settings)),
        "ss_leco_settings": json.dumps([s.as_dict() for s in config.prompts.settings[:SETTINGS_IN_METADATA]], ensure_ascii=False),
        "ss_leco_max_denoising_steps": str(leco.max_denoising_steps),
        "ss_leco_denoise_guidance_scale": str(leco.denoise_guidance_scale),
        "ss_leco_denoise_with_frozen": str(leco.denoise_with_frozen),
        "ss_leco_denoise_sampler": leco.denoise_sampler,
        "ss_leco_legacy_timestep": str(leco.legacy_timestep),
        "ss_leco_trajectory": leco.trajectory,
    }
    if hashes.legacy:
        metadata["ss_sd_model_hash"] = hashes.legacy
    if out.training_comment:
        metadata["ss_training_comment"] = out.training_comment
    metadata.update(modelspec(config, kind, v_pred, resolutions[0] if resolutions else (512, 512)))
    return metadata


def modelspec(config: RunConfig, kind: str, v_pred: bool, resolution: tuple[int, int]) -> dict[str, str]:
    """The ``modelspec.*`` block (Stability's model metadata spec 1.0.0) for a LoRA."""
    arch_key = "sd2_v" if kind == "sd2" and v_pred else kind
    out = config.output
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{_ARCHITECTURES[arch_key]}/lora",
        "modelspec.implementation": _IMPLEMENTATIONS[kind],
        "modelspec.title": out.metadata_title or out.output_name,
        "modelspec.resolution": f"{resolution[1]}x{resolution[0]}",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }
    for key, value in (("author", out.metadata_author), ("description", out.metadata_description),
                       ("license", out.metadata_license), ("tags", out.metadata_tags)):
        if value:
            spec[f"modelspec.{key}"] = value
    if config.model.zero_terminal_snr:
        spec["modelspec.timestep_range"] = "0,1000"
    return spec


# What clients need to classify a LoRA, kept under --no_metadata (sd-scripts' SS_METADATA_MINIMUM_KEYS):
# AUTOMATIC1111 tells SDXL/SD2/SD1 apart by ss_base_model_version and ss_v2 and hides other families.
MINIMUM_METADATA_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                         "ss_network_args")


def minimum_metadata(static: dict[str, str]) -> dict[str, str]:
    """``--no_metadata``: only the keys clients need to classify the file (no prompts, paths or training details)."""
    return {key: static[key] for key in MINIMUM_METADATA_KEYS if key in static}


def step_metadata(static: dict[str, str], step: int, hashes: BaseModelHashes, final: bool) -> dict[str, str]:
    """Static metadata plus what changes per save (step count, finish time, base hash)."""
    metadata = dict(static)
    metadata["ss_steps"] = str(step)
    metadata["modelspec.date"] = datetime.datetime.now().replace(microsecond=0).isoformat()
    full_hash = hashes.full()
    if full_hash:
        metadata["ss_new_sd_model_hash"] = full_hash
    if final:
        metadata["ss_training_finished_at"] = str(time.time())
    return metadata


def rename_to_sgm(path: Path, aliases: dict[str, str]) -> None:
    """Rewrite an SDXL LoRA file whose keys use diffusers module paths with the SGM names the UIs read.

    For network modules that name diffusers U-Net layers by their diffusers paths (LyCORIS);
    ``networks.lora`` writes SGM names itself.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from networks.lora import canonical_weights, save_lora_file

    tensors = load_file(str(path))
    renamed = canonical_weights(tensors, aliases)
    if list(renamed) == list(tensors):
        return
    with safe_open(str(path), framework="pt") as handle:
        metadata = {key: value for key, value in (handle.metadata() or {}).items() if not key.startswith("sshs_")}
    save_lora_file(renamed, path, metadata)


def save_network_file(network, path: Path, dtype: torch.dtype | None, metadata: dict[str, str] | None,
                      sgm_aliases: dict[str, str] | None = None) -> Path:
    """Write the network through its own ``save_weights`` into a temp name, then rename atomically.

    Works for any kohya-protocol network module (ours, LyCORIS), whether or not it writes atomically.
    ``sgm_aliases`` (SDXL with a foreign network module) renames diffusers-path keys to SGM names.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        if path.suffix == ".safetensors":
            network.save_weights(str(tmp), dtype, metadata)
            if sgm_aliases:
                rename_to_sgm(tmp, sgm_aliases)
        else:
            network.save_weights(str(tmp), dtype, None)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def prune_step_outputs(output_dir: Path, output_name: str, suffix: str, current_step: int, keep_last_n_steps: int) -> None:
    """Delete ``NAME-stepNNNNNNNN<suffix>`` files (or state folders, suffix ``-state``) whose step is
    older than ``current_step - N`` (``--save_last_n_steps`` / ``--save_last_n_steps_state``, sd-scripts' rule)."""
    import glob
    import shutil

    prefix = f"{output_name}-step"
    for path in output_dir.glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"):
        digits = path.name[len(prefix): len(path.name) - len(suffix)]
        if not digits.isdigit() or int(digits) >= current_step - keep_last_n_steps:
            continue
        kind = "state" if path.is_dir() else "checkpoint"
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        logger.info("removed old %s %s", kind, path.name)
