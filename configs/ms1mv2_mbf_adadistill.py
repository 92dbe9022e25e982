"""AdaArcDistill with the weighted alpha', m = 0.45: the AdaDistill paper's best row (ECCV 2024,
MobileFaceNet student: IJB-C TAR@FAR 1e-4 / 1e-5 93.27 / 89.32, IJB-B 91.21 / 84.13).

The paper config every other MS1MV2 AdaDistill-family job derives from (they import this file and
change what differs).  Official recipe (fdbtrs/AdaDistill config/config.py + train/
train_AdaDistill.py; docs/RECIPES.md maps every value): cavaface-style MobileFaceNet (1.20M
params) from a frozen iresnet50 ArcFace teacher on MS1MV2; ArcFace s = 64, m = 0.45; SGD momentum
0.9, wd 5e-4; lr 0.1 at global batch 512 (4 GPUs x 128), scaled linearly with the run's global
batch (0.2 on 8 x 128) as the official script does; 26 epochs; lr x 0.1 from the 0-based epochs
7, 13, 19, 24 (the official LambdaLR counts m - 1 <= epoch for m in 8, 14, 20, 25); no warm-up;
fp32; grad-norm clip 5 on the student; flip-only augmentation.
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
# the ArcFace teacher trained by configs/ms1mv2_r50_arcface_teacher (or your own backbone .pth)
config.teacher_checkpoint = "work_dirs/ms1mv2_r50_arcface_teacher/model.pt"
config.teacher_classifier = None     # AdaDistill centers start as N(0, 0.01) noise
config.teacher_embedding_size = 512
config.teacher_cache = None          # e.g. "work_dirs/teacher_cache/ms1mv2_r50" (see README)
config.rec = "/train_tmp/faces_emore"  # placeholder: MS1MV2 train.rec / train.idx / property
config.num_classes = 85742
config.num_image = 5822653
config.num_epoch = 26
config.warmup_epoch = 0
config.lr_schedule = "step"
config.lr_steps = (7, 13, 19, 24)    # 0-based epochs; official LambdaLR m - 1 <= epoch, m = 8, 14, 20, 25
config.optimizer = "sgd"
config.lr = 0.1                      # at the recipe's global batch below
config.lr_reference_batch = 512      # 4 GPUs x 128: a run of global batch G uses 0.1 * G / 512
config.momentum = 0.9
config.nesterov = False
config.weight_decay = 5e-4
config.batch_size = 128              # per GPU
config.fp16 = False
config.grad_clip = 5.0
config.sample_rate = 1.0
config.flip = True
config.val_targets = ["lfw", "cfp_fp", "agedb_30", "calfw", "cplfw"]
config.verbose = 2000
config.frequent = 10
