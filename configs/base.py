"""Every key an arcface_torch-style job config may set, with its default.

Job configs (configs/<name>.py) override these; distillation keys (method, teacher, cache, GKD
settings, schedules) have their defaults in plugins/config_defaults.py so that the same job
configs also load in a fork whose own configs/base.py lacks them.
"""
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)  # combined margin (m1, m2, m3): ArcFace (1, m, 0), CosFace (1, 0, m)
config.network = "r50"                # student backbone name
config.resume = False                 # continue from the newest valid checkpoint in output
config.save_all_states = False        # kept for arcface_torch compatibility (checkpoints always hold everything)
config.output = None                  # None -> work_dirs/<config name>
config.embedding_size = 512           # student embedding size
config.sample_rate = 1.0              # Partial FC: fraction of classes kept per rank (positives always)
config.interclass_filtering_threshold = 0  # arcface_torch option; only 0 is supported
config.fp16 = False                   # student conv trunk under autocast + GradScaler (CUDA)
config.batch_size = 128               # per GPU
config.optimizer = "sgd"              # sgd | adamw
config.lr = 0.1                       # base learning rate
config.momentum = 0.9                 # SGD momentum
config.weight_decay = 5e-4            # weight decay
config.verbose = 2000                 # verification on val_targets every this many steps
config.frequent = 10                  # a progress line every this many steps
config.dali = False                   # arcface_torch option; DALI is not supported (must be False)
config.dali_aug = False               # arcface_torch option; unused
config.gradient_acc = 1               # gradient accumulation: batches per optimizer step
config.seed = 2048                    # seed of weights, sampling order and flips
config.num_workers = "auto"           # DataLoader workers per rank; "auto": CPUs per rank - 1 (max 8) on GPUs, 1 on CPU
config.rec = "/train_tmp/ms1m-retinaface-t1"  # folder with train.rec / train.idx / property
config.num_classes = 93431            # identities in rec
config.num_image = 5179510            # images in rec
config.num_epoch = 20                 # epochs
config.warmup_epoch = 0               # linear LR warm-up epochs (polynomial and cosine schedules)
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]  # .bin sets in rec to verify on
config.using_wandb = False            # arcface_torch option; wandb is not supported (must be False)
config.wandb_key = "XXXXXXXXXXXXXXXXXXX"  # arcface_torch option; unused
config.suffix_run_name = None         # arcface_torch option; unused
config.wandb_entity = "entity"        # arcface_torch option; unused
config.wandb_project = "project"      # arcface_torch option; unused
config.wandb_log_all = True           # arcface_torch option; unused
config.save_artifacts = False         # arcface_torch option; unused
config.wandb_resume = False           # arcface_torch option; unused
config.notes = ""                     # free text, written to the training log
