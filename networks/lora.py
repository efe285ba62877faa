"""LoRA and LoCon for diffusers U-Nets, saved in the kohya format every UI loads.

Protocol (as sd-scripts' ``networks.lora``): :func:`create_network`,
:func:`create_network_from_weights`, and a network with ``apply_to``, ``prepare_optimizer_params``,
``set_multiplier``, ``save_weights`` and ``load_weights``.

Each :class:`LoRAModule` wraps one ``nn.Linear`` or ``nn.Conv2d``. It keeps the wrapped module
outside its own module tree, replaces the module's ``forward`` (``apply_to``) and can put the
original back exactly (``restore``)::

    y = org_forward(x) + lora_up(dropout(lora_down(x))) * multiplier * alpha / rank

File keys are ``lora_unet_<module path with _>.{lora_down.weight, lora_up.weight, alpha}``. SD 1.x/2.x
use the diffusers module path; SDXL uses the original SGM block names (``input_blocks_4_1_...``),
the layout AUTOMATIC1111, ComfyUI and Forge expect.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from networks.lora_blocks import (
    DIM_KEYS,
    BlockSettings,
    block_param_groups,
    layout_for,
    parse_block_lr_weights,
    parse_block_settings,
    parse_loraplus_ratio,
)
from networks.lora_files import load_lora_file, lora_hashes, read_lora_metadata, save_lora_file
from networks.lora_targets import (  # noqa: F401 - part of this module's public interface
    NETWORK_ARG_KEYS,
    TRAIN_METHODS,
    find_target_modules,
    float_arg,
    is_conv_3x3,
    validate_network_args,
)
from networks.sgm_names import LORA_PREFIX_UNET, canonical_weights, diffusers_to_sgm, is_sdxl_unet, kohya_aliases, lora_name_for

logger = logging.getLogger(__name__)


class LoRAModule(nn.Module):
    """A low-rank update ``up @ down`` added to one Linear or Conv2d.

    Args:
        lora_name: the kohya key prefix, e.g. ``lora_unet_down_blocks_0_attentions_0_proj_in``.
        org_module: the wrapped ``nn.Linear`` or ``nn.Conv2d``.
        multiplier: strength; 0 skips the LoRA path entirely (the output is the original's).
        lora_dim: rank.
        alpha: ``scale = alpha / lora_dim``; ``None`` or 0 means ``alpha = lora_dim``.
        dropout: dropout on the rank-space activations (training only).
        rank_dropout: drops whole rank channels (training only), rescaling the rest.
        module_dropout: skips the whole LoRA with this probability (training only).
    """

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__()
        self.lora_name = lora_name
        if isinstance(org_module, nn.Conv2d):
            in_dim, out_dim = org_module.in_channels, org_module.out_channels
            self.lora_down = nn.Conv2d(in_dim, lora_dim, org_module.kernel_size, org_module.stride,
                                       org_module.padding, bias=False)
            self.lora_up = nn.Conv2d(lora_dim, out_dim, (1, 1), (1, 1), bias=False)
        elif isinstance(org_module, nn.Linear):
            in_dim, out_dim = org_module.in_features, org_module.out_features
            self.lora_down = nn.Linear(in_dim, lora_dim, bias=False)
            self.lora_up = nn.Linear(lora_dim, out_dim, bias=False)
        else:
            raise TypeError(f"LoRA supports Linear and Conv2d, not {type(org_module).__name__}")
        self.lora_dim = lora_dim
        if alpha is None or alpha == 0:
            alpha = lora_dim
        alpha = float(alpha.detach().float().item() if isinstance(alpha, torch.Tensor) else alpha)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / lora_dim
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # A list keeps the wrapped module out of this module's parameters and state dict.
        self._org = [org_module]
        self._org_forward = None
        self._installed_forward = None

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    @property
    def is_applied(self) -> bool:
        return self._org_forward is not None

    def apply_to(self) -> None:
        """Route the wrapped module's ``forward`` through this LoRA."""
        if self.is_applied:
            return
        self._org_forward = self.org_module.forward
        self._installed_forward = self.forward
        self.org_module.forward = self._installed_forward

    def restore(self) -> None:
        """Give the wrapped module its original ``forward`` back."""
        if not self.is_applied:
            return
        if self.org_module.__dict__.get("forward") is self._installed_forward:
            del self.org_module.forward  # the class method is visible again, exactly as before
        else:
            self.org_module.forward = self._org_forward
        self._org_forward = None
        self._installed_forward = None

    def delta_weight(self) -> torch.Tensor:
        """``scale * up @ down`` in the wrapped module's weight shape (multiplier not applied)."""
        down = self.lora_down.weight.float()
        up = self.lora_up.weight.float()
        if down.dim() == 2:
            delta = up @ down
        elif down.shape[2:] == (1, 1):
            delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], down.shape[1], 1, 1)
        else:  # 3x3 down, 1x1 up: the update is a conv with down's kernel
            delta = torch.einsum("or,rihw->oihw", up.flatten(1), down)
        return delta * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        org = self._org_forward(x)
        multiplier = self.multiplier
        if isinstance(multiplier, (int, float)) and multiplier == 0:
            return org
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return org
        hidden = self.lora_down(x.to(self.lora_down.weight.dtype) if not torch.is_autocast_enabled() else x)
        if self.training and self.dropout:
            hidden = nn.functional.dropout(hidden, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout:
            shape = (hidden.shape[0], hidden.shape[1]) + (1,) * (hidden.dim() - 2)
            if hidden.dim() == 3:  # (B, tokens, rank): drop along the last axis
                shape = (hidden.shape[0], 1, hidden.shape[2])
            mask = (torch.rand(shape, device=hidden.device) > self.rank_dropout).to(hidden.dtype)
            hidden = hidden * mask
            scale = scale / (1.0 - self.rank_dropout)
        update = self.lora_up(hidden)
        if isinstance(multiplier, torch.Tensor):  # per-sample multipliers, shape (B,)
            multiplier = multiplier.to(update.device, update.dtype).view(-1, *([1] * (update.dim() - 1)))
        return org + (update * (multiplier * scale)).to(org.dtype)


class LoRANetwork(nn.Module):
    """A set of :class:`LoRAModule` over one U-Net (text encoders are never trained by LECO)."""

    def __init__(
        self,
        unet: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        conv_lora_dim: int | None = None,
        conv_alpha: float | None = None,
        train_method: str = "full",
        include: str | None = None,
        exclude: str | None = None,
        modules_dim: dict[str, int] | None = None,
        modules_alpha: dict[str, float] | None = None,
        loraplus_lr_ratio: float | None = None,
        blocks: BlockSettings | None = None,
    ):
        super().__init__()
        self.multiplier = multiplier
        self.lora_dim = lora_dim
        self.alpha = alpha
        self.conv_lora_dim = conv_lora_dim
        self.conv_alpha = conv_alpha
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.train_method = train_method
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.is_sdxl = is_sdxl_unet(unet)
        self._aliases = kohya_aliases(unet)
        self.blocks = blocks
        self.block_lr_weight = blocks.lr_weights if blocks is not None else None
        self.block_of: dict[str, int] = {}  # lora_name -> sd-scripts block index (block options only)
        from_weights = modules_dim is not None
        by_block = blocks is not None and blocks.dims is not None and not from_weights
        conv = bool(conv_lora_dim) or from_weights or (by_block and any(blocks.conv_dims or ()))
        targets = find_target_modules(unet, conv=conv, train_method=train_method, include=include, exclude=exclude)
        self.unet_loras: list[LoRAModule] = []
        for name, path, module in targets:
            if blocks is not None:
                self.block_of[name] = blocks.layout.index_of(diffusers_to_sgm(path, unet.config))
            if from_weights:
                if name not in modules_dim:
                    continue
                dim, module_alpha = modules_dim[name], modules_alpha.get(name, modules_dim[name])
            elif by_block:
                dim, module_alpha = blocks.rank(self.block_of[name], is_conv_3x3(module))
                if not dim:
                    continue  # rank 0 or lr weight 0: this block gets no LoRA
            elif is_conv_3x3(module):
                dim, module_alpha = conv_lora_dim, conv_alpha
            else:
                dim, module_alpha = lora_dim, alpha
            lora = LoRAModule(name, module, multiplier, dim, module_alpha, dropout, rank_dropout, module_dropout)
            self.unet_loras.append(lora)
            self.add_module(name, lora)
        if blocks is not None:
            logger.info("%s blocks: %s", blocks.layout.title, blocks.describe(self.unet_loras, self.block_of))
        self.text_encoder_loras: list[LoRAModule] = []
        if not self.unet_loras:
            raise ValueError("the network selects no U-Net layers; check train_method/include/exclude"
                             f"{'/block_dims/lr weights' if blocks is not None else ''} in --network_args")
        logger.info("LoRA network: %d U-Net modules (%s naming)", len(self.unet_loras), "SGM" if self.is_sdxl else "diffusers")

    # --- kohya protocol -------------------------------------------------------------------

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = False, apply_unet: bool = True) -> None:
        """Hook every LoRA into its U-Net layer (text-encoder LoRA is not supported by LECO)."""
        if apply_text_encoder:
            raise ValueError("LECO trains the U-Net only; text-encoder LoRA is not supported")
        if apply_unet:
            for lora in self.unet_loras:
                lora.apply_to()

    def restore(self) -> None:
        """Unhook every LoRA; the U-Net behaves exactly as before ``apply_to``."""
        for lora in self.unet_loras:
            lora.restore()

    def set_multiplier(self, multiplier: float | torch.Tensor) -> None:
        """Set the strength of every module (a float, or a per-sample tensor of shape (B,))."""
        self.multiplier = multiplier
        for lora in self.unet_loras:
            lora.multiplier = multiplier

    @contextlib.contextmanager
    def multiplier_context(self, multiplier: float | torch.Tensor) -> Iterator[None]:
        """Temporarily set the multiplier, e.g. ``0`` for the frozen model's predictions."""
        previous = self.multiplier
        self.set_multiplier(multiplier)
        try:
            yield
        finally:
            self.set_multiplier(previous)

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the U-Net's own checkpointing covers the LoRA layers it contains."""

    def get_trainable_params(self) -> list[nn.Parameter]:
        return [param for param in self.parameters() if param.requires_grad]

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=None, default_lr=None, loraplus_lr_ratio=None):
        """Parameter groups for the optimizer and sd-scripts' description of each.

        LoRA+ (``loraplus_lr_ratio``) gives the ``lora_up`` weights a learning rate that many
        times larger (Hayou et al., 2024): groups ``unet`` and ``unet plus``. With per-block lr
        weights there is one group (or LoRA+ pair) per block, ``unet_block{index}``, at
        ``lr * weight`` (see :func:`networks.lora_blocks.block_param_groups`).
        """
        lr = unet_lr if unet_lr is not None else default_lr
        ratio = loraplus_lr_ratio or self.loraplus_lr_ratio
        self.requires_grad_(True)
        return block_param_groups(self.unet_loras, self.block_of, lr, self.block_lr_weight, ratio)

    # --- weights --------------------------------------------------------------------------

    def lora_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Kohya-named tensors on the CPU, optionally cast (``alpha`` included)."""
        state = {}
        for key, value in self.state_dict().items():
            value = value.detach().to("cpu")
            if dtype is not None:
                value = value.to(dtype)
            state[key] = value.contiguous()
        return state

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> None:
        """Write the LoRA atomically (temp file, then rename); ``.safetensors`` gets metadata and hashes."""
        state = self.lora_state_dict(dtype)
        save_lora_file(state, file, metadata)

    def load_weights(self, file: str | os.PathLike, strict: bool = True) -> dict[str, Any]:
        """Load kohya-format weights (SD or SDXL naming, including diffusers-style SDXL names).

        Raises:
            ValueError: naming the first missing/unexpected keys or mismatched shapes.
        """
        weights = canonical_weights(load_lora_file(file), self._aliases)
        own = self.state_dict()
        missing = [key for key in own if key not in weights]
        unexpected = [key for key in weights if key not in own]
        if strict and (missing or unexpected):
            parts = []
            if unexpected:
                parts.append(f"{len(unexpected)} keys not in this network (first: {', '.join(unexpected[:3])})")
            if missing:
                parts.append(f"{len(missing)} network keys missing from the file (first: {', '.join(missing[:3])})")
            raise ValueError(f"{Path(file).name}: " + "; ".join(parts))
        for key, value in weights.items():
            if key in own and own[key].shape != value.shape:
                raise ValueError(
                    f"{Path(file).name}: {key} has shape {tuple(value.shape)}, the network expects {tuple(own[key].shape)} "
                    "(different --network_dim/conv_dim? use --dim_from_weights)"
                )
        alphas_before = {lora.lora_name: lora.alpha.clone() for lora in self.unet_loras}
        self.load_state_dict({key: value for key, value in weights.items() if key in own}, strict=False)
        changed = []
        for lora in self.unet_loras:  # the file's alpha decides the scale (a different --network_alpha / block_alphas)
            if not torch.equal(lora.alpha, alphas_before[lora.lora_name]):
                changed.append(lora.lora_name)
                lora.scale = float(lora.alpha) / lora.lora_dim
        if changed:
            logger.warning("%s: %d modules have another alpha in the file than this network's (first: %s); the file's alphas are used",
                           Path(file).name, len(changed), changed[0])
        return {"missing": missing, "unexpected": unexpected}

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm: float, device=None) -> tuple[int, float, float]:
        """Scale down every LoRA whose delta's norm exceeds ``max_norm`` (sd-scripts' ``--scale_weight_norms``).

        Returns:
            (number of modules scaled, mean norm after scaling, max norm after scaling)
        """
        scaled = 0
        norms = []
        for lora in self.unet_loras:
            norm = lora.delta_weight().norm()
            ratio = torch.clamp(norm, max=max_norm) / norm if norm > 0 else torch.tensor(1.0)
            if ratio < 1:
                scaled += 1
                factor = ratio.sqrt()
                lora.lora_down.weight.mul_(factor.to(lora.lora_down.weight.dtype))
                lora.lora_up.weight.mul_(factor.to(lora.lora_up.weight.dtype))
            norms.append(float(norm * ratio))
        return scaled, sum(norms) / len(norms), max(norms)

    @torch.no_grad()
    def merge_to(self, multiplier: float = 1.0) -> None:
        """Fold ``multiplier * scale * up @ down`` into the wrapped weights and unhook the LoRA."""
        for lora in self.unet_loras:
            weight = lora.org_module.weight
            weight.add_((lora.delta_weight() * multiplier).to(weight.dtype))
        self.restore()


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder,
    unet: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> LoRANetwork:
    """Build a LoRA network for ``unet`` from sd-scripts style arguments.

    ``kwargs`` are the ``--network_args`` strings: ``conv_dim``, ``conv_alpha`` (LoCon),
    ``rank_dropout``, ``module_dropout``, ``train_method`` (full | xattn | xattn_strict | selfattn |
    noxattn), ``include`` / ``exclude`` (regular expressions on the ``lora_unet_...`` names),
    ``loraplus_lr_ratio`` / ``loraplus_unet_lr_ratio``, and the block-wise ``block_dims``,
    ``block_alphas``, ``conv_block_dims``, ``conv_block_alphas``, ``down_lr_weight``,
    ``mid_lr_weight``, ``up_lr_weight``, ``block_lr_zero_threshold`` (see
    :mod:`networks.lora_blocks`).
    """
    family = "sdxl" if is_sdxl_unet(unet) else "sd"
    train_method = validate_network_args(kwargs, family)
    conv_dim = float_arg(kwargs, "conv_dim")
    conv_alpha = float_arg(kwargs, "conv_alpha")
    dropout = neuron_dropout if neuron_dropout is not None else float_arg(kwargs, "dropout")
    ratio = parse_loraplus_ratio(kwargs)
    lora_dim = int(network_dim or 4)
    alpha = network_alpha if network_alpha is not None else 1.0
    conv_alpha = conv_alpha if conv_alpha is not None else (1.0 if conv_dim else None)
    blocks = parse_block_settings(kwargs, layout_for(family), lora_dim, alpha, int(conv_dim) if conv_dim else None, conv_alpha)
    network = LoRANetwork(
        unet,
        multiplier=multiplier,
        lora_dim=lora_dim,
        alpha=alpha,
        dropout=dropout,
        rank_dropout=float_arg(kwargs, "rank_dropout"),
        module_dropout=float_arg(kwargs, "module_dropout"),
        conv_lora_dim=int(conv_dim) if conv_dim else None,
        conv_alpha=conv_alpha,
        train_method=train_method,
        include=kwargs.get("include") or None,
        exclude=kwargs.get("exclude") or None,
        loraplus_lr_ratio=ratio,
        blocks=blocks,
    )
    return network


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoder,
    unet: nn.Module,
    weights_sd: dict[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """Build a network whose modules, ranks and alphas are read from a LoRA file.

    As sd-scripts, ``down_lr_weight`` / ``mid_lr_weight`` / ``up_lr_weight`` and LoRA+ still set the
    learning rates (a block at weight 0 is kept unchanged: its modules stop training); ranks and
    alphas come from the file, so ``block_dims`` and the other per-block ranks are not used.

    Returns:
        (network, the file's tensors)
    """
    family = "sdxl" if is_sdxl_unet(unet) else "sd"
    validate_network_args(kwargs, family)
    unused = [key for key in DIM_KEYS if kwargs.get(key) not in (None, "")]
    if unused:
        logger.warning("--dim_from_weights: the ranks and alphas come from the file; %s not used", ", ".join(unused))
    lr_weights = parse_block_lr_weights(kwargs, layout_for(family))
    if weights_sd is None:
        weights_sd = load_lora_file(file)
    weights_sd = canonical_weights(weights_sd, kohya_aliases(unet))
    modules_dim: dict[str, int] = {}
    modules_alpha: dict[str, float] = {}
    for key, value in weights_sd.items():
        name, _, suffix = key.partition(".")
        if suffix == "lora_down.weight":
            modules_dim[name] = value.shape[0]
        elif suffix == "alpha":
            modules_alpha[name] = float(value.float().item())
    if not modules_dim:
        raise ValueError(f"{Path(file).name if file else 'weights'}: no lora_down weights found; is this a LoRA file?")
    network = LoRANetwork(
        unet,
        multiplier=multiplier,
        lora_dim=max(modules_dim.values()),
        alpha=max(modules_alpha.values()) if modules_alpha else max(modules_dim.values()),
        modules_dim=modules_dim,
        modules_alpha=modules_alpha,
        dropout=float_arg(kwargs, "dropout"),
        rank_dropout=float_arg(kwargs, "rank_dropout"),
        module_dropout=float_arg(kwargs, "module_dropout"),
        loraplus_lr_ratio=parse_loraplus_ratio(kwargs),
        blocks=BlockSettings(layout_for(family), lr_weights=lr_weights) if lr_weights is not None else None,
    )
    unmatched = sorted(set(modules_dim) - {lora.lora_name for lora in network.unet_loras})
    if unmatched:
        raise ValueError(
            f"{Path(file).name if file else 'weights'}: {len(unmatched)} modules do not exist in this U-Net "
            f"(first: {', '.join(unmatched[:3])}); is it a LoRA for another model family?"
        )
    return network, weights_sd


def describe_network(network: LoRANetwork) -> dict[str, Any]:
    """A JSON-friendly summary (module count, trainable parameter count)."""
    return {
        "modules": len(network.unet_loras),
        "trainable_parameters": sum(param.numel() for param in network.parameters() if param.requires_grad),
    }


__all__ = [
    "LORA_PREFIX_UNET",
    "canonical_weights",
    "find_target_modules",
    "is_sdxl_unet",
    "kohya_aliases",
    "lora_name_for",
    "LoRAModule",
    "LoRANetwork",
    "create_network",
    "create_network_from_weights",
    "describe_network",
    "load_lora_file",
    "lora_hashes",
    "read_lora_metadata",
    "save_lora_file",
]
