"""Correlation congruence KD (Peng et al., ICCV 2019) on the GLOBAL batch, under the AdaDistill
recipe (the AdaDistill comparison table's CCKD row).

Kernel from TFace's FR release (``recognition/tasks/ekd/distillation/cc.py`` l. 10-28: RBF,
gamma 0.4, 2 Taylor terms).  The weight is NOT pinned by public FR code (TFace ships none); our
choice: 1.  Everything else is configs/ms1mv2_mbf_adadistill."""
import copy

from configs.ms1mv2_mbf_adadistill import config as _paper

config = copy.deepcopy(_paper)
config.distill = "cckd"
config.cckd_weight = 1.0
config.cckd_gamma = 0.4
config.cckd_order = 2
