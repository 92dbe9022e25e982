"""``distill = "adadistill"``: the AdaDistill head (Boutros, Struc, Damer, ECCV 2024, arXiv
2407.01332), class-sharded and world-size invariant.  Equations: ``plugins.adadistill``.

    w_y <- a_i * w_y + (1 - a_i) * f_t_i                          (center update, before the loss)
    L = 1/N sum_i CE(s * margin(cos(f_s_i, w_j)), y_i)           (ArcFace or CosFace margin)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..adadistill import ALPHAS, label_rounds, update_centers_
from ..distributed import all_reduce
from ..margin import (check_batch, check_margin_args, cosine_logits,
                      distributed_margin_cross_entropy, select_classes)
from .base import (DistillHead, configured_teacher_classifier, gather_global_batch,
                   margin_from_config)
from .registry import register_head


@register_head("adadistill", needs_teacher=True, teacher_classifier="optional", same_dim=True,
               keys={"alpha": ("weighted", "AdaDistill EMA rate: weighted (the paper's alpha', "
                                           "default) | plain", (str,), ("weighted", "plain"))})
class AdaDistillHead(DistillHead):
    """AdaDistill loss head over a Partial FC class shard (equations in the module docstring).

    ``forward(student [B, D], labels [B], teacher [B, D]) -> scalar loss`` of the GLOBAL batch,
    the same on every rank.  Embeddings and labels are all-gathered (the student with gradient);
    this rank EMA-updates its own center rows from the teacher embeddings of the global batch's
    samples of its classes (fp32, autocast off, before the loss), then scores the whole global
    batch against its (kept) centers; the softmax max and sum are all-reduced.  Gradients reach
    the student through ``acos``/``cos`` as in the official head (``plugins.margin``: the target
    cosine is clamped to ``[-1 + 1e-6, 1 - 1e-6]`` before ``acos``).

    Repeated labels in one global batch: every sample contributes, in global batch order (rank 0's
    samples first, each rank's in its local order); see ``update_centers_``.

    Differences from the official code: centers are a sharded, synchronised buffer (every rank
    sees the same global batch, so no replica diverges), no update is lost on repeated labels,
    the centers get no gradient and no DDP all-reduce, plain alpha works, Partial FC sampling and
    autocast are supported.

    Args:
        embedding_size: D, the student and teacher embedding size.
        num_classes: C, the number of identities.
        margin: ``"arcface"`` (``cos(theta_y + m)``) or ``"cosface"`` (``cos(theta_y) - m``).
        s: logit scale (paper: 64).
        m: margin (paper: ArcFace 0.45, CosFace 0.35).
        alpha: ``"weighted"`` (alpha', the paper's default), ``"plain"`` (alpha) or ``"fixed"``
            (ArcDistill / CosDistill: centers from ``load_full_centers`` and never updated).
        sample_rate: Partial FC fraction of this rank's classes scored per step; positives are
            always kept (``plugins.margin.select_classes``).

    Attributes:
        centers: buffer ``[num_local, D]`` fp32, rows = classes ``class_start ...``; initialised
            N(0, 0.01).
        stats: after each forward, detached scalars of the global batch: ``mean_alpha`` (plain
            alpha), ``mean_alpha_weighted`` (alpha', with each sample's pre-update center),
            ``mean_cos_st`` (cos(f_s, f_t), paper Fig. 5), ``mean_cos_center_teacher`` and
            ``mean_cos_target`` (student vs its updated center).
        last_kept_classes: global ids ``[K]`` of the classes scored on this rank in the last
            forward (all ``num_local`` when sample_rate is 1).
    """

    sharded_keys = ("centers",)
    journaled_keys = ("centers",)   # rows saved before each update: a skipped step restores them

    def __init__(self,
                 embedding_size: int,
                 num_classes: int,
                 margin: str = "arcface",
                 s: float = 64.0,
                 m: float = 0.45,
                 alpha: str = "weighted",
                 sample_rate: float = 1.0) -> None:
        super().__init__()
        check_margin_args(margin, s, m, sample_rate)
        if alpha not in ALPHAS:
            raise ValueError(f"alpha must be one of {ALPHAS}, got {alpha!r}")
        self.own_class_shard(embedding_size, num_classes)
        self.margin, self.s, self.m = margin, float(s), float(m)
        self.alpha, self.sample_rate = alpha, float(sample_rate)
        # the repeated-label rounds' count from the host labels, without a device read
        self.wants_host_labels = alpha != "fixed"
        self.register_buffer("centers", torch.normal(0.0, 0.01, (self.num_local, embedding_size)))
        self._centers_loaded = False
        self.register_load_state_dict_post_hook(AdaDistillHead._after_load)
        self.last_kept_classes = torch.empty(0, dtype=torch.long)

    @classmethod
    def from_config(cls, cfg, teacher_classifier: Optional[torch.Tensor] = None
                    ) -> "AdaDistillHead":
        kind, m, s = margin_from_config(cfg)
        head = cls(cfg.embedding_size, cfg.num_classes, margin=kind, s=s, m=m,
                   alpha=cls._alpha_from_config(cfg), sample_rate=cfg.sample_rate)
        table = configured_teacher_classifier(cfg, teacher_classifier, cfg.embedding_size)
        if table is not None:
            head.load_full_centers(table)
        return head

    @classmethod
    def _alpha_from_config(cls, cfg) -> str:
        return cfg.alpha

    @staticmethod
    def _after_load(module: "AdaDistillHead", incompatible) -> None:
        if not any(key.endswith("centers") for key in incompatible.missing_keys):
            module._centers_loaded = True

    @torch.no_grad()
    def load_full_centers(self, full: torch.Tensor) -> None:
        """Keep this rank's rows of a full ``[C, D]`` table (e.g. a teacher classifier from
        ``plugins.classifier_io.load_teacher_classifier``) as centers, in fp32."""
        expected = (self.num_classes, self.embedding_size)
        if tuple(full.shape) != expected:
            raise ValueError(f"load_full_centers expects a [C, D] = {list(expected)} table, "
                             f"got {list(full.shape)}")
        rows = full[self.class_start:self.class_start + self.num_local]
        self.centers.copy_(rows.to(device=self.centers.device, dtype=torch.float32))
        self._centers_loaded = True

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"margin={self.margin}, s={self.s}, m={self.m}, alpha={self.alpha}, "
                f"sample_rate={self.sample_rate}, class_start={self.class_start}, "
                f"num_local={self.num_local}")

    def forward(self, student: torch.Tensor, labels: torch.Tensor,
                teacher: Optional[torch.Tensor] = None, epoch: float = 0.0) -> torch.Tensor:
        """Loss of the global batch. ``student``/``teacher`` ``[B, D]``, ``labels`` ``[B]``."""
        teacher = self.require_teacher(teacher)
        check_batch(self.embedding_size, labels, student, teacher)
        if self.alpha == "fixed" and not self._centers_loaded:
            raise RuntimeError("AdaDistillHead(alpha='fixed') needs the teacher classifier: call "
                               "head.load_full_centers(load_teacher_classifier(path, C, D)) or "
                               "load a state_dict with 'centers' first")
        if self.centers.dtype != torch.float32:
            raise RuntimeError(f"AdaDistillHead.centers must stay fp32, found "
                               f"{self.centers.dtype}; do not call .half()/.to(dtype) on the head")
        student_all, teacher_all, local = gather_global_batch(student, teacher, labels,
                                                             self.num_classes)
        n = local.shape[0]
        local = local - self.class_start

        with torch.no_grad(), torch.autocast(device_type=student.device.type, enabled=False):
            s_hat = F.normalize(student_all.detach().float(), dim=1)
            t_hat = F.normalize(teacher_all.float(), dim=1)
            cos_st = (s_hat * t_hat).sum(dim=1).clamp(-1.0, 1.0)
            # a non-finite student or teacher embedding (fp16 overflow) must not poison its
            # center for the rest of the run: such samples update nothing (same on every rank,
            # since every rank sees the same gathered batch); the loss still reports them
            finite = torch.isfinite(cos_st) & torch.isfinite(t_hat).all(dim=1)
            valid = (local >= 0) & (local < self.num_local) & finite
            host = self.take_host_labels()
            if self.alpha != "fixed":   # the rows this batch may change, for a skipped step
                self.journal_rows("centers", torch.where(valid, local, torch.zeros_like(local)))
            update = update_centers_(self.centers, local, t_hat, cos_st, self.alpha, valid=valid,
                                     rounds=None if host is None else label_rounds(host))
            owned_sums = all_reduce(torch.stack([update.alpha_weighted.sum(),
                                                 update.cos_center_teacher.sum()]), "sum")

        kept, target_col = select_classes(local, self.num_local, self.sample_rate)
        centers = self.centers if kept is None else self.centers[kept]
        cos = cosine_logits(student_all, centers)
        result = distributed_margin_cross_entropy(cos, target_col, self.margin, self.s, self.m,
                                                  straight_through=False)
        self.last_kept_classes = (torch.arange(self.num_local, device=local.device)
                                  if kept is None else kept) + self.class_start
        self.stats = {
            "mean_alpha": cos_st.clamp(1e-6, 1.0).mean(),
            "mean_alpha_weighted": owned_sums[0] / n,
            "mean_cos_st": cos_st.mean(),
            "mean_cos_center_teacher": owned_sums[1] / n,
            "mean_cos_target": result.mean_cos_target,
        }
        return result.loss
