"""ArcDistill, AdaDistill's fixed-center baseline, ArcFace m = 0.50 (AdaDistill paper: IJB-C
91.70 / 84.57; the row sits in the ablation block run with m = 0.50).

The margin softmax of the student against the teacher's trained classifier, kept frozen as fixed
class centers (official train/train_AMLDistill.py).  The classifier comes from the teacher run
(configs/ms1mv2_r50_arcface_teacher writes classifier.pt, [C, D]); arcface_torch
``checkpoint_gpu_*.pt`` shards of any GPU count work too.  Everything else is
configs/ms1mv2_mbf_adadistill (lr 0.1 at global batch 512, step decay, clip 5, fp32)."""
import copy

from configs.ms1mv2_mbf_adadistill import config as _paper

config = copy.deepcopy(_paper)
config.distill = "arcdistill"
config.margin_list = (1.0, 0.50, 0.0)
config.teacher_classifier = "work_dirs/ms1mv2_r50_arcface_teacher/classifier.pt"
