"""Shared plumbing of the KD terms: input checks, dtype, and the two exact ways of computing a
loss defined on the GLOBAL batch of ``N = W * B`` samples.

1. **Row-sharded** (``gather_with_grad``): the loss is a sum over per-anchor terms
   ``L = sum_i l_i(x_i, X)``.  Rank ``r`` computes the terms of its own anchors against the
   all-gathered batch ``X`` (gathered *with* gradient), the partial sums are reduced with
   ``all_reduce_sum_with_grad``; the gather's backward sums each rank's gradient of its partial
   sum, which is the exact gradient of ``L`` (``plugins.distributed``).  Cost per rank: ``1/W``.
   Valid only with ONE level of with-gradient reduction: a term that depends on a reduced
   statistic (e.g. RKD's mean distance) would miss the cross-rank terms of that statistic.
2. **Replicated** (``gather_own_rows``): every rank computes the whole global loss from a copy of
   the global batch in which only its own rows carry gradient (the other ranks' rows are
   constants of the same values).  The loss value is the same on every rank and the gradient that
   reaches this rank's rows is the exact partial derivative of the global loss; no backward
   communication.  Used where the loss has batch-global statistics (RKD distance, EKD).

Either way the trainer then SUMS the backbone gradients over ranks (the exact-gradient hook,
``plugins.ddp_gradient.exact_gradient_hook``) to get the gradient of the global loss.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..deferred_checks import require
from ..distributed import all_gather_no_grad, all_gather_with_grad, all_reduce, rank_and_world


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (tests), everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_embeddings(name: str, student: torch.Tensor, teacher: torch.Tensor,
                     same_dim: bool, labels: Optional[torch.Tensor] = None,
                     min_batch: int = 1) -> None:
    """Raise ValueError unless ``student [B, D_s]``, ``teacher [B, D_t]`` (``D_s == D_t`` when
    ``same_dim``), ``labels`` an integer ``[B]`` (when given) and ``B >= min_batch``."""
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(f"{name}: student and teacher embeddings must be [B, D], got "
                         f"{list(student.shape)} and {list(teacher.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{name}: student and teacher batch sizes differ: "
                         f"{student.shape[0]} vs {teacher.shape[0]}")
    if same_dim and student.shape[1] != teacher.shape[1]:
        raise ValueError(f"{name}: needs equal embedding sizes, got student D={student.shape[1]} "
                         f"and teacher D={teacher.shape[1]}; use FitNet (learned regressor) for "
                         f"different sizes")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != student.shape[0]
                               or labels.dtype.is_floating_point or labels.dtype == torch.bool):
        raise ValueError(f"{name}: labels must be an integer tensor [B] = [{student.shape[0]}], "
                         f"got dtype {labels.dtype} shape {list(labels.shape)}")
    if student.shape[0] < min_batch:
        raise ValueError(f"{name}: needs at least {min_batch} samples per rank, got "
                         f"{student.shape[0]}")


def global_count(local_rows: int, device: torch.device) -> int:
    """``N``: the number of samples of the global batch (all ranks have ``B`` rows; checked)."""
    world = rank_and_world()[1]
    if world == 1:
        return local_rows
    signed = torch.full((2,), local_rows, device=device)   # a fill: no host-to-device copy
    signed[1].neg_()
    sizes = all_reduce(signed, "max")                        # (max B, -min B)
    require(sizes[0] == -sizes[1],
            lambda: f"every rank must pass the same batch size B to a batch-relational KD term, "
                    f"got sizes between {-int(sizes[1])} and {int(sizes[0])}")
    return local_rows * world


def gather_with_grad(student: torch.Tensor, teacher: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """``(X_s [N, D_s] with gradient, X_t [N, D_t] constant, start)``: the global batch in rank
    order and the first global row of this rank (row-sharded mode)."""
    rank, _ = rank_and_world()
    return (all_gather_with_grad(student), all_gather_no_grad(teacher.detach()),
            rank * student.shape[0])


def gather_own_rows(student: torch.Tensor, teacher: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(X_s [N, D_s], X_t [N, D_t])`` where only this rank's rows of ``X_s`` carry gradient
    (replicated mode, see the module docstring)."""
    rank, world = rank_and_world()
    t_all = all_gather_no_grad(teacher.detach())
    if world == 1:
        return student, t_all
    full = all_gather_no_grad(student.detach())
    b = student.shape[0]
    return torch.cat([full[:rank * b], student, full[(rank + 1) * b:]]), t_all


def gather_labels(labels: torch.Tensor) -> torch.Tensor:
    """All-gathered ``[N]`` labels (no gradient)."""
    return all_gather_no_grad(labels.long())
