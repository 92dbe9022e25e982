r"""``distill = "fitnet"``: margin softmax + FitNet hint regression of the student embedding onto
the teacher's (Romero et al., "FitNets: Hints for thin deep nets", ICLR 2015, Eq. 3).

.. math::

    \mathcal{L} = \mathcal{L}_{margin}(f_s, y)
        + w \cdot \frac{c}{N} \sum_i \bigl\| u(f^t_i) - u(r(f^s_i)) \bigr\|_2^2

with ``r`` a learned linear regressor ``D_s -> D_t`` when the sizes differ (else the identity),
``u`` the L2 normalisation and ``c = 1/2`` (the paper's 1/2).  Recipe source: the GKD release
(github.com/WisonZ/GKD, ``distillation/fitnet.py`` l. 9-15: normalised embeddings, ``c = 1/2``,
added to the CosFace CE with weight 1); the term is ``plugins.kd_terms.FitNet``.

The regressor is REPLICATED on every rank (not class-sharded): each rank's backward holds only
its own samples' share of its gradient, so ``reduce_replicated_grads`` sums its gradients over
ranks; it is a head parameter, hence in the optimizer and in the checkpoints (``term.regressor.*``).
It is initialised from ``cfg.seed`` alone (``init_regressor``), identical on every rank.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kd_terms import FitNet, sum_replicated_grads
from .margin_plus_kd import MarginPlusKD
from .margin_softmax import MarginSoftmaxHead
from .registry import register_head

FITNET_KEYS = {
    "fitnet_weight": (1.0, "fitnet: weight w of the hint loss added to the margin loss",
                      (int, float)),
    "fitnet_normalize": (True, "fitnet: L2-normalise the regressed student and the teacher "
                               "embedding (GKD release) or not (TFace: raw MSE)", (bool,)),
    "fitnet_scale": (0.5, "fitnet: factor c of the summed squared error per sample (1/2: paper "
                          "and GKD release)", (int, float)),
    "fitnet_regressor": ("auto", "fitnet: linear D_s -> D_t regressor: auto (only when the sizes "
                                 "differ) | always | never", (str,), FitNet.REGRESSOR_MODES),
}


@register_head("fitnet", needs_teacher=True, same_dim=False, keys=FITNET_KEYS)
class FitNetHead(MarginPlusKD):
    """Margin softmax + ``fitnet_weight`` * FitNet hint loss (regressor replicated on ranks)."""

    @classmethod
    def from_config(cls, cfg, teacher_classifier: Optional[torch.Tensor] = None
                    ) -> "FitNetHead":
        term = FitNet(cfg.embedding_size, cfg.teacher_embedding_size,
                      normalize=cfg.fitnet_normalize, scale=cfg.fitnet_scale,
                      regressor=cfg.fitnet_regressor)
        head = cls(MarginSoftmaxHead.from_config(cfg), term, cfg.fitnet_weight)
        head.init_regressor(int(cfg.get("seed", 0) or 0))
        return head

    @torch.no_grad()
    def init_regressor(self, seed: int) -> None:
        """(Re-)initialise the regressor as ``nn.Linear`` does (weight and bias uniform in
        ``+-1 / sqrt(D_s)``) from a generator seeded by ``seed`` alone, so every rank starts from
        the SAME replicated copy (the trainer seeds torch differently per rank for the class
        shards; the regressor must not inherit that)."""
        regressor = self.term.regressor
        if regressor is None:
            return
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / regressor.in_features ** 0.5
        for p in (regressor.weight, regressor.bias):
            fresh = torch.empty(p.shape, dtype=torch.float64).uniform_(-bound, bound,
                                                                       generator=generator)
            p.copy_(fresh.to(p.dtype))

    def reduce_replicated_grads(self) -> None:
        """Sum the regressor's gradients over ranks (exact gradient of the global loss)."""
        sum_replicated_grads(self.term.parameters())
