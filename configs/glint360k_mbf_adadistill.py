"""AdaArcDistill at Glint360K scale (360,232 identities): Partial FC sampling keeps the positives
plus 30 % of each rank's classes per step; the center table is sharded over the GPUs."""
from easydict import EasyDict as edict

config = edict()
config.output = None   # work_dirs/<this file name>; a fork's base.py may set a fixed folder
config.distill = "adadistill"
config.alpha = "weighted"
config.margin_list = (1.0, 0.45, 0.0)
config.network = "mobilefacenet"
config.embedding_size = 512
config.teacher_network = "r100"
config.teacher_checkpoint = "work_dirs/teachers/glint360k_r100/backbone.pth"  # placeholder
config.teacher_embedding_size = 512
config.rec = "/train_tmp/glint360k"  # placeholder
config.num_classes = 360232
config.num_image = 17091657
config.num_epoch = 20
config.warmup_epoch = 0
config.lr_schedule = "step"
config.lr_steps = (6, 11, 16, 19)
config.lr = 0.1
config.weight_decay = 5e-4
config.batch_size = 128
config.sample_rate = 0.3
config.grad_clip = 5.0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
