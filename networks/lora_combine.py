"""Combine LoRA files into one LoRA: exact concatenation, plain merge, and SVD compression.

Every mode means the same by a ratio ``r_i``: the combined LoRA, applied at multiplier 1, changes a
layer by ``sum_i r_i * delta_i`` with ``delta_i = (alpha_i / rank_i) * up_i @ down_i`` (the strength
a UI slider would give each file).

* :func:`concat_loras` stacks the factors: ``[c_1 up_1, c_2 up_2] @ [d_1 down_1; d_2 down_2]`` is
  exactly the weighted sum, whatever the ranks and module sets. The rank of a module is the sum
  of its inputs' ranks; ``alpha`` equals that rank (scale 1) and each input's ``r_i * alpha_i / rank_i``
  is split as ``sqrt(|.|)`` onto both factors, the sign on ``down``.
* :func:`plain_merge_loras` keeps each module's rank (sd-scripts' ``merge_lora.py`` without
  ``--concat``). Adding the factors of two LoRAs on the same layer is not the sum of their deltas
  (``(U1+U2)(D1+D2)`` has cross terms), so a layer changed by two inputs is refused; layers changed
  by one input are scaled exactly.
* :func:`svd_compress` turns any module's weighted sum into its best rank-``R`` approximation
  (Eckart-Young) and reports the kept energy ``sum(S[:R]^2) / sum(S^2)``. The SVD is computed
  from the stacked factors through two thin QR decompositions, so a layer's full weight matrix is
  never formed: exact at full rank, cheap for any layer size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from library.errors import UserError
from networks.lora_weights import LoRAFile, LoRAWeights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Compression:
    """What SVD compression kept of one module.

    Attributes:
        name: module name.
        input_rank: rank of the stacked inputs (sum of their ranks).
        rank: rank written.
        kept_energy: ``sum(S[:rank]^2) / sum(S^2)`` (1.0 for a zero module).
        relative_error: ``||delta - delta_rank||_F / ||delta||_F = sqrt(sum(S[rank:]^2) / sum(S^2))``.
    """

    name: str
    input_rank: int
    rank: int
    kept_energy: float
    relative_error: float


def _contributions(loras: Sequence[LoRAFile], ratios: Sequence[float]) -> dict[str, list[tuple[float, LoRAWeights, LoRAFile]]]:
    """Per module name (first-seen order): ``(ratio, module, file)`` of every input with a non-zero ratio."""
    found: dict[str, list[tuple[float, LoRAWeights, LoRAFile]]] = {}
    for lora, ratio in zip(loras, ratios):
        for name, module in lora.modules.items():
            entries = found.setdefault(name, [])
            if ratio != 0:
                entries.append((ratio, module, lora))
    return {name: entries for name, entries in found.items() if entries}


def _check_same_layer(name: str, entries: Sequence[tuple[float, LoRAWeights, LoRAFile]]) -> tuple[int, ...]:
    """All inputs of a module must change a layer of one shape; returns that shape."""
    shapes = {_squeezed(entry[1].delta_shape) for entry in entries}
    if len(shapes) > 1:
        described = ", ".join(f"{entry[2].path.name} {entry[1].delta_shape}" for entry in entries)
        raise UserError(f"{name}: the inputs change layers of different shapes ({described}); are they LoRAs for different models?")
    return entries[0][1].delta_shape


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A 1x1 convolution and a Linear layer of the same width are the same matrix."""
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def _scaled_factors(module: LoRAWeights, coefficient: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up', down')`` with ``up' @ down' = coefficient * up @ down``, the magnitude split evenly."""
    root = math.sqrt(abs(coefficient))
    return module.up * root, module.down * (math.copysign(root, coefficient))


def _stacked(entries: Sequence[tuple[float, LoRAWeights, LoRAFile]], conv_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``ratio * scale``-weighted factors: ``up (out, R[,1,1])``, ``down (R, in[, kh, kw])``."""
    ups, downs = [], []
    four_d = len(conv_shape) == 4
    for ratio, module, _ in entries:
        up, down = _scaled_factors(module, ratio * module.scale)
        if four_d and up.ndim == 2:  # a Linear-shaped LoRA for a 1x1 convolution (SD1 vs SD2 proj_in)
            up, down = up[:, :, None, None], down[:, :, None, None]
        elif not four_d and up.ndim == 4:
            up, down = up.flatten(1), down.flatten(1)
        ups.append(up)
        downs.append(down)
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def concat_loras(loras: Sequence[LoRAFile], ratios: Sequence[float]) -> dict[str, torch.Tensor]:
    """Stack the inputs' ranks: the result is exactly ``sum_i ratios[i] * LoRA_i`` (kohya tensors)."""
    state: dict[str, torch.Tensor] = {}
    for name, entries in _contributions(loras, ratios).items():
        shape = _check_same_layer(name, entries)
        up, down = _stacked(entries, shape)
        state[f"{name}.lora_down.weight"] = down.contiguous()
        state[f"{name}.lora_up.weight"] = up.contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    if not state:
        raise UserError("--ratios: every ratio is 0, so the result would be empty")
    return state


def plain_merge_loras(loras: Sequence[LoRAFile], ratios: Sequence[float]) -> dict[str, torch.Tensor]:
    """Keep each module's rank and alpha; refuse modules that two inputs change (not exact there)."""
    state: dict[str, torch.Tensor] = {}
    for name, entries in _contributions(loras, ratios).items():
        if len(entries) > 1:
            files = " and ".join(entry[2].path.name for entry in entries[:2])
            raise UserError(
                f"{files} both change {name}: adding their factors (the plain merge) is not the sum of the two "
                "LoRAs; use --concat (exact, ranks add up) or networks/svd_merge_lora.py --new_rank R (compressed)"
            )
        ratio, module, _ = entries[0]
        up, down = _scaled_factors(module, ratio)
        state[f"{name}.lora_down.weight"] = down.contiguous()
        state[f"{name}.lora_up.weight"] = up.contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(module.alpha))
    if not state:
        raise UserError("--ratios: every ratio is 0, so the result would be empty")
    return state


def _low_rank_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``up @ down`` (``(out, R) @ (R, n)``) without forming it: returns ``U (out, k)``, ``S (k,)``, ``Vh (k, n)``."""
    q_up, r_up = torch.linalg.qr(up)  # (out, a), (a, R)
    q_down, r_down = torch.linalg.qr(down.T)  # (n, b), (b, R)
    u_small, singular, vh_small = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u_small, singular, vh_small @ q_down.T


def kept_rank(singular: torch.Tensor, max_rank: int, method: str | None = None, param: float | None = None) -> int:
    """How many singular values to keep (at least 1, at most ``max_rank``).

    Args:
        singular: singular values, descending.
        max_rank: the hard limit (``--new_rank`` / ``--new_conv_rank``).
        method: None (keep ``max_rank``), or sd-scripts' ``resize_lora.py`` dynamic methods:
            ``sv_ratio`` keeps values larger than ``S[0] / param``; ``sv_fro`` the fewest that keep
            ``param`` of the Frobenius norm (``sqrt`` of the energy); ``sv_cumulative`` the fewest
            whose sum reaches ``param`` of the sum of all values.
        param: the method's target.
    """
    count = len(singular)
    if method is None:
        rank = max_rank
    elif float(singular[0]) <= 0:
        rank = 1
    elif method == "sv_ratio":
        rank = int((singular > singular[0] / param).sum())
    elif method == "sv_fro":
        energy = torch.cumsum(singular.double() ** 2, 0) / (singular.double() ** 2).sum()
        rank = int(torch.searchsorted(energy, torch.tensor(param ** 2, dtype=torch.float64) - 1e-12)) + 1
    elif method == "sv_cumulative":
        cumulative = torch.cumsum(singular.double(), 0) / singular.double().sum()
        rank = int(torch.searchsorted(cumulative, torch.tensor(param, dtype=torch.float64) - 1e-12)) + 1
    else:
        raise ValueError(f"unknown dynamic method {method!r}")
    return max(1, min(rank, max_rank, count))


def svd_compress(
    loras: Sequence[LoRAFile],
    ratios: Sequence[float],
    new_rank: int,
    new_conv_rank: int | None = None,
    device: str | None = None,
    dynamic_method: str | None = None,
    dynamic_param: float | None = None,
) -> tuple[dict[str, torch.Tensor], list[Compression]]:
    """The best rank-``new_rank`` LoRA for ``sum_i ratios[i] * LoRA_i``, module by module.

    Args:
        loras, ratios: the inputs and their weights.
        new_rank: rank of Linear and 1x1-conv modules.
        new_conv_rank: rank of kxk-conv (LoCon) modules (default ``new_rank``).
        device: where to compute (e.g. ``"cuda"``); tensors come back on the CPU.
        dynamic_method, dynamic_param: see :func:`kept_rank`.

    Returns:
        ``(kohya tensors, per-module report)``. Each module's ``alpha`` equals its rank (scale 1)
        and the singular values are split as ``sqrt(S)`` onto both factors.
    """
    conv_rank = new_conv_rank if new_conv_rank is not None else new_rank
    state: dict[str, torch.Tensor] = {}
    report: list[Compression] = []
    for name, entries in _contributions(loras, ratios).items():
        shape = _check_same_layer(name, entries)
        up, down = _stacked(entries, shape)
        input_rank = int(down.shape[0])
        compute = torch.float64 if up.dtype == torch.float64 else torch.float32
        up_matrix = up.reshape(up.shape[0], input_rank).to(device=device, dtype=compute)
        down_matrix = down.reshape(input_rank, -1).to(device=device, dtype=compute)
        u, singular, vh = _low_rank_svd(up_matrix, down_matrix)
        values = singular.to(device="cpu", dtype=torch.float64)  # rank choice and report on the CPU, whatever --device
        is_kxk = len(shape) == 4 and shape[2:] != (1, 1)
        rank = kept_rank(values, conv_rank if is_kxk else new_rank, dynamic_method, dynamic_param)
        total = float((values ** 2).sum())
        tail = float((values[rank:] ** 2).sum())
        kept = 1.0 if total == 0 else 1.0 - tail / total
        report.append(Compression(name, input_rank, rank, kept, 0.0 if total == 0 else math.sqrt(tail / total)))
        root = singular[:rank].sqrt()
        new_up = (u[:, :rank] * root).to(device="cpu", dtype=up.dtype)
        new_down = (root[:, None] * vh[:rank]).to(device="cpu", dtype=down.dtype)
        if len(shape) == 4:
            new_up = new_up.reshape(shape[0], rank, 1, 1)
            new_down = new_down.reshape(rank, *shape[1:])
        state[f"{name}.lora_down.weight"] = new_down.contiguous()
        state[f"{name}.lora_up.weight"] = new_up.contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    if not state:
        raise UserError("--ratios: every ratio is 0, so the result would be empty")
    return state, report


def log_compression(report: Sequence[Compression]) -> None:
    """One line per module (kept energy, relative error, ranks) and a summary, at INFO level."""
    width = max((len(item.name) for item in report), default=10)
    for item in report:
        logger.info("%-*s  rank %3d -> %3d  kept energy %7.3f%%  relative error %.2e",
                    width, item.name, item.input_rank, item.rank, 100 * item.kept_energy, item.relative_error)
    if report:
        worst = min(report, key=lambda item: item.kept_energy)
        mean = sum(item.kept_energy for item in report) / len(report)
        logger.info("%d modules: mean kept energy %.3f%%, lowest %.3f%% (%s, relative error %.2e)",
                    len(report), 100 * mean, 100 * worst.kept_energy, worst.name, worst.relative_error)


def dims_and_alphas(state: dict[str, torch.Tensor]) -> tuple[str, str]:
    """``ss_network_dim`` / ``ss_network_alpha`` values: the common value, or ``Dynamic`` (as sd-scripts)."""
    dims = {int(value.shape[0]) for key, value in state.items() if key.endswith(".lora_down.weight")}
    alphas = {float(value) for key, value in state.items() if key.endswith(".alpha")}
    dim = str(dims.pop()) if len(dims) == 1 else "Dynamic"
    alpha = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    return dim, alpha
