"""Load a trained teacher classifier as a full ``[C, D]`` fp32 table (for ArcDistill/CosDistill
centers, AdaDistill initial centers or GKD's frozen teacher logits).

Accepted sources:

- arcface_torch ``save_all_states`` checkpoints: a directory holding ``checkpoint_gpu_{rank}.pt``
  for ranks ``0 .. W-1`` (any W), or the path of one of them.  Each holds
  ``state_dict_softmax_fc['weight']`` ``[num_local, D]``; the shards are checked against the
  Partial FC rule for W ranks and concatenated in rank order.
- one file, ``.npy`` (``numpy.load(allow_pickle=False)``) or anything ``torch.load`` reads with
  ``weights_only=True`` (``.pt``/``.pth``), holding:
  a tensor ``[C, D]`` or ``[D, C]`` (transposed as needed; when ``C == D`` pass ``layout``),
  a dict with ``'kernel'`` ``[D, C]`` (the AdaDistill header ``.pth``),
  a dict with ``'weight'`` ``[C, D]`` (a Partial FC / ``nn.Linear`` state_dict), either optionally
  prefixed with ``module.`` (a DDP state_dict), or a single-rank arcface_torch checkpoint dict.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from .distributed import shard_range

SHARD_PATTERN = re.compile(r"^checkpoint_gpu_(\d+)\.pt$")
LAYOUTS = ("CD", "DC")
FC_KEY = "state_dict_softmax_fc"


def _load_torch(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True,
                          mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) "
                         f"({type(err).__name__}: {err}); re-save the tensor or state_dict "
                         f"alone") from err


def _check_float(path: str, key: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        found = (f"{value.dtype} tensor" if isinstance(value, torch.Tensor)
                 else type(value).__name__)
        raise ValueError(f"{path}: {key} must be a floating-point tensor, found {found}")
    return value


def _check_shape(path: str, key: str, tensor: torch.Tensor, expected: tuple, what: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{path}: {key} has shape {list(tensor.shape)}, expected "
                         f"{list(expected)} ({what})")


def _shard_files(directory: str) -> List[str]:
    ranks: Dict[int, str] = {}
    for name in os.listdir(directory):
        match = SHARD_PATTERN.match(name)
        if match:
            ranks[int(match.group(1))] = os.path.join(directory, name)
    if not ranks:
        raise ValueError(f"{directory}: no checkpoint_gpu_{{rank}}.pt files found (arcface_torch "
                         f"writes them with save_all_states=True); pass a .pt/.pth/.npy file")
    world = max(ranks) + 1
    missing = [f"checkpoint_gpu_{r}.pt" for r in range(world) if r not in ranks]
    if missing:
        raise ValueError(f"{directory}: found ranks {sorted(ranks)} but {missing} missing; "
                         f"every rank's checkpoint of one run is needed")
    return [ranks[r] for r in range(world)]


def _fc_weight(path: str, checkpoint: Any) -> torch.Tensor:
    if not isinstance(checkpoint, Mapping) or FC_KEY not in checkpoint:
        keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"{path}: key '{FC_KEY}' missing (found {keys}); was the teacher "
                         f"trained with save_all_states=True?")
    fc = checkpoint[FC_KEY]
    if not isinstance(fc, Mapping) or "weight" not in fc:
        keys = sorted(fc) if isinstance(fc, Mapping) else type(fc).__name__
        raise ValueError(f"{path}: key '{FC_KEY}.weight' missing (found {keys})")
    return _check_float(path, f"{FC_KEY}.weight", fc["weight"])


def _load_shards(directory: str, num_classes: int, embedding_size: int) -> torch.Tensor:
    files = _shard_files(directory)
    world = len(files)
    shards = []
    for rank, path in enumerate(files):
        weight = _fc_weight(path, _load_torch(path))
        num_local = shard_range(num_classes, rank, world)[1]
        _check_shape(path, f"{FC_KEY}.weight", weight, (num_local, embedding_size),
                     f"rank {rank} of {world} for num_classes={num_classes}, "
                     f"embedding_size={embedding_size}")
        shards.append(weight.float())
    return torch.cat(shards, dim=0)


def _orient(path: str, key: str, tensor: torch.Tensor, num_classes: int, embedding_size: int,
            layout: Optional[str]) -> torch.Tensor:
    """Return ``tensor`` as ``[C, D]``; ``layout`` says how it is stored ("CD" or "DC")."""
    cd, dc = (num_classes, embedding_size), (embedding_size, num_classes)
    if layout is None:
        if tuple(tensor.shape) == cd and cd == dc:
            raise ValueError(f"{path}: {key} is square {list(tensor.shape)} (num_classes == "
                             f"embedding_size), so its layout is ambiguous; pass layout='CD' "
                             f"([num_classes, embedding_size]) or layout='DC'")
        if tuple(tensor.shape) not in (cd, dc):
            raise ValueError(f"{path}: {key} has shape {list(tensor.shape)}, expected "
                             f"[num_classes, embedding_size] = {list(cd)} or the transpose "
                             f"{list(dc)}")
        layout = "CD" if tuple(tensor.shape) == cd else "DC"
    expected = cd if layout == "CD" else dc
    _check_shape(path, key, tensor, expected,
                 f"layout {layout}, num_classes={num_classes}, embedding_size={embedding_size}")
    return tensor if layout == "CD" else tensor.t()


def _from_object(path: str, obj: Any, num_classes: int, embedding_size: int,
                 layout: Optional[str]) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return _orient(path, "tensor", _check_float(path, "tensor", obj), num_classes,
                       embedding_size, layout)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a tensor or a dict with 'kernel' [D, C] or 'weight' "
                         f"[C, D], found {type(obj).__name__}")
    if FC_KEY in obj:
        weight = _fc_weight(path, obj)
        return _orient(path, f"{FC_KEY}.weight", weight, num_classes, embedding_size, "CD")
    found = [k for k in ("kernel", "weight", "module.kernel", "module.weight") if k in obj]
    if len(found) != 1:
        what = "both " + " and ".join(found) if found else "none"
        raise ValueError(f"{path}: expected exactly one of the keys 'kernel' [D, C] or 'weight' "
                         f"[C, D] (optionally 'module.'-prefixed), found {what} among keys "
                         f"{sorted(obj)}")
    key = found[0]
    value = _check_float(path, key, obj[key])
    return _orient(path, key, value, num_classes, embedding_size,
                   "DC" if key.endswith("kernel") else "CD")


def load_teacher_classifier(path: str, num_classes: int, embedding_size: int,
                            layout: Optional[str] = None) -> torch.Tensor:
    """Read a teacher classifier (see the module docstring) as ``[num_classes, embedding_size]``.

    Args:
        path: a directory of arcface_torch ``checkpoint_gpu_{rank}.pt`` files, one of those files,
            or a single ``.pt``/``.pth``/``.npy`` file.
        num_classes: C, checked against the file.
        embedding_size: D, checked against the file.
        layout: only for a bare tensor: ``"CD"`` (``[C, D]``) or ``"DC"`` (``[D, C]``); needed
            when ``C == D``, otherwise inferred from the shape.

    Returns:
        a contiguous fp32 CPU tensor ``[C, D]`` (class rows).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, missing key, wrong shape, dtype or layout; the message
            names the file, the key, the expected and the found shape.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or None, got {layout!r}")
    if num_classes < 1 or embedding_size < 1:
        raise ValueError(f"num_classes and embedding_size must be >= 1, got {num_classes}, "
                         f"{embedding_size}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher classifier not found: {path}")
    if os.path.isdir(path):
        table = _load_shards(path, num_classes, embedding_size)
    elif SHARD_PATTERN.match(os.path.basename(path)):
        table = _load_shards(os.path.dirname(os.path.abspath(path)), num_classes, embedding_size)
    elif path.endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{path}: not a plain numeric .npy array ({err})") from err
        if array.dtype.kind != "f":
            raise ValueError(f"{path}: array must be floating point, found dtype {array.dtype}")
        table = _orient(path, "array", torch.from_numpy(array), num_classes, embedding_size,
                        layout)
    else:
        table = _from_object(path, _load_torch(path), num_classes, embedding_size, layout)
    bad = int((~torch.isfinite(table)).sum())
    if bad:
        rows = torch.nonzero(~torch.isfinite(table).all(dim=1)).flatten()
        raise ValueError(f"{path}: the teacher classifier holds {bad} non-finite (NaN/inf) "
                         f"values, in {rows.numel()} class row(s), first class {int(rows[0])}; "
                         f"export it again from a healthy teacher checkpoint")
    return table.to(dtype=torch.float32).contiguous().clone()
