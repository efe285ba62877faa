"""Functions run in spawned gloo processes by tests/test_distributed.py (kept free of heavy imports)."""

from __future__ import annotations

import datetime
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist


def init_gloo(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a short timeout turns a collective that never matches into a failure instead of a hang
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))


def _mean(tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """What ``Accelerator.reduce`` does on CPUs."""
    dist.all_reduce(tensor)
    return tensor / dist.get_world_size() if reduction == "mean" else tensor


def reduce_grads_with_dropped_modules(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank r has a gradient only for the parameters its "module dropout" kept; returns the reduced grads."""
    from library.optimizer_step import all_reduce_grads

    init_gloo(rank, world, port)
    try:
        params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((2, 3), (4,), (3, 3), (5,))]
        kept = {0: (0, 2, 3), 1: (1, 2)}[rank]  # parameter 0 only on rank 0, 1 only on rank 1, 2 on both, 3 on rank 0
        for index in kept:
            params[index].grad = torch.full_like(params[index], float(10 * (rank + 1) + index))
        all_reduce_grads(params, SimpleNamespace(num_processes=world, reduce=_mean))
        torch.save([None if param.grad is None else param.grad.clone() for param in params],
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
