"""Class sharding and the few collectives the heads need, usable with or without torch.distributed.

Sharding follows arcface_torch's Partial FC rule, so shards written by either code interoperate:
for ``C`` classes on ``W`` ranks, rank ``r`` owns the contiguous rows

    num_local(r)   = C // W + (r < C % W)
    class_start(r) = C // W * r + min(r, C % W)

Without an initialised process group every function behaves as a world of one process.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist


def rank_and_world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(num_classes: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``(class_start, num_local)`` of ``rank`` under the Partial FC rule (see module docstring)."""
    if num_classes < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"shard_range needs num_classes >= 1 and 0 <= rank < world_size, "
            f"got num_classes={num_classes}, rank={rank}, world_size={world_size}")
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


def shard_sizes(num_classes: int, world_size: int) -> List[int]:
    """``num_local`` of every rank, in rank order; they sum to ``num_classes``."""
    return [shard_range(num_classes, r, world_size)[1] for r in range(world_size)]


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate equal-sized local tensors of all ranks; the backward pass sums the incoming
    gradient over ranks and returns this rank's slice, i.e. the exact gradient of a loss that every
    rank computes from its share of the gathered batch."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), local.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """Gather ``[B, ...]`` from every rank into ``[W * B, ...]`` in rank order, with gradient.

    Every rank must pass the same shape (training drops the last incomplete batch).  The gradient
    that reaches ``local`` is the sum over ranks of the gradients of their gathered copies.
    """
    if rank_and_world()[1] == 1:
        return local
    return _AllGatherWithGrad.apply(local)


@torch.no_grad()
def all_gather_no_grad(local: torch.Tensor) -> torch.Tensor:
    """Gather ``[B, ...]`` from every rank into ``[W * B, ...]`` in rank order, without gradient."""
    world = rank_and_world()[1]
    if world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``op`` is ``"sum"`` or ``"max"``) that is a no-op on one process.

    No gradient flows through it: use it for statistics (softmax max, sums) and for values whose
    gradient the caller handles.  Returns ``tensor`` for chaining.
    """
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"all_reduce op must be one of {sorted(ops)}, got {op!r}")
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=ops[op])
    return tensor


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks whose backward pass is the identity (see ``all_reduce_sum_with_grad``)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable all-reduce sum (out of place), identity on one process.

    The convention every head follows: all ranks compute the *same* loss value from reduced
    quantities, and each rank's autograd graph carries only its own summand.  The backward pass is
    therefore the identity: rank ``r`` receives ``dL/dS`` for its own part of ``S = sum_r s_r``.
    Gradients of shared inputs (the all-gathered embeddings) are then summed over ranks by
    ``all_gather_with_grad``, which yields the exact gradient of the one global loss.  Never feed a
    value computed identically on every rank into the loss without such a reduction: its gradient
    would be counted once per rank.
    """
    if rank_and_world()[1] == 1:
        return tensor
    return _AllReduceSumWithGrad.apply(tensor)
