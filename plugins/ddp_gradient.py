"""Gradient conventions under DDP: what turns a head's exact local gradient into the gradient of
the global-batch mean loss, whatever DDP does to it afterwards.

Every head of the plugin returns the mean loss over the GLOBAL batch (all ranks' samples) and
gives each rank's embeddings [B, D] the exact gradient of that mean for its own samples.  The
backbone gradient of the global-batch mean is therefore the SUM over ranks of the per-rank
backbone gradients.  Plain DDP AVERAGES them (divides the sum by W).  Two ways to get the sum:

- our trainer registers ``exact_gradient_hook`` (below), a comm hook that sums;
- a fork's patched ``train_v2.py`` keeps the fork's DDP (upstream registers its own
  ``fp16_compress_hook``, and DDP accepts one hook only) and multiplies the embeddings'
  gradient by W before DDP averages -- exactly what upstream's PartialFC_V2 does in the backward
  of its all-gather (``grad *= world size``), so its effective gradient is also the gradient of
  the global-batch mean, identical on any GPU count:

      sum_r g_r  =  (1 / W) * sum_r (W * g_r)          (DDP average of the scaled gradients)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``factor``."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def ddp_average_size(model: nn.Module) -> int:
    """W, the number of ranks DDP averages ``model``'s gradients over; 1 for a plain module."""
    if isinstance(model, DistributedDataParallel) and dist.is_available() and \
            dist.is_initialized():
        return dist.get_world_size(model.process_group)
    return 1


def undo_ddp_average(embeddings: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``embeddings`` [B, D] (output of ``model``) unchanged, with its gradient multiplied by the
    DDP world size W of ``model`` (1: returned as is), so that DDP's average of the backbone
    gradients is the sum -- the gradient of the global-batch mean loss on any W."""
    world = ddp_average_size(model)
    if world == 1 or not embeddings.requires_grad:
        return embeddings
    return _ScaleGradient.apply(embeddings, float(world))


def exact_gradient_hook(state, bucket):
    """DDP communication hook that SUMS gradients over ranks instead of averaging them.

    The heads already give every rank the exact gradient of the global-batch mean loss for its
    own samples, so the sum is that loss's gradient on any world size -- the gradient upstream
    arcface_torch's PartialFC_V2 path and both official recipes give.  (A fork's patched
    train_v2.py keeps the fork's DDP averaging and scales the embedding gradient by W instead:
    plugins/ddp_gradient.py.)
    """
    future = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return future.then(lambda fut: fut.value()[0])
