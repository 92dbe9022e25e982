"""The AdaDistill paper's teacher: iresnet50, ArcFace, MS1MV2 (IJB-C 95.16 / 92.66), trained with
train_distill.py like any other job (``distill = "none"``).

Writes work_dirs/ms1mv2_r50_arcface_teacher/model.pt (the backbone: the distillation jobs'
teacher_checkpoint) and classifier.pt (the learned [C, D] ArcFace weights: the fixed centers of
ArcDistill / CosDistill).  The official code trains its teacher with train/train_standalone.py,
the student-alone script: exact-gradient ArcFace, lr 0.1 at global batch 512, 26 epochs, step
decay, clip 5 -- so this is configs/ms1mv2_mbf_standalone with network r50."""
import copy

from configs.ms1mv2_mbf_standalone import config as _standalone

config = copy.deepcopy(_standalone)
config.network = "r50"
