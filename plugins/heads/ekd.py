r"""``distill = "ekd"``: margin softmax + EKD, evaluation-oriented KD for face recognition (Huang,
Wu, Xu, Ding, CVPR 2022), on the pair similarities of the GLOBAL batch.

.. math::

    \mathcal{L} = \mathcal{L}_{margin}(f_s, y) + w \bigl(
        w_p \, \mathrm{mean}_{pos} (r^s - r^t)^2 + w_n \, \mathrm{mean}_{top\text{-}k\ neg}
        (r^s - r^t)^2 \bigr), \qquad r(x) = \sum_k \sigma\bigl((x - \tau_k) / T\bigr)

``tau_k``: EMA thresholds at FPR 1e-1 .. 1e-6 of the negative pairs (student and teacher each
their own).  Defaults from TFace's EKD release (github.com/Tencent/TFace,
``recognition/tasks/ekd/distillation/ekd.py`` l. 10-84: top_k 2000, T 0.01, momentum 0.01,
w_p 0.02, w_n 0.01; ``train.py`` l. 86-93: added with weight 1); the term is
``plugins.kd_terms.EvaluationOrientedKD``.

State: the threshold buffers ``term.student_thresholds`` / ``term.teacher_thresholds`` are
REPLICATED (identical on every rank, computed on the global batch), saved in the head's
state_dict and not class-sharded.  TFace draws its batches with a balanced sampler (4 images per
identity) so positive pairs exist; our loader samples at random (a batch without positive pairs
gives a positive term of 0).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kd_terms import EvaluationOrientedKD
from .margin_plus_kd import MarginPlusKD
from .margin_softmax import MarginSoftmaxHead
from .registry import register_head


@register_head("ekd", needs_teacher=True, same_dim=False, keys={
    "ekd_weight": (1.0, "ekd: weight w of the EKD term added to the margin loss", (int, float)),
    "ekd_top_k": (2000, "ekd: hardest negative pairs (by student similarity) in the loss",
                  (int,)),
    "ekd_temperature": (0.01, "ekd: temperature T of the soft rank", (int, float)),
    "ekd_momentum": (0.01, "ekd: EMA rate of the FPR thresholds", (int, float)),
    "ekd_positive_weight": (0.02, "ekd: weight w_p of the positive-pair rank MSE", (int, float)),
    "ekd_negative_weight": (0.01, "ekd: weight w_n of the hard-negative rank MSE", (int, float))})
class EKDHead(MarginPlusKD):
    """Margin softmax + ``ekd_weight`` * EKD rank loss at the FPR thresholds (global batch)."""

    wants_host_labels = True    # the term counts its negative pairs there, not on the device

    def forward(self, student: torch.Tensor, labels: torch.Tensor,
                teacher: Optional[torch.Tensor] = None, epoch: float = 0.0) -> torch.Tensor:
        self.term.use_host_labels(self.take_host_labels())
        return super().forward(student, labels, teacher, epoch)

    @classmethod
    def from_config(cls, cfg, teacher_classifier: Optional[torch.Tensor] = None) -> "EKDHead":
        term = EvaluationOrientedKD(top_k=cfg.ekd_top_k, temperature=cfg.ekd_temperature,
                                    momentum=cfg.ekd_momentum,
                                    positive_weight=cfg.ekd_positive_weight,
                                    negative_weight=cfg.ekd_negative_weight)
        return cls(MarginSoftmaxHead.from_config(cfg), term, cfg.ekd_weight)
