"""Example: AdaArcDistill with an insightface ONNX recognition model as the teacher.

The teacher is the iresnet50 of insightface's buffalo_l pack (WebFace600K, ``w600k_r50.onnx``),
run by onnxruntime (``teacher_network = "onnx"``; see README, "Using an insightface model as the
teacher").  Build the teacher-embedding cache once, then train from it:

    python train_distill.py configs/example_onnx_w600k_r50_adadistill --build-teacher-cache
    torchrun --nproc_per_node=8 train_distill.py configs/example_onnx_w600k_r50_adadistill

Everything else is the AdaArcDistill recipe of configs/ms1mv2_mbf_adadistill.py.
"""
from easydict import EasyDict as edict

config = edict()
config.output = None   # work_dirs/<this file name>
config.distill = "adadistill"
config.alpha = "weighted"
config.margin_list = (1.0, 0.45, 0.0)
config.margin_scale = 64.0
config.network = "mobilefacenet"
config.embedding_size = 512
config.teacher_network = "onnx"
config.teacher_checkpoint = "work_dirs/teachers/buffalo_l/w600k_r50.onnx"  # placeholder: your .onnx
config.teacher_embedding_size = 512
config.teacher_cache = "work_dirs/teacher_cache/ms1mv2_w600k_r50"
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
config.grad_reduction = "exact"
config.sample_rate = 1.0
config.val_targets = ["lfw", "cfp_fp", "agedb_30", "calfw", "cplfw"]
config.verbose = 2000
config.frequent = 10
