r"""FitNet hint regression (Romero et al., "FitNets: Hints for thin deep nets", ICLR 2015, Eq. 3)
on the embeddings, with a learned linear regressor when the dimensions differ.

.. math::

    \mathcal{L}_{hint} = \frac{c}{N} \sum_{i=1}^{N} \bigl\| u(f^t_i) - u(r(f^s_i)) \bigr\|_2^2,
    \qquad r(x) = W_r x + b_r \ \text{(or the identity)},\quad u = \frac{x}{\|x\|}
    \ \text{(or the identity)}

over the GLOBAL batch of ``N`` samples.  The paper's ``1/2`` is ``c = 0.5``.  Defaults follow
the GKD release (github.com/WisonZ/GKD, ``distillation/fitnet.py`` lines 9-14: ``MSELoss(sum)`` of
the L2-normalised embeddings divided by ``T * B`` with ``T = 2``, i.e. ``normalize=True, scale=0.5``,
no regressor since both are 512-d; added to CE with weight 1, line 15).  TFace's EKD release
(``recognition/tasks/ekd/distillation/fitnet.py``) uses ``MSELoss()`` of the raw embeddings:
``normalize=False, scale=1/D``.

The regressor is a replicated parameter (every rank holds a copy).  Each rank's autograd graph
holds only its own samples' share of its gradient: SUM its gradients over ranks after backward
(``plugins.kd_terms.sum_replicated_grads``) or put it inside the DDP-wrapped module with the exact
(sum) gradient hook.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_sum_with_grad
from ._batch import check_embeddings, compute_dtype, global_count


class FitNet(nn.Module):
    """Hint loss of student embeddings ``[B, D_s]`` onto teacher embeddings ``[B, D_t]``.

    Args:
        student_dim: ``D_s``.
        teacher_dim: ``D_t``.
        normalize: L2-normalise the (regressed) student and the teacher embedding first.
        scale: ``c``; the squared error is summed over dimensions and averaged over samples.
        regressor: ``"auto"`` (a linear ``D_s -> D_t`` layer only when the sizes differ),
            ``"always"`` or ``"never"`` (then ``D_s`` must equal ``D_t``).

    Attributes:
        regressor: ``nn.Linear(D_s, D_t)`` (torch default init, with bias) or None.
        stats: ``mean_cos_st`` of the regressed student vs the teacher.
    """

    REGRESSOR_MODES = ("auto", "always", "never")

    def __init__(self,
                 student_dim: int,
                 teacher_dim: int,
                 normalize: bool = True,
                 scale: float = 0.5,
                 regressor: str = "auto") -> None:
        super().__init__()
        if student_dim < 1 or teacher_dim < 1:
            raise ValueError(f"FitNet: student_dim and teacher_dim must be >= 1, got "
                             f"{student_dim}, {teacher_dim}")
        if regressor not in self.REGRESSOR_MODES:
            raise ValueError(f"FitNet: regressor must be one of {self.REGRESSOR_MODES}, got "
                             f"{regressor!r}")
        if regressor == "never" and student_dim != teacher_dim:
            raise ValueError(f"FitNet: regressor='never' needs equal sizes, got D_s={student_dim}"
                             f" and D_t={teacher_dim}")
        if not scale > 0:
            raise ValueError(f"FitNet: scale must be > 0, got {scale}")
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.normalize, self.scale = bool(normalize), float(scale)
        use = regressor == "always" or (regressor == "auto" and student_dim != teacher_dim)
        self.regressor: Optional[nn.Linear] = nn.Linear(student_dim, teacher_dim) if use else None
        self.stats: Dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return (f"D_s={self.student_dim}, D_t={self.teacher_dim}, normalize={self.normalize}, "
                f"scale={self.scale}")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_embeddings("FitNet", student, teacher, same_dim=False, labels=labels)
        if student.shape[1] != self.student_dim or teacher.shape[1] != self.teacher_dim:
            raise ValueError(f"FitNet: expected student [B, {self.student_dim}] and teacher "
                             f"[B, {self.teacher_dim}], got {list(student.shape)} and "
                             f"{list(teacher.shape)}")
        dtype = compute_dtype(student)
        with torch.autocast(device_type=student.device.type, enabled=False):
            s = student.to(dtype)
            if self.regressor is not None:
                s = F.linear(s, self.regressor.weight.to(dtype), self.regressor.bias.to(dtype))
            t = teacher.detach().to(dtype)
            if self.normalize:
                s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
            n = global_count(student.shape[0], student.device)
            loss = self.scale * all_reduce_sum_with_grad(((s - t) ** 2).sum()) / n
            with torch.no_grad():
                cos = all_reduce_sum_with_grad(F.cosine_similarity(s, t, dim=1).sum()) / n
        self.stats = {"mean_cos_st": cos.detach()}
        return loss
