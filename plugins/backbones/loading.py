"""Load a backbone checkpoint strictly, and explain a mismatch in terms of network names.

``load_backbone_weights(model, path_or_state_dict, network_name)`` accepts what arcface_torch and
AdaDistill write: a bare state_dict (``model.pt``, ``<step>backbone.pth``), a dict holding it under
``state_dict_backbone`` (``checkpoint_gpu_<rank>.pt``) or ``state_dict``, with or without the
``module.`` prefix of DistributedDataParallel (or ``_orig_mod.`` of ``torch.compile``).  Any
missing key, unexpected key or wrong shape raises ValueError listing the first few of each, the
counts, and which registered networks would accept the checkpoint (compared against key/shape
signatures built on the meta device, so no large network is materialised).
"""
from __future__ import annotations

import functools
import os
import pickle
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ._registry import ModelFactory, list_models, model_factory

Shape = Tuple[int, ...]
WRAPPER_KEYS = ("state_dict_backbone", "state_dict", "model", "backbone")
PREFIXES = ("module.", "_orig_mod.")
SHOW = 5  # entries listed per category in an error message


def _unwrap(checkpoint: Mapping, source: str) -> Dict[str, torch.Tensor]:
    """The backbone tensors of ``checkpoint`` with wrapper dicts and prefixes removed."""
    state = checkpoint
    while not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((k for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"{source}: no backbone state_dict found; top-level keys "
                             f"{list(state)[:10]}, expected tensors or one of {WRAPPER_KEYS}")
        state = state[inner]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source}: entries {bad[:SHOW]} are not tensors; pass the backbone "
                         f"state_dict (or a dict holding it under one of {WRAPPER_KEYS})")
    result = dict(state)
    for prefix in PREFIXES:
        if result and all(k.startswith(prefix) for k in result):
            result = {k[len(prefix):]: v for k, v in result.items()}
    return result


def read_state_dict(path_or_state_dict: Union[str, os.PathLike, Mapping]
                    ) -> Dict[str, torch.Tensor]:
    """Tensors of a backbone checkpoint file (``torch.load(weights_only=True)`` on CPU) or dict."""
    if isinstance(path_or_state_dict, Mapping):
        return _unwrap(path_or_state_dict, "state_dict")
    path = os.fspath(path_or_state_dict)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: not loadable with torch.load(weights_only=True): {error}") \
            from error
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: holds a {type(checkpoint).__name__}, not a state_dict")
    return _unwrap(checkpoint, path)


def network_signature(name: str, num_features: int = 512) -> Tuple[Tuple[str, Shape], ...]:
    """``(key, shape)`` pairs of the registered network ``name``, built on the meta device (no
    memory; about 0.1 s for r200) and cached per factory and embedding size."""
    return _signature(model_factory(name), num_features)


@functools.lru_cache(maxsize=None)
def _signature(factory: ModelFactory, num_features: int) -> Tuple[Tuple[str, Shape], ...]:
    with torch.device("meta"):
        model = factory(num_features=num_features)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _embedding_size(state: Mapping[str, torch.Tensor]) -> Optional[int]:
    """D of a checkpoint: every bundled network ends with a BatchNorm1d over the embedding, whose
    ``running_mean`` is the last such entry in state_dict order."""
    means = [v for k, v in state.items() if k.endswith("running_mean") and v.dim() == 1]
    return int(means[-1].shape[0]) if means else None


def fitting_networks(state: Mapping[str, torch.Tensor]) -> List[str]:
    """Registered networks whose keys and shapes equal ``state``'s, as ``name`` or
    ``name(num_features=D)`` when D is not 512."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    sizes = sorted({512, _embedding_size(state) or 512})
    fits = []
    for name in list_models():
        if {k for k, _ in network_signature(name)} != shapes.keys():
            continue
        for size in sizes:
            if dict(network_signature(name, size)) == shapes:
                fits.append(name if size == 512 else f"{name}(num_features={size})")
                break
    return fits


def _shape(shape: Shape) -> str:
    return str(list(shape))


def mismatch_report(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """None if ``state`` fits ``model`` exactly, else the lines describing the differences."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and expected[k] != found[k]]
    if not (missing or unexpected or wrong):
        return None
    lines = [f"{len(missing)} missing keys, {len(unexpected)} unexpected keys, "
             f"{len(wrong)} wrong shapes (model has {len(expected)} keys, checkpoint "
             f"{len(found)})"]
    if missing:
        lines.append("missing: " + ", ".join(
            f"{k} {_shape(expected[k])}" for k in missing[:SHOW]))
    if unexpected:
        lines.append("unexpected: " + ", ".join(
            f"{k} {_shape(found[k])}" for k in unexpected[:SHOW]))
    if wrong:
        lines.append("wrong shape: " + ", ".join(
            f"{k} expected {_shape(expected[k])} found {_shape(found[k])}" for k in wrong[:SHOW]))
    return "\n  ".join(lines)


def load_backbone_weights(model: nn.Module,
                          state_dict_or_path: Union[str, os.PathLike, Mapping],
                          network_name: str, config_key: str = "network") -> nn.Module:
    """Load a backbone checkpoint into ``model`` strictly; returns ``model``.

    Args:
        model: the backbone (a DDP / DataParallel wrapper is unwrapped).
        state_dict_or_path: a checkpoint path (loaded on CPU with ``weights_only=True``) or a
            dict; wrappers and ``module.`` prefixes are removed (see module docstring).
        network_name: the name ``model`` was built from, for the error message.
        config_key: the config key that chose ``network_name`` (``teacher_network`` for a
            teacher), named in the hint.

    Raises:
        ValueError: the checkpoint does not fit; the message names the file (when a path was
            given), lists the first missing / unexpected / wrongly shaped keys with expected vs
            found shapes, the counts, and the registered networks the checkpoint would fit.
    """
    target = model.module if isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model
    state = read_state_dict(state_dict_or_path)
    report = mismatch_report(target, state)
    if report is not None:
        source = ("state_dict" if isinstance(state_dict_or_path, Mapping)
                  else f"checkpoint {os.fspath(state_dict_or_path)}")
        fits = fitting_networks(state)
        hint = (f"it fits: {', '.join(fits)}" if fits
                else "it fits none of the registered networks " + ", ".join(list_models()))
        raise ValueError(f"{source} does not fit backbone {network_name!r}:\n  {report}\n  "
                         f"{hint}; set the network name (config key '{config_key}') accordingly")
    target.load_state_dict(state, strict=True)
    return model
