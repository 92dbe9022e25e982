"""GKD with the adaptive primary group, tau = 0.93, beta = 4 (the GKD paper's adaptive variant,
official gkd_adaptive.py; its IJB-B/C numbers are in the GKD paper; not copied into our reference
sheet).

k is the smallest of 1, 101, 201, ... whose top-k summed student softmax (T = 1) reaches
tau x 128 over each GPU's own batch of 128 in the official code; ``gkd_tau_batch = 128`` chooses k
per block of 128 consecutive samples of the global batch, the same thing on 8 x 128 and the same
recipe on any other GPU count.  Everything else is configs/ms1mv2_mbf_gkd."""
import copy

from configs.ms1mv2_mbf_gkd import config as _paper

config = copy.deepcopy(_paper)
config.gkd_tau = 0.93
config.gkd_beta = 4.0
config.gkd_tau_batch = 128
