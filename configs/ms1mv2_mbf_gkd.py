"""GKD with a fixed primary group k = 10,000 (Zhao et al., AAAI 2023; MobileFaceNet student:
IJB-C 94.34 / 91.01, IJB-B 92.52 / 86.06 -- a secondary source, see shared REFERENCE.md).

Official recipe (WisonZ/GKD train_gkd.py + distillation/gkd.py; docs/RECIPES.md maps every value):
arcface_torch-style MobileFaceNet (mbf) student, iresnet50 CosFace teacher (s = 64, m = 0.4, the
same margin logits for both), T = 4, alpha 1, beta 8, lambda 0, classes ranked by the student, KD
weight min(epoch / 10, 1); SGD Nesterov momentum 0.9 wd 5e-4; lr 0.1 at global batch 1024
(8 GPUs x 128; the official script does not scale it, we scale it linearly with the global batch so
the recipe holds on any GPU count); timm cosine per step over all 20 epochs down to 2.5e-7, its
first 4 epochs replaced by a linear warm-up from 2.5e-7; fp32; no gradient clipping.
"""
from easydict import EasyDict as edict

config = edict()
config.output = None   # work_dirs/<this file name>; a fork's base.py may set a fixed folder
config.distill = "gkd"
config.margin_list = (1.0, 0.0, 0.4)
config.margin_scale = 64.0
config.network = "mbf"
config.embedding_size = 512
config.teacher_network = "r50"
config.teacher_checkpoint = "work_dirs/ms1mv2_r50_cosface_teacher/model.pt"
config.teacher_classifier = "work_dirs/ms1mv2_r50_cosface_teacher/classifier.pt"
config.teacher_embedding_size = 512
config.gkd_temperature = 4.0
config.gkd_alpha = 1.0
config.gkd_beta = 8.0
config.gkd_lamda = 0.0
config.gkd_k = 10000
config.gkd_tau = None
config.gkd_rank_by = "student"
config.gkd_warmup_epochs = 10
config.rec = "/train_tmp/faces_emore"  # placeholder: MS1MV2
config.num_classes = 85742
config.num_image = 5822653
config.num_epoch = 20
config.lr_schedule = "cosine"
config.warmup_epoch = 4
config.warmup_lr = 2.5e-7
config.lr_min = 2.5e-7
config.optimizer = "sgd"
config.nesterov = True
config.lr = 0.1                      # at the recipe's global batch below
config.lr_reference_batch = 1024     # 8 GPUs x 128: a run of global batch G uses 0.1 * G / 1024
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128              # per GPU
config.fp16 = False
config.grad_clip = 0.0               # the official script does not clip
config.sample_rate = 1.0
config.flip = True
config.val_targets = ["lfw", "cfp_fp", "agedb_30", "calfw", "cplfw"]
