"""AdaArcDistill at WebFace42M scale (2,059,906 identities) -- not a published row: the AdaDistill
paper trains on MS1MV2 only and is silent on WebFace42M, so this recipe is ours.

The MS1MV2 paper recipe (configs/ms1mv2_mbf_adadistill: alpha', ArcFace m 0.45, lr 0.1 at global
batch 512 scaled with the run's global batch, clip 5) with 20 epochs, lr x 0.1 from the 0-based
epochs 6, 11, 16, 19, an iresnet100 teacher, fp16, and Partial FC sampling: each rank keeps its
positives plus 20 % of its classes per step; the center table is sharded over the GPUs
(2.06M x 512 fp32 = 4.2 GB in total, 0.53 GB per GPU on 8 GPUs)."""
import copy

from configs.ms1mv2_mbf_adadistill import config as _paper

config = copy.deepcopy(_paper)
config.teacher_network = "r100"
config.teacher_checkpoint = "work_dirs/teachers/webface42m_r100/backbone.pth"  # placeholder
config.rec = "/train_tmp/WebFace42M"  # placeholder
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 20
config.lr_steps = (6, 11, 16, 19)
config.sample_rate = 0.2
config.fp16 = True
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
