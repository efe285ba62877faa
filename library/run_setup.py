"""Run set-up: accelerator, frozen U-Net, LoRA network, optimizer and learning-rate schedule."""

from __future__ import annotations

import contextlib
import importlib
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from library.config import RunConfig
from library.errors import UserError
from library.optimizers import create_lr_scheduler, create_optimizer, is_schedule_free, warmup_steps

logger = logging.getLogger(__name__)


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def make_accelerator(config: RunConfig, tracker_name: str):
    """An ``Accelerator`` for this run (precision, accumulation, trackers)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps process-wide singletons; a new run in the same process (a notebook, tests)
    # must not inherit the previous run's precision or accumulation settings.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    mixed = config.train.mixed_precision
    if mixed == "fp16" and not torch.cuda.is_available():
        logger.warning("--mixed_precision fp16 needs a CUDA GPU; training in float32 on this machine")
        mixed = "no"
    log_dir = None
    if config.log.logging_dir:
        log_dir = str(Path(config.log.logging_dir) / f"{config.log.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}")
    handlers = []
    if config.train.ddp_timeout_minutes:
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs

        handlers.append(InitProcessGroupKwargs(timeout=timedelta(minutes=config.train.ddp_timeout_minutes)))
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # also makes a multi-process launch on CPUs use gloo DDP
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        mixed_precision=mixed,
        log_with=config.log.log_with,
        project_dir=log_dir,
        kwargs_handlers=handlers,
    )
    if accelerator.is_main_process and config.log.log_with:
        accelerator.init_trackers(config.log.log_tracker_name or tracker_name, config=tracker_config(config))
    return accelerator


@contextlib.contextmanager
def tf32_matmuls(allow: bool):
    """``--allow_tf32``: let float32 matmuls and cuDNN convolutions use TF32 (Ampere and newer) for
    the run, then put torch's process-wide switches back (a notebook's next run starts clean)."""
    if not allow:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def tracker_config(config: RunConfig) -> dict[str, Any]:
    values = {}
    for key, value in config.effective_args.items():
        values[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return values


def seeded_generator(seed: int | None, rank: int) -> torch.Generator:
    """The run's CPU generator (settings, k, noise); each rank draws differently."""
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    return torch.Generator().manual_seed(seed + 1_000_003 * rank)


def prepare_unet(unet: torch.nn.Module, device, dtype: torch.dtype, attention: str, checkpointing: bool) -> torch.nn.Module:
    """Freeze the U-Net, cast it to ``dtype`` *then* move it to ``device`` (moving first would put a
    float32 copy on the GPU: about 10 GB for SDXL), and set up attention and checkpointing."""
    unet.requires_grad_(False)
    if next(unet.parameters()).dtype != dtype:
        unet.to(dtype=dtype)
    unet.to(device=device)
    unet.eval()
    if attention == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ValueError, RuntimeError) as exc:  # a broken or mismatched xformers build
            raise UserError(f"--xformers: xformers cannot run here ({type(exc).__name__}: {exc}); use --sdpa") from None
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def create_lora_network(config: RunConfig, unet: torch.nn.Module):
    """The LoRA network from ``--network_module``, applied to the U-Net, weights loaded if asked."""
    module = importlib.import_module(config.network.module)
    net_cfg = config.network
    args = dict(net_cfg.args)
    ours = config.network.module == "networks.lora"
    if config.network.module.startswith("lycoris") and "preset" not in args:
        # LyCORIS' "full" preset wraps diffusers' TimestepEmbedding twice and fails; this preset
        # covers the transformer blocks, like networks.lora's default.
        args["preset"] = "unet-transformer-only"
        logger.info("LyCORIS: using --network_args preset=unet-transformer-only (pass preset=... to change it)")
    try:
        if net_cfg.dim_from_weights:
            if net_cfg.dropout is not None:
                args.setdefault("dropout", str(net_cfg.dropout))
            network, _ = module.create_network_from_weights(1.0, net_cfg.weights, None, [], unet, **args)
        else:
            network = module.create_network(1.0, net_cfg.dim, net_cfg.alpha, None, [], unet, neuron_dropout=net_cfg.dropout, **args)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        flag = "--network_weights" if net_cfg.dim_from_weights else "--network_args"
        raise UserError(message if message.startswith("--") else f"{flag}: {message}") from None
    except Exception as exc:  # noqa: BLE001 - a third-party module's failure, reported in one line
        if ours:
            raise
        raise UserError(f"--network_module {config.network.module} could not build the network: {type(exc).__name__}: {exc}") from None
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    if not any(param.requires_grad for param in network.parameters()) and not list(network.parameters()):
        raise UserError(f"--network_module {config.network.module}: the network has no parameters (the preset/options select no layers)")
    if net_cfg.weights:
        try:
            info = network.load_weights(net_cfg.weights)
        except (ValueError, RuntimeError) as exc:  # key or shape mismatch
            raise UserError(f"--network_weights: {exc}") from None
        logger.info("loaded LoRA weights from %s %s", net_cfg.weights, info if info else "")
    if not hasattr(network, "multiplier_context"):
        network.multiplier_context = _multiplier_context.__get__(network)
    return network


@contextlib.contextmanager
def _multiplier_context(network, multiplier):
    """Fallback for network modules without ``multiplier_context`` (e.g. LyCORIS)."""
    previous = getattr(network, "multiplier", 1.0)
    network.set_multiplier(multiplier)
    try:
        yield
    finally:
        network.set_multiplier(previous)


def allow_fp16_gradient_unscaling(accelerator) -> None:
    """``--full_fp16`` keeps the LoRA in fp16; torch's GradScaler refuses to unscale fp16 gradients
    unless told to, so let it (what sd-scripts' train_network.py does for full fp16)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    unscale = scaler._unscale_grads_

    def unscale_allowing_fp16(optimizer, inv_scale, found_inf, allow_fp16):  # noqa: ARG001 - torch's signature
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_allowing_fp16


def optimizer_and_schedule(config: RunConfig, network):
    opt = config.optimizer
    params = network.prepare_optimizer_params(None, opt.unet_learning_rate, opt.learning_rate)
    if isinstance(params, tuple):  # newer kohya protocol returns (groups, descriptions)
        params, descriptions = params
        if len(descriptions) == len(params):  # sd-scripts' names (unet, unet plus, unet_block3 ...) for the lr logs
            params = [{**group, "name": name} if isinstance(group, dict) else group for group, name in zip(params, descriptions)]
    optimizer = create_optimizer(opt.optimizer_type, params, opt.learning_rate, dict(opt.optimizer_args))
    if is_schedule_free(opt.optimizer_type):
        if opt.lr_scheduler != "constant" or opt.lr_warmup_steps:
            logger.warning("%s keeps its own schedule: --lr_scheduler %s and --lr_warmup_steps are not used "
                           "(pass --optimizer_args warmup_steps=N for its warm-up)", opt.optimizer_type, opt.lr_scheduler)
        return optimizer, None
    if opt.optimizer_type.lower() == "adafactor" and opt.optimizer_args.get("relative_step"):
        from transformers.optimization import AdafactorSchedule

        return optimizer, AdafactorSchedule(optimizer)
    warmup = warmup_steps(opt.lr_warmup_steps, config.train.max_train_steps)
    schedule = create_lr_scheduler(optimizer, opt.lr_scheduler, warmup, config.train.max_train_steps,
                                   opt.lr_scheduler_num_cycles, opt.lr_scheduler_power)
    return optimizer, schedule


def optimizer_name(optimizer, kwargs: dict) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)
    name = f"{type(inner).__module__}.{type(inner).__name__}"
    if kwargs:
        name += "(" + ",".join(f"{key}={value}" for key, value in kwargs.items()) + ")"
    return name
