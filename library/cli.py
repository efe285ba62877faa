"""The command line shared by ``train_leco.py`` and ``sdxl_train_leco.py``.

sd-scripts flag names and defaults. ``--config_file`` reads a TOML of flags (sections are only
for grouping; flags on the command line win). The namespace is validated here, completely and
before any model is loaded, and turned into a frozen :class:`~library.config.RunConfig`.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from library.arguments import IMPLIED_FLAGS, REJECTED_FLAGS, setup_parser
from library.config import (
    LecoConfig,
    LogConfig,
    ModelConfig,
    NetworkConfig,
    OptimizerConfig,
    OutputConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    check_zero_terminal_snr,
)
from library.config_file import read_config_file, write_config_file
from library.errors import UserError
from library.optimizers import check_optimizer, literal_values, parse_key_values, resolve_optimizer
from library.prompts import load_prompt_file
from library.sample_prompts import load_sample_prompts
from library.state import check_state_folder

__all__ = [
    "REJECTED_FLAGS", "build_run_config", "check_flags", "effective_args", "implied_flag_notes", "parse_namespace",
    "read_config_file", "setup_parser", "write_config_file",
]

# ----------------------------------------------------------------------------------------------
# Parse and validate


def parse_namespace(argv: Sequence[str] | None, family: str) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """Parse ``argv`` (with ``--config_file`` defaults applied). ``--help`` raises SystemExit(0)."""
    parser = setup_parser(family)
    argv = join_signed_lists(list(sys.argv[1:] if argv is None else argv))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_file")
    pre.add_argument("--output_config", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.config_file and not known.output_config:
        parser.set_defaults(**read_config_file(known.config_file, parser))
    return parser.parse_args(argv), parser


def join_signed_lists(argv: list[str], flags: Sequence[str] = ("--sample_multipliers",)) -> list[str]:
    """``--sample_multipliers -1,0,1`` -> ``--sample_multipliers=-1,0,1`` (argparse would read -1,0,1 as a flag)."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in flags and index + 1 < len(argv) and re.match(r"^-[\d.]", argv[index + 1]):
            joined.append(f"{token}={argv[index + 1]}")
            index += 2
            continue
        joined.append(token)
        index += 1
    return joined


def effective_args(namespace: argparse.Namespace) -> dict[str, Any]:
    """The flags that define the run (no config-file plumbing), for metadata and --output_config."""
    skip = {"config_file", "output_config", *REJECTED_FLAGS, *IMPLIED_FLAGS}
    return {key: value for key, value in vars(namespace).items() if key not in skip}


def implied_flag_notes(namespace: argparse.Namespace) -> list[str]:
    """One info line per given sd-scripts flag whose intent LECO always meets (it changes nothing)."""
    return [f"--{flag}: always the case in LECO ({reason}); the flag changes nothing"
            for flag, reason in IMPLIED_FLAGS.items() if getattr(namespace, flag, None) is not None]


def _reject_unsupported(args: argparse.Namespace, family: str) -> None:
    for flag, reason in REJECTED_FLAGS.items():
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag} is not supported: {reason}")
    if family == "sdxl" and args.v2:
        raise UserError("--v2 cannot be used with sdxl_train_leco.py (SDXL is not SD 2.x); for SD 2.x use train_leco.py")


def _require(args: argparse.Namespace) -> None:
    for flag in ("pretrained_model_name_or_path", "prompts_file", "output_dir"):
        if not getattr(args, flag):
            raise UserError(f"--{flag} is required (see --help)")


def _check_model_path(path: str) -> None:
    candidate = Path(path).expanduser()
    if candidate.exists():
        return
    looks_local = path.startswith((".", "/", "~")) or path.endswith((".safetensors", ".ckpt", ".pt", ".bin")) or os.sep + os.sep in path
    if looks_local or path.count("/") != 1:
        raise UserError(
            f"--pretrained_model_name_or_path: {path} not found (give a diffusers folder, a .safetensors/.ckpt file, "
            "or a hub id like org/name)"
        )


def _check_existing(flag: str, path: str | None) -> None:
    if path and not Path(path).expanduser().exists():
        raise UserError(f"--{flag}: not found: {path}")


def _check_network_args(module: str, items: list[str] | None, family: str | None = None) -> None:
    """networks.lora's options are checked here, before any model is loaded (block counts by family)."""
    if module != "networks.lora":
        return
    from networks.lora import validate_network_args

    try:
        validate_network_args(parse_key_values(items, "--network_args"), family)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _check_group_learning_rates(module: str, items: list[str] | None, optimizer_type: str, family: str) -> None:
    """Per-block lr weights and LoRA+ need an optimizer that accepts a learning rate per parameter group."""
    if module != "networks.lora":
        return
    from networks.lora_blocks import check_optimizer_accepts_groups

    try:
        check_optimizer_accepts_groups(parse_key_values(items, "--network_args"), optimizer_type, family)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _check_network_module(name: str) -> None:
    try:
        found = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        found = None
    if found is None:
        hint = " (pip install lycoris-lora)" if name.startswith("lycoris") else ""
        raise UserError(f"--network_module: cannot import '{name}'{hint}")


def _check_network_weights(path: str, module: str) -> None:
    """``--network_weights`` must be a readable LoRA file (kohya names for networks.lora)."""
    from networks.lora_files import lora_file_keys

    try:
        keys = lora_file_keys(Path(path).expanduser())
    except ValueError as exc:
        raise UserError(f"--network_weights: {exc}") from None
    if module == "networks.lora" and not any(key.endswith(".lora_down.weight") for key in keys):
        raise UserError(f"--network_weights: {Path(path).name} has no kohya LoRA keys (*.lora_down.weight); "
                        f"first key: {keys[0]}")


def _check_attention(args: argparse.Namespace) -> str:
    if not args.xformers:
        return "sdpa"
    if args.sdpa:
        raise UserError("--sdpa and --xformers both given: choose one attention implementation")
    if importlib.util.find_spec("xformers") is None:
        raise UserError("--xformers: xformers is not installed (pip install xformers), or use --sdpa")
    import torch

    if not torch.cuda.is_available():
        raise UserError("--xformers needs a CUDA GPU; on this machine use --sdpa (the default)")
    return "xformers"


def mixed_precision_of(args: argparse.Namespace) -> str:
    """``--mixed_precision``, else what ``accelerate launch --mixed_precision`` set, else "no"."""
    value = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if value not in ("no", "fp16", "bf16"):
        raise UserError(f"accelerate launch --mixed_precision {value} is not supported; use no, fp16 or bf16")
    return value


def _check_precision(args: argparse.Namespace) -> None:
    if args.full_bf16 and mixed_precision_of(args) != "bf16":
        raise UserError("--full_bf16 needs --mixed_precision bf16")
    if args.full_fp16 and mixed_precision_of(args) != "fp16":
        raise UserError("--full_fp16 needs --mixed_precision fp16")
    if args.full_bf16 and args.full_fp16:
        raise UserError("use either --full_bf16 or --full_fp16, not both")


def _check_ranges(args: argparse.Namespace) -> None:
    if not 2 <= args.max_denoising_steps <= 1000:
        raise UserError(f"--max_denoising_steps must be between 2 and 1000, got {args.max_denoising_steps}")
    if args.network_dropout is not None and not 0 <= args.network_dropout < 1:
        raise UserError(f"--network_dropout must be in [0, 1), got {args.network_dropout}")
    if args.lr_warmup_steps >= 1 and args.lr_warmup_steps != int(args.lr_warmup_steps):
        raise UserError(f"--lr_warmup_steps must be an integer or a fraction below 1, got {args.lr_warmup_steps}")
    if args.dim_from_weights and not args.network_weights:
        raise UserError("--dim_from_weights needs --network_weights")
    if args.sample_every_n_steps and not args.sample_prompts:
        raise UserError("--sample_every_n_steps needs --sample_prompts")
    if args.save_state and args.save_model_as != "safetensors":
        raise UserError("--save_state needs --save_model_as safetensors")


def _sample_multipliers(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise UserError(f"--sample_multipliers: expected comma-separated numbers like -1,0,1, got {text!r}") from None
    if not values or not all(math.isfinite(value) for value in values):
        raise UserError(f"--sample_multipliers: expected comma-separated numbers like -1,0,1, got {text!r}")
    return values


def _optimizer_type(args: argparse.Namespace) -> str:
    name = args.optimizer_type
    if args.use_8bit_adam:
        name = "AdamW8bit"
    if args.use_lion_optimizer:
        name = "Lion"
    resolve_optimizer(name)
    return name


def check_flags(args: argparse.Namespace, family: str) -> None:
    """The checks that need no files: rejected flags, combinations and ranges (also run by --output_config)."""
    _reject_unsupported(args, family)
    _check_precision(args)
    _check_ranges(args)
    if family == "sdxl" and args.clip_skip:
        raise UserError("--clip_skip does not apply to SDXL (it always uses the penultimate layers)")


def build_run_config(args: argparse.Namespace, family: str) -> RunConfig:
    """Validate a parsed namespace and turn it into a :class:`RunConfig` (loads the prompt file).

    Raises:
        UserError: on any invalid flag, combination, path or prompt file.
    """
    check_flags(args, family)
    _require(args)
    _check_model_path(args.pretrained_model_name_or_path)
    if Path(args.pretrained_model_name_or_path).expanduser().is_file():  # single files predict epsilon unless told
        check_zero_terminal_snr(args.zero_terminal_snr, args.v_parameterization)
    for flag in ("network_weights", "resume", "model_config_dir"):
        _check_existing(flag, getattr(args, flag))
    if args.model_config_dir:
        if not Path(args.pretrained_model_name_or_path).expanduser().is_file():
            raise UserError("--model_config_dir only applies to single-file checkpoints (.safetensors/.ckpt)")
        for needed in ("model_index.json", "unet/config.json"):
            if not (Path(args.model_config_dir).expanduser() / needed).is_file():
                raise UserError(f"--model_config_dir: {args.model_config_dir} has no {needed} (give a diffusers-layout config folder)")
    _check_network_module(args.network_module)
    _check_network_args(args.network_module, args.network_args, family)
    if args.network_weights:
        _check_network_weights(args.network_weights, args.network_module)
    if args.resume:
        check_state_folder(args.resume)
    attention = _check_attention(args)
    optimizer_type = _optimizer_type(args)
    _check_group_learning_rates(args.network_module, args.network_args, optimizer_type, family)
    prompts = load_prompt_file(args.prompts_file)
    sample_prompts = load_sample_prompts(args.sample_prompts) if args.sample_prompts else ()

    model = ModelConfig(
        path=args.pretrained_model_name_or_path,
        family=family,
        v2=args.v2,
        v_parameterization=args.v_parameterization,
        zero_terminal_snr=args.zero_terminal_snr,
        clip_skip=args.clip_skip,
        max_token_length=args.max_token_length or 75,
        tokenizer_cache_dir=args.tokenizer_cache_dir,
        model_config_dir=args.model_config_dir,
        vae=args.vae,
    )
    network = NetworkConfig(
        module=args.network_module,
        dim=args.network_dim,
        alpha=args.network_alpha,
        dropout=args.network_dropout,
        args=parse_key_values(args.network_args, "--network_args"),
        weights=args.network_weights,
        dim_from_weights=args.dim_from_weights,
        scale_weight_norms=args.scale_weight_norms,
    )
    optimizer = OptimizerConfig(
        optimizer_type=optimizer_type,
        optimizer_args=literal_values(parse_key_values(args.optimizer_args, "--optimizer_args")),
        learning_rate=args.learning_rate,
        unet_lr=args.unet_lr,
        max_grad_norm=args.max_grad_norm,
        lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps,
        lr_scheduler_num_cycles=args.lr_scheduler_num_cycles,
        lr_scheduler_power=args.lr_scheduler_power,
    )
    check_optimizer(optimizer.optimizer_type, optimizer.unet_lr or optimizer.learning_rate, optimizer.optimizer_args)
    leco = LecoConfig(
        max_denoising_steps=args.max_denoising_steps,
        denoise_guidance_scale=args.leco_denoise_guidance_scale,
        denoise_with_frozen=args.leco_denoise_with_frozen,
        denoise_sampler=args.leco_denoise_sampler,
        legacy_timestep=args.leco_legacy_timestep,
        trajectory=args.leco_trajectory,
        loss_type=args.loss_type,
        huber_c=args.huber_c,
        huber_schedule=args.huber_schedule,
        huber_scale=args.huber_scale,
        min_snr_gamma=args.min_snr_gamma,
        noise_offset=args.noise_offset,
    )
    train = TrainConfig(
        max_train_steps=args.max_train_steps,
        seed=args.seed,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision_of(args),
        full_bf16=args.full_bf16,
        full_fp16=args.full_fp16,
        gradient_checkpointing=args.gradient_checkpointing,
        attention=attention,
        allow_tf32=args.allow_tf32,
        ddp_timeout_minutes=args.ddp_timeout,
    )
    output = OutputConfig(
        output_dir=args.output_dir,
        output_name=args.output_name,
        save_model_as=args.save_model_as,
        save_precision=args.save_precision or "float",
        save_every_n_steps=args.save_every_n_steps,
        save_last_n_steps=args.save_last_n_steps,
        save_last_n_steps_state=args.save_last_n_steps_state or args.save_last_n_steps,
        save_state=args.save_state,
        save_state_on_train_end=args.save_state_on_train_end,
        resume=args.resume,
        no_metadata=args.no_metadata,
        training_comment=args.training_comment,
        metadata_title=args.metadata_title,
        metadata_author=args.metadata_author,
        metadata_description=args.metadata_description,
        metadata_license=args.metadata_license,
        metadata_tags=args.metadata_tags,
    )
    log = LogConfig(
        logging_dir=args.logging_dir,
        log_with=args.log_with or ("tensorboard" if args.logging_dir else None),
        log_prefix=args.log_prefix,
        log_tracker_name=args.log_tracker_name,
        console_log_level=args.console_log_level,
    )
    if log.log_with in ("tensorboard", "all") and not log.logging_dir:
        raise UserError("--log_with tensorboard needs --logging_dir")
    if log.log_with == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UserError("--log_with wandb needs the wandb package: pip install wandb")
    sample = SampleConfig(
        every_n_steps=args.sample_every_n_steps,
        prompts_file=args.sample_prompts,
        multipliers=_sample_multipliers(args.sample_multipliers),
        at_first=args.sample_at_first,
        sampler=args.sample_sampler,
        prompts=sample_prompts,
    )
    return RunConfig(
        model=model, network=network, optimizer=optimizer, leco=leco, train=train, output=output,
        log=log, sample=sample, prompts=prompts, effective_args=effective_args(args),
    )
