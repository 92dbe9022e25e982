r"""``distill = "sp"``: margin softmax + similarity-preserving KD (Tung & Mori, "Similarity-
preserving knowledge distillation", ICCV 2019, Eqs. 1-4) on the GLOBAL batch.

.. math::

    \mathcal{L} = \mathcal{L}_{margin}(f_s, y)
        + w \cdot \frac{1}{N^2} \bigl\| \tilde G_t - \tilde G_s \bigr\|_F^2

with ``G~`` the batch Gram matrix: ``"cosine"`` (cosine similarities, TFace's face-recognition
release, github.com/Tencent/TFace ``recognition/tasks/ekd/distillation/similarity_perserving.py``
l. 17-31) or ``"row_normalized"`` (the paper's ``G G^T`` with L2-normalised rows).

The weight is NOT pinned by a public face-recognition source: the paper's ``gamma = 3000`` is for
CIFAR with the row-normalised Gram, and TFace ships the term without a weight.  Our choice:
the cosine Gram of the FR release with ``w = 1`` (the same weight 1 the GKD/TFace releases give
their other terms).  The term is ``plugins.kd_terms.SimilarityPreservingKD``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kd_terms import SimilarityPreservingKD
from ..kd_terms.sp import GRAMS
from .margin_plus_kd import MarginPlusKD
from .margin_softmax import MarginSoftmaxHead
from .registry import register_head


@register_head("sp", needs_teacher=True, same_dim=False, keys={
    "sp_weight": (1.0, "sp: weight w of the similarity-preserving term (not pinned by a public "
                       "FR source; the paper's 3000 is for CIFAR)", (int, float)),
    "sp_gram": ("cosine", "sp: batch Gram matrix: cosine (TFace FR release) | row_normalized "
                          "(paper)", (str,), tuple(GRAMS))})
class SPHead(MarginPlusKD):
    """Margin softmax + ``sp_weight`` * similarity-preserving KD on the global batch."""

    @classmethod
    def from_config(cls, cfg, teacher_classifier: Optional[torch.Tensor] = None) -> "SPHead":
        return cls(MarginSoftmaxHead.from_config(cfg), SimilarityPreservingKD(cfg.sp_gram),
                   cfg.sp_weight)
