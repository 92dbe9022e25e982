"""The teacher-embedding cache: every training image's two possible teacher embeddings, on disk.

With flip-only augmentation an image reaches the teacher either as it is or mirrored, so its
teacher embedding is one of two vectors.  A cache stores both for every image, computed once
(``engine/teacher_cache_build.py``), and training reads them instead of running the teacher.

Format (a folder ``<path>/``, format version 1):

    embeddings.npy   numpy .npy array [num_images, 2, D], float16 (default) or float32,
                     read through a memory map; [i, 0] = plain image i, [i, 1] = mirrored image i
                     (``torch.flip(image, dims=[2])`` of the normalised image [3, H, W]);
                     embeddings are raw (not L2-normalised), like the teacher's output
    labels.npy       int64 [num_images], the dataset label of every image
    meta.json        what the cache was made from (``IDENTITY_KEYS``: teacher checkpoint digest,
                     teacher network, dataset fingerprint, image count, embedding size), plus
                     dataset_path (absolute, informative), dtype, chunk_size, format_version and
                     ``complete`` -- set to true atomically, only after every chunk is written
    chunks/NNNNNN.done  one marker per finished chunk of ``chunk_size`` consecutive images
                     (written atomically after the chunk's rows are flushed): a killed build
                     resumes with the unfinished chunks only

``TeacherEmbeddingCache`` opens a complete cache read-only and refuses to serve a run whose
teacher, dataset, image count or embedding size differ from the ones recorded.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .atomic_io import save_json
from .class_means import ClassMeanAccumulator
from .distributed import rank_and_world, shard_range
from .teacher import file_digest

FORMAT_VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
LABELS_FILE = "labels.npy"
META_FILE = "meta.json"
CHUNKS_DIR = "chunks"
DTYPES = {"float16": np.float16, "float32": np.float32}
# What a cache was made from; a run may only use a cache whose identity equals its own.
IDENTITY_KEYS = ("teacher_digest", "teacher_network", "dataset_fingerprint", "num_images",
                 "embedding_size")
# Additionally fixed once a build has started (a resumed build must use the same values).
LAYOUT_KEYS = ("format_version", "dtype", "chunk_size")
REBUILD_HINT = ("build the cache for this run with `python train_distill.py configs/<name> "
                "--build-teacher-cache` (torchrun for several GPUs), or point config key "
                "'teacher_cache' at another folder")


def dataset_fingerprint(root: str) -> str:
    """Identity of a RecordIO training set: sha256 of its ``.idx`` file and size of its ``.rec``.

    ``root`` is the folder of config key ``rec`` (holding ``train.rec`` / ``train.idx``) or the
    ``.rec`` file itself.  The .idx lists every record's byte offset, so re-encoding, adding or
    reordering any image changes it.  Independent of where the data lives: a moved copy of the
    same files has the same fingerprint.
    """
    if os.path.isdir(root):
        rec, idx = os.path.join(root, "train.rec"), os.path.join(root, "train.idx")
    else:
        rec, idx = root, os.path.splitext(root)[0] + ".idx"
    for name in (rec, idx):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"config key 'rec': {name} not found; the teacher cache "
                                    f"identifies the training set by its .rec and .idx files")
    sha = hashlib.sha256()
    with open(idx, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            sha.update(block)
    return f"idx-sha256:{sha.hexdigest()};rec-bytes:{os.path.getsize(rec)}"


def cache_identity(teacher_digest: str, teacher_network: str, dataset_root: str,
                   num_images: int, embedding_size: int) -> Dict[str, Any]:
    """The ``expect`` dict of a run (and the identity part of a new cache's meta.json)."""
    return {"teacher_digest": teacher_digest, "teacher_network": teacher_network,
            "dataset_path": os.path.abspath(dataset_root),
            "dataset_fingerprint": dataset_fingerprint(dataset_root),
            "num_images": int(num_images), "embedding_size": int(embedding_size)}


def read_meta(path: str) -> Dict[str, Any]:
    """The meta.json of the cache folder ``path``.

    Raises:
        FileNotFoundError: no meta.json (no cache there).
        ValueError: meta.json is not valid JSON.
    """
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"config key 'teacher_cache': no teacher cache at {path} "
                                f"({META_FILE} missing); {REBUILD_HINT}")
    with open(meta_path) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path}: not valid JSON ({err}); {REBUILD_HINT}") from err


def meta_differences(meta: Mapping[str, Any], expect: Mapping[str, Any],
                     keys: Tuple[str, ...]) -> List[str]:
    """``"field: cache has X, this run expects Y"`` for every key of ``keys`` in ``expect`` that
    differs from ``meta``."""
    return [f"{key}: cache has {meta.get(key)!r}, this run expects {expect[key]!r}"
            for key in keys if key in expect and meta.get(key) != expect[key]]


def chunk_ranges(num_images: int, chunk_size: int) -> List[Tuple[int, int]]:
    """``[(start, stop), ...]`` of the consecutive chunks covering ``range(num_images)``."""
    if num_images < 1 or chunk_size < 1:
        raise ValueError(f"need num_images >= 1 and chunk_size >= 1, got {num_images}, "
                         f"{chunk_size}")
    return [(s, min(s + chunk_size, num_images)) for s in range(0, num_images, chunk_size)]


def marker_path(path: str, chunk: int) -> str:
    return os.path.join(path, CHUNKS_DIR, f"{chunk:06d}.done")


def finished_chunks(path: str) -> Set[int]:
    """Numbers of the chunks whose completion marker exists."""
    folder = os.path.join(path, CHUNKS_DIR)
    if not os.path.isdir(folder):
        return set()
    return {int(name[:-len(".done")]) for name in os.listdir(folder)
            if name.endswith(".done") and name[:-len(".done")].isdigit()}


def mark_chunk_done(path: str, chunk: int, start: int, stop: int) -> None:
    """Atomically record that rows ``[start, stop)`` are written and flushed."""
    save_json(marker_path(path, chunk), {"chunk": chunk, "start": start, "stop": stop})


def create_storage(path: str, num_images: int, embedding_size: int, dtype: str) -> None:
    """Create (sparse, zero-filled) embeddings.npy [N, 2, D] and labels.npy [N] in ``path``."""
    if dtype not in DTYPES:
        raise ValueError(f"teacher cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    os.makedirs(os.path.join(path, CHUNKS_DIR), exist_ok=True)
    for name, shape, np_dtype in ((EMBEDDINGS_FILE, (num_images, 2, embedding_size),
                                   DTYPES[dtype]), (LABELS_FILE, (num_images,), np.int64)):
        array = np.lib.format.open_memmap(os.path.join(path, name), mode="w+",
                                          dtype=np_dtype, shape=shape)
        array.flush()
        del array


def open_rows_for_write(path: str, start: int, stop: int) -> Tuple[np.memmap, np.memmap]:
    """Writable memory maps of embeddings rows ``[start, stop)`` ([n, 2, D]) and their labels
    ([n]); ``.flush()`` them before marking the chunk done."""
    views = []
    for name in (EMBEDDINGS_FILE, LABELS_FILE):
        whole = np.load(os.path.join(path, name), mmap_mode="r")
        row_bytes = whole.dtype.itemsize * int(np.prod(whole.shape[1:], dtype=np.int64))
        views.append(np.memmap(os.path.join(path, name), dtype=whole.dtype, mode="r+",
                               offset=whole.offset + start * row_bytes,
                               shape=(stop - start,) + whole.shape[1:]))
        del whole
    return views[0], views[1]


class TeacherEmbeddingCache:
    """Read-only access to a complete teacher-embedding cache, checked against the run.

    Args:
        path: the cache folder (config key ``teacher_cache``).
        expect: what the run uses -- ``cache_identity(...)`` (keys from ``IDENTITY_KEYS`` and
            ``dataset_path``); every identity key given must match meta.json.  ``dataset_path``
            is informative: a different path with the same fingerprint (moved data) only warns.
            ``None`` checks nothing but completeness.
        force: serve the cache despite identity differences (warns instead of raising).  An
            incomplete cache is refused even then: its missing rows would be zeros.

    Raises:
        FileNotFoundError: no cache at ``path``.
        RuntimeError: the cache is incomplete or its files do not match its meta.json.
        ValueError: identity mismatch (message names every differing field), or unknown
            ``expect`` keys.

    The memory map opens lazily, once per process, so the object can be handed to DataLoader
    workers (fork or spawn).
    """

    def __init__(self, path: str, expect: Optional[Mapping[str, Any]] = None,
                 force: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.meta = read_meta(self.path)
        expect = dict(expect or {})
        unknown = set(expect) - set(IDENTITY_KEYS) - {"dataset_path"}
        if unknown:
            raise ValueError(f"TeacherEmbeddingCache: unknown expect keys {sorted(unknown)}; "
                             f"known: {list(IDENTITY_KEYS) + ['dataset_path']}")
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise RuntimeError(f"teacher cache {self.path}: format_version "
                               f"{self.meta.get('format_version')!r}, this code reads "
                               f"{FORMAT_VERSION}; {REBUILD_HINT}")
        if self.meta.get("complete") is not True:
            done = len(finished_chunks(self.path))
            total = len(chunk_ranges(self.meta["num_images"], self.meta["chunk_size"]))
            raise RuntimeError(
                f"teacher cache {self.path} is incomplete ({done} of {total} chunks written): "
                f"re-run `python train_distill.py configs/<name> --build-teacher-cache` to "
                f"finish it (it resumes where it stopped)")
        diffs = meta_differences(self.meta, expect, IDENTITY_KEYS)
        if diffs:
            message = (f"teacher cache {self.path} was made for another run:\n  "
                       + "\n  ".join(diffs) + f"\n{REBUILD_HINT}")
            if not force:
                raise ValueError(message)
            warnings.warn(message + "\n(served anyway: force=True)", stacklevel=2)
        elif "dataset_path" in expect and expect["dataset_path"] != self.meta.get("dataset_path"):
            warnings.warn(f"teacher cache {self.path} was built from {self.meta['dataset_path']}, "
                          f"this run reads {expect['dataset_path']} (same fingerprint: served)",
                          stacklevel=2)
        self.num_images = int(self.meta["num_images"])
        self.embedding_size = int(self.meta["embedding_size"])
        self.dtype = str(self.meta["dtype"])
        self.network = self.meta["teacher_network"]
        self.digest = self.meta["teacher_digest"]
        self._arrays: Optional[Tuple[np.ndarray, np.ndarray]] = None
        self._pid = -1
        table, _ = self._open()
        expected_shape = (self.num_images, 2, self.embedding_size)
        if table.shape != expected_shape or table.dtype != np.dtype(DTYPES[self.dtype]):
            raise RuntimeError(f"teacher cache {self.path}: {EMBEDDINGS_FILE} holds "
                               f"{table.dtype}{list(table.shape)}, meta.json says "
                               f"{self.dtype}{list(expected_shape)}; {REBUILD_HINT}")

    def _open(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._arrays is None or self._pid != os.getpid():
            self._arrays = (np.load(os.path.join(self.path, EMBEDDINGS_FILE), mmap_mode="r"),
                            np.load(os.path.join(self.path, LABELS_FILE), mmap_mode="r"))
            self._pid = os.getpid()
        return self._arrays

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"], state["_pid"] = None, -1
        return state

    def __len__(self) -> int:
        return self.num_images

    @property
    def labels(self) -> np.ndarray:
        """int64 [num_images] memory map of the dataset labels recorded by the build."""
        return self._open()[1]

    @property
    def table(self) -> np.ndarray:
        """The read-only memory map [num_images, 2, D] (stored dtype)."""
        return self._open()[0]

    def lookup(self, index: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        """Teacher embeddings ``[B, D]`` fp32 (on CPU) of images ``index [B]`` (int), mirrored
        where ``flipped [B]`` (bool) is True -- what the teacher returns for those images."""
        if index.dim() != 1 or flipped.shape != index.shape:
            raise ValueError(f"lookup expects index [B] and flipped [B], got "
                             f"{tuple(index.shape)} and {tuple(flipped.shape)}")
        rows = index.detach().cpu().numpy().astype(np.int64, copy=False)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_images):
            raise IndexError(f"teacher cache {self.path} has {self.num_images} images, "
                             f"got index range [{rows.min()}, {rows.max()}]")
        slots = flipped.detach().cpu().numpy().astype(np.int64)
        return torch.from_numpy(self.table[rows, slots].astype(np.float32, copy=False))

    def teacher_embeddings(self, images: Optional[torch.Tensor], index: torch.Tensor,
                           flipped: torch.Tensor) -> torch.Tensor:
        """The common "teacher embedding source" call (see ``TeacherHook``): ``f_t [B, D]`` fp32
        on the device of ``images`` (CPU when ``images`` is None); the pixels are not read."""
        out = self.lookup(index, flipped)
        if images is None or images.device.type == "cpu":
            return out
        if images.device.type == "cuda":
            out = out.pin_memory()
        return out.to(images.device, non_blocking=True)


def collective_device() -> torch.device:
    """Where tensors passed to collectives must live: the GPU under nccl, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def expected_meta(cfg: Mapping[str, Any], num_images: Optional[int] = None) -> Dict[str, Any]:
    """What a training run expects of its cache (the ``expect`` of ``TeacherEmbeddingCache``):
    the sha256 of ``cfg.teacher_checkpoint`` (hashed, not loaded), ``cfg.teacher_network``,
    ``cfg.teacher_embedding_size`` and the fingerprint of ``cfg.rec``; plus the image count when
    ``num_images`` (``len(dataset)``) is given -- without it the fingerprint alone identifies the
    data."""
    checkpoint = cfg["teacher_checkpoint"]
    if checkpoint is None or not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"config key 'teacher_checkpoint': {checkpoint!r} not found; the "
                                f"teacher cache is checked against the teacher's checkpoint")
    expect = cache_identity(file_digest(checkpoint), cfg["teacher_network"], cfg["rec"],
                            0 if num_images is None else num_images,
                            cfg["teacher_embedding_size"])
    if num_images is None:
        del expect["num_images"]
    return expect


def open_teacher_cache(cfg: Mapping[str, Any], num_images: Optional[int] = None,
                       force: bool = False) -> TeacherEmbeddingCache:
    """Open ``cfg.teacher_cache`` for training, checked against ``expected_meta(cfg,
    num_images)``."""
    return TeacherEmbeddingCache(cfg["teacher_cache"], expect=expected_meta(cfg, num_images),
                                 force=force)


def class_mean_classifier_from_cache(cache: TeacherEmbeddingCache,
                                     labels: Optional[torch.Tensor],
                                     num_classes: int,
                                     block: int = 65536) -> torch.Tensor:
    """A teacher classifier ``[C, D]`` fp32 from the cache, for GKD teachers saved without one.

    ``w_c`` = L2-normalised mean over the images of class c of the L2-normalised embeddings of the
    image *and* of its mirror (both views count as samples: the classifier sees what training
    feeds the teacher).  One pass over the cache; with several ranks each streams a contiguous
    share and the sums are all-reduced.

    Args:
        cache: an open, validated cache.
        labels: ``[num_images]`` labels; ``None`` uses the ones recorded in the cache.
        num_classes: ``C``.
        block: rows read per step.

    Raises:
        ValueError: wrong label count, a label outside ``[0, C)`` or a class without images.
    """
    if labels is None:
        labels = torch.from_numpy(np.array(cache.labels, dtype=np.int64))
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.shape != (cache.num_images,):
        raise ValueError(f"class_mean_classifier_from_cache: labels must be "
                         f"[{cache.num_images}], got {list(labels.shape)}")
    start, count = shard_range(cache.num_images, *rank_and_world())
    stop = start + count
    acc = ClassMeanAccumulator(num_classes, cache.embedding_size, device=collective_device())
    for s in range(start, stop, block):
        e = min(s + block, stop)
        views = torch.from_numpy(np.array(cache.table[s:e], dtype=np.float32))  # [n, 2, D]
        acc.update(views.reshape(-1, cache.embedding_size),
                   labels[s:e].repeat_interleave(2))
    return acc.all_reduce().result().cpu()
