"""Files that appear whole or not at all: write to a temporary name beside the target, fsync,
then rename over it (a crash leaves the previous file, or none, never a partial one)."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import numpy as np
import torch


@contextlib.contextmanager
def atomic_output(path: str, mode: str = "wb") -> Iterator:
    """Open a temporary file next to ``path``; on success fsync it and rename it over ``path``.

    A crash or exception leaves ``path`` untouched (the temporary file is removed).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npy(path: str, array: np.ndarray) -> None:
    """``np.save`` atomically (no pickle; exactly ``path``, no ``.npy`` appended)."""
    with atomic_output(path) as handle:
        np.save(handle, np.asarray(array), allow_pickle=False)


def save_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    with atomic_output(path, "w") as handle:
        handle.write(text)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` atomically."""
    with atomic_output(path) as handle:
        torch.save(obj, handle)
