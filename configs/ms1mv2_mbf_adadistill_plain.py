"""AdaArcDistill with the plain alpha = cos(f_s, f_t) (AdaDistill paper: IJB-C 92.56 / 88.23).

The row sits in the paper's ablation block with the ArcDistill row, which was run with m = 0.50;
we take m = 0.50 here too (our reference sheet does not state this row's m: check it against the
paper).  The official plain-alpha path crashes (an undefined attribute, and run script passes a
keyword the head does not take); ours runs it as the paper's equation.  Everything else is
configs/ms1mv2_mbf_adadistill."""
import copy

from configs.ms1mv2_mbf_adadistill import config as _paper

config = copy.deepcopy(_paper)
config.alpha = "plain"
config.margin_list = (1.0, 0.50, 0.0)
