"""CPU demo, step 2: the student (tiny_s) trained alone, the baseline; the demo runs it once per
seed (config.seed and output <output>/seed_<k> set by tools/demo.py)."""
from easydict import EasyDict as edict

config = edict()
config.distill = "none"
config.network = "tiny_s"
config.margin_list = (1.0, 0.0, 0.35)
config.margin_scale = 32.0
config.output = "work_dirs/demo/student"
config.rec = "work_dirs/demo/data"
config.num_classes = 200
config.num_image = 4800
config.num_epoch = 3
config.batch_size = 64
config.lr = 0.1
config.lr_schedule = "cosine"
config.warmup_epoch = 0
config.weight_decay = 5e-4
config.num_workers = 0        # decode in the run's process: the demo runs one process per core
config.val_targets = ["lfw"]
config.verbose = 10 ** 9
config.frequent = 20
config.save_every = 10 ** 9
config.seed = 0
