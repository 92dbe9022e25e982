"""AdaArcDistill at Glint360K scale (360,232 identities) -- not a published row: the AdaDistill
paper trains on MS1MV2 only and is silent on Glint360K, so this recipe is ours.

The MS1MV2 paper recipe (configs/ms1mv2_mbf_adadistill: alpha', ArcFace m 0.45, lr 0.1 at global
batch 512 scaled with the run's global batch, fp32, clip 5) with 20 epochs, lr x 0.1 from the
0-based epochs 6, 11, 16, 19, an iresnet100 teacher, and Partial FC sampling: each rank keeps its
positives plus 30 % of its classes per step; the center table is sharded over the GPUs."""
import copy

from configs.ms1mv2_mbf_adadistill import config as _paper

config = copy.deepcopy(_paper)
config.teacher_network = "r100"
config.teacher_checkpoint = "work_dirs/teachers/glint360k_r100/backbone.pth"  # placeholder
config.rec = "/train_tmp/glint360k"  # placeholder
config.num_classes = 360232
config.num_image = 17091657
config.num_epoch = 20
config.lr_steps = (6, 11, 16, 19)
config.sample_rate = 0.3
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
