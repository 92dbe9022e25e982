"""The student trained alone (the papers' baseline: IJB-C 89.13 / 81.65 in AdaDistill): ArcFace
margin softmax with learned Partial-FC weights, through the same loop as the distillation runs."""
from easydict import EasyDict as edict

config = edict()
config.output = None   # work_dirs/<this file name>; a fork's base.py may set a fixed folder
config.distill = "none"
config.margin_list = (1.0, 0.5, 0.0)
config.margin_scale = 64.0
config.network = "mobilefacenet"
config.embedding_size = 512
config.rec = "/train_tmp/faces_emore"  # placeholder: MS1MV2
config.num_classes = 85742
config.num_image = 5822653
config.num_epoch = 26
config.warmup_epoch = 0
config.lr_schedule = "step"
config.lr_steps = (8, 14, 20, 25)
config.lr = 0.1
config.weight_decay = 5e-4
config.batch_size = 128
config.grad_clip = 5.0
config.val_targets = ["lfw", "cfp_fp", "agedb_30", "calfw", "cplfw"]
