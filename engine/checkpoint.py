"""Atomic, verified, resumable, world-size-portable training checkpoints.

Layout below ``<output>/checkpoints/``::

    step_000012345/
        common.pt     rank 0: student backbone, epoch, step, samples consumed, scaler, config,
                      run identity (engine/run_identity)
        rank_<r>.pt   every rank: head state (its class shard), optimizer state, RNG states
        meta.json     written last: format, step, world size, run, size and sha256 of every file

Every rank writes into ``step_<n>.tmp/``; after a barrier rank 0 writes ``meta.json`` and renames
the folder.  A job killed at any moment leaves either the previous checkpoints untouched or a
``.tmp`` folder that is never loaded (and removed at the next start-up).  Nothing non-finite is
ever written: ``save`` checks every tensor first (all ranks agree) and raises
``NonFiniteStateError`` naming the first bad tensor and the newest good checkpoint.  Loading
takes the newest checkpoint whose meta.json is well formed and whose files all match their size
and sha256 and load (``weights_only=True``) with the expected keys; otherwise it falls back to
older ones with a warning naming the file.  A checkpoint of W ranks resumes on W' ranks:
class-sharded head state and its optimizer moments are joined and re-split by the Partial FC rule.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from plugins.atomic_io import atomic_torch_save
from plugins.distributed import rank_and_world
from plugins.sharded_state import reshard_state

LOG = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{9})$")
META_FORMAT = 2
COMMON_KEYS = ("backbone", "epoch", "global_step", "consumed")
RANK_KEYS = ("rank", "world_size", "head", "optimizer", "rng")


class NonFiniteStateError(RuntimeError):
    """A checkpoint was about to be written with a NaN/inf tensor (it is not written)."""


def first_nonfinite(obj: Any, prefix: str = "") -> Optional[Tuple[str, int, int]]:
    """``(name, bad_count, numel)`` of the first floating tensor in ``obj`` (nested dicts, lists)
    holding a NaN or inf, in insertion order; None when all are finite."""
    if torch.is_tensor(obj):
        if obj.is_floating_point() or obj.is_complex():
            bad = int((~torch.isfinite(obj)).sum())
            if bad:
                return prefix, bad, obj.numel()
        return None
    items = obj.items() if isinstance(obj, dict) else (
        enumerate(obj) if isinstance(obj, (list, tuple)) else ())
    for key, value in items:
        found = first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


def collective_device() -> torch.device:
    """Where a small tensor must live for a collective: the current GPU under nccl (which cannot
    reduce CPU tensors), the CPU otherwise."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def rng_state() -> Dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states, in types ``weights_only`` loads."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "python": (py_version, list(py_internal), py_gauss),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _head_param_names(head: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[int, str]:
    """Optimizer state index -> head parameter name, for the head's parameters."""
    index_of = {}
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            index_of[id(param)] = index
            index += 1
    return {index_of[id(p)]: name for name, p in head.named_parameters() if id(p) in index_of}


class CheckpointManager:
    """Saves and restores the complete training state of every rank.

    Args:
        output: the run's output folder.
        keep: how many checkpoints to keep (older ones are deleted after a successful save).
    """

    def __init__(self, output: str, keep: int = 2) -> None:
        self.root = os.path.join(output, "checkpoints")
        self.keep = max(int(keep), 1)

    # ----------------------------------------------------------------------------- saving
    def save(self, step: int, common: Dict[str, Any], head: torch.nn.Module,
             optimizer: torch.optim.Optimizer) -> str:
        """Write checkpoint ``step`` collectively (every rank must call it)."""
        rank, world = rank_and_world()
        final = os.path.join(self.root, f"step_{step:09d}")
        tmp = final + ".tmp"
        per_rank = {"rank": rank, "world_size": world, "head": head.state_dict(),
                    "optimizer": optimizer.state_dict(), "rng": rng_state()}
        self._refuse_nonfinite(step, common if rank == 0 else {}, per_rank)
        if rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        atomic_torch_save(per_rank, os.path.join(tmp, f"rank_{rank}.pt"))
        if rank == 0:
            atomic_torch_save(dict(common, world_size=world), os.path.join(tmp, "common.pt"))
        _barrier()
        if rank == 0:
            names = sorted(os.listdir(tmp))
            files = {name: os.path.getsize(os.path.join(tmp, name)) for name in names}
            digests = {name: _file_sha256(os.path.join(tmp, name)) for name in names}
            run = common.get("run") or {}
            meta = {"format": META_FORMAT, "step": step, "world_size": world, "files": files,
                    "sha256": digests, "config_name": run.get("config_name", ""),
                    "run_digest": run.get("digest", "")}
            with open(os.path.join(tmp, "meta.json"), "w") as handle:
                json.dump(meta, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        _barrier()
        return final

    def _refuse_nonfinite(self, step: int, common: Dict[str, Any],
                          per_rank: Dict[str, Any]) -> None:
        """Raise NonFiniteStateError on every rank when any rank holds a NaN/inf tensor."""
        found = first_nonfinite(common)
        where = "common.pt"
        if found is None:
            found, where = first_nonfinite(per_rank), f"rank_{per_rank['rank']}.pt"
        flag = torch.tensor([0 if found is None else 1], device=collective_device())
        if rank_and_world()[1] > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) == 0:
            return
        newest = self.newest()
        what = (f"tensor '{found[0]}' ({where}) holds {found[1]} non-finite of {found[2]} values"
                if found else "another rank holds a non-finite tensor")
        resume = (f"the newest good checkpoint is {newest}: lower lr (or check the data) and "
                  f"continue it with --resume" if newest else
                  "there is no earlier checkpoint: lower lr (or check the data) and start again")
        raise NonFiniteStateError(f"checkpoint step {step} not written: {what}; {resume}")

    def newest(self) -> Optional[str]:
        """The newest complete-looking checkpoint folder, or None."""
        found = self.list()
        return found[0] if found else None

    def _prune(self) -> None:
        for path in self.list()[self.keep:]:
            shutil.rmtree(path, ignore_errors=True)

    # ---------------------------------------------------------------------------- loading
    def list(self) -> List[str]:
        """Complete-looking checkpoint folders, newest first."""
        if not os.path.isdir(self.root):
            return []
        names = sorted((n for n in os.listdir(self.root) if _STEP_DIR.match(n)), reverse=True)
        return [os.path.join(self.root, n) for n in names]

    @staticmethod
    def _read(path: str, rank: int, world: int) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
        """Load and check one checkpoint folder; raise ValueError naming what is wrong."""
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise ValueError(f"{meta_path} missing (interrupted save)")
        try:
            with open(meta_path) as handle:
                meta = json.load(handle)
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{meta_path}: not valid JSON ({err})") from err
        _check_meta(meta_path, meta)
        files, digests = meta["files"], meta.get("sha256")
        for name, size in files.items():
            file_path = os.path.join(path, name)
            if not os.path.isfile(file_path) or os.path.getsize(file_path) != size:
                raise ValueError(f"{file_path}: missing or not {size} bytes as meta.json says")
        saved_world = meta["world_size"]
        wanted = [rank] if saved_world == world else list(range(saved_world))

        def load(name: str, required: Tuple[str, ...]) -> Dict[str, Any]:
            file_path = os.path.join(path, name)
            if name not in files:
                raise ValueError(f"{file_path}: not listed in meta.json")
            with open(file_path, "rb") as handle:
                data = handle.read()
            if digests is not None and _sha256(data) != digests.get(name):
                raise ValueError(f"{file_path}: sha256 differs from meta.json (corrupt file)")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise ValueError(f"{file_path}: holds a {type(obj).__name__}, not a dict")
            missing = [key for key in required if key not in obj]
            if missing:
                raise ValueError(f"{file_path}: lacks the key(s) {missing}")
            return obj

        common = load("common.pt", COMMON_KEYS)
        shards = [load(f"rank_{r}.pt", RANK_KEYS) for r in wanted]
        return dict(common, saved_world_size=saved_world), shards

    def load_latest(self) -> Optional[Tuple[str, Dict[str, Any], List[Dict[str, Any]]]]:
        """The newest checkpoint that loads completely on EVERY rank, or None.

        Ranks agree collectively (one all-reduce per candidate), so a file that only one rank
        fails to read makes all ranks fall back together.  Unusable checkpoints are skipped with a
        warning naming them."""
        rank, world = rank_and_world()
        for path in self.list():
            try:
                loaded = self._read(path, rank, world)
                error = ""
            except (ValueError, OSError, RuntimeError, KeyError, TypeError, AttributeError,
                    EOFError, pickle.UnpicklingError) as err:
                loaded, error = None, str(err)
            usable = torch.tensor([0 if loaded is None else 1], device=collective_device())
            if world > 1:
                dist.all_reduce(usable, op=dist.ReduceOp.MIN)
            if int(usable) == 1:
                return (path,) + loaded
            LOG.warning("checkpoint %s is unusable (%s); trying the one before", path,
                        error or "another rank could not read its part")
        return None

    @staticmethod
    def restore(common: Dict[str, Any], shards: List[Dict[str, Any]], head: torch.nn.Module,
                optimizer: torch.optim.Optimizer) -> None:
        """Load head, optimizer and RNG state for this rank, re-splitting class shards when the
        checkpoint was written by another world size."""
        rank, world = rank_and_world()
        keys = tuple(head.sharded_keys)
        if common["saved_world_size"] == world:
            own = shards[0]
            head.load_state_dict(own["head"])
            optimizer.load_state_dict(own["optimizer"])
            set_rng_state(own["rng"])
            return
        num_classes = head.num_classes
        source = f"checkpoint of {common['saved_world_size']} ranks"
        head.load_state_dict(reshard_state([s["head"] for s in shards], keys, num_classes,
                                           rank, world, source))
        optim_state = shards[0]["optimizer"]
        names = _head_param_names(head, optimizer)
        for index, name in names.items():
            if name not in keys or index not in optim_state["state"]:
                continue
            per_rank = [s["optimizer"]["state"][index] for s in shards]
            moments = [k for k, v in per_rank[0].items() if torch.is_tensor(v) and v.dim() > 0]
            resplit = reshard_state(per_rank, moments, num_classes, rank, world, source)
            optim_state["state"][index] = resplit
        optimizer.load_state_dict(optim_state)
        # RNG streams cannot be mapped between world sizes: derive fresh ones per rank.
        torch.manual_seed(int(common["global_step"]) * 1000 + rank)
        np.random.seed((int(common["global_step"]) * 1000 + rank) % 2**32)
        random.seed(int(common["global_step"]) * 1000 + rank)


def _check_meta(meta_path: str, meta: Any) -> None:
    """Raise ValueError unless ``meta`` is a meta.json this module wrote."""
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, found {type(meta).__name__}")
    for key, kind in (("step", int), ("world_size", int), ("files", dict)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ValueError(f"{meta_path}: key '{key}' missing or not {kind.__name__}")
    if meta["world_size"] < 1:
        raise ValueError(f"{meta_path}: world_size {meta['world_size']} < 1")
    files = meta["files"]
    needed = ["common.pt"] + [f"rank_{r}.pt" for r in range(meta["world_size"])]
    missing = [name for name in needed if name not in files]
    if missing:
        raise ValueError(f"{meta_path}: 'files' lacks {missing}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in files.values()):
        raise ValueError(f"{meta_path}: 'files' sizes must be integers")
    if meta.get("format", 1) >= 2:       # format 1 (sizes only) was written before sha256
        digests = meta.get("sha256")
        if not isinstance(digests, dict) or set(digests) != set(files) or not all(
                isinstance(v, str) and len(v) == 64 for v in digests.values()):
            raise ValueError(f"{meta_path}: 'sha256' must give a digest for every file")
