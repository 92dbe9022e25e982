"""Logit KD (Hinton et al., NIPS-W 2015), the KD baseline of the GKD release, under the GKD recipe.

Recipe source: WisonZ/GKD ``distillation/kd.py`` l. 8-16 (T = 4, ``T^2``-scaled batch-mean KL of
the CosFace margin logits of student and frozen teacher classifier, added to CE with weight 1, no
warm-up) trained by the same script and schedule as its GKD.  Everything else is
configs/ms1mv2_mbf_gkd (mbf from the r50 CosFace teacher, s 64 m 0.4, 8 x 128, SGD 0.1 Nesterov,
cosine over 20 epochs with 4 warm-up epochs)."""
import copy

from configs.ms1mv2_mbf_gkd import config as _paper

config = copy.deepcopy(_paper)
config.distill = "kd"
config.kd_temperature = 4.0
config.kd_weight = 1.0
config.kd_warmup_epochs = 0
