"""Base of the class-sharded logit-distillation heads (``gkd``, ``kd``): the student's trainable
CosFace classifier shard beside the teacher's frozen classifier shard, and the margin logits of
both networks for the global batch,

.. math::  z = s\\,(\\cos\\theta - m\\,\\mathbb{1}[c = y])

over this rank's (Partial FC kept) classes -- the logits both papers' KD terms compare.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..margin import select_classes, target_mask
from .base import DistillHead, gather_global_batch, margin_from_config


class MarginLogits(NamedTuple):
    """Both networks' CosFace logits of the global batch over this rank's kept classes.

    Attributes:
        student: ``[N, L]`` with gradient to the student embeddings and ``weight``.
        teacher: ``[N, L]`` without gradient.
        column: ``[N]`` each sample's target column among the ``L`` kept classes, -1 where another
            rank owns the class.
        target: bool ``[N, L]``, True at the targets held here (``plugins.margin.target_mask``).
        index: the kept local classes ``[L]``, or None when all ``num_local`` are kept.
        labels: ``[N]`` the gathered labels.
    """

    student: torch.Tensor
    teacher: torch.Tensor
    column: torch.Tensor
    target: torch.Tensor
    index: Optional[torch.Tensor]
    labels: torch.Tensor


def cosface_logits(embeddings: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                   s: float, m: float) -> torch.Tensor:
    """CosFace logits ``s * (cos - m * onehot)`` ``[N, L]`` of ``embeddings [N, D]`` against the
    class rows ``weight [L, D]``; the margin goes to the entries where ``target [N, L]`` is True.
    Built in place on one fresh ``[N, L]`` tensor (the matmul output is not kept)."""
    logits = F.linear(F.normalize(embeddings), F.normalize(weight)).mul_(s)
    margin = torch.full((), -s * m, dtype=logits.dtype, device=logits.device)
    return logits.add_(torch.where(target, margin, torch.zeros_like(margin)))


class TeacherLogitsHead(DistillHead):
    """A student CosFace classifier shard ``weight [num_local, D_s]`` (trained, N(0, 0.01) as in
    arcface_torch) and the teacher's frozen classifier shard ``teacher_weight [num_local, D_t]``,
    rows = classes ``class_start ...`` (Partial FC rule).  Subclasses call ``init_classifiers``
    in their constructor and ``margin_logits`` in their forward; ``logits_source`` says, in the
    CosFace-only error, whose logits they reproduce."""

    sharded_keys = ("weight", "teacher_weight")
    frozen_keys = ("teacher_weight",)
    logits_source = ""

    def init_classifiers(self, embedding_size: int, num_classes: int,
                         teacher_weight: torch.Tensor, teacher_embedding_size: Optional[int],
                         s: float, m: float, sample_rate: float) -> None:
        """Check the teacher classifier ``[C, D_t]`` (the full table) and keep this rank's rows."""
        name = type(self).__name__
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"{name} sample_rate must lie in (0, 1], got {sample_rate}")
        if not isinstance(teacher_weight, torch.Tensor):
            raise ValueError(f"{name} teacher_weight must be the teacher's classifier tensor "
                             f"[num_classes, D_t], got {type(teacher_weight).__name__}; set config "
                             f"key 'teacher_classifier' or use a teacher cache's class means "
                             f"(plugins.class_means.ClassMeanAccumulator)")
        found = tuple(teacher_weight.shape)
        width = teacher_embedding_size if teacher_embedding_size is not None else (
            found[1] if len(found) == 2 else "D_t")
        if len(found) != 2 or found != (num_classes, width):
            raise ValueError(f"{name} teacher_weight: expected shape [num_classes, D_t] = "
                             f"[{num_classes}, {width}], found {list(found)}; pass the teacher's "
                             f"full classifier (all classes, one row per class)")
        self.own_class_shard(embedding_size, num_classes)
        self.teacher_embedding_size = found[1]
        self.s, self.m, self.sample_rate = float(s), float(m), float(sample_rate)
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_local, embedding_size)))
        rows = teacher_weight.detach()[self.class_start:self.class_start + self.num_local]
        keep = torch.float64 if rows.dtype == torch.float64 else torch.float32
        self.register_buffer("teacher_weight", rows.to(keep).clone())

    @classmethod
    def check_config(cls, cfg) -> None:
        if margin_from_config(cfg)[0] != "cosface":
            raise ValueError(f"distill='{cfg.distill}' needs a CosFace margin_list (1.0, 0.0, m), "
                             f"got {tuple(cfg.margin_list)}: {cls.logits_source}")

    def learned_classifier(self) -> Optional[torch.Tensor]:
        return self.weight.detach()

    def classifier_repr(self) -> str:
        """The shard and classifier part of ``extra_repr``; subclasses append their options."""
        return (f"classes={self.class_start}..{self.class_start + self.num_local - 1} of "
                f"{self.num_classes}, D_s={self.embedding_size}, "
                f"D_t={self.teacher_embedding_size}, s={self.s}, m={self.m}")

    def margin_logits(self, student: torch.Tensor, labels: torch.Tensor,
                      teacher: torch.Tensor) -> MarginLogits:
        """Gather the global batch (student with gradient) and build both logit matrices in fp32
        (fp64 for an fp64 classifier) with autocast off, over the classes kept this step."""
        f_s, f_t, y = gather_global_batch(student, teacher, labels, self.num_classes)
        index, column = select_classes(y - self.class_start, self.num_local, self.sample_rate)
        weight, teacher_weight = self.weight, self.teacher_weight
        if index is not None:
            weight, teacher_weight = weight[index], teacher_weight[index]
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            target = target_mask(column, weight.shape[0])
            z_s = cosface_logits(f_s.to(dtype), weight.to(dtype), target, self.s, self.m)
            with torch.no_grad():
                z_t = cosface_logits(f_t.to(dtype), teacher_weight.to(dtype), target,
                                     self.s, self.m)
        return MarginLogits(z_s, z_t, column, target, index, y)
