r"""Angular (cosine) distillation, ShrinkTeaNet style (Duong et al., "ShrinkTeaNet: Million-scale
lightweight face recognition via shrinking teacher-student networks", arXiv 1905.10620).

.. math::  \mathcal{L}_{ang} = \frac{1}{N} \sum_{i=1}^{N} \bigl(1 - \cos(f^s_i, f^t_i)\bigr)

over the GLOBAL batch of ``N`` samples (``= \frac12 \|\hat f^s_i - \hat f^t_i\|^2``, i.e. half of
AdaDistill's Eq. 2 feature term).  Only the embedding layer is distilled (ShrinkTeaNet also
applies it to intermediate feature maps).  Public code it follows: the MarginDistillation release
(github.com/david-svitov/margindistillation, ``train/train.py`` lines 137-144:
``mean(1 - cos)``, added to the margin softmax with ``alpha = 1.0``, ``train/config.py`` l. 120-123)
and TFace's EKD release (``recognition/tasks/ekd/distillation/cosine_distance.py``: ``1 - mean cos``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_sum_with_grad
from ._batch import check_embeddings, compute_dtype, global_count


class AngularKD(nn.Module):
    """``1 - cos(f_s, f_t)`` averaged over the global batch; needs ``D_s == D_t``.

    ``forward(student [B, D], teacher [B, D], labels=None) -> scalar``.  Per-sample terms, so each
    rank sums its own rows and the sums are all-reduced with gradient: exact on any world size.
    ``stats``: ``mean_cos_st``.
    """

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = float(eps)
        self.stats: Dict[str, torch.Tensor] = {}

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_embeddings("AngularKD", student, teacher, same_dim=True, labels=labels)
        dtype = compute_dtype(student)
        with torch.autocast(device_type=student.device.type, enabled=False):
            cos = (F.normalize(student.to(dtype), dim=1, eps=self.eps)
                   * F.normalize(teacher.detach().to(dtype), dim=1, eps=self.eps)).sum(dim=1)
            n = global_count(student.shape[0], student.device)
            loss = all_reduce_sum_with_grad((1.0 - cos).sum()) / n
        self.stats = {"mean_cos_st": 1.0 - loss.detach()}
        return loss
