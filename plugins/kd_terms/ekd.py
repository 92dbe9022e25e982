r"""EKD: evaluation-oriented KD for face recognition (Huang, Wu, Xu, Ding, CVPR 2022), on the
pair similarities of the GLOBAL batch of ``N`` samples.

For the pairs ``i < j`` of the batch, cosine similarities ``x^s_{ij}``, ``x^t_{ij}``; positive
pairs share a label.  The thresholds at the chosen false-positive rates ``FPR_k = 1 / a_k``
(``a = 10 .. 10^6``) are read off the negative pairs sorted descending, at index
``floor(n_neg / a_k)``, separately for student and teacher, and smoothed by an EMA
(buffers start at 0, ``tau <- m * threshold + (1 - m) * tau``, ``m = 0.01``, before the loss).
A similarity's soft rank among the thresholds is

.. math::  r(x) = \sum_k \sigma\bigl((x - \tau_k) / T\bigr)

(``sigma`` with its exponent clamped to ``[-50, 50]``, as the public code), and the loss is the
mean squared rank difference over the positive pairs and over the ``top_k`` hardest negatives
(highest *student* similarity):

.. math::

    \mathcal{L}_{EKD} = w_p \, \mathrm{mean}_{pos} (r^s - r^t)^2
                      + w_n \, \mathrm{mean}_{top\text{-}k\ neg} (r^s - r^t)^2

Defaults from TFace's EKD release (github.com/Tencent/TFace,
``recognition/tasks/ekd/distillation/ekd.py`` lines 10-84; identical copy in the GKD release,
``distillation/ekd.py``): ``top_k = 2000``, ``T = 0.01``, anchors ``(10, ..., 10^6)``, momentum
0.01, ``w_p = 0.02``, ``w_n = 0.01``; ``train.py`` lines 86-93 add it to the margin softmax with
weight 1, computed on the batch all-gathered over the GPUs, drawn by a balanced sampler (per GPU
32 random images + 32 with 4 per identity, ``dataset.py`` l. 18-60; ``train.yaml``) so positive
pairs exist.  Thresholds: teacher and student use their own sorted negatives; gradients flow
through the similarities only (thresholds and the hard-negative choice are constants).

Deliberate definitions where the public code has none: a batch without positive pairs gives a
positive term of 0 (the public code: NaN); fewer than 2 samples or no negative pair is an error.
Replicated computation (every rank the full ``N x N``; gradient into its own rows only): exact
and world-size invariant, including the EMA buffers (the same on every rank; they are
replicated state to checkpoint, not class-sharded).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..deferred_checks import require
from ._batch import (check_embeddings, compute_dtype, gather_labels, gather_own_rows,
                     global_count)

DEFAULT_ANCHORS = (10, 100, 1000, 10000, 100000, 1000000)


def soft_rank(similarity: torch.Tensor, anchors: torch.Tensor, temperature: float
              ) -> torch.Tensor:
    """``[P]``: ``sum_k sigmoid((x - tau_k) / T)``, exponent clamped to [-50, 50]."""
    exponent = (-(similarity[:, None] - anchors[None, :]) / temperature).clamp(-50.0, 50.0)
    return (1.0 / (1.0 + torch.exp(exponent))).sum(dim=1)


class EvaluationOrientedKD(nn.Module):
    """``forward(student [B, D], teacher [B, D], labels [B]) -> scalar`` (global batch).

    Args:
        top_k: hardest negatives (by student similarity) in the negative term.
        temperature: ``T`` of the soft rank.
        anchors: FPR denominators ``a_k`` (threshold index ``floor(n_neg / a_k)``).
        momentum: EMA rate ``m`` of the thresholds.
        positive_weight, negative_weight: ``w_p``, ``w_n``.

    Buffers: ``student_thresholds``, ``teacher_thresholds`` ``[K]`` (EMA, replicated).
    ``stats``: positive, negative (unweighted), num_positive_pairs.
    """

    def __init__(self,
                 top_k: int = 2000,
                 temperature: float = 0.01,
                 anchors: Sequence[int] = DEFAULT_ANCHORS,
                 momentum: float = 0.01,
                 positive_weight: float = 0.02,
                 negative_weight: float = 0.01) -> None:
        super().__init__()
        anchors = tuple(int(a) for a in anchors)
        if top_k < 1 or not temperature > 0 or not 0 < momentum <= 1:
            raise ValueError(f"EvaluationOrientedKD needs top_k >= 1, temperature > 0 and "
                             f"momentum in (0, 1], got {top_k}, {temperature}, {momentum}")
        if not anchors or min(anchors) < 2:
            raise ValueError(f"EvaluationOrientedKD: anchors must be FPR denominators >= 2 "
                             f"(FPR <= 1/2), got {anchors}")
        self.top_k, self.temperature, self.anchors = int(top_k), float(temperature), anchors
        self.momentum = float(momentum)
        self.positive_weight, self.negative_weight = float(positive_weight), float(negative_weight)
        self.register_buffer("student_thresholds", torch.zeros(len(anchors), dtype=torch.float64))
        self.register_buffer("teacher_thresholds", torch.zeros(len(anchors), dtype=torch.float64))
        self.stats: Dict[str, torch.Tensor] = {}
        self._host_labels: Optional[np.ndarray] = None

    def use_host_labels(self, labels: Optional[np.ndarray]) -> None:
        """The global batch's labels ``[N]`` on the host for the next forward (see
        ``DistillHead.use_host_labels``): the negative pairs are counted there, not read from
        the device."""
        self._host_labels = None if labels is None else np.asarray(labels).reshape(-1)

    def _negative_pairs(self, n: int) -> Optional[int]:
        """The number of negative pairs of the host labels given for this forward (then
        forgotten), or None."""
        labels, self._host_labels = self._host_labels, None
        if labels is None or labels.size != n:
            return None
        counts = np.unique(labels, return_counts=True)[1]
        return n * (n - 1) // 2 - int((counts * (counts - 1) // 2).sum())

    def extra_repr(self) -> str:
        return (f"top_k={self.top_k}, T={self.temperature}, anchors={self.anchors}, "
                f"momentum={self.momentum}, w_pos={self.positive_weight}, "
                f"w_neg={self.negative_weight}")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("EvaluationOrientedKD needs the labels (positive vs negative pairs)")
        check_embeddings("EvaluationOrientedKD", student, teacher, same_dim=False,
                         labels=labels)
        dtype = compute_dtype(student)
        with torch.autocast(device_type=student.device.type, enabled=False):
            n = global_count(student.shape[0], student.device)
            if n < 2:
                raise ValueError("EvaluationOrientedKD: the global batch must hold >= 2 samples")
            s_rep, t_all = gather_own_rows(student.to(dtype), teacher.detach().to(dtype))
            y = gather_labels(labels.to(student.device))
            iu = torch.triu_indices(n, n, offset=1, device=student.device)
            s_hat = F.normalize(s_rep, dim=1)
            sim_s = (s_hat @ s_hat.t())[iu[0], iu[1]]            # [N (N - 1) / 2], row-major
            with torch.no_grad():
                t_hat = F.normalize(t_all, dim=1)
                sim_t = (t_hat @ t_hat.t())[iu[0], iu[1]]
            positive = y[iu[0]] == y[iu[1]]
            # the pair lists split by label (compact lists: the means of the published formula);
            # their sizes depend on the labels: counted from the host labels when the caller
            # gave them (use_host_labels), else read from the device (a host-device sync).  A
            # stable sort puts the negatives first, each group in pair order
            split = torch.sort(positive.to(torch.uint8), stable=True).indices
            num_neg = self._negative_pairs(n)
            if num_neg is None:
                num_neg = int((~positive).sum())
            else:                              # counted on the host: checked with the step
                require((~positive).sum() == num_neg,
                        lambda: "EvaluationOrientedKD: the host labels given by "
                                "use_host_labels do not match the batch's labels")
            neg_pairs, pos_pairs = split[:num_neg], split[num_neg:]
            neg_s, neg_t = sim_s[neg_pairs], sim_t[neg_pairs]
            if num_neg == 0:
                raise ValueError("EvaluationOrientedKD: the global batch has no pair of "
                                 "different labels, so no FPR threshold exists")
            with torch.no_grad():
                order_s = torch.sort(neg_s.detach(), descending=True, stable=True)
                sorted_t = torch.sort(neg_t, descending=True, stable=True).values
                index = torch.stack([torch.full((), num_neg // a, device=s_rep.device)
                                     for a in self.anchors])       # fills: no host copy
                m = self.momentum
                self.student_thresholds.mul_(1 - m).add_(m * order_s.values[index].double())
                self.teacher_thresholds.mul_(1 - m).add_(m * sorted_t[index].double())
            tau_s = self.student_thresholds.to(dtype)
            tau_t = self.teacher_thresholds.to(dtype)

            def rank_mse(x_s: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
                if x_s.numel() == 0:
                    return x_s.new_zeros(())
                return ((soft_rank(x_s, tau_s, self.temperature)
                         - soft_rank(x_t, tau_t, self.temperature)) ** 2).mean()

            pos_term = rank_mse(sim_s[pos_pairs], sim_t[pos_pairs])
            hard = order_s.indices[:self.top_k]
            neg_term = rank_mse(neg_s[hard], neg_t[hard])
            loss = self.positive_weight * pos_term + self.negative_weight * neg_term
        self.stats = {"positive": pos_term.detach(), "negative": neg_term.detach(),
                      "num_positive_pairs": positive.sum().detach()}
        return loss
