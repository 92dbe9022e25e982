r"""``distill = "kd"``: logit KD (Hinton, Vinyals, Dean, "Distilling the knowledge in a neural
network", NIPS-W 2015) between the student's CosFace margin logits and the frozen teacher
classifier's, class-sharded like GKD (no rank holds a full logit row).

.. math::

    \mathcal{L} = \mathrm{CE}(z^S, y) + w(e) \, \frac{T^2}{N} \sum_i
        \mathrm{KL}\bigl(\mathrm{softmax}(z^T_i / T) \,\|\, \mathrm{softmax}(z^S_i / T)\bigr),
    \qquad z = s\,(\cos\theta - m\,\mathbb{1}[c = y])

with ``w(e) = kd_weight * min(e / kd_warmup_epochs, 1)`` (no warm-up when 0).  Recipe source: the
GKD release's KD baseline (github.com/WisonZ/GKD, ``distillation/kd.py`` l. 8-16: ``T = 4``,
``kl_div(sum) * T^2 / B``, added to the CosFace CE with weight 1 and no warm-up, on the margin
logits of both networks as its GKD does).  The KL over class shards is
``plugins.kd_terms.LogitKD``; the logits, Partial FC sampling and sharded CE are the GKD head's.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..gkd import kd_warmup_weight
from ..kd_terms import LogitKD
from ..margin import check_batch, sharded_cross_entropy
from .base import configured_teacher_classifier, margin_from_config
from .registry import register_head
from .teacher_logits import TeacherLogitsHead

KD_KEYS = {
    "kd_temperature": (4.0, "kd: temperature T of the logit KD", (int, float)),
    "kd_weight": (1.0, "kd: weight of the logit KD term added to the CE", (int, float)),
    "kd_warmup_epochs": (0, "kd: linear warm-up of the KD weight, min(epoch / this, 1); 0: none "
                            "(GKD release's KD baseline)", (int, float)),
}


@register_head("kd", needs_teacher=True, teacher_classifier="or_class_means", same_dim=False,
               keys=KD_KEYS)
class KDHead(TeacherLogitsHead):
    """Student CosFace classifier shard + frozen teacher classifier shard + Hinton logit KD.

    Rank ``r`` owns classes ``[class_start, class_start + num_local)`` of both classifiers; the
    global batch is all-gathered (student with gradient), both networks' CosFace logits are
    built against the owned (Partial FC kept) classes, the CE and the KL reduce their softmax
    normalisers across ranks: loss and gradients equal those of one process holding every class.

    Args:
        embedding_size: ``D_s``.
        num_classes: ``C``.
        teacher_weight: the teacher's full classifier ``[C, D_t]`` (this rank keeps its rows).
        s, m: CosFace scale and margin (both networks' logits).
        temperature: ``T``.
        weight: KD weight.
        warmup_epochs: linear KD warm-up (0: none).
        sample_rate: Partial FC fraction of the owned classes kept per step, in (0, 1].

    Attributes: ``sharded_keys = ("weight", "teacher_weight")``; ``frozen_keys =
    ("teacher_weight",)``; ``stats``: ce, kd, kl, kd_weight.
    """

    logits_source = ("the KD baseline's student and teacher logits are CosFace as in the GKD "
                     "release")

    def __init__(self, embedding_size: int, num_classes: int, teacher_weight: torch.Tensor,
                 s: float = 64.0, m: float = 0.4, temperature: float = 4.0, weight: float = 1.0,
                 warmup_epochs: float = 0, sample_rate: float = 1.0) -> None:
        super().__init__()
        if warmup_epochs < 0 or weight < 0:
            raise ValueError(f"KDHead: kd_warmup_epochs and kd_weight must be >= 0, got "
                             f"{warmup_epochs} and {weight}")
        self.kd = LogitKD(temperature)
        self.init_classifiers(embedding_size, num_classes, teacher_weight, None, s, m,
                              sample_rate)
        self.kd_weight, self.warmup_epochs = float(weight), warmup_epochs

    def extra_repr(self) -> str:
        return (f"{self.classifier_repr()}, kd_weight={self.kd_weight}, "
                f"warmup_epochs={self.warmup_epochs}, sample_rate={self.sample_rate}")

    @classmethod
    def from_config(cls, cfg, teacher_classifier: Optional[torch.Tensor] = None) -> "KDHead":
        cls.check_config(cfg)
        _, m, s = margin_from_config(cfg)
        table = configured_teacher_classifier(cfg, teacher_classifier,
                                              cfg.teacher_embedding_size)
        return cls(cfg.embedding_size, cfg.num_classes, table, s=s, m=m,
                   temperature=cfg.kd_temperature, weight=cfg.kd_weight,
                   warmup_epochs=cfg.kd_warmup_epochs, sample_rate=cfg.sample_rate)

    def forward(self, student: torch.Tensor, labels: torch.Tensor,
                teacher: Optional[torch.Tensor] = None, epoch: float = 0.0) -> torch.Tensor:
        """Loss of the global batch: ``student [B, D_s]``, ``labels [B]``, ``teacher [B, D_t]``."""
        teacher = self.require_teacher(teacher)
        check_batch(self.embedding_size, labels, student, teacher,
                    teacher_size=self.teacher_embedding_size)
        if epoch < 0:
            raise ValueError(f"KDHead.forward: epoch must be >= 0, got {epoch}")
        logits = self.margin_logits(student, labels, teacher)
        z_s, z_t = logits.student, logits.teacher
        with torch.autocast(device_type=z_s.device.type, enabled=False):
            ce, _ = sharded_cross_entropy(z_s, logits.column)
            kd = self.kd(z_s, z_t)
        ramp = kd_warmup_weight(epoch, self.warmup_epochs) * self.kd_weight
        self.stats = {"ce": ce.detach(), "kd": kd.detach(), "kl": self.kd.stats["kl"],
                      "kd_weight": ce.new_full((), ramp)}
        return ce + ramp * kd
