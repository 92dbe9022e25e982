r"""``distill = "angular"``: margin softmax + ShrinkTeaNet-style angular distillation (Duong et
al., "ShrinkTeaNet: Million-scale lightweight face recognition via shrinking teacher-student
networks", arXiv 1905.10620): the cosine distance between student and teacher embeddings.

.. math::

    \mathcal{L} = \mathcal{L}_{margin}(f_s, y) + w \cdot \frac{1}{N} \sum_i
        \bigl(1 - \cos(f^s_i, f^t_i)\bigr)

Weight source: the MarginDistillation authors' public code that implements this baseline
(github.com/david-svitov/margindistillation, ``train/train.py`` l. 137-144, weight 1.0 in
``config.py`` l. 120-123); the term is ``plugins.kd_terms.AngularKD``.  That code's classifier is
a normalised softmax without margin (set ``margin_list`` to a zero margin to match it); our recipe
keeps the student's ArcFace margin of the AdaDistill recipe.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kd_terms import AngularKD
from .margin_plus_kd import MarginPlusKD
from .margin_softmax import MarginSoftmaxHead
from .registry import register_head


@register_head("angular", needs_teacher=True, same_dim=True, keys={
    "angular_weight": (1.0, "angular: weight w of the mean 1 - cos(f_s, f_t) added to the margin "
                            "loss", (int, float))})
class AngularHead(MarginPlusKD):
    """Margin softmax + ``angular_weight`` * mean ``1 - cos(f_s, f_t)`` (ShrinkTeaNet-style)."""

    @classmethod
    def from_config(cls, cfg, teacher_classifier: Optional[torch.Tensor] = None
                    ) -> "AngularHead":
        return cls(MarginSoftmaxHead.from_config(cfg), AngularKD(), cfg.angular_weight)
