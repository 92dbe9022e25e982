r"""MarginDistillation's per-sample margins (Svitov & Alyamkin, "MarginDistillation:
distillation for margin-based softmax", arXiv 2003.02586).

The student is trained with ArcFace whose class centers are the teacher's classifier rows,
frozen (as ArcDistill), and whose additive angular margin is set per sample from how close the
teacher embedding is to its class center:

.. math::

    c_i = \cos(f^t_i, w_{y_i}), \qquad
    m_i = m_{min} + (m_{max} - m_{min}) \, \frac{c_i}{\max_j c_j}, \qquad
    z_{i, y_i} = s \cos(\theta_{i, y_i} + m_i)

with the max over the (GLOBAL) batch.  Pinned down from the authors' public code
(github.com/david-svitov/margindistillation): ``train/train.py`` lines 168-196 (the margin
formula; ``Dmax = max`` over the batch; ``teacher_centers`` = the L2-normalised classifier rows
of the labels), lines 414-436 (the classifier is the teacher's ``fc7_weight``, frozen);
``train/config.py`` lines 95-100: ``s = 64``, ``Mmax = 0.5``, ``Mmin = 0.2``.  The loss is that
margin softmax alone (no extra KD term, ``train.py`` l. 334-335).  The public code takes the max
over each GPU's batch; here over the global batch, so the margins do not depend on the GPU count.
Margins are constants (no gradient).

This module computes the ``[N]`` margins from class-sharded centers; the head (frozen teacher
centers, ArcFace with a per-sample ``m``) is the registry's to wire.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..deferred_checks import require
from ..distributed import all_reduce, rank_and_world


class MarginDistillationMargins(nn.Module):
    """``forward(teacher [N, D], centers [L, D], target_col [N]) -> m [N]`` (no gradient).

    ``teacher``: the global batch's teacher embeddings (the same on every rank); ``centers``:
    this rank's classifier rows (Partial FC shard); ``target_col``: the column of each sample's
    class in ``centers`` or ``-1`` when another rank owns it (every sample owned by exactly one
    rank, as ``plugins.margin.select_classes`` returns).  ``stats``: ``mean_margin``,
    ``max_cos_teacher_center``.
    """

    def __init__(self, m_min: float = 0.2, m_max: float = 0.5) -> None:
        super().__init__()
        if not 0 <= m_min <= m_max:
            raise ValueError(f"MarginDistillationMargins needs 0 <= m_min <= m_max, got "
                             f"m_min={m_min}, m_max={m_max}")
        self.m_min, self.m_max = float(m_min), float(m_max)
        self.stats: Dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"m_min={self.m_min}, m_max={self.m_max}"

    @torch.no_grad()
    def forward(self, teacher: torch.Tensor, centers: torch.Tensor, target_col: torch.Tensor
                ) -> torch.Tensor:
        if teacher.dim() != 2 or centers.dim() != 2 or teacher.shape[1] != centers.shape[1]:
            raise ValueError(f"MarginDistillationMargins: teacher [N, D] and centers [L, D] with "
                             f"the same D, got {list(teacher.shape)} and {list(centers.shape)}")
        if target_col.shape != (teacher.shape[0],):
            raise ValueError(f"MarginDistillationMargins: target_col must be [{teacher.shape[0]}]"
                             f", got {list(target_col.shape)}")
        dtype = torch.float64 if teacher.dtype == torch.float64 else torch.float32
        held = target_col >= 0          # masked, not compacted: no host read of the row count
        if centers.shape[0] == 0:
            cos = teacher.new_zeros(teacher.shape[0], dtype=dtype)
        else:
            t_hat = F.normalize(teacher.to(dtype), dim=1)
            c_hat = F.normalize(centers[target_col.clamp(min=0)].to(dtype), dim=1)
            cos = torch.where(held, (t_hat * c_hat).sum(dim=1), 0.0)
        owned = held.to(target_col.dtype)
        if rank_and_world()[1] > 1:
            all_reduce(cos, "sum")
            all_reduce(owned, "sum")
        require((owned == 1).all(),
                lambda: "MarginDistillationMargins: every sample's class must be owned by exactly "
                        "one rank (check target_col / the class sharding)")
        d_max = cos.max()
        require(d_max > 0,
                lambda: f"MarginDistillationMargins: the largest teacher-to-center cosine of the "
                        f"batch is {float(d_max):.4g} <= 0; the classifier does not belong to "
                        f"this teacher")
        margins = self.m_min + (self.m_max - self.m_min) * cos / d_max
        self.stats = {"mean_margin": margins.mean(), "max_cos_teacher_center": d_max}
        return margins
