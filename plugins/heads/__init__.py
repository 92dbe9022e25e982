"""Distillation heads, one file per method, each registered under its ``cfg.distill`` name.

``build_head(cfg)`` builds the configured head; ``head_spec(name)`` tells what the method needs.
Adding a method: one file here with a ``DistillHead`` subclass decorated by ``register_head``
(and an import line below), plus a job config; see docs/ARCHITECTURE.md.
"""
from .base import DistillHead, margin_from_config
from .registry import (HeadSpec, build_head, check_embedding_sizes, head_names, head_spec,
                       register_head)

# registration by import, in the order the methods are listed
from . import adadistill, fixed_centers, gkd, feature_mse, margin_softmax  # noqa: E402,F401
# the comparison methods of both papers (issue 17)
from . import (kd, fitnet, angular, rkd, sp, cckd, ekd,  # noqa: E402,F401
               margin_distillation)
from .angular import AngularHead  # noqa: E402
from .cckd import CCKDHead  # noqa: E402
from .ekd import EKDHead  # noqa: E402
from .fitnet import FitNetHead  # noqa: E402
from .kd import KDHead  # noqa: E402
from .margin_distillation import MarginDistillationHead  # noqa: E402
from .rkd import RKDHead  # noqa: E402
from .sp import SPHead  # noqa: E402
from .adadistill import AdaDistillHead  # noqa: E402
from .fixed_centers import ArcDistillHead, CosDistillHead  # noqa: E402
from .feature_mse import FeatureMSE  # noqa: E402
from .gkd import GKDHead  # noqa: E402
from .margin_plus_kd import MarginPlusKD  # noqa: E402
from .margin_softmax import MarginSoftmaxHead  # noqa: E402

__all__ = ["AngularHead", "CCKDHead", "EKDHead", "FitNetHead", "KDHead",
           "MarginDistillationHead", "RKDHead", "SPHead",
           "AdaDistillHead", "ArcDistillHead", "CosDistillHead", "DistillHead", "FeatureMSE",
           "GKDHead", "HeadSpec", "MarginPlusKD", "MarginSoftmaxHead", "build_head",
           "check_embedding_sizes",
           "head_names", "head_spec", "margin_from_config", "register_head"]
