"""AdaArcDistill alpha' with ArcFace m = 0.50: the margin ablation row of the AdaDistill paper
(its IJB-B/C numbers are in the paper's margin ablation table; not copied into our reference
sheet).  Everything else is configs/ms1mv2_mbf_adadistill."""
import copy

from configs.ms1mv2_mbf_adadistill import config as _paper

config = copy.deepcopy(_paper)
config.margin_list = (1.0, 0.50, 0.0)
