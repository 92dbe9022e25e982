"""A margin-softmax head plus vanilla feature distillation, the feature-KD baseline.

.. math::  L = L_{margin}(f_s, y) + \\lambda \\cdot L_{MSE}(f_s, f_t)

(AdaDistill, Eq. 2: the mean squared distance of the L2-normalised embeddings.)
"""
from __future__ import annotations

import torch
from torch import nn


class MarginWithFeatureKD(nn.Module):
    """``margin_head(f_s, y) + weight * feature_head(f_s, f_t, y)``.

    Args:
        margin_head: a head called as ``margin_head(student [B, D], labels [B])``.
        feature_head: a head called as ``feature_head(student [B, D], teacher [B, D], labels [B])``.
        weight: the factor lambda of the feature term.
    """

    def __init__(self, margin_head: nn.Module, feature_head: nn.Module, weight: float = 1.0) -> None:
        super().__init__()
        self.margin_head = margin_head
        self.feature_head = feature_head
        self.weight = float(weight)
        self.num_classes = margin_head.num_classes
        self.class_start = margin_head.class_start
        self.num_local = margin_head.num_local
        self.sharded_keys = tuple(f"margin_head.{k}" for k in margin_head.sharded_keys)
        self.stats = {}

    def extra_repr(self) -> str:
        return f"loss = margin_head + {self.weight} * feature_head"

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        margin = self.margin_head(student, labels)
        feature = self.feature_head(student, teacher, labels)
        self.stats = {"margin_loss": margin.detach(), "feature_mse": feature.detach()}
        return margin + self.weight * feature
