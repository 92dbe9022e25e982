"""FitNet hint regression (Romero et al., ICLR 2015, Eq. 3) on the embeddings, under the GKD
recipe.

Recipe source: WisonZ/GKD ``distillation/fitnet.py`` l. 9-15 (squared distance of the
L2-normalised embeddings times 1/2, per sample, added to the CosFace CE with weight 1; no
regressor since student and teacher are both 512-d -- ``fitnet_regressor = "auto"`` adds a
learned linear one only when they differ).  Everything else is configs/ms1mv2_mbf_gkd (its GKD
keys are left in place, unused)."""
import copy

from configs.ms1mv2_mbf_gkd import config as _paper

config = copy.deepcopy(_paper)
config.distill = "fitnet"
config.fitnet_weight = 1.0
config.fitnet_normalize = True
config.fitnet_scale = 0.5
config.fitnet_regressor = "auto"
