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
    reduce its gradients; ranks would drift apart. Every rank sends the same layout, one slot per
    parameter plus one "has a gradient" flag each: a module that skipped the forward on one rank
    (``module_dropout``) has no gradient there, and a layout built from the present gradients only
    would differ between ranks (a hang, or gradients added to the wrong parameters). A parameter
    keeps no gradient only where no rank produced one, so every rank takes the same optimizer step.
    """
    if accelerator.num_processes == 1 or not params:
        return
    import torch.distributed as dist

    sample = next((param.grad for param in params if param.grad is not None), params[0])
    flat = torch.cat([torch.zeros(param.numel(), device=sample.device, dtype=torch.float32) if param.grad is None
                      else param.grad.detach().float().flatten() for param in params]
                     + [torch.tensor([param.grad is not None for param in params], device=sample.device, dtype=torch.float32)])
    dist.all_reduce(flat)
    flat[:-len(params)] /= accelerator.num_processes
    present = flat[-len(params):] > 0
    offset = 0
    for param, has_grad in zip(params, present.tolist()):
        values = flat[offset: offset + param.numel()].view_as(param)
        offset += param.numel()
        if not has_grad:
            param.grad = None
        elif param.grad is None:
            param.grad = values.to(param.dtype)
        else:
            param.grad.copy_(values)


def non_finite_gradients(params: list[torch.nn.Parameter]) -> int:
    """How many parameters hold a NaN/inf gradient (one reduction and one device sync)."""
    flags = [~torch.isfinite(param.grad).all() for param in params if param.grad is not None]
    return int(torch.stack(flags).sum()) if flags else 0


def accumulate_and_step(accelerator, compute, optimizer, lr_scheduler, params: list[torch.nn.Parameter],
                        max_grad_norm: float, check_loss=None, on_non_finite_grads=None):
    """One micro-step: forward/backward under gradient accumulation, then (on the last micro-step)
    all-reduce, clip, optimizer and schedule step, and only then zero the gradients.

    ``compute()`` returns an object with a ``loss`` attribute (or a tensor). Zeroing after the step
    is what makes accumulation equal a larger batch; sd-scripts' LECO zeroes at the start of every
    micro-step and keeps only the last micro-step's gradient.

    Gradients are checked before the optimizer step. With an fp16 loss scaler a NaN/inf gradient is
    an overflow the scaler handles (the step is skipped and the scale lowered); without one,
    ``on_non_finite_grads(count)`` is called (it should raise) so that no NaN reaches the weights.
    The all-reduced gradients are the same on every rank, so every rank decides alike.
    """
    with accelerator.accumulate():
        result = compute()
        loss = result.loss if hasattr(result, "loss") else result
        if check_loss is not None:
            check_loss(loss)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            all_reduce_grads(params, accelerator)
            if getattr(accelerator, "scaler", None) is None and on_non_finite_grads is not None:
                bad = non_finite_gradients(params)
                if bad:
                    optimizer.zero_grad(set_to_none=True)
                    on_non_finite_grads(bad)
            if max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if accelerator.sync_gradients and accelerator.optimizer_step_was_skipped:
            logger.info("fp16 gradient overflow: optimizer step skipped, loss scale lowered to %g",
                           accelerator.scaler.get_scale())
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
