r"""Relational KD, distance-wise and angle-wise (Park et al., CVPR 2019, arXiv 1904.05068,
Eqs. 4-8) on the GLOBAL batch of ``N`` (raw, not normalised) embeddings.

.. math::

    d_{ij} = \|x_i - x_j\|_2, \quad \mu = \frac{1}{N(N-1)} \sum_{i \ne j} d_{ij}, \quad
    \mathcal{L}_D = \frac{1}{N^2} \sum_{i,j} \ell_\delta\!\Bigl(\frac{d^s_{ij}}{\mu^s}
                                                            - \frac{d^t_{ij}}{\mu^t}\Bigr)

    e_{ab} = \frac{x_b - x_a}{\|x_b - x_a\|} \ (0 \text{ if } b = a), \quad
    \mathcal{L}_A = \frac{1}{N^3} \sum_{a,b,c} \ell_\delta\bigl(\langle e^s_{ab}, e^s_{ac}\rangle
                                                       - \langle e^t_{ab}, e^t_{ac}\rangle\bigr)

    \mathcal{L}_{RKD} = w_d \mathcal{L}_D + w_a \mathcal{L}_A

with the Huber loss ``l(x) = x^2/2 if |x| < 1 else |x| - 1/2`` (``F.smooth_l1_loss``, beta 1).
The means over ``N^2`` / ``N^3`` include the zero diagonal / degenerate entries, and distances
come from the Gram identity with squared distances clamped at ``1e-12``, as in the public code
the weights come from: ``w_d = 25, w_a = 50`` in the GKD release (github.com/WisonZ/GKD,
``distillation/rkd.py`` lines 9-57) and TFace's EKD release (``.../ekd/distillation/rkd.py``),
both from RepDistiller (the paper itself uses ``lambda_D = 1, lambda_A = 2``).  The RKD term is
added to the classification loss with weight 1 in both releases.

Distributed: ``L_D`` depends on the batch-global mean distance, so it is computed replicated
(every rank the full ``N x N``, gradient only into its own rows); ``L_A`` is a sum over vertices
``a``, row-sharded (rank ``r`` the vertices it holds: ``[B, N, N]`` angles per rank, from the
batch's Gram matrix, see ``vertex_angles``).  Both exact on any world size (``plugins.kd_terms._batch``).  ``N >= 2`` is
required (``mu`` is undefined for one sample).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_sum_with_grad
from ._batch import (check_embeddings, compute_dtype, gather_own_rows, gather_with_grad,
                     global_count)


def pairwise_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``[N, N]`` Euclidean distances of the rows of ``x``, diagonal exactly 0 (Gram identity
    on the rows centred by their detached mean: same distances and gradient, less cancellation)."""
    x = x - x.detach().mean(dim=0, keepdim=True)
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())).clamp(min=eps)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.where(eye, 0.0, d2.sqrt())


def normalized_distances(x: torch.Tensor) -> torch.Tensor:
    """``d_ij / mean_{i != j} d_ij`` (``N >= 2``)."""
    d = pairwise_distances(x)
    n = x.shape[0]
    return d / (d.sum() / (n * (n - 1)))


def vertex_angles(x: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """``[B, N, N]``: ``<e_ab, e_ac>`` for the vertices ``a`` in rows ``start .. start + B`` of
    ``x [N, D]``, from the Gram matrix of the batch (centred first; differences do not change):

        <x_b - x_a, x_c - x_a> = G_bc - G_ab - G_ac + G_aa,  ||x_b - x_a||^2 = G_aa + G_bb - 2 G_ab

    so no ``[B, N, D]`` difference tensor is formed (``O(N^2 D + B N^2)`` instead of
    ``O(B N^2 D)``).  A pair closer than ``sqrt(64 eps (G_aa + G_bb))`` (``eps`` of the dtype: the
    Gram rounding level) counts as coincident: its unit vector is 0, as ``F.normalize`` gives
    for an exactly zero difference.
    """
    xc = x - x.detach().mean(dim=0, keepdim=True)
    gram = xc @ xc.t()                                               # [N, N]
    diag = torch.diagonal(gram)                                      # [N]
    g_v = gram[start:start + count]                                  # [B, N]: G_ab
    g_aa = diag[start:start + count]                                 # [B]
    sq = g_aa[:, None] + diag[None, :] - 2.0 * g_v                   # [B, N]: ||x_b - x_a||^2
    tiny = 64.0 * torch.finfo(x.dtype).eps * (g_aa[:, None] + diag[None, :]).detach()
    apart = sq > tiny
    inv = torch.where(apart, sq.clamp(min=torch.finfo(x.dtype).tiny).rsqrt(), 0.0)
    inner = gram[None, :, :] - g_v[:, :, None] - g_v[:, None, :] + g_aa[:, None, None]
    return inner * inv[:, :, None] * inv[:, None, :]


class RelationalKD(nn.Module):
    """``forward(student [B, D_s], teacher [B, D_t], labels=None) -> scalar`` (global batch).

    Args:
        distance_weight: ``w_d`` (25 in the public code).
        angle_weight: ``w_a`` (50); 0 skips the ``O(N^3)`` angle term.

    ``stats``: ``distance`` and ``angle`` (the unweighted ``L_D``, ``L_A``).
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        if distance_weight < 0 or angle_weight < 0:
            raise ValueError(f"RelationalKD: weights must be >= 0, got distance_weight="
                             f"{distance_weight}, angle_weight={angle_weight}")
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)
        self.stats: Dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_embeddings("RelationalKD", student, teacher, same_dim=False, labels=labels)
        dtype = compute_dtype(student)
        s, t = student.to(dtype), teacher.detach().to(dtype)
        with torch.autocast(device_type=student.device.type, enabled=False):
            n = global_count(student.shape[0], student.device)
            if n < 2:
                raise ValueError("RelationalKD: the global batch must hold at least 2 samples "
                                 "(the mean pairwise distance is undefined for 1)")
            s_rep, t_all = gather_own_rows(s, t)
            with torch.no_grad():
                d_t = normalized_distances(t_all)
            distance = F.smooth_l1_loss(normalized_distances(s_rep), d_t, reduction="sum") / n ** 2
            angle = distance.new_zeros(())
            if self.angle_weight > 0:
                s_all, _, start = gather_with_grad(s, t)
                with torch.no_grad():
                    a_t = vertex_angles(t_all, start, s.shape[0])
                a_s = vertex_angles(s_all, start, s.shape[0])
                angle = all_reduce_sum_with_grad(
                    F.smooth_l1_loss(a_s, a_t, reduction="sum")) / n ** 3
            loss = self.distance_weight * distance + self.angle_weight * angle
        self.stats = {"distance": distance.detach(), "angle": angle.detach()}
        return loss
