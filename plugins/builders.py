"""Config -> the pieces of a distillation run: start-up checks, the loss head (the registry of
``plugins.heads``), the teacher-embedding source (frozen teacher or its cache) and, for a method
that may use them, the teacher's class means.

Used by train_distill.py (engine/trainer.py) and by a fork's patched train_v2.py
(``plugins.fork_loop``), so both build exactly the same objects from the same keys.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .heads import build_head, check_embedding_sizes, head_names, head_spec  # noqa: F401
from .heads.base import margin_from_config

# config key amp_dtype -> the autocast dtype (None: float16 on GPUs, fp32 on CPU)
AMP_DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


# arcface_torch job keys the distillation code reads (a fork's base.py does not define them).
REQUIRED_JOB_KEYS = ("rec", "num_classes", "num_epoch", "warmup_epoch")


def check_config(cfg) -> None:
    """Start-up checks that would otherwise fail mid-run, each naming the config key; what the
    method needs (teacher, teacher classifier, equal embedding sizes) comes from its registered
    ``HeadSpec``."""
    missing = [key for key in REQUIRED_JOB_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"config lacks the job key(s) {missing}: set them in configs/<job>.py "
                         f"(a fork's configs/base.py does not define them)")
    if cfg.distill not in head_names():
        raise ValueError(f"config key 'distill' must be one of {head_names()}, "
                         f"got {cfg.distill!r}")
    for key, ok in (("dali", False), ("using_wandb", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"config key '{key}' = {cfg[key]!r} is not supported; set it to {ok}")
    if cfg.get("interclass_filtering_threshold", 0) not in (0, 0.0):
        raise ValueError("config key 'interclass_filtering_threshold' must be 0 (not supported)")
    method = cfg.distill
    spec = head_spec(method)
    check_embedding_sizes(method, cfg.embedding_size, cfg.teacher_embedding_size)
    means = spec.teacher_classifier == "or_class_means"
    if spec.teacher_classifier in ("required", "or_class_means") and not cfg.teacher_classifier \
            and not (means and cfg.teacher_cache):
        raise ValueError(f"distill='{method}' needs the teacher's classifier: set config key "
                         f"'teacher_classifier' to a checkpoint_gpu_*.pt folder or a [C, D] file"
                         + (" (or set teacher_cache to use class means)" if means else ""))
    if spec.needs_teacher and not cfg.teacher_cache:
        path = cfg.teacher_checkpoint
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(f"config key 'teacher_checkpoint' = {path!r}: file not found; "
                                    f"point it at the teacher's backbone.pth / model.pt "
                                    f"(or set teacher_cache to a built teacher-embedding cache)")
    margin_from_config(cfg)
    spec.cls.check_config(cfg)


def build_teacher_source(cfg, device=None, num_images: Optional[int] = None):
    """The teacher-embedding source of a run, or None when the method needs no teacher.

    Both sources answer ``teacher_embeddings(images [B,3,112,112], index [B], flipped [B])`` with
    fp32 embeddings [B, D_t]: the cache (``cfg.teacher_cache``, checked against the teacher
    checkpoint, network, dataset and ``num_images``) looks them up, the hook runs the frozen
    teacher."""
    if not head_spec(cfg.distill).needs_teacher:
        return None
    if cfg.teacher_cache:
        from .teacher_cache import open_teacher_cache
        return open_teacher_cache(cfg, num_images=num_images, force=cfg.teacher_cache_force)
    from .teacher import build_teacher
    return build_teacher(cfg.teacher_network, cfg.teacher_checkpoint,
                         embedding_size=cfg.teacher_embedding_size, device=device,
                         fp16=cfg.teacher_fp16,
                         autocast_dtype=AMP_DTYPES[cfg.get("amp_dtype", "auto")])


def teacher_class_means(cfg, teacher) -> Optional[torch.Tensor]:
    """A method whose teacher classifier may be class means (GKD), run without a teacher
    classifier: per-class means of the cached teacher embeddings ([C, D_t], one pass over the
    cache); None when the config names a classifier or the method takes none."""
    if head_spec(cfg.distill).teacher_classifier != "or_class_means" or cfg.teacher_classifier:
        return None
    from .teacher_cache import class_mean_classifier_from_cache
    return class_mean_classifier_from_cache(teacher, None, cfg.num_classes)
