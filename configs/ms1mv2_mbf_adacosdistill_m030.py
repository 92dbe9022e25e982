"""AdaCosDistill alpha' with CosFace m = 0.30: the margin ablation row of the AdaDistill paper
(its IJB-B/C numbers are in the paper's margin ablation table; not copied into our reference
sheet).  Everything else is configs/ms1mv2_mbf_adacosdistill."""
import copy

from configs.ms1mv2_mbf_adacosdistill import config as _paper

config = copy.deepcopy(_paper)
config.margin_list = (1.0, 0.0, 0.30)
