"""GKD, the AAAI 2023 recipe: Primary-KD + Binary-KD (Secondary-KD dropped), fixed k = 10,000.

arcface_torch-style MobileFaceNet (mbf) student, iresnet50 CosFace teacher (s=64, m=0.4) on
MS1MV2, 8 GPUs x 128, SGD Nesterov lr 0.1 wd 5e-4, cosine schedule, 20 epochs, 4 warm-up epochs,
KD weight ramped linearly over 10 epochs.  The official code is arcface_torch-based, so gradients
are averaged over ranks as upstream does (grad_reduction = "arcface_torch").
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
config.teacher_checkpoint = "work_dirs/teachers/ms1mv2_r50_cosface/backbone.pth"  # placeholder
config.teacher_classifier = "work_dirs/teachers/ms1mv2_r50_cosface"  # placeholder: checkpoint_gpu_*.pt
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
config.warmup_epoch = 4
config.lr_schedule = "cosine"
config.optimizer = "sgd"
config.nesterov = True
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.fp16 = True
config.grad_clip = 5.0
config.val_targets = ["lfw", "cfp_fp", "agedb_30", "calfw", "cplfw"]
