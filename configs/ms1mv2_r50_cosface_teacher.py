"""The GKD paper's teacher: iresnet50, CosFace s = 64, m = 0.4, MS1MV2 (GKD publishes no teacher
row of its own), trained with train_distill.py (``distill = "none"``).

Writes work_dirs/ms1mv2_r50_cosface_teacher/model.pt (teacher_checkpoint of the GKD jobs) and
classifier.pt (the learned [C, D] CosFace weights that give GKD's teacher logits).  The official
GKD teacher is face.evoLVe's SEResNet_IR(50) trained by a script that is not public, so its recipe
is unknown: we train it with the AdaDistill teacher recipe (configs/ms1mv2_r50_arcface_teacher:
lr 0.1 at global batch 512, 26 epochs, step decay, clip 5, fp32) and a CosFace margin."""
import copy

from configs.ms1mv2_r50_arcface_teacher import config as _teacher

config = copy.deepcopy(_teacher)
config.margin_list = (1.0, 0.0, 0.4)
config.margin_grad = "straight_through"   # CosFace: both conventions give the same gradient
