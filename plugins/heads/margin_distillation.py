r"""``distill = "margin_distillation"``: MarginDistillation (Svitov & Alyamkin,
"MarginDistillation: distillation for margin-based softmax", arXiv 2003.02586): the student is
trained with ArcFace on the teacher's FROZEN class centers, with a per-sample margin set by how
close the teacher embedding is to its class center.

.. math::

    c_i = \cos(f^t_i, w_{y_i}), \qquad
    m_i = m_{min} + (m_{max} - m_{min}) \frac{c_i}{\max_j c_j}, \qquad
    \mathcal{L} = \frac{1}{N} \sum_i -\log \frac{e^{s \cos(\theta_{i y_i} + m_i)}}
        {e^{s \cos(\theta_{i y_i} + m_i)} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}}

(``theta`` between the student embedding and the teacher centers ``w``; with a CosFace
``margin_list`` the target logit is ``s (cos theta - m_i)``).  Pinned down from the authors'
public code (github.com/david-svitov/margindistillation, ``train/train.py`` l. 168-196 and
414-436, ``config.py`` l. 95-100: ``s = 64``, ``m_min = 0.2``, ``m_max = 0.5``; no extra KD term).
The max runs over the GLOBAL batch (the public code: each GPU's batch), so the margins do not
depend on the GPU count.  Margins: ``plugins.kd_terms.MarginDistillationMargins``; the cross
entropy: ``plugins.margin.distributed_margin_cross_entropy`` with a per-sample ``m``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..distributed import rank_and_world, shard_range
from ..kd_terms import MarginDistillationMargins
from ..margin import (check_batch, cosine_logits,
                      distributed_margin_cross_entropy, select_classes)
from .base import (DistillHead, configured_teacher_classifier, gather_global_batch,
                   margin_from_config)
from .margin_softmax import MARGIN_GRADS
from .registry import register_head


@register_head("margin_distillation", needs_teacher=True, teacher_classifier="required",
               same_dim=True, keys={
                   "md_m_min": (0.2, "margin_distillation: smallest per-sample margin m_min",
                                (int, float)),
                   "md_m_max": (0.5, "margin_distillation: largest per-sample margin m_max",
                                (int, float))})
class MarginDistillationHead(DistillHead):
    """ArcFace (or CosFace) on the frozen teacher centers with teacher-derived per-sample margins.

    Args:
        embedding_size: ``D`` (student = teacher embedding size).
        num_classes: ``C``.
        teacher_weight: the teacher's classifier ``[C, D]`` (this rank keeps its rows, frozen).
        margin: ``"arcface"`` or ``"cosface"`` (how ``m_i`` enters the target logit).
        s: logit scale.
        m_min, m_max: margin range.
        sample_rate: Partial FC fraction of the owned classes kept per step.
        margin_grad: ``"exact"`` or ``"straight_through"`` (``plugins.margin``).

    Attributes: ``sharded_keys = frozen_keys = ("teacher_weight",)``; ``stats``: mean_margin,
    max_cos_teacher_center, mean_cos_target.
    """

    sharded_keys = ("teacher_weight",)
    frozen_keys = ("teacher_weight",)

    def __init__(self, embedding_size: int, num_classes: int, teacher_weight: torch.Tensor,
                 margin: str = "arcface", s: float = 64.0, m_min: float = 0.2,
                 m_max: float = 0.5, sample_rate: float = 1.0,
                 margin_grad: str = "exact") -> None:
        super().__init__()
        if margin_grad not in MARGIN_GRADS:
            raise ValueError(f"margin_grad must be one of {MARGIN_GRADS}, got {margin_grad!r}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"MarginDistillationHead sample_rate must lie in (0, 1], got "
                             f"{sample_rate}")
        expected = (num_classes, embedding_size)
        if not isinstance(teacher_weight, torch.Tensor) \
                or tuple(teacher_weight.shape) != expected:
            found = list(teacher_weight.shape) if isinstance(teacher_weight, torch.Tensor) \
                else type(teacher_weight).__name__
            raise ValueError(f"MarginDistillationHead: the teacher classifier must be "
                             f"[num_classes, D] = {list(expected)}, found {found}; set config "
                             f"key 'teacher_classifier' to the teacher's classifier file")
        self.margins = MarginDistillationMargins(m_min, m_max)
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.margin, self.s, self.margin_grad = margin, float(s), margin_grad
        self.sample_rate = float(sample_rate)
        rank, world = rank_and_world()
        self.class_start, self.num_local = shard_range(num_classes, rank, world)
        rows = teacher_weight.detach()[self.class_start:self.class_start + self.num_local]
        keep = torch.float64 if rows.dtype == torch.float64 else torch.float32
        self.register_buffer("teacher_weight", rows.to(keep).clone())

    @classmethod
    def from_config(cls, cfg, teacher_classifier: Optional[torch.Tensor] = None
                    ) -> "MarginDistillationHead":
        kind, _, s = margin_from_config(cfg)
        table = configured_teacher_classifier(cfg, teacher_classifier,
                                              cfg.teacher_embedding_size)
        return cls(cfg.embedding_size, cfg.num_classes, table, margin=kind, s=s,
                   m_min=cfg.md_m_min, m_max=cfg.md_m_max, sample_rate=cfg.sample_rate,
                   margin_grad=cfg.get("margin_grad", "straight_through"))

    def extra_repr(self) -> str:
        return (f"classes={self.class_start}..{self.class_start + self.num_local - 1} of "
                f"{self.num_classes}, margin={self.margin}, s={self.s}, "
                f"sample_rate={self.sample_rate}, margin_grad={self.margin_grad}")

    def forward(self, student: torch.Tensor, labels: torch.Tensor,
                teacher: Optional[torch.Tensor] = None, epoch: float = 0.0) -> torch.Tensor:
        """Loss of the global batch: ``student [B, D]``, ``labels [B]``, ``teacher [B, D]``."""
        teacher = self.require_teacher(teacher)
        check_batch(self.embedding_size, labels, student, teacher)
        f_s, f_t, y = gather_global_batch(student, teacher, labels, self.num_classes)
        kept, column = select_classes(y - self.class_start, self.num_local, self.sample_rate)
        centers = self.teacher_weight if kept is None else self.teacher_weight[kept]
        m = self.margins(f_t, centers, column)
        cos = cosine_logits(f_s, centers)
        result = distributed_margin_cross_entropy(
            cos, column, self.margin, self.s, m,
            straight_through=self.margin_grad == "straight_through")
        self.stats = {"mean_cos_target": result.mean_cos_target,
                      **{k: v.detach() for k, v in self.margins.stats.items()}}
        return result.loss
