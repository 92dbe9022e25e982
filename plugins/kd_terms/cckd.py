r"""Correlation congruence KD (Peng et al., "Correlation Congruence for Knowledge Distillation",
ICCV 2019, arXiv 1904.01802, Sec. 3.3) on the GLOBAL batch of ``N`` samples.

.. math::

    \mathcal{L}_{CC} = \frac{1}{N^2} \sum_{i,j} \bigl(k(f^t_i, f^t_j) - k(f^s_i, f^s_j)\bigr)^2

with the Gaussian RBF kernel of the L2-normalised embeddings,
``k(x, y) = exp(-gamma ||x - y||^2) = exp(-2 gamma) exp(2 gamma x.y)``, approximated as in the
paper by its Taylor series truncated to ``order`` terms (``p = 0 .. order - 1``):

.. math::  k(x, y) \approx \sum_{p=0}^{P-1} e^{-2\gamma} \frac{(2\gamma)^p}{p!} (x^\top y)^p

Defaults ``gamma = 0.4``, ``order = 2`` (so ``p = 0, 1``: an affine function of the cosine) are
those of TFace's EKD release (``recognition/tasks/ekd/distillation/cc.py`` lines 10-28, whose
``range(self.p)`` with ``p = 2`` sums exactly these two terms).  ``order=None`` uses the exact
kernel.  The paper's MSE over the ``N x N`` matrix (TFace: ``F.mse_loss``, mean over ``N^2``).
``D_s`` and ``D_t`` may differ.  Row-sharded and exact on any world size, as SP.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_sum_with_grad
from ._batch import check_embeddings, compute_dtype, gather_with_grad, global_count


def rbf_kernel_rows(local: torch.Tensor, full: torch.Tensor, gamma: float,
                    order: Optional[int]) -> torch.Tensor:
    """``[B, N]`` kernel of normalised ``local [B, D]`` rows against ``full [N, D]``."""
    cos = F.normalize(local, dim=1) @ F.normalize(full, dim=1).t()
    if order is None:
        return torch.exp(2.0 * gamma * (cos - 1.0))
    out = torch.zeros_like(cos)
    for p in range(order):
        out = out + math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p) * cos ** p
    return out


class CorrelationCongruenceKD(nn.Module):
    """``forward(student [B, D_s], teacher [B, D_t], labels=None) -> scalar`` (global batch).

    Args:
        gamma: RBF width ``gamma`` (> 0).
        order: number of Taylor terms ``P`` (>= 1), or None for the exact exponential.
    """

    def __init__(self, gamma: float = 0.4, order: Optional[int] = 2) -> None:
        super().__init__()
        if not gamma > 0:
            raise ValueError(f"CorrelationCongruenceKD: gamma must be > 0, got {gamma}")
        if order is not None and order < 1:
            raise ValueError(f"CorrelationCongruenceKD: order must be >= 1 or None, got {order}")
        self.gamma, self.order = float(gamma), order
        self.stats: Dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, order={self.order}"

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_embeddings("CorrelationCongruenceKD", student, teacher, same_dim=False,
                         labels=labels)
        dtype = compute_dtype(student)
        with torch.autocast(device_type=student.device.type, enabled=False):
            n = global_count(student.shape[0], student.device)
            s_all, t_all, start = gather_with_grad(student.to(dtype), teacher.to(dtype))
            rows = slice(start, start + student.shape[0])
            k_s = rbf_kernel_rows(s_all[rows], s_all, self.gamma, self.order)
            with torch.no_grad():
                k_t = rbf_kernel_rows(t_all[rows], t_all, self.gamma, self.order)
            loss = all_reduce_sum_with_grad(((k_s - k_t) ** 2).sum()) / (n * n)
        return loss
