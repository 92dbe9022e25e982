"""ArcDistill with ArcFace m = 0.45 -- an extra, not a published row (the published ArcDistill
row, 91.70 / 84.57, is m = 0.50: configs/ms1mv2_mbf_arcdistill).  It isolates the centers:
same margin as the best AdaArcDistill row (configs/ms1mv2_mbf_adadistill)."""
import copy

from configs.ms1mv2_mbf_arcdistill import config as _paper

config = copy.deepcopy(_paper)
config.margin_list = (1.0, 0.45, 0.0)
