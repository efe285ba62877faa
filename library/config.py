"""Typed, frozen run configuration. The argparse namespace is turned into these once, in ``cli``;
everything below ``main`` takes explicit values from them, never an ``args`` object."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from library.errors import UserError
from library.prompts import PromptFile


def check_zero_terminal_snr(zero_terminal_snr: bool, predicts_v: bool) -> None:
    """Refuse ``--zero_terminal_snr`` for an epsilon model: at zero terminal SNR its first DDPM/DDIM
    step divides by ``sqrt(alpha_bar) = 0`` and the loss becomes NaN.

    Raises:
        UserError: zero terminal SNR without v-prediction.
    """
    if zero_terminal_snr and not predicts_v:
        raise UserError("--zero_terminal_snr needs a v-prediction model: at zero terminal SNR an epsilon model's first sampling "
                        "step divides by zero (add --v_parameterization if the model predicts v)")


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how to read its text encoders."""

    path: str
    family: str  # "sd" (SD 1.x / 2.x) or "sdxl"
    v2: bool = False
    v_parameterization: bool = False
    zero_terminal_snr: bool = False
    clip_skip: int | None = None
    max_token_length: int = 75
    tokenizer_cache_dir: str | None = None
    model_config_dir: str | None = None
    vae: str | None = None


@dataclass(frozen=True)
class NetworkConfig:
    """The LoRA network to create (``--network_*``)."""

    module: str = "networks.lora"
    dim: int = 4
    alpha: float = 1.0
    dropout: float | None = None
    args: dict[str, str] = field(default_factory=dict)
    weights: str | None = None
    dim_from_weights: bool = False
    scale_weight_norms: float | None = None


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule."""

    optimizer_type: str = "AdamW"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0

    @property
    def unet_learning_rate(self) -> float:
        """The U-Net LoRA's rate: ``--unet_lr`` when given, else ``--learning_rate``."""
        return self.unet_lr if self.unet_lr is not None else self.learning_rate


@dataclass(frozen=True)
class LecoConfig:
    """The LECO step: partial denoising, targets and loss."""

    max_denoising_steps: int = 40
    denoise_guidance_scale: float = 3.0
    denoise_with_frozen: bool = False
    denoise_sampler: str = "ddpm"
    legacy_timestep: bool = False
    trajectory: str = "fresh"  # "fresh" or "persistent" (library.trajectories)
    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    noise_offset: float | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Loop, precision and devices."""

    max_train_steps: int = 1600
    seed: int | None = None
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    full_bf16: bool = False
    full_fp16: bool = False
    gradient_checkpointing: bool = False
    attention: str = "sdpa"  # "sdpa" or "xformers"
    allow_tf32: bool = False
    ddp_timeout_minutes: int | None = None


@dataclass(frozen=True)
class OutputConfig:
    """What is written, where and when."""

    output_dir: str
    output_name: str = "leco"
    save_model_as: str = "safetensors"
    save_precision: str = "float"
    save_every_n_steps: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_steps_state: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    resume: str | None = None
    no_metadata: bool = False
    training_comment: str | None = None
    metadata_title: str | None = None
    metadata_author: str | None = None
    metadata_description: str | None = None
    metadata_license: str | None = None
    metadata_tags: str | None = None


@dataclass(frozen=True)
class LogConfig:
    """Trackers (TensorBoard, wandb) and console logging."""

    logging_dir: str | None = None
    log_with: str | None = None
    log_prefix: str | None = None
    log_tracker_name: str | None = None
    console_log_level: str = "INFO"


@dataclass(frozen=True)
class SampleConfig:
    """Sample images during training."""

    every_n_steps: int | None = None
    prompts_file: str | None = None
    multipliers: tuple[float, ...] = (-1.0, 0.0, 1.0)
    at_first: bool = False
    sampler: str = "ddim"
    prompts: tuple = ()  # parsed SamplePrompt entries


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs, validated."""

    model: ModelConfig
    network: NetworkConfig
    optimizer: OptimizerConfig
    leco: LecoConfig
    train: TrainConfig
    output: OutputConfig
    log: LogConfig
    sample: SampleConfig
    prompts: PromptFile
    effective_args: dict[str, Any] = field(default_factory=dict)  # flags as given, for metadata
