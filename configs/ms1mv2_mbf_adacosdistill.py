"""AdaCosDistill: the AdaDistill recipe with a CosFace margin m=0.35 (IJB-C 93.05 / 89.21)."""
from easydict import EasyDict as edict

config = edict()
config.output = None   # work_dirs/<this file name>; a fork's base.py may set a fixed folder
config.distill = "adadistill"
config.alpha = "weighted"
config.margin_list = (1.0, 0.0, 0.35)
config.margin_scale = 64.0
config.network = "mobilefacenet"
config.embedding_size = 512
config.teacher_network = "r50"
config.teacher_checkpoint = "work_dirs/teachers/ms1mv2_r50/backbone.pth"  # placeholder: your teacher
config.teacher_embedding_size = 512
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
