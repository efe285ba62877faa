"""The command line shared by ``train_leco.py`` and ``sdxl_train_leco.py``.

sd-scripts flag names and defaults. ``--config_file`` reads a TOML of flags (sections are only
for grouping; flags on the command line win). The namespace is validated here, completely and
before any model is loaded, and turned into a frozen :class:`~library.config.RunConfig`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
)
from library.errors import UserError
from library.optimizers import LR_SCHEDULERS, literal_values, parse_key_values, resolve_optimizer
from library.prompts import load_prompt_file
from library.sample_prompts import load_sample_prompts

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# sd-scripts flags LECO deliberately does not take, and what to use instead.
REJECTED_FLAGS = {
    "max_train_epochs": "LECO trains by steps: use --max_train_steps",
    "save_every_n_epochs": "LECO saves by steps: use --save_every_n_steps",
    "save_last_n_epochs": "LECO saves by steps: use --save_last_n_steps",
    "train_batch_size": "the batch size comes from batch_size in the prompt TOML",
    "dataset_config": "LECO uses no images: describe concepts in --prompts_file",
    "train_data_dir": "LECO uses no images: describe concepts in --prompts_file",
    "network_train_text_encoder_only": "LECO trains the U-Net only",
    "text_encoder_lr": "LECO trains the U-Net only (use --unet_lr or --learning_rate)",
    "cache_latents": "LECO uses no images, so there are no latents to cache",
    "cache_latents_to_disk": "LECO uses no images, so there are no latents to cache",
    "mem_eff_attn": "use --sdpa (the default) or --xformers",
    "deepspeed": "DeepSpeed is not supported; LECO trains a small LoRA, use plain DDP via accelerate",
    "fp8_base": "fp8 base weights are not supported; use --mixed_precision bf16",
    "lowram": "not needed: weights are memory-mapped while loading; remove the flag",
    "highvram": "not needed: LECO keeps no latents or images in memory; remove the flag",
    "vae_batch_size": "LECO never encodes images, so there is no VAE batch",
}

MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("float", "fp16", "bf16")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one-line :class:`UserError` instead of usage + exit."""

    def error(self, message: str):  # noqa: D401 - argparse API
        if message.startswith("unrecognized arguments:"):
            unknown = [token.split("=", 1)[0] for token in message.split(":", 1)[1].split() if token.startswith("--")]
            options = [option for action in self._actions for option in action.option_strings
                       if action.help != argparse.SUPPRESS]
            for flag in unknown:
                close = difflib.get_close_matches(flag, options, n=1, cutoff=0.7)
                if close:
                    raise UserError(f"unknown flag {flag} (did you mean {close[0]}?)")
            message = message.replace("unrecognized arguments:", "unknown flag(s):")
        raise UserError(f"{message} (see --help)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


_positive_int.__name__ = "integer >= 1"
_non_negative_float.__name__ = "number >= 0"
_positive_float.__name__ = "number > 0"


def setup_parser(family: str = "sd") -> argparse.ArgumentParser:
    """Build the shared argument parser (``family`` only changes the description)."""
    script = "sdxl_train_leco.py" if family == "sdxl" else "train_leco.py"
    models = "Stable Diffusion XL" if family == "sdxl" else "Stable Diffusion 1.x / 2.x"
    parser = _Parser(
        prog=script,
        description=f"Train a LECO LoRA (erase / enhance / slider) on a {models} U-Net without images.",
        epilog="Full reference with examples: docs/train_leco.md",
        allow_abbrev=False,
    )
    _add_model_args(parser.add_argument_group("model"))
    _add_leco_args(parser.add_argument_group("LECO"))
    _add_network_args(parser.add_argument_group("network (LoRA)"))
    _add_optimizer_args(parser.add_argument_group("optimizer and learning rate"))
    _add_training_args(parser.add_argument_group("training"))
    _add_saving_args(parser.add_argument_group("saving and resuming"))
    _add_logging_args(parser.add_argument_group("logging"))
    _add_sampling_args(parser.add_argument_group("sample images"))
    config = parser.add_argument_group("config file")
    config.add_argument("--config_file", help="TOML file of flags (flag names without --; sections allowed). "
                        "Flags given on the command line win.")
    config.add_argument("--output_config", action="store_true",
                        help="write the effective flags to --config_file and exit without training")
    for flag in REJECTED_FLAGS:
        parser.add_argument(f"--{flag}", nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    return parser


def _add_model_args(group) -> None:
    group.add_argument("--pretrained_model_name_or_path", metavar="PATH",
                       help="base model: a diffusers folder, a hub id, or a single .safetensors/.ckpt file (required)")
    group.add_argument("--v2", action="store_true", help="the model is Stable Diffusion 2.x (detected automatically for single files)")
    group.add_argument("--v_parameterization", action="store_true",
                       help="the model predicts v (SD 2.x 768-v, v-pred SDXL); sampling and targets use v")
    group.add_argument("--zero_terminal_snr", action="store_true",
                       help="rescale the noise schedule to zero terminal SNR (for models trained that way)")
    group.add_argument("--clip_skip", type=_positive_int, default=None,
                       help="use the output of the n-th last text-encoder layer (2 = penultimate; SD 1.x/2.x only)")
    group.add_argument("--max_token_length", type=int, default=None, choices=[75, 150, 225],
                       help="prompt length in tokens; 150/225 encode in 75-token chunks (default 75)")
    group.add_argument("--tokenizer_cache_dir", metavar="DIR",
                       help="read tokenizers from DIR (saved there on first download) so training works offline")
    group.add_argument("--model_config_dir", metavar="DIR",
                       help="diffusers-layout config folder for a single-file checkpoint whose architecture is not "
                            "SD 1.x / 2.x / SDXL base (default: the configs shipped in library/model_configs)")
    group.add_argument("--vae", metavar="PATH", help="VAE for sample images (diffusers folder or file); never used for training")


def _add_leco_args(group) -> None:
    group.add_argument("--prompts_file", metavar="TOML", help="prompt TOML describing what to train (required)")
    group.add_argument("--max_denoising_steps", type=int, default=40,
                       help="N: each step denoises k ~ U{1..N-1} steps of an N-step schedule to make x_t (default 40)")
    group.add_argument("--leco_denoise_guidance_scale", type=_non_negative_float, default=3.0,
                       help="CFG scale of the partial denoising pass (default 3.0)")
    group.add_argument("--leco_denoise_with_frozen", action="store_true",
                       help="make x_t with the frozen model instead of the LoRA being trained")
    group.add_argument("--leco_denoise_sampler", default="ddpm", choices=["ddpm", "ddim"],
                       help="sampler of the partial denoising pass (default ddpm, as sd-scripts)")
    group.add_argument("--leco_legacy_timestep", action="store_true",
                       help="query x_t at 999 - k*1000/N like sd-scripts/p1atdev (about one step noisier than x_t is); "
                            "for parity only")
    group.add_argument("--loss_type", default="l2", choices=LOSS_TYPES, help="loss function (default l2)")
    group.add_argument("--huber_c", type=_positive_float, default=0.1, help="Huber/smooth L1 threshold (default 0.1)")
    group.add_argument("--huber_schedule", default="snr", choices=["constant", "exponential", "snr"],
                       help="how the Huber threshold varies with the timestep (default snr)")
    group.add_argument("--huber_scale", type=_positive_float, default=1.0, help="scale of the Huber threshold (default 1.0)")
    group.add_argument("--min_snr_gamma", type=_positive_float, default=None,
                       help="min-SNR loss weighting with this gamma (5 is common), at the real timestep")
    group.add_argument("--noise_offset", type=_non_negative_float, default=None,
                       help="add this much per-channel offset noise to the initial latents")


def _add_network_args(group) -> None:
    group.add_argument("--network_module", default="networks.lora",
                       help="module providing create_network (default networks.lora; lycoris.kohya works too)")
    group.add_argument("--network_dim", type=_positive_int, default=4, help="LoRA rank (default 4)")
    group.add_argument("--network_alpha", type=_positive_float, default=1.0, help="LoRA alpha; scale = alpha/dim (default 1)")
    group.add_argument("--network_dropout", type=float, default=None, help="dropout on the LoRA down-projection output")
    group.add_argument("--network_args", nargs="*", metavar="KEY=VALUE",
                       help="extra network options, e.g. conv_dim=4 conv_alpha=1 train_method=xattn")
    group.add_argument("--network_weights", metavar="FILE", help="start from these LoRA weights")
    group.add_argument("--dim_from_weights", action="store_true", help="take dim/alpha/modules from --network_weights")
    group.add_argument("--scale_weight_norms", type=_positive_float, default=None,
                       help="max-norm regularisation of each LoRA delta (1.0 is a common value)")
    group.add_argument("--network_train_unet_only", action="store_true", help="accepted for sd-scripts compatibility (always true)")


def _add_optimizer_args(group) -> None:
    group.add_argument("--optimizer_type", default="AdamW",
                       help="AdamW, AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, Adafactor, Prodigy, "
                            "AdamWScheduleFree, SGDNesterov, ... or package.Class (default AdamW)")
    group.add_argument("--optimizer_args", nargs="*", metavar="KEY=VALUE", help="optimizer options, e.g. weight_decay=0.01 betas=0.9,0.99")
    group.add_argument("--learning_rate", type=_positive_float, default=1e-4, help="learning rate (default 1e-4)")
    group.add_argument("--unet_lr", type=_positive_float, default=None, help="U-Net LoRA learning rate (default --learning_rate)")
    group.add_argument("--max_grad_norm", type=_non_negative_float, default=1.0, help="gradient clipping norm, 0 = off (default 1.0)")
    group.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="learning-rate schedule (default constant)")
    group.add_argument("--lr_warmup_steps", type=_non_negative_float, default=0,
                       help="warmup steps, or a fraction (< 1) of --max_train_steps (default 0)")
    group.add_argument("--lr_scheduler_num_cycles", type=_positive_int, default=1, help="restarts for cosine_with_restarts (default 1)")
    group.add_argument("--lr_scheduler_power", type=_positive_float, default=1.0, help="power of the polynomial schedule (default 1)")
    group.add_argument("--use_8bit_adam", action="store_true", help="same as --optimizer_type AdamW8bit")
    group.add_argument("--use_lion_optimizer", action="store_true", help="same as --optimizer_type Lion")


def _add_training_args(group) -> None:
    group.add_argument("--max_train_steps", type=_positive_int, default=1600, help="optimizer steps to train (default 1600)")
    group.add_argument("--seed", type=int, default=None, help="random seed (same seed and flags give the same LoRA)")
    group.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1,
                       help="micro-steps per optimizer step; equivalent to a larger batch (default 1)")
    group.add_argument("--mixed_precision", default="no", choices=MIXED_PRECISIONS, help="autocast precision (default no)")
    group.add_argument("--full_bf16", action="store_true", help="keep the LoRA weights in bf16 too (needs --mixed_precision bf16)")
    group.add_argument("--full_fp16", action="store_true", help="keep the LoRA weights in fp16 too (needs --mixed_precision fp16)")
    group.add_argument("--gradient_checkpointing", action="store_true", help="recompute U-Net activations to save memory")
    group.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    group.add_argument("--xformers", action="store_true", help="xformers memory-efficient attention (CUDA only)")


def _add_saving_args(group) -> None:
    group.add_argument("--output_dir", metavar="DIR", help="where LoRA files are written (required)")
    group.add_argument("--output_name", default="leco", help="file name without extension (default leco)")
    group.add_argument("--save_model_as", default="safetensors", choices=["safetensors", "ckpt", "pt"],
                       help="file format (default safetensors; ckpt/pt carry no metadata)")
    group.add_argument("--save_precision", default=None, choices=SAVE_PRECISIONS, help="dtype of saved weights (default float)")
    group.add_argument("--save_every_n_steps", type=_positive_int, default=None, help="also save NAME-stepNNNNNNNN every N steps")
    group.add_argument("--save_last_n_steps", type=_positive_int, default=None,
                       help="keep only intermediate files from the last N steps")
    group.add_argument("--save_state", action="store_true", help="with every save, also write the training state for --resume")
    group.add_argument("--save_state_on_train_end", action="store_true", help="write the training state at the end only")
    group.add_argument("--resume", metavar="STATE_DIR", help="continue from a state folder written by --save_state")
    group.add_argument("--no_metadata", action="store_true", help="write no ss_*/modelspec metadata")
    group.add_argument("--training_comment", help="free text stored as ss_training_comment")
    group.add_argument("--metadata_title", help="modelspec.title (default: output name)")
    group.add_argument("--metadata_author", help="modelspec.author")
    group.add_argument("--metadata_description", help="modelspec.description")
    group.add_argument("--metadata_license", help="modelspec.license")
    group.add_argument("--metadata_tags", help="modelspec.tags (comma separated)")


def _add_logging_args(group) -> None:
    group.add_argument("--logging_dir", metavar="DIR", help="write TensorBoard logs here")
    group.add_argument("--log_with", choices=["tensorboard", "wandb", "all"], default=None,
                       help="tracker (default tensorboard when --logging_dir is set)")
    group.add_argument("--log_prefix", help="prefix for the log run folder name")
    group.add_argument("--log_tracker_name", help="tracker project name (default leco_train / sdxl_leco_train)")
    group.add_argument("--console_log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="console log level (default INFO)")


def _add_sampling_args(group) -> None:
    group.add_argument("--sample_every_n_steps", type=_positive_int, default=None, help="write a sample grid every N steps")
    group.add_argument("--sample_prompts", metavar="FILE",
                       help="text file, one prompt per line with optional --n --s --l --d --w --h")
    group.add_argument("--sample_multipliers", default="-1,0,1", help="LoRA multipliers, one grid column each (default -1,0,1)")
    group.add_argument("--sample_at_first", action="store_true", help="also sample before the first step")
    group.add_argument("--sample_sampler", default="ddim", choices=["ddim", "euler_a", "euler", "ddpm"],
                       help="sampler for sample images (default ddim)")


# ----------------------------------------------------------------------------------------------
# --config_file


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.dest != "help"}


def _config_value(action: argparse.Action, key: str, value: Any, file_label: str) -> Any:
    """Check a TOML value against its flag's type and choices."""
    where = f"{file_label}: {key}"
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise UserError(f"{where}: must be true or false (without quotes), got {value!r}")
        return value
    if action.nargs == "*":
        items = value if isinstance(value, list) else [value]
        return [str(item) for item in items]
    if isinstance(value, (list, dict)):
        raise UserError(f"{where}: must be a single value, got {type(value).__name__}")
    numeric = action.type is not None and action.type is not str
    if numeric and (isinstance(value, (bool, str))):
        raise UserError(f"{where}: must be a number (without quotes), got {value!r}")
    converted = value
    if numeric:
        wants_int = action.type in (int, _positive_int)
        if wants_int and isinstance(value, float):
            raise UserError(f"{where}: must be an integer, got {value}")
        try:
            converted = action.type(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise UserError(f"{where}: {exc}") from None
    elif not isinstance(value, str):
        converted = str(value)
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(str(choice) for choice in action.choices)
        raise UserError(f"{where}: {value!r} is not one of {choices}")
    return converted


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a ``--config_file`` TOML into flag defaults, strictly (unknown keys are errors)."""
    config_path = Path(path).expanduser()
    if not config_path.is_file() and config_path.suffix != ".toml" and Path(f"{path}.toml").is_file():
        config_path = Path(f"{path}.toml")
    if not config_path.is_file():
        raise UserError(f"--config_file: file not found: {config_path}")
    try:
        data = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{config_path.name}: invalid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for flag, flag_value in items:
            flag = flag.lstrip("-").replace("-", "_")
            if flag in flat:
                raise UserError(f"{config_path.name}: '{flag}' is set twice")
            flat[flag] = flag_value
    actions = _actions_by_dest(parser)
    values = {}
    for flag, value in flat.items():
        if flag in ("config_file", "output_config"):
            raise UserError(f"{config_path.name}: '{flag}' cannot be set inside a config file")
        if flag not in actions:
            close = difflib.get_close_matches(flag, list(actions), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{config_path.name}: unknown flag '{flag}'{hint}")
        values[flag] = _config_value(actions[flag], flag, value, config_path.name)
    return values


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and every control character escaped."""
    escaped = []
    for char in text:
        if char in ('"', "\\"):
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def write_config_file(path: str, args: dict[str, Any]) -> Path:
    """Write the effective flags as a TOML that ``--config_file`` reads back."""
    target = Path(path).expanduser()
    if target.suffix != ".toml":
        target = target.with_name(target.name + ".toml")
    lines = [f"{key} = {_toml_value(value)}" for key, value in sorted(args.items()) if value is not None and value is not False]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


# ----------------------------------------------------------------------------------------------
# Parse and validate


def parse_namespace(argv: Sequence[str] | None, family: str) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """Parse ``argv`` (with ``--config_file`` defaults applied). ``--help`` raises SystemExit(0)."""
    parser = setup_parser(family)
    argv = _join_signed_lists(list(sys.argv[1:] if argv is None else argv))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_file")
    pre.add_argument("--output_config", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.config_file and not known.output_config:
        parser.set_defaults(**read_config_file(known.config_file, parser))
    return parser.parse_args(argv), parser


def _join_signed_lists(argv: list[str]) -> list[str]:
    """``--sample_multipliers -1,0,1`` -> ``--sample_multipliers=-1,0,1`` (argparse would read -1,0,1 as a flag)."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--sample_multipliers" and index + 1 < len(argv) and re.match(r"^-[\d.]", argv[index + 1]):
            joined.append(f"{token}={argv[index + 1]}")
            index += 2
            continue
        joined.append(token)
        index += 1
    return joined


def effective_args(namespace: argparse.Namespace) -> dict[str, Any]:
    """The flags that define the run (no config-file plumbing), for metadata and --output_config."""
    skip = {"config_file", "output_config", *REJECTED_FLAGS}
    return {key: value for key, value in vars(namespace).items() if key not in skip}


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


def _check_network_module(name: str) -> None:
    try:
        found = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        found = None
    if found is None:
        hint = " (pip install lycoris-lora)" if name.startswith("lycoris") else ""
        raise UserError(f"--network_module: cannot import '{name}'{hint}")


def _check_attention(args: argparse.Namespace) -> str:
    if not args.xformers:
        return "sdpa"
    if importlib.util.find_spec("xformers") is None:
        raise UserError("--xformers: xformers is not installed (pip install xformers), or use --sdpa")
    import torch

    if not torch.cuda.is_available():
        raise UserError("--xformers needs a CUDA GPU; on this machine use --sdpa (the default)")
    return "xformers"


def _check_precision(args: argparse.Namespace) -> None:
    if args.full_bf16 and args.mixed_precision != "bf16":
        raise UserError("--full_bf16 needs --mixed_precision bf16")
    if args.full_fp16 and args.mixed_precision != "fp16":
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
    for flag in ("network_weights", "resume", "model_config_dir"):
        _check_existing(flag, getattr(args, flag))
    if args.model_config_dir and not Path(args.pretrained_model_name_or_path).expanduser().is_file():
        raise UserError("--model_config_dir only applies to single-file checkpoints (.safetensors/.ckpt)")
    _check_network_module(args.network_module)
    attention = _check_attention(args)
    optimizer_type = _optimizer_type(args)
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
    leco = LecoConfig(
        max_denoising_steps=args.max_denoising_steps,
        denoise_guidance_scale=args.leco_denoise_guidance_scale,
        denoise_with_frozen=args.leco_denoise_with_frozen,
        denoise_sampler=args.leco_denoise_sampler,
        legacy_timestep=args.leco_legacy_timestep,
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
        mixed_precision=args.mixed_precision,
        full_bf16=args.full_bf16,
        full_fp16=args.full_fp16,
        gradient_checkpointing=args.gradient_checkpointing,
        attention=attention,
    )
    output = OutputConfig(
        output_dir=args.output_dir,
        output_name=args.output_name,
        save_model_as=args.save_model_as,
        save_precision=args.save_precision or "float",
        save_every_n_steps=args.save_every_n_steps,
        save_last_n_steps=args.save_last_n_steps,
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
