"""Build the pieces a distillation run needs from a config: the loss head and the teacher source.

Used by train_distill.py and by a fork's patched train_v2.py (patches/), so both build exactly the
same objects from the same keys.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import nn

from plugins.config_defaults import METHODS
from plugins.teacher import check_embedding_sizes


# arcface_torch job keys the distillation code reads (a fork's base.py does not define them).
REQUIRED_JOB_KEYS = ("rec", "num_classes", "num_epoch", "warmup_epoch")
NEEDS_TEACHER = ("adadistill", "arcdistill", "cosdistill", "gkd", "feature_mse")


def margin_from_list(margin_list, source: str = "margin_list") -> Tuple[str, float]:
    """arcface_torch's combined margin (m1, m2, m3) -> ("arcface", m2) or ("cosface", m3)."""
    if len(margin_list) != 3:
        raise ValueError(f"{source} must be (m1, m2, m3), got {margin_list!r}")
    m1, m2, m3 = (float(v) for v in margin_list)
    if m1 != 1.0 or (m2 > 0 and m3 > 0) or (m2 <= 0 and m3 <= 0):
        raise ValueError(f"{source} = {tuple(margin_list)}: distillation heads support ArcFace "
                         f"(1.0, m, 0.0) or CosFace (1.0, 0.0, m) only")
    return ("arcface", m2) if m2 > 0 else ("cosface", m3)


def check_config(cfg) -> None:
    """Start-up checks that would otherwise fail mid-run, each naming the config key."""
    missing = [key for key in REQUIRED_JOB_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"config lacks the job key(s) {missing}: set them in configs/<job>.py "
                         f"(a fork's configs/base.py does not define them)")
    if cfg.distill not in METHODS:
        raise ValueError(f"config key 'distill' must be one of {list(METHODS)}, "
                         f"got {cfg.distill!r}")
    for key, ok in (("dali", False), ("using_wandb", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"config key '{key}' = {cfg[key]!r} is not supported; set it to {ok}")
    if cfg.get("interclass_filtering_threshold", 0) not in (0, 0.0):
        raise ValueError("config key 'interclass_filtering_threshold' must be 0 (not supported)")
    method = cfg.distill
    check_embedding_sizes(method, cfg.embedding_size, cfg.teacher_embedding_size)
    if method in ("arcdistill", "cosdistill", "gkd") and not cfg.teacher_classifier \
            and not (method == "gkd" and cfg.teacher_cache):
        raise ValueError(f"distill='{method}' needs the teacher's classifier: set config key "
                         f"'teacher_classifier' to a checkpoint_gpu_*.pt folder or a [C, D] file"
                         + (" (or set teacher_cache to use class means)" if method == "gkd" else ""))
    if method in NEEDS_TEACHER and not cfg.teacher_cache:
        path = cfg.teacher_checkpoint
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(f"config key 'teacher_checkpoint' = {path!r}: file not found; "
                                    f"point it at the teacher's backbone.pth / model.pt "
                                    f"(or set teacher_cache to a built teacher-embedding cache)")
    kind, _ = margin_from_list(cfg.margin_list)
    if method == "gkd" and kind != "cosface":
        raise ValueError(f"distill='gkd' needs a CosFace margin_list (1.0, 0.0, m), got "
                         f"{tuple(cfg.margin_list)}: GKD's logits are CosFace as in the official "
                         f"code (an ArcFace margin is refused, not silently trained as CosFace)")


def build_head(cfg, teacher_classifier: Optional[torch.Tensor] = None) -> nn.Module:
    """The loss head of ``cfg.distill``; ``teacher_classifier`` [C, D_t] overrides loading it
    from ``cfg.teacher_classifier`` (e.g. class means computed from the teacher cache)."""
    from plugins.adadistill import AdaDistillHead
    from plugins.classifier_io import load_teacher_classifier
    from plugins.margin_head import MarginSoftmaxHead

    method = cfg.distill
    kind, m = margin_from_list(cfg.margin_list)
    s = float(cfg.margin_scale)

    def classifier(dim: int) -> Optional[torch.Tensor]:
        if teacher_classifier is not None:
            return teacher_classifier
        if cfg.teacher_classifier:
            return load_teacher_classifier(cfg.teacher_classifier, cfg.num_classes, dim)
        return None

    if method in ("adadistill", "arcdistill", "cosdistill"):
        if method != "adadistill" and kind != method.replace("distill", "face"):
            raise ValueError(f"distill='{method}' needs a {method[:3]}face margin_list, "
                             f"got {tuple(cfg.margin_list)}")
        alpha = cfg.alpha if method == "adadistill" else "fixed"
        head = AdaDistillHead(cfg.embedding_size, cfg.num_classes, margin=kind, s=s, m=m,
                              alpha=alpha, sample_rate=cfg.sample_rate)
        table = classifier(cfg.embedding_size)
        if table is not None:
            head.load_full_centers(table)
        return head
    if method == "gkd":
        from plugins.gkd import GKDHead
        if kind != "cosface":
            raise ValueError(f"distill='gkd' needs a CosFace margin_list (1.0, 0.0, m): GKD's "
                             f"student and teacher logits are CosFace as in the official code; "
                             f"got margin_list = {tuple(cfg.margin_list)} (ArcFace is refused, "
                             f"not silently trained as CosFace)")
        table = classifier(cfg.teacher_embedding_size)
        return GKDHead(cfg.embedding_size, cfg.num_classes, table, s=s, m=m,
                       temperature=cfg.gkd_temperature, alpha=cfg.gkd_alpha, beta=cfg.gkd_beta,
                       lamda=cfg.gkd_lamda, k=cfg.gkd_k, tau=cfg.gkd_tau,
                       rank_by=cfg.gkd_rank_by, warmup_epochs=cfg.gkd_warmup_epochs,
                       sample_rate=cfg.sample_rate,
                       teacher_embedding_size=cfg.teacher_embedding_size,
                       tau_batch=cfg.get("gkd_tau_batch"), margin=kind)
    margin_head = MarginSoftmaxHead(cfg.embedding_size, cfg.num_classes, margin=kind, s=s, m=m,
                                    sample_rate=cfg.sample_rate,
                                    margin_grad=cfg.get("margin_grad", "straight_through"))
    if method == "none":
        return margin_head
    if method != "feature_mse":
        raise ValueError(f"config key 'distill' must be one of {list(METHODS)}, got {method!r}")
    from plugins.composite import MarginWithFeatureKD
    from plugins.feature_kd import FeatureMSEHead
    return MarginWithFeatureKD(margin_head, FeatureMSEHead(), cfg.feature_kd_weight)


def head_loss(head: nn.Module, method: str, student: torch.Tensor,
              teacher: Optional[torch.Tensor], labels: torch.Tensor, epoch: int) -> torch.Tensor:
    """Call ``head`` with the arguments its method takes (local batch tensors)."""
    if method == "none":
        return head(student, labels)
    if method == "gkd":
        return head(student, teacher, labels, epoch)
    return head(student, teacher, labels)


def build_teacher_source(cfg, device=None, num_images: Optional[int] = None):
    """The teacher-embedding source of a run, or None when the method needs no teacher.

    Both sources answer ``teacher_embeddings(images [B,3,112,112], index [B], flipped [B])`` with
    fp32 embeddings [B, D_t]: the cache (``cfg.teacher_cache``, checked against the teacher
    checkpoint, network, dataset and ``num_images``) looks them up, the hook runs the frozen
    teacher."""
    if cfg.distill not in NEEDS_TEACHER:
        return None
    if cfg.teacher_cache:
        from host.teacher_cache_build import open_teacher_cache
        return open_teacher_cache(cfg, num_images=num_images, force=cfg.teacher_cache_force)
    from host.precision import AMP_DTYPES
    from plugins.teacher import build_teacher
    return build_teacher(cfg.teacher_network, cfg.teacher_checkpoint,
                         embedding_size=cfg.teacher_embedding_size, device=device,
                         fp16=cfg.teacher_fp16,
                         autocast_dtype=AMP_DTYPES[cfg.get("amp_dtype", "auto")])


def teacher_class_means(cfg, teacher) -> Optional[torch.Tensor]:
    """GKD without a teacher classifier: per-class means of the cached teacher embeddings
    ([C, D_t], one pass over the cache); None when the config names a classifier."""
    if cfg.distill != "gkd" or cfg.teacher_classifier:
        return None
    from host.teacher_cache_build import class_mean_classifier_from_cache
    return class_mean_classifier_from_cache(teacher, None, cfg.num_classes)
