r"""``distill = "rkd"``: margin softmax + relational KD (Park et al., "Relational knowledge
distillation", CVPR 2019, Eqs. 4-8) on the GLOBAL batch.

.. math::

    \mathcal{L} = \mathcal{L}_{margin}(f_s, y) + w \bigl(w_d \mathcal{L}_D + w_a \mathcal{L}_A\bigr)

``L_D``: Huber loss between the pairwise distances of student and teacher, each divided by its
batch-mean distance; ``L_A``: Huber loss between the cosines of the angles of all triplets.
Weights from the GKD release (github.com/WisonZ/GKD, ``distillation/rkd.py`` l. 9-57:
``w_d = 25``, ``w_a = 50``, added to CE with weight 1; TFace's EKD release the same); the term is
``plugins.kd_terms.RelationalKD``.  The embeddings are all-gathered with gradient, so the loss
and gradients are the same on any GPU count (the public code sees one GPU's batch).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kd_terms import RelationalKD
from .margin_plus_kd import MarginPlusKD
from .margin_softmax import MarginSoftmaxHead
from .registry import register_head


@register_head("rkd", needs_teacher=True, same_dim=False, keys={
    "rkd_weight": (1.0, "rkd: weight w of the RKD term added to the margin loss", (int, float)),
    "rkd_distance_weight": (25.0, "rkd: weight w_d of the distance-wise loss", (int, float)),
    "rkd_angle_weight": (50.0, "rkd: weight w_a of the angle-wise loss", (int, float))})
class RKDHead(MarginPlusKD):
    """Margin softmax + ``rkd_weight`` * (w_d distance + w_a angle) relational KD, global batch."""

    @classmethod
    def from_config(cls, cfg, teacher_classifier: Optional[torch.Tensor] = None) -> "RKDHead":
        term = RelationalKD(cfg.rkd_distance_weight, cfg.rkd_angle_weight)
        return cls(MarginSoftmaxHead.from_config(cfg), term, cfg.rkd_weight)
