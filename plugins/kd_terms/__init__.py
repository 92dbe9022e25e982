"""KD terms of the comparison methods (the loss math only; the heads that combine each with the
student's margin softmax are built by the head registry).

Every term is an ``nn.Module`` returning a scalar computed on the GLOBAL batch, the same value on
every rank, with each rank's gradient the exact gradient of that global loss for its own inputs
(see ``_batch``).  Embedding terms: ``forward(student [B, D_s], teacher [B, D_t], labels [B])``;
logit KD: ``forward(student_logits [N, L], teacher_logits [N, L])`` on class shards.

Vanilla feature KD (AdaDistill Eq. 2) is ``plugins.feature_kd.FeatureMSEHead`` (already exact).
"""
from .angular import AngularKD
from .cckd import CorrelationCongruenceKD
from .ekd import EvaluationOrientedKD
from .fitnet import FitNet
from .logit_kd import LogitKD
from .margin_kd import MarginDistillationMargins
from .replicated import sum_replicated_grads
from .rkd import RelationalKD
from .sp import SimilarityPreservingKD

__all__ = ["AngularKD", "CorrelationCongruenceKD", "EvaluationOrientedKD", "FitNet", "LogitKD",
           "MarginDistillationMargins", "RelationalKD", "SimilarityPreservingKD",
           "sum_replicated_grads"]
