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

from typing import NamedTuple, Optional

import numpy as np
import torch

from .deferred_checks import require


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
                    cos_st: torch.Tensor, alpha: str, valid: Optional[torch.Tensor] = None,
                    rounds: Optional[int] = None) -> CenterUpdate:
    """Apply the AdaDistill EMA in place to ``centers`` ``[L, D]`` (fp32), sample by sample.

    Args:
        centers: this rank's center rows, updated in place (unless ``alpha == "fixed"``).
        local_labels: ``[n]`` row of ``centers`` of each sample, in global batch order.
        teacher_hat: ``[n, D]`` L2-normalised teacher embeddings.
        cos_st: ``[n]`` ``clamp(cos(f_s_i, f_t_i), -1, 1)``.
        alpha: ``"weighted"`` (alpha'), ``"plain"`` (alpha) or ``"fixed"`` (no update; the
            returned statistics use the fixed centers).
        valid: ``[n]`` bool, the samples that update (the others -- rows of other ranks,
            non-finite embeddings -- keep their place but change nothing); None: all.  Their
            ``local_labels`` may lie outside ``[0, L)``.
        rounds: an upper bound on how often one label occurs among the valid samples (the
            caller's host-side knowledge, e.g. the largest label count of the global batch);
            extra rounds change nothing.  None: read it from the device (one host sync).

    Repeated labels: every sample contributes, sequentially in the given (global batch) order;
    sample i's alpha is computed from the center as already updated by the earlier samples of its
    class.  Vectorised by occurrence rounds: round k applies the k-th occurrence of every class at
    once (distinct rows, so the writes cannot collide); the result is deterministic and equals the
    one-sample-at-a-time loop.  Every round computes all ``n`` rows and masks (no ``nonzero``):
    a sample that does not update in a round writes what its row gets anyway -- the value of one
    updating sample, or its row's own value when none updates -- so duplicate writes agree.

    Returns: ``CenterUpdate`` with ``[n]`` statistics, 0 for samples that did not update.
    """
    n = local_labels.numel()
    alpha_weighted = teacher_hat.new_zeros(n)
    cos_wt = teacher_hat.new_zeros(n)
    if n == 0 or centers.shape[0] == 0:
        return CenterUpdate(alpha_weighted, cos_wt)
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=local_labels.device)
    rows = torch.where(valid, local_labels, torch.zeros_like(local_labels))
    if alpha == "fixed":
        occurrence, rounds = torch.zeros_like(local_labels), 1  # nothing changes: one round
    else:
        # skipped samples get labels of their own, so they never delay a valid sample's turn
        alone = centers.shape[0] + torch.arange(n, device=local_labels.device)
        occurrence = occurrence_index(torch.where(valid, local_labels, alone))
        last = torch.where(valid, occurrence, -1).max()
        if rounds is None:
            rounds = int(last.item()) + 1
        else:
            require(last < rounds, lambda: f"update_centers_: a label occurs {int(last) + 1} "
                                           f"times but rounds={rounds} was given (the host "
                                           f"labels do not match the batch)")
    for k in range(rounds):
        take = valid & (occurrence == k)
        w = centers[rows]
        lam = ((w * teacher_hat).sum(dim=1) / w.norm(dim=1).clamp_min(1e-12)).clamp(ALPHA_MIN,
                                                                                    1.0)
        a_weighted = (cos_st * lam).clamp(ALPHA_MIN, 1.0)
        alpha_weighted = torch.where(take, a_weighted, alpha_weighted)
        cos_wt = torch.where(take, lam, cos_wt)
        if alpha == "fixed":
            continue
        a = (a_weighted if alpha == "weighted" else cos_st.clamp(ALPHA_MIN, 1.0))[:, None]
        new = a * w + (1.0 - a) * teacher_hat
        first, anyone = take.int().argmax(), take.any()
        index = torch.where(take, rows, torch.where(anyone, rows[first], rows))
        value = torch.where(take[:, None], new, torch.where(anyone, new[first][None, :], w))
        centers.index_copy_(0, index, value)
    return CenterUpdate(alpha_weighted, cos_wt)


def label_rounds(labels: np.ndarray) -> int:
    """The largest number of times one label occurs in ``labels`` (host array; 0 when empty):
    the ``rounds`` bound of ``update_centers_`` for a batch with these labels."""
    labels = np.asarray(labels).reshape(-1)
    return int(np.unique(labels, return_counts=True)[1].max()) if labels.size else 0
