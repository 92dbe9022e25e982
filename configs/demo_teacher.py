"""CPU demo, step 1: the teacher (tiny_t) trained alone on the synthetic set, once; the demo then
builds its teacher-embedding cache (work_dirs/demo/teacher/embedding_cache, see tools/demo.py)."""
from easydict import EasyDict as edict

config = edict()
config.distill = "none"
config.network = "tiny_t"
config.margin_list = (1.0, 0.0, 0.35)
config.margin_scale = 32.0
config.output = "work_dirs/demo/teacher"
config.rec = "work_dirs/demo/data"
config.num_classes = 200
config.num_image = 4800
config.num_epoch = 4
config.batch_size = 64
config.lr = 0.1
config.lr_schedule = "cosine"
config.warmup_epoch = 0
config.weight_decay = 5e-4
config.fp16 = False
config.num_workers = 0        # decode in the run's process: the demo runs one process per core
config.val_targets = ["lfw"]
config.verbose = 10 ** 9       # verify once, at the end
config.frequent = 20
config.save_every = 10 ** 9    # checkpoint at epoch ends only
config.seed = 0
