"""Similarity-preserving KD (Tung & Mori, ICCV 2019) on the GLOBAL batch, under the AdaDistill
recipe (the AdaDistill comparison table's SP row).

The weight is NOT pinned by a public face-recognition source: the paper's gamma = 3000 is for
CIFAR with its row-normalised Gram; TFace's FR release (``similarity_perserving.py`` l. 17-31)
uses the cosine Gram and ships no weight.  Our choice: cosine Gram, weight 1.  Everything else is
configs/ms1mv2_mbf_adadistill."""
import copy

from configs.ms1mv2_mbf_adadistill import config as _paper

config = copy.deepcopy(_paper)
config.distill = "sp"
config.sp_weight = 1.0
config.sp_gram = "cosine"
