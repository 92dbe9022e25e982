"""Vanilla feature distillation (the baseline of AdaDistill, paper Eq. 2): pull the normalised
student embedding onto the normalised teacher embedding."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce, all_reduce_sum_with_grad
from .margin import check_batch


class FeatureMSEHead(nn.Module):
    """``L = 1/N sum_i || f_s_i/|f_s_i| - f_t_i/|f_t_i| ||_2^2`` over the GLOBAL batch of N samples.

    Exact reduction: squared differences are SUMMED over the D embedding dimensions and AVERAGED
    over the N samples of all ranks (``torch.nn.MSELoss`` would also divide by D).  Equivalently
    ``L = 2 - 2 * mean_i cos(f_s_i, f_t_i)``.  Each rank sums its own samples, the sums are
    all-reduced (``all_reduce_sum_with_grad``), so the loss is the same on every rank and each
    rank's gradient is exact.  Computed in fp32 with autocast disabled.

    ``forward(student [B, D], teacher [B, D], labels [B])``: ``labels`` are only checked for shape
    (the call signature of the KD terms, ``plugins.kd_terms``).  A term, not a head: the
    registered ``feature_mse`` head (``plugins.heads.feature_mse``) adds it to a margin softmax.
    ``stats``: ``mean_cos_st``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor
                ) -> torch.Tensor:
        """Loss of the global batch. ``student``/``teacher`` ``[B, D]``, ``labels`` ``[B]``."""
        if student.dim() != 2:
            raise ValueError(f"student embeddings must be [B, D], got {list(student.shape)}")
        check_batch(student.shape[1], labels, student, teacher)
        with torch.autocast(device_type=student.device.type, enabled=False):
            s_hat = F.normalize(student.float(), dim=1)
            t_hat = F.normalize(teacher.detach().float(), dim=1)
            local_sum = ((s_hat - t_hat) ** 2).sum()
            with torch.no_grad():
                count, cos_sum = all_reduce(torch.stack([
                    torch.full((), float(student.shape[0]), device=student.device),
                    (s_hat * t_hat).sum()]))
            loss = all_reduce_sum_with_grad(local_sum) / count
            self.stats = {"mean_cos_st": cos_sum / count}
        return loss
