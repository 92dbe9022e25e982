"""CPU demo, step 4: the student (tiny_s) distilled from the demo teacher with GKD (teacher
classifier = the demo teacher's learned CosFace weights), same data, schedule and steps, once per
seed; the teacher embeddings come from the cache the demo builds after the teacher."""
from easydict import EasyDict as edict

config = edict()
config.distill = "gkd"
config.network = "tiny_s"
config.teacher_network = "tiny_t"
config.teacher_checkpoint = "work_dirs/demo/teacher/model.pt"
config.teacher_classifier = "work_dirs/demo/teacher/classifier.pt"
config.teacher_cache = "work_dirs/demo/teacher/embedding_cache"
config.margin_list = (1.0, 0.0, 0.35)
config.margin_scale = 32.0
config.gkd_k = 20
config.gkd_warmup_epochs = 1
config.output = "work_dirs/demo/gkd"
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
