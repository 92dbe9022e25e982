"""AdaArcDistill, the AdaDistill paper's best recipe (ECCV 2024, Table 1: IJB-C 93.27 / 89.32).

MobileFaceNet student (cavaface style, 1.20M params) from a frozen iresnet50 teacher on MS1MV2;
ArcFace m=0.45, s=64, weighted alpha', SGD lr 0.1, wd 5e-4, 26 epochs, lr x0.1 at epochs
8/14/20/25, no warm-up, fp32, grad-norm clip 5.  Global batch 512 in the paper (4 GPUs x 128):
with 8 GPUs the global batch doubles; ``grad_reduction = "exact"`` keeps the gradient the one of
the global-batch mean loss, as the official code's DDP averaging of per-GPU means does.
"""
from easydict import EasyDict as edict

config = edict()
config.output = None   # work_dirs/<this file name>; a fork's base.py may set a fixed folder
config.distill = "adadistill"
config.alpha = "weighted"
config.margin_list = (1.0, 0.45, 0.0)
config.margin_scale = 64.0
config.network = "mobilefacenet"
config.embedding_size = 512
config.teacher_network = "r50"
config.teacher_checkpoint = "work_dirs/teachers/ms1mv2_r50/backbone.pth"  # placeholder: your teacher
config.teacher_embedding_size = 512
config.teacher_cache = None          # e.g. "work_dirs/teacher_cache/ms1mv2_r50" (see README)
config.rec = "/train_tmp/faces_emore"  # placeholder: MS1MV2 train.rec / train.idx / property
config.num_classes = 85742
config.num_image = 5822653
config.num_epoch = 26
config.warmup_epoch = 0
config.lr_schedule = "step"
config.lr_steps = (8, 14, 20, 25)
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.fp16 = False
config.grad_clip = 5.0
config.sample_rate = 1.0
config.val_targets = ["lfw", "cfp_fp", "agedb_30", "calfw", "cplfw"]
config.verbose = 2000
config.frequent = 10
