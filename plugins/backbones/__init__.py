"""Face-recognition backbones with arcface_torch's (and AdaDistill's) state_dict layout.

``get_model(name, num_features=512, fp16=False, dropout=0.0, **options)`` builds a registered
network; ``list_models()`` names them; ``resolve_model(name, ...)`` prefers a fork's own
``backbones.get_model`` when the plugin runs inside an arcface_torch fork; ``load_backbone_weights``
loads a checkpoint and explains a mismatch.

=============  ==========  ====  ===============================================
name           parameters  keys  origin
=============  ==========  ====  ===============================================
r18            24.0M       187   arcface_torch iresnet18
r34            34.1M       331   arcface_torch iresnet34
r50            43.6M       475   arcface_torch iresnet50 (AdaDistill teacher)
r100           65.2M       925   arcface_torch iresnet100
r200           118.8M      1807  arcface_torch iresnet200
mbf            2.06M       333   arcface_torch MobileFaceNet
mbf_large      6.31M       606   arcface_torch MobileFaceNet, large
mobilefacenet  1.20M       331   AdaDistill's cavaface-style MobileFaceNet student
tiny_s/tiny_t  2.5M/4.2M   --    CPU demo and tests only
=============  ==========  ====  ===============================================
"""
from __future__ import annotations

import contextvars
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from typing import Any, Optional

import torch
from torch import nn

from ._registry import list_models, model_factory, register_model
# imported for their @register_model side effect, in the order list_models() reports
from . import iresnet, mobilefacenet, cavaface_mobilefacenet, tiny  # noqa: F401,I001
from .loading import load_backbone_weights

__all__ = ["get_model", "list_models", "register_model", "resolve_model", "load_backbone_weights"]

_LOG = logging.getLogger(__name__)
_COMMON_ARGS = ("num_features", "fp16", "dropout")


def get_model(name: str,
              num_features: int = 512,
              fp16: bool = False,
              dropout: float = 0.0,
              **options: Any) -> nn.Module:
    """Build the bundled backbone ``name`` (see ``list_models()``).

    Args:
        name: registered name, e.g. ``"r50"``, ``"mbf"``, ``"mobilefacenet"``.
        num_features: embedding size D of the ``[B, D]`` output.
        fp16: arcface_torch's flag: the convolutional trunk runs under autocast (float16 on CUDA,
            bfloat16 on CPU), the embedding head in fp32; weights stay fp32.  A ``torch.dtype``
            (e.g. ``torch.float16`` on a CPU) is the trunk's autocast dtype on any device.
        dropout: dropout before the embedding layer; networks without a dropout layer (mbf,
            mbf_large, mobilefacenet) accept only 0.0.
        **options: extra options a network declares; the only one today is
            ``use_checkpoint: bool`` of the iresnets (activation checkpointing per block).
            Anything else raises ValueError naming the options the network accepts.
    """
    factory = model_factory(name)
    params = inspect.signature(factory).parameters
    extra = [p for p in params if p not in _COMMON_ARGS]
    unknown = sorted(set(options) - set(extra))
    if unknown:
        raise ValueError(f"backbone {name!r} has no option(s) {unknown}; its extra options: "
                         f"{extra if extra else 'none'}")
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    # a torch.dtype is passed through: the trunk autocasts to it (see _common.trunk_autocast)
    fp16 = fp16 if isinstance(fp16, torch.dtype) else bool(fp16)
    kwargs = dict(options, num_features=num_features, fp16=fp16)
    if "dropout" in params:
        kwargs["dropout"] = float(dropout)
    elif dropout:
        raise ValueError(f"backbone {name!r} has no dropout layer; set dropout=0.0 "
                         f"(got {dropout})")
    return factory(**kwargs)


# True while resolve_model is calling a fork's get_model: a fork whose get_model falls back to
# resolve_model for names it does not know then reaches our get_model instead of looping.
_IN_FORK = contextvars.ContextVar("plugins_backbones_in_fork", default=False)


def fork_backbones_module() -> Optional[Any]:
    """The top-level ``backbones`` package of an arcface_torch fork, or None.

    None when no module ``backbones`` is importable, when it is this very package (imported
    under another name because ``plugins/`` is on ``sys.path``), or when it has no callable
    ``get_model`` (an unrelated package of that name).
    """
    module = sys.modules.get("backbones")
    if module is None:
        if importlib.util.find_spec("backbones") is None:
            return None
        module = importlib.import_module("backbones")
    origin = getattr(module, "__file__", None)
    if origin and os.path.realpath(origin) == os.path.realpath(__file__):
        return None
    if getattr(module, "get_model", None) is get_model or not callable(
            getattr(module, "get_model", None)):
        return None
    return module


def resolve_model(name: str, **kwargs: Any) -> nn.Module:
    """Build ``name`` with a fork's ``backbones.get_model`` first, else with ``get_model``.

    In a fork of arcface_torch (a top-level ``backbones`` package that is not this one), names
    the fork knows are built there, so its custom networks work; the fork signals an unknown
    name with ValueError, and the name then goes to the bundled registry.  ``kwargs`` go
    unchanged to whichever builds it (``num_features``, ``fp16``, ``dropout``, ...).  Re-entry
    from the fork's own fallback is detected and goes straight to the bundled registry.
    """
    fork = None if _IN_FORK.get() else fork_backbones_module()
    if fork is None:
        return get_model(name, **kwargs)
    token = _IN_FORK.set(True)
    try:
        model = fork.get_model(name, **kwargs)
    except ValueError as fork_error:
        _LOG.info("fork backbones.get_model does not build %r (%s); using the bundled one",
                  name, fork_error or "ValueError")
        try:
            return get_model(name, **kwargs)
        except ValueError as error:
            raise ValueError(f"{error} (the fork's backbones.get_model at "
                             f"{getattr(fork, '__file__', '?')} refused it too: "
                             f"{fork_error!r})") from fork_error
    finally:
        _IN_FORK.reset(token)
    if model is None:  # old arcface_torch get_model fell through and returned None
        return get_model(name, **kwargs)
    _LOG.info("backbone %r built by the fork's backbones.get_model", name)
    return model
