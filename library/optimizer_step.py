"""One optimizer step across micro-steps and processes: accumulation, all-reduce, clipping."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def broadcast_parameters(network, accelerator) -> None:
    """Give every rank rank 0's LoRA weights (each rank initialised its own; DDP would do this on wrap)."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    for tensor in network.state_dict().values():
        dist.broadcast(tensor, src=0)


def all_reduce_grads(params: list[torch.nn.Parameter], accelerator) -> None:
    """Average LoRA gradients over processes in one flattened all-reduce.

    The LoRA is hooked into the U-Net and never called through a DDP wrapper, so DDP would not
    reduce its gradients; ranks would drift apart.
    """
    grads = [param.grad for param in params if param.grad is not None]
    if accelerator.num_processes == 1 or not grads:
        return
    flat = torch.cat([grad.flatten() for grad in grads])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def accumulate_and_step(accelerator, compute, optimizer, lr_scheduler, params: list[torch.nn.Parameter],
                        max_grad_norm: float, check_loss=None):
    """One micro-step: forward/backward under gradient accumulation, then (on the last micro-step)
    all-reduce, clip, optimizer and schedule step, and only then zero the gradients.

    ``compute()`` returns an object with a ``loss`` attribute (or a tensor). Zeroing after the step
    is what makes accumulation equal a larger batch; sd-scripts' LECO zeroes at the start of every
    micro-step and keeps only the last micro-step's gradient.
    """
    with accelerator.accumulate():
        result = compute()
        loss = result.loss if hasattr(result, "loss") else result
        if check_loss is not None:
            check_loss(loss)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            all_reduce_grads(params, accelerator)
            if max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if accelerator.sync_gradients and lr_scheduler is not None and not accelerator.optimizer_step_was_skipped:
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return result


def ranks_agree(params: list[torch.nn.Parameter], accelerator, device) -> bool:
    """With several processes, whether every rank holds the same LoRA (gradients were all-reduced)."""
    if accelerator.num_processes == 1:
        return True
    checksum = torch.stack([param.detach().double().sum() for param in params]).sum().float().to(device)
    gathered = accelerator.gather(checksum.reshape(1))
    agree = torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=1e-5, atol=1e-6)
    if not agree:
        logger.error("LoRA differs between processes (checksums %s); please report this", gathered.tolist())
    return agree
