"""CosDistill, the CosFace fixed-center baseline of the AdaDistill paper, CosFace m = 0.35 (its
IJB-B/C numbers are in the paper's comparison table; not copied into our reference sheet).

Fixed centers = the paper's one iresnet50 teacher's trained classifier (the official
train_AMLDistill.py loads the same teacher header into its CosFace head), so the teacher keys are
the ones of configs/ms1mv2_mbf_adadistill.  Everything else is that config too."""
import copy

from configs.ms1mv2_mbf_adadistill import config as _paper

config = copy.deepcopy(_paper)
config.distill = "cosdistill"
config.margin_list = (1.0, 0.0, 0.35)
config.teacher_classifier = "work_dirs/ms1mv2_r50_arcface_teacher/classifier.pt"
