r"""Logit KD (Hinton, Vinyals, Dean, "Distilling the knowledge in a neural network", NIPS-W
2015) over class shards: no rank holds a full logit row.

For the global batch of ``N`` samples with student logits ``z^s`` and frozen-teacher logits
``z^t`` (``[N, C]``, classes split over ranks by the Partial FC rule) and temperature ``T``:

.. math::

    \mathcal{L}_{KD} = \frac{T^2}{N} \sum_i \mathrm{KL}\bigl(\mathrm{softmax}(z^t_i/T)\,\|\,
                                                         \mathrm{softmax}(z^s_i/T)\bigr)
    = \frac{T^2}{N} \sum_i \Bigl[\sum_c p^t_{ic}(a_{ic} - b_{ic}) - \mathrm{lse}(a_i)
                                  + \mathrm{lse}(b_i)\Bigr]

with ``a = z^t / T``, ``b = z^s / T``.  Rank ``r`` passes the columns of its classes; the row
maxima are all-reduced (max, no gradient: they cancel), and the three per-row sums
``sum exp(a - max a)``, ``sum exp(b - max b)`` and ``sum exp(a - max a) (a - b)`` are reduced with
``all_reduce_sum_with_grad``: one reduction level, so the loss is the same on every rank and each
rank's logit shard gets the exact gradient.  This equals GKD with ``k >= C`` and ``beta = 1``
(``plugins.gkd.grouped_kd_loss(...).primary``), tested.

Defaults from the GKD release (github.com/WisonZ/GKD, ``distillation/kd.py`` lines 8-16:
``T = 4``, ``kl_div(sum) * T^2 / B``, added to CE with weight 1 -- line 16 -- on the CosFace
margin logits of both networks, as its GKD does) and TFace's EKD release (``simple_kd.py``, t=4).
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..deferred_checks import require
from ..distributed import all_reduce, all_reduce_sum_with_grad, rank_and_world


class LogitKD(nn.Module):
    """``forward(student_logits [N, L], teacher_logits [N, L]) -> scalar``: ``T^2`` times the
    batch-mean KL, where ``N`` is the global batch (every rank the same rows) and ``L`` this
    rank's classes (``L = 0`` allowed).

    Args:
        temperature: ``T`` (> 0).

    ``stats``: ``kl`` (the mean KL without ``T^2``).
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"LogitKD: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.stats: Dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"T={self.temperature}"

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
                ) -> torch.Tensor:
        if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
            raise ValueError(f"LogitKD: student and teacher logits must both be [N, L] (global "
                             f"batch x this rank's classes), got {list(student_logits.shape)} "
                             f"and {list(teacher_logits.shape)}")
        n = student_logits.shape[0]
        if n == 0:
            raise ValueError("LogitKD: empty batch")
        dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
        distributed = rank_and_world()[1] > 1
        with torch.autocast(device_type=student_logits.device.type, enabled=False):
            a = teacher_logits.detach().to(dtype) / self.temperature
            b = student_logits.to(dtype) / self.temperature
            if a.shape[1] == 0:
                maxima = a.new_full((n, 2), -torch.inf)
            else:
                maxima = torch.stack([a.amax(dim=1), b.detach().amax(dim=1)], dim=1)
            if distributed:
                maxima = all_reduce(maxima.clone(), "max")
            require(torch.isfinite(maxima).all(),
                    lambda: "LogitKD: a row has no finite logit on any rank (no classes, or "
                            "NaN/inf logits)")
            e_a = torch.exp(a - maxima[:, 0:1])
            e_b = torch.exp(b - maxima[:, 1:2])
            sums = torch.stack([e_a.sum(dim=1), e_b.sum(dim=1), (e_a * (a - b)).sum(dim=1)], 1)
            sums = all_reduce_sum_with_grad(sums)
            kl = (sums[:, 2] / sums[:, 0] - maxima[:, 0] - sums[:, 0].log()
                  + maxima[:, 1] + sums[:, 1].log())
            mean_kl = kl.mean()
        self.stats = {"kl": mean_kl.detach()}
        return self.temperature ** 2 * mean_kl
