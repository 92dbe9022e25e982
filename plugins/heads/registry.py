"""Name -> head class registry of the distillation methods (``cfg.distill``).

A head file registers its class with ``@register_head("name", needs_teacher=..., ...)``; the
flags tell the config checks and the trainer what the method needs (a teacher, the teacher's
classifier, equal student/teacher embedding sizes) and ``keys`` declares the config keys the
method adds (their defaults, descriptions, accepted types and choices), so a new method is one
file in ``plugins/heads/`` plus a job config.  Registering a name twice warns and the later class
wins (as ``plugins.backbones.register_model``).
"""
from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

TEACHER_CLASSIFIER = ("no", "optional", "required", "or_class_means")

# key -> (default, description, types) or (default, description, types, choices)
KeySpec = Tuple[Any, ...]


@dataclass(frozen=True)
class HeadSpec:
    """What the registry knows about one method.

    Attributes:
        name: the ``cfg.distill`` value.
        cls: the ``DistillHead`` subclass; ``cls.from_config(cfg, teacher_classifier)`` builds it.
        needs_teacher: the loss reads teacher embeddings (a teacher or a cache must be set).
        teacher_classifier: ``"no"`` | ``"optional"`` (used when configured) | ``"required"``
            | ``"or_class_means"`` (required, but class means of the teacher cache may stand in).
        same_dim: student and teacher embeddings must have the same size.
        keys: config keys the method adds: ``{key: (default, description, types[, choices])}``.
        summary: first line of the class docstring.
    """
    name: str
    cls: type
    needs_teacher: bool
    teacher_classifier: str
    same_dim: bool
    keys: Dict[str, KeySpec] = field(default_factory=dict)
    summary: str = ""


_HEADS: Dict[str, HeadSpec] = {}
_LISTENERS: List[Callable[[HeadSpec], None]] = []


def on_register(listener: Callable[[HeadSpec], None]) -> None:
    """Call ``listener(spec)`` for every head registered so far and every later one (the config
    tables of ``plugins.config_defaults`` follow the registry this way, also for a head a test or
    a fork registers after start-up)."""
    _LISTENERS.append(listener)
    for spec in list(_HEADS.values()):
        listener(spec)


def _check_keys(name: str, keys: Dict[str, KeySpec]) -> Dict[str, KeySpec]:
    for key, spec in keys.items():
        if not isinstance(key, str) or not isinstance(spec, tuple) or len(spec) not in (3, 4) \
                or not isinstance(spec[2], tuple) or not isinstance(spec[1], str):
            raise ValueError(f"register_head({name!r}): keys[{key!r}] must be (default, "
                             f"description, types_tuple[, choices_tuple]), got {spec!r}")
        if len(spec) == 4 and not isinstance(spec[3], tuple):
            raise ValueError(f"register_head({name!r}): keys[{key!r}] choices must be a tuple, "
                             f"got {spec[3]!r}")
    return dict(keys)


def register_head(name: str, *, needs_teacher: bool, teacher_classifier: str = "no",
                  same_dim: bool = False, keys: Optional[Dict[str, KeySpec]] = None
                  ) -> Callable[[type], type]:
    """Class decorator registering a ``DistillHead`` subclass under ``name`` (``cfg.distill``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_head needs a non-empty string name, got {name!r}")
    if teacher_classifier not in TEACHER_CLASSIFIER:
        raise ValueError(f"register_head({name!r}): teacher_classifier must be one of "
                         f"{TEACHER_CLASSIFIER}, got {teacher_classifier!r}")
    checked = _check_keys(name, keys or {})

    def decorate(cls: type) -> type:
        if not callable(getattr(cls, "from_config", None)):
            raise TypeError(f"register_head({name!r}): {cls.__qualname__} has no from_config "
                            f"classmethod (subclass plugins.heads.DistillHead)")
        if name in _HEADS:
            old = _HEADS[name].cls
            warnings.warn(f"head name {name!r} is registered twice: {old.__module__}."
                          f"{old.__qualname__} is replaced by {cls.__module__}.{cls.__qualname__}",
                          RuntimeWarning, stacklevel=2)
        doc = (cls.__doc__ or "").strip().splitlines()
        spec = HeadSpec(name, cls, bool(needs_teacher), teacher_classifier, bool(same_dim),
                        checked, doc[0] if doc else "")
        _HEADS[name] = spec
        for listener in _LISTENERS:
            listener(spec)
        return cls

    return decorate


def head_names() -> List[str]:
    """Registered method names, in registration order."""
    return list(_HEADS)


def head_spec(name: str) -> HeadSpec:
    """The spec registered under ``name``; ValueError listing the valid names otherwise."""
    try:
        return _HEADS[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(_HEADS), n=1, cutoff=0.5)
        hint = f" -- did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"config key 'distill': unknown method {name!r}{hint}; valid names: "
                         f"{', '.join(_HEADS)}") from None


def build_head(cfg, teacher_classifier: Optional[torch.Tensor] = None):
    """The loss head of ``cfg.distill``; ``teacher_classifier`` ``[C, D_t]`` overrides loading
    it from ``cfg.teacher_classifier`` (e.g. class means of the teacher cache)."""
    return head_spec(cfg.distill).cls.from_config(cfg, teacher_classifier)


def check_embedding_sizes(method: str, student_dim: int, teacher_dim: int) -> None:
    """Refuse, at start-up, a student/teacher embedding size pair the method cannot train: a
    ``same_dim`` method (AdaDistill, ArcDistill/CosDistill, feature MSE put student embeddings
    against teacher embeddings or centers made of them) needs ``student_dim == teacher_dim``.

    Raises:
        ValueError: sizes differ for a ``same_dim`` method, or the method is unknown.
    """
    if head_spec(method).same_dim and student_dim != teacher_dim:
        others = [name for name in _HEADS if not _HEADS[name].same_dim
                  and _HEADS[name].needs_teacher]
        raise ValueError(
            f"distill={method!r} needs the student and teacher embeddings to have the same size, "
            f"got embedding_size={student_dim} (student) and teacher_embedding_size={teacher_dim} "
            f"(teacher): set both config keys to the same value, or use a method that allows "
            f"different sizes ({', '.join(repr(n) for n in others)})")
