"""Optimizers by sd-scripts name (``--optimizer_type``) and learning-rate schedules."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerSpec:
    """Where an optimizer class lives and which pip package provides it."""

    module: str
    class_name: str
    package: str | None = None  # pip name, None for torch/transformers built-ins
    defaults: tuple[tuple[str, Any], ...] = ()


# Keys are lower-case sd-scripts names; lookups are case-insensitive.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("torch.optim", "AdamW"),
    "adamw8bit": OptimizerSpec("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "pagedadamw8bit": OptimizerSpec("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes"),
    "pagedadamw": OptimizerSpec("bitsandbytes.optim", "PagedAdamW", "bitsandbytes"),
    "lion": OptimizerSpec("lion_pytorch", "Lion", "lion-pytorch"),
    "lion8bit": OptimizerSpec("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    "pagedlion8bit": OptimizerSpec("bitsandbytes.optim", "PagedLion8bit", "bitsandbytes"),
    "adafactor": OptimizerSpec(
        "transformers.optimization", "Adafactor", None,
        (("scale_parameter", False), ("relative_step", False), ("warmup_init", False)),
    ),
    "prodigy": OptimizerSpec("prodigyopt", "Prodigy", "prodigyopt"),
    "adamwschedulefree": OptimizerSpec("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "radamschedulefree": OptimizerSpec("schedulefree", "RAdamScheduleFree", "schedulefree"),
    "sgdschedulefree": OptimizerSpec("schedulefree", "SGDScheduleFree", "schedulefree"),
    "sgdnesterov": OptimizerSpec("torch.optim", "SGD", None, (("momentum", 0.9), ("nesterov", True))),
    "sgdnesterov8bit": OptimizerSpec("bitsandbytes.optim", "SGD8bit", "bitsandbytes", (("momentum", 0.9), ("nesterov", True))),
    "dadaptadam": OptimizerSpec("dadaptation", "DAdaptAdam", "dadaptation"),
    "dadaptlion": OptimizerSpec("dadaptation", "DAdaptLion", "dadaptation"),
}

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def resolve_optimizer(name: str) -> OptimizerSpec:
    """Find an optimizer by sd-scripts name or ``package.module.Class`` path.

    Checks that the providing package is installed, so a missing one fails before any model
    is loaded, with the ``pip install`` line to run.

    Raises:
        UserError: unknown name, or the package is not installed.
    """
    spec = OPTIMIZERS.get(name.lower())
    if spec is None:
        if "." not in name:
            import difflib

            names = sorted({value.class_name for value in OPTIMIZERS.values()} | {"AdamW8bit", "SGDNesterov"})
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(
                f"--optimizer_type: unknown optimizer '{name}'{hint}; use one of AdamW, AdamW8bit, "
                "PagedAdamW8bit, Lion, Lion8bit, Adafactor, Prodigy, AdamWScheduleFree, SGDNesterov, "
                "or a full class path such as torch.optim.RAdam"
            )
        module, _, class_name = name.rpartition(".")
        spec = OptimizerSpec(module, class_name, module.split(".")[0])
    root = spec.module.split(".")[0]
    if importlib.util.find_spec(root) is None:
        raise UserError(
            f"--optimizer_type {name} needs the '{spec.package or root}' package: pip install {spec.package or root}"
        )
    return spec


def is_schedule_free(name: str) -> bool:
    """Schedule-free optimizers keep two iterates and must be put in eval mode before saving."""
    return "schedulefree" in name.lower()


def parse_key_values(items: Iterable[str] | None, flag: str) -> dict[str, str]:
    """Split ``key=value`` items (``--optimizer_args``, ``--network_args``) into a dict of strings."""
    result: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag}: '{item}' is not key=value (example: {flag} weight_decay=0.01)")
        result[key.strip()] = value.strip()
    return result


def literal_values(raw: dict[str, str]) -> dict[str, Any]:
    """Turn ``"0.01"``, ``"True"``, ``"0.9,0.999"`` into Python values; other text stays a string."""
    values: dict[str, Any] = {}
    for key, text in raw.items():
        try:
            values[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            values[key] = text
    return values


def create_optimizer(name: str, params: list[dict], learning_rate: float, kwargs: dict[str, Any],
                     announce: bool = True) -> torch.optim.Optimizer:
    """Instantiate the optimizer for the LoRA parameter groups.

    Args:
        name: ``--optimizer_type``.
        params: parameter groups (each may carry its own ``lr``).
        learning_rate: default learning rate.
        kwargs: parsed ``--optimizer_args``.
        announce: log advice about the learning rate (off for :func:`check_optimizer`).
    """
    spec = resolve_optimizer(name)
    optimizer_class = getattr(importlib.import_module(spec.module), spec.class_name, None)
    if optimizer_class is None:
        raise UserError(f"--optimizer_type: {spec.module} has no class {spec.class_name}")
    options = {**dict(spec.defaults), **kwargs}
    if announce and spec.class_name == "Prodigy" and learning_rate < 0.1:
        logger.warning("Prodigy adapts the step size itself and expects --learning_rate around 1.0 (got %g)", learning_rate)
    if spec.class_name == "Adafactor" and options.get("relative_step"):
        if announce:
            logger.info("Adafactor with relative_step=True ignores --learning_rate")
        learning_rate = None
    try:
        return optimizer_class(params, lr=learning_rate, **options)
    except (TypeError, ValueError) as exc:  # unknown keyword, or a value out of range (betas, eps ...)
        raise UserError(f"--optimizer_args: {spec.class_name} rejected the arguments: {exc}") from None


def check_optimizer(name: str, learning_rate: float, kwargs: dict[str, Any]) -> None:
    """Build the optimizer once on a throw-away parameter, so bad ``--optimizer_args`` (an unknown
    keyword, ``betas=0.9,1.5``, a negative ``eps``) fail before any model is loaded.

    Raises:
        UserError: the optimizer rejects the arguments or the learning rate.
    """
    probe = torch.nn.Parameter(torch.zeros(8))
    create_optimizer(name, [{"params": [probe], "lr": learning_rate}], learning_rate, kwargs, announce=False)


def warmup_steps(value: float, max_train_steps: int) -> int:
    """``--lr_warmup_steps``: an integer step count, or a fraction (< 1) of the training steps."""
    if value < 1:
        return int(value * max_train_steps)
    return int(value)


def create_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup: int, total_steps: int,
                        num_cycles: int = 1, power: float = 1.0):
    """Build a diffusers learning-rate schedule stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    if name not in LR_SCHEDULERS:
        raise UserError(f"--lr_scheduler: unknown schedule '{name}'; use one of {', '.join(LR_SCHEDULERS)}")
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
        num_cycles=num_cycles,
        power=power,
    )


def lr_logs(param_groups: list[dict], base_lr: float) -> dict[str, float]:
    """The learning-rate scalars of one step, named as sd-scripts logs them.

    ``lr`` is the first group's rate when there is one group; with several groups (per-block lr
    weights, LoRA+) it is the unweighted rate, ``base_lr`` times the schedule's current factor.
    Every group named by the network (``"name"``: ``unet``, ``unet plus``, ``unet_block4`` ...) also
    logs ``lr/<name>``, and for Prodigy / D-Adaptation ``lr/d*lr`` (``lr/d*lr/<name>`` per group).
    """
    first = param_groups[0]
    rate = float(first["lr"] or 0.0)
    logs = {"lr": rate}
    if len(param_groups) > 1:
        initial = first.get("initial_lr")  # set by the LR schedule; the group's rate at factor 1
        logs["lr"] = float(base_lr) * rate / initial if initial else float(base_lr)
    if "d" in first:  # Prodigy / D-Adaptation: the effective learning rate
        logs["lr/d*lr"] = float(first["d"] * rate)
    for group in param_groups:
        name = group.get("name")
        if not name:
            continue
        logs[f"lr/{name}"] = float(group["lr"] or 0.0)
        if "d" in group and len(param_groups) > 1:
            logs[f"lr/d*lr/{name}"] = float(group["d"] * (group["lr"] or 0.0))
    return logs
