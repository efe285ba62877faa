"""Training state for ``--save_state`` / ``--resume``: LoRA, optimizer, LR schedule, step and RNG.

A state is a folder ``NAME-step00000100-state/`` (``NAME-state/`` at the end) holding
``network.safetensors`` (float32 weights) and ``training_state.pt``. It is written into a
temporary folder and renamed into place, so a crash mid-write leaves the previous state intact.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.atomic import replace_folder
from library.errors import UserError

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
NETWORK_FILE = "network.safetensors"
FORMAT_VERSION = 1


def state_dir_name(output_name: str, step: int | None) -> str:
    """``NAME-step00000100-state`` (or ``NAME-state`` for the end of training)."""
    return f"{output_name}-state" if step is None else f"{output_name}-step{step:08d}-state"


@dataclass
class TrainingState:
    """What a resumed run continues from."""

    step: int
    optimizer: dict
    lr_scheduler: dict
    generator: torch.Tensor
    torch_rng: torch.Tensor
    cuda_rng: list | None
    fingerprint: dict[str, Any]
    scaler: dict | None = None  # fp16 loss scaler (scale, growth tracker), None without one


def save_state(folder: Path, network, optimizer, lr_scheduler, step: int, generator: torch.Generator,
               fingerprint: dict[str, Any], scaler=None) -> Path:
    """Write the state folder atomically (temp folder, then rename over any previous one).

    ``scaler`` is the fp16 run's ``GradScaler`` (its scale and growth counter make an fp16 resume exact).
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    network.save_weights(str(tmp / NETWORK_FILE), torch.float32, {"leco_state_step": str(step)})
    payload = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else {},
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "fingerprint": fingerprint,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    torch.save(payload, tmp / STATE_FILE)
    replace_folder(tmp, folder)
    return folder


def check_state_folder(folder: str | Path) -> tuple[Path, Path]:
    """The state and network files of a ``--save_state`` folder (cheap: checks they exist).

    Raises:
        UserError: the folder is not a state written by ``--save_state``.
    """
    folder = Path(folder).expanduser()
    state_file, network_file = folder / STATE_FILE, folder / NETWORK_FILE
    if not state_file.is_file() or not network_file.is_file():
        raise UserError(f"--resume: {folder} is not a training state folder (expected {STATE_FILE} and {NETWORK_FILE})")
    return state_file, network_file


def load_state(folder: str | Path) -> tuple[TrainingState, Path]:
    """Read a state folder. Returns the state and the path of its network weights.

    Raises:
        UserError: the folder is not a state written by ``--save_state``.
    """
    state_file, network_file = check_state_folder(folder)
    payload = torch.load(state_file, map_location="cpu", weights_only=True)
    if payload.get("format_version") != FORMAT_VERSION:
        raise UserError(f"--resume: {folder} was written by an incompatible version")
    state = TrainingState(
        step=int(payload["step"]),
        optimizer=payload["optimizer"],
        lr_scheduler=payload["lr_scheduler"],
        generator=payload["generator"],
        torch_rng=payload["torch_rng"],
        cuda_rng=payload.get("cuda_rng"),
        fingerprint=payload.get("fingerprint", {}),
        scaler=payload.get("scaler"),
    )
    return state, network_file


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume into a different network or optimizer (the state would not fit)."""
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise UserError(f"--resume: the state was trained with {key}={saved[key]!r}, this run has {value!r}")
