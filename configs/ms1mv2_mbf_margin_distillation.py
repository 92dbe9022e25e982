"""MarginDistillation (Svitov & Alyamkin, arXiv 2003.02586): ArcFace s 64 on the frozen r50
ArcFace teacher's class centers with per-sample margins m_i in [0.2, 0.5] from the teacher
embedding's cosine to its center, under the AdaDistill recipe.

Recipe source: david-svitov/margindistillation ``train/config.py`` l. 95-100 (s 64, Mmin 0.2,
Mmax 0.5), ``train/train.py`` l. 168-196 (margin formula) and l. 414-436 (frozen teacher fc7);
the margin softmax alone (no extra term).  The max of the margin formula runs over the global
batch (the public code: each GPU's).  Gradient through the margin: exact (that code builds the
margin in the graph).  Everything else is configs/ms1mv2_mbf_adadistill (its r50 teacher trained
by configs/ms1mv2_r50_arcface_teacher, which writes the classifier used here)."""
import copy

from configs.ms1mv2_mbf_adadistill import config as _paper

config = copy.deepcopy(_paper)
config.distill = "margin_distillation"
config.teacher_classifier = "work_dirs/ms1mv2_r50_arcface_teacher/classifier.pt"
config.margin_list = (1.0, 0.5, 0.0)    # ArcFace; m itself is replaced by the per-sample m_i
config.margin_scale = 64.0
config.margin_grad = "exact"
config.md_m_min = 0.2
config.md_m_max = 0.5
