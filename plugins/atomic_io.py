"""Files that appear whole or not at all: write to a temporary name beside the target, fsync,
then rename over it (a crash leaves the previous file, or none, never a partial one).  The one
writer of the toolkit: checkpoints, caches, evaluation results, exports, synthetic data."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch


@contextlib.contextmanager
def atomic_output(path: str, mode: str = "wb", durable: bool = True) -> Iterator:
    """Open a temporary file next to ``path``; on success fsync it (``durable``) and rename it
    over ``path``.

    A crash or exception leaves ``path`` untouched (the temporary file is removed).  Without
    ``durable`` the file is renamed without fsync: whole or absent after a crash of the process,
    but not necessarily after a power loss (bulk generated data that can be re-made).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


TMP_MARK = ".tmp."


def temporary_name(path: str) -> str:
    """``<dir>/.<name>.tmp.<pid>``: the temporary file ``atomic_output`` writes before renaming
    (start-up removes leftovers of a killed writer, see engine/run_guard)."""
    directory = os.path.dirname(os.path.abspath(path))
    return os.path.join(directory, f".{os.path.basename(path)}{TMP_MARK}{os.getpid()}")


def is_temporary_name(name: str) -> bool:
    head, mark, pid = name.rpartition(TMP_MARK)
    return name.startswith(".") and bool(mark) and bool(head) and pid.isdigit()


def _disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain (torch may wrap the OSError in a
    RuntimeError from its zip writer, ``enforce fail at inline_container.cc``)."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _tensor_bytes(obj: Any, depth: int = 0) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if depth > 20:
        return 0
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, depth + 1) for v in obj)
    return 0


def disk_full_error(path: str, needed: Optional[int], err: BaseException) -> OSError:
    """An OSError(ENOSPC) that names the folder, the space needed and the space free."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        free = f"{shutil.disk_usage(directory).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    need = f"needs about {needed / 1e6:.1f} MB" if needed else "needs more space"
    return OSError(errno.ENOSPC, f"disk full while writing {os.path.basename(path)} in "
                                 f"{directory}: it {need} ({free}); free space there or point "
                                 f"config.output elsewhere (the previous file is intact)")


def save_npy(path: str, array: np.ndarray) -> None:
    """``np.save`` atomically (no pickle; exactly ``path``, no ``.npy`` appended)."""
    with atomic_output(path) as handle:
        np.save(handle, np.asarray(array), allow_pickle=False)


def save_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    with atomic_output(path, "w") as handle:
        handle.write(text)


def save_bytes(path: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` atomically (``durable``: see ``atomic_output``)."""
    with atomic_output(path, "wb", durable=durable) as handle:
        handle.write(data)


def save_json(path: str, obj: Mapping[str, Any]) -> None:
    """Write ``obj`` as indented, key-sorted JSON (with a final newline) atomically."""
    save_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` atomically."""
    try:
        with atomic_output(path) as handle:
            torch.save(obj, handle)
    except (OSError, RuntimeError) as err:
        if _disk_full(err):
            raise disk_full_error(path, _tensor_bytes(obj), err) from err
        raise
