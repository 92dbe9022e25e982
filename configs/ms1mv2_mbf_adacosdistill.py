"""AdaCosDistill alpha', CosFace m = 0.35 (AdaDistill paper: IJB-C 93.05 / 89.21, IJB-B 90.93 /
84.32).  The AdaArcDistill recipe (configs/ms1mv2_mbf_adadistill) with a CosFace margin."""
import copy

from configs.ms1mv2_mbf_adadistill import config as _paper

config = copy.deepcopy(_paper)
config.margin_list = (1.0, 0.0, 0.35)
