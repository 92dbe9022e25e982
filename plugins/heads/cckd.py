r"""``distill = "cckd"``: margin softmax + correlation congruence KD (Peng et al., "Correlation
congruence for knowledge distillation", ICCV 2019, Sec. 3.3) on the GLOBAL batch.

.. math::

    \mathcal{L} = \mathcal{L}_{margin}(f_s, y)
        + w \cdot \frac{1}{N^2} \sum_{i,j} \bigl(k(f^t_i, f^t_j) - k(f^s_i, f^s_j)\bigr)^2

with ``k`` the Gaussian RBF kernel ``exp(-2 gamma + 2 gamma x^T y)`` of the normalised embeddings
approximated by its Taylor series truncated to ``P`` terms.  ``gamma = 0.4``, ``P = 2`` from
TFace's FR release (github.com/Tencent/TFace ``recognition/tasks/ekd/distillation/cc.py``
l. 10-28); the term is ``plugins.kd_terms.CorrelationCongruenceKD``.

The weight is NOT pinned by public face-recognition code (TFace ships the term without one); we
use ``w = 1`` (the weight the GKD/TFace releases give their other terms).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kd_terms import CorrelationCongruenceKD
from .margin_plus_kd import MarginPlusKD
from .margin_softmax import MarginSoftmaxHead
from .registry import register_head


@register_head("cckd", needs_teacher=True, same_dim=False, keys={
    "cckd_weight": (1.0, "cckd: weight w of the correlation congruence term (not pinned by a "
                         "public FR source)", (int, float)),
    "cckd_gamma": (0.4, "cckd: RBF kernel gamma", (int, float)),
    "cckd_order": (2, "cckd: number P of Taylor terms of the RBF kernel; None: the exact kernel",
                   (int, type(None)))})
class CCKDHead(MarginPlusKD):
    """Margin softmax + ``cckd_weight`` * correlation congruence on the global batch."""

    @classmethod
    def from_config(cls, cfg, teacher_classifier: Optional[torch.Tensor] = None) -> "CCKDHead":
        term = CorrelationCongruenceKD(cfg.cckd_gamma, cfg.cckd_order)
        return cls(MarginSoftmaxHead.from_config(cfg), term, cfg.cckd_weight)
