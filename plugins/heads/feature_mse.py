"""``distill = "feature_mse"``: margin softmax + lambda * vanilla feature MSE (AdaDistill Eq. 2),
the feature-KD baseline."""
from __future__ import annotations

from typing import Optional

import torch

from ..feature_kd import FeatureMSEHead
from .margin_plus_kd import MarginPlusKD
from .margin_softmax import MarginSoftmaxHead
from .registry import register_head


@register_head("feature_mse", needs_teacher=True, same_dim=True, keys={
    "feature_kd_weight": (1.0, "feature_mse: weight lambda of the embedding MSE added to the "
                               "margin loss", (int, float))})
class FeatureMSE(MarginPlusKD):
    """Margin softmax + ``feature_kd_weight`` * MSE of the normalised embeddings."""

    @classmethod
    def from_config(cls, cfg, teacher_classifier: Optional[torch.Tensor] = None) -> "FeatureMSE":
        return cls(MarginSoftmaxHead.from_config(cfg), FeatureMSEHead(), cfg.feature_kd_weight)
