"""Relational KD (Park et al., CVPR 2019, Eqs. 4-8) on the GLOBAL batch, under the GKD recipe.

Recipe source: WisonZ/GKD ``distillation/rkd.py`` l. 9-57 (distance weight 25, angle weight 50,
added to the CosFace CE with weight 1; TFace's EKD release has the same weights).  The public
code sees one GPU's batch of 128; here the distances and angles run over the global batch (1024
on 8 x 128), so the run is the same on any GPU count.  Everything else is
configs/ms1mv2_mbf_gkd."""
import copy

from configs.ms1mv2_mbf_gkd import config as _paper

config = copy.deepcopy(_paper)
config.distill = "rkd"
config.rkd_weight = 1.0
config.rkd_distance_weight = 25.0
config.rkd_angle_weight = 50.0
