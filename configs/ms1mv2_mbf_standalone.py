"""The student trained alone, the AdaDistill paper's baseline (MobileFaceNet: IJB-C 89.13 / 81.65,
IJB-B 87.07 / 74.63).

Official train/train_standalone.py: ArcFace with learned weights, differentiated through
acos / cos (``margin_grad = "exact"``, not arcface_torch's straight-through margin), m = 0.50
(our reference sheet does not state the baseline's m; 0.50 is ArcFace's and the ablation block's),
the classifier trained with the same lr, schedule and weight decay as the backbone, clip 5 on the
backbone only.  Everything else is configs/ms1mv2_mbf_adadistill (lr 0.1 at global batch 512)."""
import copy

from configs.ms1mv2_mbf_adadistill import config as _paper

config = copy.deepcopy(_paper)
config.distill = "none"
config.margin_list = (1.0, 0.50, 0.0)
config.margin_grad = "exact"
config.teacher_checkpoint = None
