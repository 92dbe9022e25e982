"""AdaDistill's center update (Boutros, Struc, Damer, "AdaDistill: Adaptive Knowledge Distillation for Deep
Face Recognition", ECCV 2024, arXiv 2407.01332), class-sharded and world-size invariant.

The student is trained with a margin softmax whose class centers are teacher embeddings, refined
before the loss of every batch by an exponential moving average with an adaptive rate:

    w_y <- a_i * w_y + (1 - a_i) * f_t_i                          (center update)
    plain alpha:     a_i = clamp(cos(f_s_i, f_t_i), 1e-6, 1)
    weighted alpha': a_i = clamp(clamp(cos(f_s_i, f_t_i), -1, 1)
                                 * clamp(cos(w_y, f_t_i), 1e-6, 1), 1e-6, 1)
    L = 1/N sum_i CE(s * margin(cos(f_s_i, w_j)), y_i)           (ArcFace or CosFace margin)

``f_t_i`` is the L2-normalised teacher embedding; the centers themselves are not renormalised
(they are normalised only inside the cosine), exactly as in the paper's code.  The head that uses
it is ``plugins.heads.adadistill.AdaDistillHead``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


ALPHAS = ("weighted", "plain", "fixed")
ALPHA_MIN = 1e-6


def occurrence_index(labels: torch.Tensor) -> torch.Tensor:
    """``[n]`` -> ``[n]``: for each position, how many earlier positions hold the same label
    (0 for a label's first occurrence, 1 for its second, ...).  Vectorised (stable sort)."""
    n = labels.numel()
    positions = torch.arange(n, device=labels.device)
    if n == 0:
        return positions
    sorted_labels, order = torch.sort(labels, stable=True)
    first = torch.ones(n, dtype=torch.bool, device=labels.device)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    group_start = torch.cummax(torch.where(first, positions, 0), dim=0).values
    occurrence = torch.empty_like(positions)
    occurrence[order] = positions - group_start
    return occurrence


class CenterUpdate(NamedTuple):
    """Per-sample quantities of ``update_centers_`` (all ``[n]``, fp32)."""
    alpha_weighted: torch.Tensor    # alpha' of each sample, with the center as that sample saw it
    cos_center_teacher: torch.Tensor  # clamp(cos(w_y, f_t_i), 1e-6, 1), same center


@torch.no_grad()
def update_centers_(centers: torch.Tensor, local_labels: torch.Tensor, teacher_hat: torch.Tensor,
                    cos_st: torch.Tensor, alpha: str) -> CenterUpdate:
    """Apply the AdaDistill EMA in place to ``centers`` ``[L, D]`` (fp32), sample by sample.

    Args:
        centers: this rank's center rows, updated in place (unless ``alpha == "fixed"``).
        local_labels: ``[n]`` row of ``centers`` of each sample, in global batch order.
        teacher_hat: ``[n, D]`` L2-normalised teacher embeddings.
        cos_st: ``[n]`` ``clamp(cos(f_s_i, f_t_i), -1, 1)``.
        alpha: ``"weighted"`` (alpha'), ``"plain"`` (alpha) or ``"fixed"`` (no update; the
            returned statistics use the fixed centers).

    Repeated labels: every sample contributes, sequentially in the given (global batch) order;
    sample i's alpha is computed from the center as already updated by the earlier samples of its
    class.  Vectorised by occurrence rounds: round k applies the k-th occurrence of every class at
    once (distinct rows, so the writes cannot collide); the result is deterministic and equals the
    one-sample-at-a-time loop.
    """
    n = local_labels.numel()
    alpha_weighted = teacher_hat.new_zeros(n)
    cos_wt = teacher_hat.new_zeros(n)
    if n == 0:
        return CenterUpdate(alpha_weighted, cos_wt)
    if alpha == "fixed":
        occurrence = torch.zeros_like(local_labels)  # nothing changes between rounds: one round
    else:
        occurrence = occurrence_index(local_labels)
    for k in range(int(occurrence.max().item()) + 1):
        idx = torch.nonzero(occurrence == k).squeeze(1)
        rows = local_labels[idx]
        w = centers[rows]
        t = teacher_hat[idx]
        lam = ((w * t).sum(dim=1) / w.norm(dim=1).clamp_min(1e-12)).clamp(ALPHA_MIN, 1.0)
        a_weighted = (cos_st[idx] * lam).clamp(ALPHA_MIN, 1.0)
        alpha_weighted[idx] = a_weighted
        cos_wt[idx] = lam
        if alpha == "fixed":
            continue
        a = a_weighted if alpha == "weighted" else cos_st[idx].clamp(ALPHA_MIN, 1.0)
        centers.index_copy_(0, rows, a[:, None] * w + (1.0 - a[:, None]) * t)
    return CenterUpdate(alpha_weighted, cos_wt)
