"""Standalone margin-softmax head (ArcFace / CosFace over Partial FC shards): the student-alone
baseline (``distill = "none"``) and the reference the distillation heads are compared with."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..distributed import all_gather_no_grad, all_gather_with_grad
from ..margin import (check_batch, check_labels_range, check_margin_args, cosine_logits,
                      distributed_margin_cross_entropy, select_classes)
from .base import DistillHead, margin_from_config
from .registry import register_head

MARGIN_GRADS = ("straight_through", "exact")


@register_head("none", needs_teacher=False, keys={
    "margin_grad": ("straight_through", "distill none / feature_mse, ArcFace: straight_through "
                                        "(arcface_torch) | exact (AdaDistill's own ArcFace)",
                    (str,), MARGIN_GRADS)})
class MarginSoftmaxHead(DistillHead):
    """ArcFace / CosFace loss with learned class weights, sharded by the Partial FC rule.

    ``forward(student [B, D], labels [B], teacher=None, epoch=0) -> scalar loss`` (``teacher``
    and ``epoch`` are not used): the mean over the GLOBAL batch of
    ``CE(s * margin(cos(f_i, W_j)), y_i)``, identical on every rank.  Embeddings and labels are
    all-gathered (with gradient), each rank scores them against its weight rows, softmax max and
    sum are all-reduced (``plugins.margin.distributed_margin_cross_entropy``).  The weight shard
    receives the exact gradient of the global loss; keep it out of DDP (it is not replicated).

    Margin gradient: by default ``margin_grad="straight_through"``, what arcface_torch trains
    with: the ArcFace target logit has the value ``s * cos(theta + m)`` but the gradient of
    ``s * cos(theta)`` (the margin is applied without gradient).  ``margin_grad="exact"``
    differentiates through ``acos``/``cos`` like the distillation heads.  CosFace is the same
    under both.

    Args:
        embedding_size: D.
        num_classes: C.
        margin: ``"arcface"`` or ``"cosface"``.
        s: logit scale.
        m: margin (arcface_torch: ArcFace 0.5, CosFace 0.4).
        sample_rate: Partial FC fraction of the owned classes scored per step (positives kept).
        margin_grad: ``"straight_through"`` (default, upstream) or ``"exact"``.

    Attributes:
        weight: ``nn.Parameter`` ``[num_local, D]``, rows = classes ``class_start ...``,
            initialised N(0, 0.01) as in arcface_torch.
        stats: ``mean_cos_target`` (detached, global batch).
    """

    sharded_keys = ("weight",)

    def __init__(self,
                 embedding_size: int,
                 num_classes: int,
                 margin: str = "arcface",
                 s: float = 64.0,
                 m: float = 0.5,
                 sample_rate: float = 1.0,
                 margin_grad: str = "straight_through") -> None:
        super().__init__()
        check_margin_args(margin, s, m, sample_rate)
        if margin_grad not in MARGIN_GRADS:
            raise ValueError(f"margin_grad must be one of {MARGIN_GRADS}, got {margin_grad!r}")
        self.own_class_shard(embedding_size, num_classes)
        self.margin, self.s, self.m = margin, float(s), float(m)
        self.sample_rate, self.margin_grad = float(sample_rate), margin_grad
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_local, embedding_size)))

    @classmethod
    def from_config(cls, cfg, teacher_classifier: Optional[torch.Tensor] = None
                    ) -> "MarginSoftmaxHead":
        kind, m, s = margin_from_config(cfg)
        return cls(cfg.embedding_size, cfg.num_classes, margin=kind, s=s, m=m,
                   sample_rate=cfg.sample_rate,
                   margin_grad=cfg.get("margin_grad", "straight_through"))

    def learned_classifier(self) -> Optional[torch.Tensor]:
        return self.weight.detach()

    @torch.no_grad()
    def load_full_weight(self, full: torch.Tensor) -> None:
        """Keep this rank's rows of a full ``[C, D]`` weight table."""
        expected = (self.num_classes, self.embedding_size)
        if tuple(full.shape) != expected:
            raise ValueError(f"load_full_weight expects a [C, D] = {list(expected)} table, "
                             f"got {list(full.shape)}")
        rows = full[self.class_start:self.class_start + self.num_local]
        self.weight.copy_(rows.to(device=self.weight.device, dtype=self.weight.dtype))

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"margin={self.margin}, s={self.s}, m={self.m}, sample_rate={self.sample_rate}, "
                f"margin_grad={self.margin_grad}, class_start={self.class_start}, "
                f"num_local={self.num_local}")

    def forward(self, student: torch.Tensor, labels: torch.Tensor,
                teacher: Optional[torch.Tensor] = None, epoch: float = 0.0) -> torch.Tensor:
        """Loss of the global batch. ``student`` ``[B, D]``, ``labels`` ``[B]``."""
        check_batch(self.embedding_size, labels, student)
        student_all = all_gather_with_grad(student)
        local = all_gather_no_grad(labels).long()
        check_labels_range(local, self.num_classes)
        local = local - self.class_start
        kept, target_col = select_classes(local, self.num_local, self.sample_rate)
        weight = self.weight if kept is None else self.weight[kept]
        cos = cosine_logits(student_all, weight)
        result = distributed_margin_cross_entropy(
            cos, target_col, self.margin, self.s, self.m,
            straight_through=self.margin_grad == "straight_through")
        self.stats = {"mean_cos_target": result.mean_cos_target}
        return result.loss
