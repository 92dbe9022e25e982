"""ShrinkTeaNet-style angular distillation (Duong et al., arXiv 1905.10620): ArcFace + 1.0 *
mean (1 - cos(f_s, f_t)), under the AdaDistill recipe.

Recipe source of the term and its weight: david-svitov/margindistillation ``train/train.py``
l. 137-144, ``config.py`` l. 120-123 (weight 1.0).  That code's classifier is a normalised
softmax without margin; we keep the student's ArcFace m = 0.45 of configs/ms1mv2_mbf_adadistill
(a zero margin is not accepted by our margin_list check; a tiny CosFace margin comes closest to
that code).  Everything else is configs/ms1mv2_mbf_adadistill."""
import copy

from configs.ms1mv2_mbf_adadistill import config as _paper

config = copy.deepcopy(_paper)
config.distill = "angular"
config.angular_weight = 1.0
