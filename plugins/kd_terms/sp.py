r"""Similarity-preserving KD (Tung & Mori, ICCV 2019, arXiv 1907.09682, Eqs. 1-4) on the
embeddings of the GLOBAL batch of ``N`` samples.

.. math::

    G = F F^\top \in \mathbb{R}^{N \times N}, \qquad
    \tilde G_{i\cdot} = G_{i\cdot} / \|G_{i\cdot}\|_2, \qquad
    \mathcal{L}_{SP} = \frac{1}{N^2} \|\tilde G^t - \tilde G^s\|_F^2

``gram="row_normalized"`` is the paper (activations flattened, Gram rows L2-normalised; weight
``gamma = 3000`` in its CIFAR experiments).  ``gram="cosine"`` is TFace's EKD release
(``recognition/tasks/ekd/distillation/similarity_perserving.py`` lines 17-31: embeddings
L2-normalised, Gram of cosines, no row normalisation, the same ``1/N^2``), the variant the
face-recognition comparisons used.  ``D_s`` and ``D_t`` may differ (only ``N x N`` matrices meet).

Row-sharded (``plugins.kd_terms._batch``): rank ``r`` computes the rows of its own samples
against the gathered batch; every row term depends on that row only, so one with-gradient
all-reduce of the partial sums is exact.  ``N = 1`` is defined (a ``1 x 1`` matrix; the loss is 0
for the row-normalised Gram of a nonzero vector).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_sum_with_grad
from ._batch import check_embeddings, compute_dtype, gather_with_grad, global_count

GRAMS = ("row_normalized", "cosine")


def _gram_rows(local: torch.Tensor, full: torch.Tensor, gram: str) -> torch.Tensor:
    if gram == "cosine":
        return F.normalize(local, dim=1) @ F.normalize(full, dim=1).t()
    return F.normalize(local @ full.t(), dim=1)


class SimilarityPreservingKD(nn.Module):
    """``forward(student [B, D_s], teacher [B, D_t], labels=None) -> scalar`` (global batch).

    Args:
        gram: ``"row_normalized"`` (paper) or ``"cosine"`` (TFace EKD release).
    """

    def __init__(self, gram: str = "row_normalized") -> None:
        super().__init__()
        if gram not in GRAMS:
            raise ValueError(f"SimilarityPreservingKD: gram must be one of {GRAMS}, got {gram!r}")
        self.gram = gram
        self.stats: Dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"gram={self.gram}"

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_embeddings("SimilarityPreservingKD", student, teacher, same_dim=False,
                         labels=labels)
        dtype = compute_dtype(student)
        with torch.autocast(device_type=student.device.type, enabled=False):
            n = global_count(student.shape[0], student.device)
            s_all, t_all, start = gather_with_grad(student.to(dtype), teacher.to(dtype))
            rows = slice(start, start + student.shape[0])
            g_s = _gram_rows(s_all[rows], s_all, self.gram)
            with torch.no_grad():
                g_t = _gram_rows(t_all[rows], t_all, self.gram)
            loss = all_reduce_sum_with_grad(((g_s - g_t) ** 2).sum()) / (n * n)
        return loss
