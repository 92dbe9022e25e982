"""EKD, evaluation-oriented KD (Huang et al., CVPR 2022), on the GLOBAL batch, with TFace's EKD
schedule.

Recipe source: Tencent/TFace ``recognition/tasks/ekd`` (``distillation/ekd.py`` l. 10-84: top-k
2000, T 0.01, EMA momentum 0.01, w_p 0.02, w_n 0.01; ``train.py`` l. 86-93: added to the margin
loss with weight 1; ``train.yaml``: MobileFaceNet from an IR-50 teacher, ArcFace s 64 m 0.4,
64 per GPU, lr 0.1, x 0.1 at epochs 10 / 18 / 22, 26 epochs, wd 5e-4).  Differences we keep: the
student/teacher pair and the rest of the AdaDistill recipe (configs/ms1mv2_mbf_adadistill: 4 x
128, mobilefacenet, r50 ArcFace teacher, grad clip 5); our loader samples at random, while TFace
draws half of each GPU's batch with 4 images per identity (without it few positive pairs exist:
the positive term is then mostly 0)."""
import copy

from configs.ms1mv2_mbf_adadistill import config as _paper

config = copy.deepcopy(_paper)
config.distill = "ekd"
config.margin_list = (1.0, 0.4, 0.0)
config.lr_steps = (10, 18, 22)
config.ekd_weight = 1.0
config.ekd_top_k = 2000
config.ekd_temperature = 0.01
config.ekd_momentum = 0.01
config.ekd_positive_weight = 0.02
config.ekd_negative_weight = 0.01
