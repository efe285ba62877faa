"""The argument parser shared by both entry scripts: sd-scripts flag names, defaults and help."""

from __future__ import annotations

import argparse
import difflib
import math

from library.errors import UserError
from library.optimizers import LR_SCHEDULERS

# sd-scripts flags LECO deliberately does not take, and what to use instead.
NO_IMAGES = "LECO uses no images: describe concepts in --prompts_file (resolution and batch_size live there)"
REJECTED_FLAGS = {
    "max_train_epochs": "LECO trains by steps: use --max_train_steps",
    "save_every_n_epochs": "LECO saves by steps: use --save_every_n_steps",
    "save_last_n_epochs": "LECO saves by steps: use --save_last_n_steps",
    "save_last_n_epochs_state": "LECO saves by steps: use --save_last_n_steps_state",
    "save_n_epoch_ratio": "LECO saves by steps: use --save_every_n_steps",
    "sample_every_n_epochs": "LECO samples by steps: use --sample_every_n_steps",
    "train_batch_size": "the batch size comes from batch_size in the prompt TOML",
    "resolution": "the resolution comes from resolution in the prompt TOML",
    "dataset_config": NO_IMAGES,
    "train_data_dir": NO_IMAGES,
    "reg_data_dir": NO_IMAGES,
    "in_json": NO_IMAGES,
    "enable_bucket": NO_IMAGES + " (dynamic_resolution = true trains several aspect ratios)",
    "caption_extension": NO_IMAGES,
    "shuffle_caption": NO_IMAGES,
    "keep_tokens": NO_IMAGES,
    "flip_aug": NO_IMAGES,
    "color_aug": NO_IMAGES,
    "random_crop": NO_IMAGES + " (dynamic_crops = true varies SDXL's crop conditioning)",
    "network_train_text_encoder_only": "LECO trains the U-Net only",
    "text_encoder_lr": "LECO trains the U-Net only (use --unet_lr or --learning_rate)",
    "deepspeed": "DeepSpeed is not supported; LECO trains a small LoRA, use plain DDP via accelerate",
    "fp8_base": "fp8 base weights are not supported; use --mixed_precision bf16",
}

# sd-scripts flags whose intent LECO always meets: accepted (so pasted commands run), changing
# nothing, with one info line saying why.
IMPLIED_FLAGS = {
    "cache_text_encoder_outputs": "every prompt is encoded once before training and the text encoders are released",
    "cache_text_encoder_outputs_to_disk": "every prompt is encoded once before training and the text encoders are released "
                                          "(prompts are few, the cache stays in memory)",
    "cache_latents": "there are no images, so no latents to encode",
    "cache_latents_to_disk": "there are no images, so no latents to encode",
    "vae_batch_size": "the VAE never encodes images",
    "no_half_vae": "the VAE is never used in training; sample images are decoded in float32",
    "persistent_data_loader_workers": "there is no data loader (prompt embeddings are cached)",
    "max_data_loader_n_workers": "there is no data loader (prompt embeddings are cached)",
    "mem_eff_attn": "PyTorch scaled-dot-product attention (the default) is memory-efficient attention",
    "lowram": "models are always loaded one component at a time, straight into their training dtype",
    "highvram": "the U-Net and the cached embeddings stay on the GPU; there are no latents to keep",
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


def positive_int(text: str) -> int:
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


positive_int.__name__ = "integer >= 1"
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
    for flag in (*REJECTED_FLAGS, *IMPLIED_FLAGS):
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
    group.add_argument("--clip_skip", type=positive_int, default=None,
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
    group.add_argument("--leco_trajectory", default="fresh", choices=["fresh", "persistent"],
                       help="fresh: every step denoises new noise k steps (default, as sd-scripts); persistent: keep "
                            "batch_size sampling chains per setting, staggered over the schedule, and advance them one "
                            "step per training step, so a step costs one CFG call whatever N is (see docs/train_leco.md)")
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
    group.add_argument("--network_dim", type=positive_int, default=4, help="LoRA rank (default 4)")
    group.add_argument("--network_alpha", type=_positive_float, default=1.0, help="LoRA alpha; scale = alpha/dim (default 1)")
    group.add_argument("--network_dropout", type=float, default=None, help="dropout on the LoRA down-projection output")
    group.add_argument("--network_args", nargs="*", metavar="KEY=VALUE",
                       help="extra network options, e.g. conv_dim=4 conv_alpha=1 train_method=xattn; per block: block_dims, "
                            "block_alphas, conv_block_dims, conv_block_alphas, down/mid/up_lr_weight, block_lr_zero_threshold; "
                            "LoRA+: loraplus_lr_ratio (docs/train_leco.md)")
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
    group.add_argument("--lr_scheduler_num_cycles", type=positive_int, default=1, help="restarts for cosine_with_restarts (default 1)")
    group.add_argument("--lr_scheduler_power", type=_positive_float, default=1.0, help="power of the polynomial schedule (default 1)")
    group.add_argument("--use_8bit_adam", action="store_true", help="same as --optimizer_type AdamW8bit")
    group.add_argument("--use_lion_optimizer", action="store_true", help="same as --optimizer_type Lion")


def _add_training_args(group) -> None:
    group.add_argument("--max_train_steps", type=positive_int, default=1600, help="optimizer steps to train (default 1600)")
    group.add_argument("--seed", type=int, default=None, help="random seed (same seed and flags give the same LoRA)")
    group.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                       help="micro-steps per optimizer step; equivalent to a larger batch (default 1)")
    group.add_argument("--mixed_precision", default=None, choices=MIXED_PRECISIONS,
                       help="autocast precision (default: what `accelerate launch --mixed_precision` set, else no)")
    group.add_argument("--full_bf16", action="store_true", help="keep the LoRA weights in bf16 too (needs --mixed_precision bf16)")
    group.add_argument("--full_fp16", action="store_true", help="keep the LoRA weights in fp16 too (needs --mixed_precision fp16)")
    group.add_argument("--gradient_checkpointing", action="store_true", help="recompute U-Net activations to save memory")
    group.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    group.add_argument("--xformers", action="store_true", help="xformers memory-efficient attention (CUDA only)")
    group.add_argument("--allow_tf32", action="store_true",
                       help="let float32 matmuls and convolutions use TF32 on Ampere or newer GPUs (faster, ~10-bit mantissa)")
    group.add_argument("--ddp_timeout", type=positive_int, default=None,
                       help="minutes a process waits for the others in a multi-GPU run before giving up (default 30)")


def _add_saving_args(group) -> None:
    group.add_argument("--output_dir", metavar="DIR", help="where LoRA files are written (required)")
    group.add_argument("--output_name", default="leco", help="file name without extension (default leco)")
    group.add_argument("--save_model_as", default="safetensors", choices=["safetensors", "ckpt", "pt"],
                       help="file format (default safetensors; ckpt/pt carry no metadata)")
    group.add_argument("--save_precision", default=None, choices=SAVE_PRECISIONS, help="dtype of saved weights (default float)")
    group.add_argument("--save_every_n_steps", type=positive_int, default=None, help="also save NAME-stepNNNNNNNN every N steps")
    group.add_argument("--save_last_n_steps", type=positive_int, default=None,
                       help="keep only intermediate files from the last N steps")
    group.add_argument("--save_last_n_steps_state", type=positive_int, default=None,
                       help="keep only state folders from the last N steps (default: --save_last_n_steps)")
    group.add_argument("--save_state", action="store_true", help="with every save, also write the training state for --resume")
    group.add_argument("--save_state_on_train_end", action="store_true", help="write the training state at the end only")
    group.add_argument("--resume", metavar="STATE_DIR", help="continue from a state folder written by --save_state")
    group.add_argument("--no_metadata", action="store_true",
                       help="write only what clients need to classify the file (model family, network module/dim/alpha/args): "
                            "no prompts, paths or training details")
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
    group.add_argument("--sample_every_n_steps", type=positive_int, default=None, help="write a sample grid every N steps")
    group.add_argument("--sample_prompts", metavar="FILE",
                       help="text file, one prompt per line with optional --n --s --l --d --w --h")
    group.add_argument("--sample_multipliers", default="-1,0,1", help="LoRA multipliers, one grid column each (default -1,0,1)")
    group.add_argument("--sample_at_first", action="store_true", help="also sample before the first step")
    group.add_argument("--sample_sampler", default="ddim", choices=["ddim", "euler_a", "euler", "ddpm"],
                       help="sampler for sample images (default ddim)")
