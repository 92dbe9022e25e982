"""A margin-softmax head plus a weighted KD term of the embeddings: the base of the feature-KD
baselines.

.. math::  L = L_{margin}(f_s, y) + \\lambda \\cdot L_{KD}(f_s, f_t, y)

(AdaDistill, Eq. 2 with ``L_KD`` the mean squared distance of the L2-normalised embeddings:
``feature_mse``; the comparison methods put their own term in.)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import DistillHead
from .margin_softmax import MarginSoftmaxHead


class MarginPlusKD(DistillHead):
    """``margin_head(f_s, y) + weight * term(f_s, f_t, y)``.

    Args:
        margin_head: the student's learned margin softmax (class-sharded).
        term: an ``nn.Module`` called as ``term(student [B, D], teacher [B, D_t], labels [B])``
            returning a scalar of the global batch (same on every rank); its ``stats`` (if any)
            are reported beside ``margin_loss`` and ``kd_term``; if it has
            ``reduce_replicated_grads`` (replicated parameters, e.g. a regressor), the head's
            ``reduce_replicated_grads`` calls it.
        weight: the factor lambda of the KD term.

    ``sharded_keys``: the margin head's, prefixed ``margin_head.``.  ``learned_classifier``: the
    margin head's weight shard.
    """

    def __init__(self, margin_head: MarginSoftmaxHead, term: nn.Module, weight: float = 1.0
                 ) -> None:
        super().__init__()
        self.margin_head = margin_head
        self.term = term
        self.weight = float(weight)
        self.num_classes = margin_head.num_classes
        self.class_start = margin_head.class_start
        self.num_local = margin_head.num_local
        self.sharded_keys = tuple(f"margin_head.{k}" for k in margin_head.sharded_keys)

    def extra_repr(self) -> str:
        return f"loss = margin_head + {self.weight} * term"

    def forward(self, student: torch.Tensor, labels: torch.Tensor,
                teacher: Optional[torch.Tensor] = None, epoch: float = 0.0) -> torch.Tensor:
        teacher = self.require_teacher(teacher)
        margin = self.margin_head(student, labels)
        kd = self.term(student, teacher, labels)
        self.stats = {"margin_loss": margin.detach(), "kd_term": kd.detach()}
        self.stats.update(getattr(self.term, "stats", {}))
        return margin + self.weight * kd

    def learned_classifier(self) -> Optional[torch.Tensor]:
        return self.margin_head.learned_classifier()

    def reduce_replicated_grads(self) -> None:
        reduce = getattr(self.term, "reduce_replicated_grads", None)
        if reduce is not None:
            reduce()
