"""The contract every distillation head follows (``DistillHead``) and config helpers heads share.

A head maps this rank's batch to the loss of the GLOBAL batch (identical on every rank):

    head(student [B, D], labels [B], teacher=None | [B, D_t], epoch=0.0) -> scalar loss

and declares which of its state entries are class-sharded (``sharded_keys``: first axis = this
rank's Partial FC class shard, re-split by the checkpoint code on a world-size change) and which
buffers never change during training (``frozen_keys``: the non-finite step guard does not copy
them).  After each forward ``stats`` holds detached scalars for the progress log.

A skipped training step must leave every buffer as before it.  The trainer's step guard copies a
head's buffers before the step, except ``frozen_keys`` and ``journaled_keys``: the buffers a
head changes only row by row (AdaDistill's ``[C_local, D]`` centers) and saves itself, calling
``journal_rows(name, rows)`` just before it changes those rows, so a skipped step costs a copy of
the rows the batch touches, not of the table (``begin_journal`` / ``rollback_journal``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..distributed import all_gather_no_grad, all_gather_with_grad, rank_and_world, shard_range
from ..margin import check_labels_range

MARGIN_KINDS = ("arcface", "cosface")


class DistillHead(nn.Module):
    """Base class of the registered heads (see the module docstring for the call contract).

    Attributes:
        sharded_keys: state_dict keys whose first axis is the class shard of this rank.
        frozen_keys: buffers that never change during training (not snapshotted every step).
        journaled_keys: buffers changed only through ``journal_rows`` (row-wise rollback).
        wants_host_labels: the forward uses ``use_host_labels`` when given (no device read).
        stats: detached scalar tensors of the last forward.
    """

    sharded_keys: Tuple[str, ...] = ()
    frozen_keys: Tuple[str, ...] = ()
    journaled_keys: Tuple[str, ...] = ()
    wants_host_labels: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.stats: Dict[str, torch.Tensor] = {}
        self._journal: Optional[List[Tuple[str, torch.Tensor, torch.Tensor]]] = None
        self._host_labels: Optional[np.ndarray] = None

    # ------------------------------------------------------------ a skipped step's rollback
    def begin_journal(self) -> None:
        """Start recording ``journal_rows`` (the trainer calls it before a step's first forward)."""
        self._journal = []

    @torch.no_grad()
    def journal_rows(self, name: str, rows: torch.Tensor) -> None:
        """Call just before changing rows ``rows [n]`` (long, repeats allowed) of the
        ``journaled_keys`` buffer ``name``: keeps their current values while a journal is open."""
        if self._journal is not None:
            self._journal.append((name, rows, self.get_buffer(name).index_select(0, rows)))

    def journaled_rows(self) -> List[Tuple[str, torch.Tensor]]:
        """``(buffer name, rows)`` changed since ``begin_journal`` (for the finite check)."""
        return [(name, rows) for name, rows, _ in self._journal or ()]

    @torch.no_grad()
    def rollback_journal(self) -> None:
        """Put every journaled row back as it was at ``begin_journal`` (newest entry first, so
        each row ends at its oldest saved value); the journal stays open."""
        for name, rows, saved in reversed(self._journal or ()):
            self.get_buffer(name).index_copy_(0, rows, saved)
        if self._journal is not None:
            self._journal.clear()

    def end_journal(self) -> None:
        """Stop recording and drop the saved rows."""
        self._journal = None

    def use_host_labels(self, labels: Optional[np.ndarray]) -> None:
        """The global batch's labels ``[N]`` (rank order) on the host, for the next forward only.
        A head whose loop bounds depend on the labels (``wants_host_labels``, e.g. AdaDistill's
        repeated-label rounds) takes them from here instead of reading the device; the trainer
        passes them.  None, or never called: the head reads the device."""
        self._host_labels = None if labels is None else np.asarray(labels)

    def take_host_labels(self) -> Optional[np.ndarray]:
        """The labels given by ``use_host_labels`` (then forgotten), or None."""
        labels, self._host_labels = self._host_labels, None
        return labels

    def own_class_shard(self, embedding_size: int, num_classes: int) -> None:
        """Check the sizes and take this rank's Partial FC class shard: sets ``embedding_size``
        (D), ``num_classes`` (C), ``class_start`` and ``num_local``
        (``plugins.distributed.shard_range``) for the heads that hold per-class rows."""
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(f"{type(self).__name__}: embedding_size and num_classes must be "
                             f">= 1, got {embedding_size} and {num_classes}")
        self.embedding_size, self.num_classes = embedding_size, num_classes
        rank, world = rank_and_world()
        self.class_start, self.num_local = shard_range(num_classes, rank, world)

    @classmethod
    def from_config(cls, cfg, teacher_classifier: Optional[torch.Tensor]) -> "DistillHead":
        """Build the head from an arcface_torch config (with the distillation keys).
        ``teacher_classifier`` ``[C, D_t]``: a given teacher classifier (class means of the
        teacher cache, ...), overriding ``cfg.teacher_classifier``; None when none is given."""
        raise NotImplementedError(f"{cls.__qualname__}.from_config")

    @classmethod
    def check_config(cls, cfg) -> None:
        """Start-up checks of the method's own config keys (ValueError naming the key); runs
        before any data or teacher is loaded.  Default: nothing to check."""

    def forward(self, student: torch.Tensor, labels: torch.Tensor,
                teacher: Optional[torch.Tensor] = None, epoch: float = 0.0) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__qualname__}.forward")

    def require_teacher(self, teacher: Optional[torch.Tensor]) -> torch.Tensor:
        """``teacher`` itself; ValueError naming the head when it is None (a head whose method
        needs a teacher was called without teacher embeddings)."""
        if teacher is None:
            raise ValueError(f"{type(self).__name__} needs teacher embeddings [B, D_t] "
                             f"(teacher=None given)")
        return teacher

    def learned_classifier(self) -> Optional[torch.Tensor]:
        """This rank's trained classifier shard ``[num_local, D]`` (detached), or None when the
        head trains none (teacher centers, no classes)."""
        return None

    def reduce_replicated_grads(self) -> None:
        """Sum over ranks the gradients of parameters replicated on every rank (called after
        backward, before unscale / clip / step); heads without such parameters do nothing."""


def gather_global_batch(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                        num_classes: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(f_s [N, D_s] with gradient, f_t [N, D_t] constant, y [N] long)``: the global batch of
    the ranks in rank order (``N = W * B``), the labels checked to lie in ``[0, num_classes)``."""
    f_s = all_gather_with_grad(student)
    f_t = all_gather_no_grad(teacher.detach())
    y = all_gather_no_grad(labels.to(student.device, torch.long))
    check_labels_range(y, num_classes)
    return f_s, f_t, y


def margin_from_config(cfg) -> Tuple[str, float, float]:
    """``(kind, m, s)`` of arcface_torch's combined ``margin_list`` (m1, m2, m3) and
    ``margin_scale``: ``("arcface", m2, s)`` or ``("cosface", m3, s)``.

    Raises ValueError naming ``margin_list`` for any other combination (SphereFace m1 != 1, or
    both / neither of m2, m3)."""
    margin_list = cfg.margin_list
    if len(margin_list) != 3:
        raise ValueError(f"config key 'margin_list' must be (m1, m2, m3), got {margin_list!r}")
    m1, m2, m3 = (float(v) for v in margin_list)
    if m1 != 1.0 or (m2 > 0 and m3 > 0) or (m2 <= 0 and m3 <= 0):
        raise ValueError(f"config key 'margin_list' = {tuple(margin_list)}: distillation heads "
                         f"support ArcFace (1.0, m, 0.0) or CosFace (1.0, 0.0, m) only")
    kind, m = ("arcface", m2) if m2 > 0 else ("cosface", m3)
    return kind, m, float(cfg.margin_scale)


def configured_teacher_classifier(cfg, teacher_classifier: Optional[torch.Tensor], dim: int
                                  ) -> Optional[torch.Tensor]:
    """The teacher classifier a head starts from: the given ``teacher_classifier``, else the
    ``[C, dim]`` table loaded from ``cfg.teacher_classifier``, else None."""
    if teacher_classifier is not None:
        return teacher_classifier
    if cfg.get("teacher_classifier"):
        from ..classifier_io import load_teacher_classifier
        return load_teacher_classifier(cfg.teacher_classifier, cfg.num_classes, dim)
    return None
