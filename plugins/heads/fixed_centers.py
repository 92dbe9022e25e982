"""``distill = "arcdistill"`` / ``"cosdistill"``: the student's margin softmax against the
teacher's fixed classifier (AdaDistill's ArcDistill / CosDistill baselines): the AdaDistill head
with ``alpha = "fixed"`` (centers loaded from the teacher classifier, never updated)."""
from __future__ import annotations

from .adadistill import AdaDistillHead
from .base import margin_from_config
from .registry import register_head


class _FixedCenters(AdaDistillHead):
    """AdaDistill head with the teacher's classifier as fixed centers."""

    MARGIN = ""

    @classmethod
    def _alpha_from_config(cls, cfg) -> str:
        cls.check_config(cfg)
        return "fixed"

    @classmethod
    def check_config(cls, cfg) -> None:
        kind, _, _ = margin_from_config(cfg)
        if kind != cls.MARGIN:
            raise ValueError(f"distill='{cfg.distill}' needs a {cls.MARGIN} margin_list "
                             f"({'(1.0, m, 0.0)' if cls.MARGIN == 'arcface' else '(1.0, 0.0, m)'}),"
                             f" got {tuple(cfg.margin_list)}")


@register_head("arcdistill", needs_teacher=True, teacher_classifier="required", same_dim=True)
class ArcDistillHead(_FixedCenters):
    """ArcFace margin softmax of the student against the teacher's fixed classifier."""

    MARGIN = "arcface"


@register_head("cosdistill", needs_teacher=True, teacher_classifier="required", same_dim=True)
class CosDistillHead(_FixedCenters):
    """CosFace margin softmax of the student against the teacher's fixed classifier."""

    MARGIN = "cosface"
