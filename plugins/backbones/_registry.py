"""Name -> constructor registry of the bundled backbones (the timm pattern).

A factory is registered under the name configs use (``cfg.network``), e.g. ``"r50"``.  Every
factory takes the keyword arguments ``num_features: int`` and ``fp16: bool``; ``dropout: float``
only when the network has a dropout layer; any further keyword it declares is an "extra option"
that ``get_model`` forwards and documents in its error messages.
"""
from __future__ import annotations

import fnmatch
import warnings
from typing import Callable, Dict, List

from torch import nn

ModelFactory = Callable[..., nn.Module]

_FACTORIES: Dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``factory`` under ``name``; registering a name twice warns and the
    later factory wins (so a fork can override a bundled network on purpose)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_model needs a non-empty string name, got {name!r}")

    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in _FACTORIES:
            warnings.warn(
                f"backbone name {name!r} is registered twice: {_FACTORIES[name].__module__}."
                f"{_FACTORIES[name].__qualname__} is replaced by "
                f"{factory.__module__}.{factory.__qualname__}", RuntimeWarning, stacklevel=2)
        _FACTORIES[name] = factory
        return factory

    return decorate


def list_models(pattern: str = "*") -> List[str]:
    """Registered names matching the shell-style ``pattern`` (``"r*"``), in registration order."""
    return [name for name in _FACTORIES if fnmatch.fnmatchcase(name, pattern)]


def model_factory(name: str) -> ModelFactory:
    """The factory registered under ``name``; ValueError listing the valid names otherwise."""
    try:
        return _FACTORIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown backbone {name!r}; valid names: {', '.join(list_models())}") from None
