r"""``distill = "gkd"``: GKD (Grouped Knowledge Distillation, Zhao et al., AAAI 2023, arXiv
2304.04462) as a class-sharded head: the student's CosFace classifier, the teacher's frozen
classifier, cross entropy + warmed-up GKD.  The GKD math (groups, sharded reductions) is in
``plugins.gkd``; Partial FC sampling, the sharded cross entropy and the input checks are the
shared core of ``plugins.margin``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..distributed import rank_and_world, shard_sizes
from ..gkd import (_check_group, _check_options, _gkd_parts, _Local, _Sharded, kd_warmup_weight)
from ..margin import check_batch, sharded_cross_entropy, static_sample_count
from .base import configured_teacher_classifier, margin_from_config
from .registry import register_head
from .teacher_logits import TeacherLogitsHead

GKD_KEYS = {
    "gkd_temperature": (4.0, "GKD temperature T", (int, float)),
    "gkd_alpha": (1.0, "GKD weight of Binary-KD", (int, float)),
    "gkd_beta": (8.0, "GKD weight of Primary-KD (8 with fixed k, 4 with adaptive tau)",
                 (int, float)),
    "gkd_lamda": (0.0, "GKD weight of Secondary-KD (0: dropped, as in the paper)", (int, float)),
    "gkd_k": (10000, "GKD primary group size k (fixed-k version)", (int,)),
    "gkd_tau": (None, "GKD adaptive primary group threshold (0.93 in the paper); None uses gkd_k",
                (int, float, type(None))),
    "gkd_rank_by": ("student", "GKD ranks classes by the student's (paper) or teacher's logits",
                    (str,), ("student", "teacher")),
    "gkd_warmup_epochs": (10, "GKD linear KD warm-up: weight min(epoch / this, 1)", (int, float)),
    "gkd_tau_batch": (None, "GKD adaptive k: samples (consecutive in the global batch) whose "
                            "summed softmax sets one k; None: each GPU's own batch",
                      (int, type(None))),
}


@register_head("gkd", needs_teacher=True, teacher_classifier="or_class_means", same_dim=False,
               keys=GKD_KEYS)
class GKDHead(TeacherLogitsHead):
    r"""Student CosFace classifier shard + frozen teacher classifier shard + GKD, Partial FC style.

    .. math::

        \mathcal{L} = \mathrm{CE}(z^S, y) + \min(e / e_w, 1)\, \mathcal{L}_{GKD}(z^S, z^T, y),
        \qquad z = s\,(\cos\theta - m\,\mathbb{1}[c = y])

    for epoch :math:`e` (counted from 0) and ``warmup_epochs`` :math:`e_w` (0: weight 1 at once).
    Both classifiers produce CosFace margin logits, as the official code does; the teacher's is a
    frozen buffer.  Rank ``r`` owns classes ``[class_start, class_start + num_local)`` of both
    (``plugins.distributed.shard_range``); embeddings and labels are all-gathered, and the
    softmax normalisers, group sums and per-sample top-``k`` boundaries are reduced across ranks
    (see the module docstring), so the loss and its gradients equal those of one process holding
    every class, and no rank holds more than ``[N, C / W]`` logits.

    With ``sample_rate < 1`` each rank keeps its positive classes plus random negatives (up to
    ``int(sample_rate * num_local)`` classes, arcface_torch's rule, by the shared
    ``plugins.margin.select_classes``), the same classes for the
    student and the teacher logits: cross entropy, the softmax, the ranking and the groups are
    then all taken over the kept classes only (``k`` is capped at their number).

    Args:
        embedding_size: student embedding dimension ``D_s``.
        num_classes: number of classes ``C`` (all ranks).
        teacher_weight: the teacher's classifier ``[C, D_t]`` (the full table; this rank keeps its
            rows).  Rows need not be normalised.  For a teacher saved without classifier use
            ``plugins.class_means.ClassMeanAccumulator``.
        s: CosFace scale.
        m: CosFace margin, applied to both the student and the teacher logits.
        temperature, alpha, beta, lamda, k, tau, rank_by, k_step: as in ``grouped_kd_loss``.
        warmup_epochs: epochs of the linear KD warm-up (10 officially).
        sample_rate: fraction of each rank's classes kept per step (Partial FC), in (0, 1].
        teacher_embedding_size: ``D_t``; checked against ``teacher_weight`` when given.
        k_step: step of the adaptive search over ``k``.
        tau_batch: adaptive ``k`` only: samples of the global batch (consecutive, in rank order)
            that choose one ``k`` together; None: each rank's own batch, as the official
            gkd_adaptive.py (one ``k`` per GPU from its 128 samples).  Set it to the official
            per-GPU batch (128) to keep the run identical on any GPU count.
        margin: ``"cosface"`` (the only margin GKD's logits use); ``"arcface"`` is refused.

    Attributes:
        num_classes, class_start, num_local; ``sharded_keys = ("weight", "teacher_weight")``;
        ``stats``: detached scalars ce, kd, binary, primary, secondary, kd_weight, k;
        ``sampled_index``: local class indices kept in the last step (None when sample_rate = 1).
    """

    logits_source = ("GKD's student and teacher logits are CosFace as in the official code (an "
                     "ArcFace margin is refused, not silently trained as CosFace)")

    def __init__(self,
                 embedding_size: int,
                 num_classes: int,
                 teacher_weight: torch.Tensor,
                 s: float = 64.0,
                 m: float = 0.4,
                 temperature: float = 4.0,
                 alpha: float = 1.0,
                 beta: float = 8.0,
                 lamda: float = 0.0,
                 k: int = 10000,
                 tau: Optional[float] = None,
                 rank_by: str = "student",
                 warmup_epochs: int = 10,
                 sample_rate: float = 1.0,
                 teacher_embedding_size: Optional[int] = None,
                 k_step: int = 100,
                 tau_batch: Optional[int] = None,
                 margin: str = "cosface") -> None:
        super().__init__()
        _check_options(temperature, k, tau, rank_by, k_step)
        if margin != "cosface":
            raise ValueError(f"GKDHead: margin {margin!r} is not supported: GKD's student and "
                             f"teacher logits are CosFace s * (cos - m * onehot) as in the "
                             f"official code; use a CosFace margin_list (1.0, 0.0, m), e.g. "
                             f"(1.0, 0.0, 0.4)")
        if tau_batch is not None and tau_batch < 1:
            raise ValueError(f"GKDHead tau_batch must be >= 1 or None, got {tau_batch}")
        if warmup_epochs < 0:
            raise ValueError(f"GKDHead warmup_epochs must be >= 0, got {warmup_epochs}")
        self.init_classifiers(embedding_size, num_classes, teacher_weight,
                              teacher_embedding_size, s, m, sample_rate)
        self.temperature = temperature
        self.alpha, self.beta, self.lamda = alpha, beta, lamda
        self.k, self.tau, self.rank_by, self.k_step = k, tau, rank_by, k_step
        self.warmup_epochs, self.tau_batch = warmup_epochs, tau_batch
        self.sampled_index: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return (f"{self.classifier_repr()}, T={self.temperature}, alpha={self.alpha}, "
                f"beta={self.beta}, lamda={self.lamda}, k={self.k}, tau={self.tau}, "
                f"rank_by={self.rank_by}, tau_batch={self.tau_batch}, "
                f"warmup_epochs={self.warmup_epochs}, "
                f"sample_rate={self.sample_rate}")

    @classmethod
    def from_config(cls, cfg, teacher_classifier: Optional[torch.Tensor] = None) -> "GKDHead":
        cls.check_config(cfg)
        kind, m, s = margin_from_config(cfg)
        table = configured_teacher_classifier(cfg, teacher_classifier,
                                              cfg.teacher_embedding_size)
        return cls(cfg.embedding_size, cfg.num_classes, table, s=s, m=m,
                   temperature=cfg.gkd_temperature, alpha=cfg.gkd_alpha, beta=cfg.gkd_beta,
                   lamda=cfg.gkd_lamda, k=cfg.gkd_k, tau=cfg.gkd_tau, rank_by=cfg.gkd_rank_by,
                   warmup_epochs=cfg.gkd_warmup_epochs, sample_rate=cfg.sample_rate,
                   teacher_embedding_size=cfg.teacher_embedding_size,
                   tau_batch=cfg.get("gkd_tau_batch"), margin=kind)

    def forward(self, student: torch.Tensor, labels: torch.Tensor,
                teacher: Optional[torch.Tensor] = None, epoch: float = 0.0
                ) -> torch.Tensor:
        """Loss of the global batch (same value on every rank).

        Args:
            student: ``[B, D_s]`` this rank's student embeddings (with gradient).
            labels: ``[B]`` class ids in ``[0, C)``.
            teacher: ``[B, D_t]`` this rank's teacher embeddings (no gradient).
            epoch: current epoch counted from 0 (may be fractional), for the KD warm-up.
        """
        teacher = self.require_teacher(teacher)
        check_batch(self.embedding_size, labels, student, teacher,
                    teacher_size=self.teacher_embedding_size)
        if epoch < 0:
            raise ValueError(f"GKDHead.forward: epoch must be >= 0, got {epoch}")
        reduce = _Sharded() if rank_and_world()[1] > 1 else _Local()
        group = self.tau_batch if self.tau_batch is not None else student.shape[0]
        if self.tau is not None:
            _check_group(student.shape[0] * rank_and_world()[1], group, "GKDHead (tau_batch)")
        logits = self.margin_logits(student, labels, teacher)
        z_s, z_t, index = logits.student, logits.teacher, logits.index
        num_kept = self.num_classes
        if index is not None:      # every rank's kept count, from the host when it is fixed
            counts = [static_sample_count(size, self.sample_rate, z_s.shape[0])
                      for size in shard_sizes(self.num_classes, rank_and_world()[1])]
            if None in counts:
                count = torch.tensor([index.numel()], device=z_s.device)
                num_kept = int(reduce.sum(count).item())
            else:
                num_kept = sum(counts)
        self.sampled_index = index

        with torch.autocast(device_type=z_s.device.type, enabled=False):
            ce, _ = sharded_cross_entropy(z_s, logits.column)
            parts = _gkd_parts(z_s, z_t, logits.target, num_kept, self.temperature, self.alpha,
                               self.beta, self.lamda, self.k, self.tau, self.rank_by, self.k_step,
                               reduce, group)
        kd_weight = kd_warmup_weight(epoch, self.warmup_epochs)
        loss = ce + kd_weight * parts.total
        self.stats = {name: value.detach() for name, value in (
            ("ce", ce), ("kd", parts.total), ("binary", parts.binary),
            ("primary", parts.primary), ("secondary", parts.secondary))}
        # made on the loss's device (a fill, no host copy), so the trainer can sum them there
        self.stats["kd_weight"] = ce.new_full((), kd_weight)
        self.stats["k"] = ce.new_full((), parts.k_used)
        return loss

