"""Build the teacher-embedding cache (format: ``plugins/teacher_cache.py``) -- once, resumably,
on every rank of the job.

``python train_distill.py configs/<name> --build-teacher-cache`` calls ``build_from_config``;
under ``torchrun --nproc_per_node=8`` the eight ranks share the work.  The images are split into
chunks of ``chunk_size`` consecutive indices; each rank embeds its share of the unfinished chunks
(image and mirror, two teacher embeddings per image), writes them into the memory-mapped file in
place, flushes, and marks the chunk done with an atomic marker file.  A killed build re-run with
the same command continues with the unfinished chunks only.  meta.json says ``complete: true``
only after a barrier, once every chunk marker exists: a cache that looks complete is complete.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.dataset import collate_batch
from plugins.distributed import all_reduce, rank_and_world
from plugins.teacher import TeacherHook, build_teacher
from plugins.teacher_cache import (CHUNKS_DIR, DTYPES, EMBEDDINGS_FILE, FORMAT_VERSION,
                                   IDENTITY_KEYS, LABELS_FILE, LAYOUT_KEYS, META_FILE,
                                   cache_identity, chunk_ranges,
                                   create_storage, finished_chunks, mark_chunk_done,
                                   meta_differences, open_rows_for_write, read_meta,
                                   collective_device)
from plugins.atomic_io import save_json

DEFAULT_CHUNK_SIZE = 8192  # images per resumable unit (~10 s of an r50 on one GPU)


def _agree(failure: Optional[BaseException], device: torch.device) -> None:
    """A barrier that raises on every rank if any rank failed (none waits forever).  ``device``
    holds the flag: CUDA under nccl, CPU under gloo."""
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int64, device=device)
    all_reduce(flag, "max")
    if failure is not None:
        raise failure
    if int(flag) != 0:
        raise RuntimeError("teacher cache build: another rank failed (see its error); stopping")


def _storage_fits(path: str, meta: Mapping[str, Any]) -> bool:
    """Whether the arrays of a partial cache exist with the shapes and dtype of ``meta``."""
    try:
        table = np.load(os.path.join(path, EMBEDDINGS_FILE), mmap_mode="r")
        labels = np.load(os.path.join(path, LABELS_FILE), mmap_mode="r")
    except (OSError, ValueError):
        return False
    return (table.shape == (meta["num_images"], 2, meta["embedding_size"])
            and table.dtype == np.dtype(DTYPES[meta["dtype"]])
            and labels.shape == (meta["num_images"],))


def _prepare(path: str, meta: Dict[str, Any], overwrite: bool) -> bool:
    """Rank 0: create the cache, or check that the existing one may be resumed.  Returns True
    when it is already complete."""
    meta_path = os.path.join(path, META_FILE)
    if os.path.isfile(meta_path):
        old = read_meta(path)
        diffs = meta_differences(old, meta, IDENTITY_KEYS + LAYOUT_KEYS)
        if not diffs:
            if old.get("complete") is True:
                return True
            if _storage_fits(path, meta):
                return False  # resume: keep the finished chunks
            # else: killed before the arrays existed -- start the build afresh below
        elif not overwrite:
            raise ValueError(
                f"teacher cache {path} exists and was made for something else:\n  "
                + "\n  ".join(diffs) + "\nrefusing to overwrite it: delete the folder, choose "
                f"another 'teacher_cache', or pass overwrite=True")
        save_json(meta_path, dict(old, complete=False))  # never complete from here on
        for name in (EMBEDDINGS_FILE, LABELS_FILE):
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
    elif os.path.isdir(path) and os.listdir(path):
        raise ValueError(f"teacher cache folder {path} is not empty and holds no {META_FILE}: "
                         f"refusing to write into it; choose an empty or new folder")
    os.makedirs(path, exist_ok=True)
    save_json(meta_path, dict(meta, complete=False))
    if os.path.isdir(os.path.join(path, CHUNKS_DIR)):
        shutil.rmtree(os.path.join(path, CHUNKS_DIR))
    create_storage(path, meta["num_images"], meta["embedding_size"], meta["dtype"])
    return False


def _chunk_batches(chunks: Sequence[tuple], batch_size: int) -> List[List[int]]:
    """Index batches that never cross a chunk boundary, in chunk order."""
    return [list(range(s, min(s + batch_size, stop)))
            for (_, start, stop) in chunks for s in range(start, stop, batch_size)]


@torch.no_grad()
def _embed_pairs(teacher: TeacherHook, images: torch.Tensor) -> torch.Tensor:
    """``[B, 2, D]`` fp32 on the host: teacher embeddings of the images and of their mirrors,
    one forward of the ``2B`` batch ``cat(images, flip(images))``.  A torch teacher gets the
    mirrors made on its device (a GPU receives B images, not 2B); an ONNX teacher reads host
    arrays, so its images stay on the host."""
    if isinstance(teacher, TeacherHook):
        images = images.to(teacher.device, non_blocking=True)
    both = teacher(torch.cat([images, torch.flip(images, dims=[3])]))
    batch = images.shape[0]
    return both.reshape(2, batch, -1).transpose(0, 1).cpu()


def _stored(pairs: torch.Tensor, np_dtype: type, wanted: List[int]) -> np.ndarray:
    """``pairs [B, 2, D]`` fp32 cast to the cache dtype; RuntimeError on a non-finite value or
    one beyond the dtype's range (an untrained teacher can exceed float16's 65504)."""
    values = pairs.numpy()
    with np.errstate(over="ignore"):
        stored = values.astype(np_dtype)
    if not np.isfinite(stored).all():
        where = "non-finite" if not np.isfinite(values).all() else \
            f"beyond {np.dtype(np_dtype).name} range (max |x| = {np.abs(values).max():.4g})"
        raise RuntimeError(f"build_teacher_cache: teacher embeddings of images {wanted[0]}.."
                           f"{wanted[-1]} are {where}; check teacher_checkpoint, or build with "
                           f"dtype='float32' for a teacher with very large outputs")
    return stored


def _embed_chunks(teacher: TeacherHook, dataset: torch.utils.data.Dataset, path: str,
                  mine: Sequence[tuple], batch_size: int, num_workers: int, np_dtype: type,
                  progress: bool, world: int) -> None:
    """Embed the chunks ``mine`` = ``[(chunk, start, stop), ...]`` and mark each one done."""
    batches = _chunk_batches(mine, batch_size)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                        collate_fn=collate_batch,    # numpy's stack in the main process
                        pin_memory=teacher.device.type == "cuda")
    bar = tqdm(total=sum(e - s for _, s, e in mine), unit="img", dynamic_ncols=True,
               desc=f"teacher cache (rank 0 of {world})", disable=not progress)
    current, rows, labels = None, None, None
    try:
        for wanted, (images, label, index, flipped) in zip(batches, loader):
            if bool(torch.as_tensor(flipped).any()):
                raise RuntimeError("build_teacher_cache: the dataset returned flipped images; "
                                   "build it with flip=False (the cache stores both views)")
            # A dataset with skip_bad replaces an undecodable image i by the next good one and
            # returns that one's index; training does the same, so row i is never looked up.
            if torch.as_tensor(index).tolist() != wanted and not getattr(dataset, "skip_bad",
                                                                          False):
                raise RuntimeError(f"build_teacher_cache: asked for images {wanted[0]}.."
                                   f"{wanted[-1]}, the dataset returned other indices")
            if current is None:
                current = next(chunk for chunk in mine if chunk[1] <= wanted[0] < chunk[2])
                rows, labels = open_rows_for_write(path, current[1], current[2])
            offset = wanted[0] - current[1]
            rows[offset:offset + len(wanted)] = _stored(_embed_pairs(teacher, images), np_dtype,
                                                        wanted)
            labels[offset:offset + len(wanted)] = torch.as_tensor(label).numpy()
            bar.update(len(wanted))
            if wanted[-1] == current[2] - 1:  # last batch of the chunk: flush, then mark
                rows.flush()
                labels.flush()
                mark_chunk_done(path, *current)
                current, rows, labels = None, None, None
    finally:
        bar.close()


def build_teacher_cache(teacher: TeacherHook,
                        dataset: torch.utils.data.Dataset,
                        path: str,
                        meta: Mapping[str, Any],
                        batch_size: int = 128,
                        num_workers: int = 2,
                        chunk_size: int = DEFAULT_CHUNK_SIZE,
                        dtype: str = "float16",
                        overwrite: bool = False,
                        progress: bool = True) -> str:
    """Embed every image of ``dataset`` and its mirror with ``teacher`` into the cache ``path``.

    Runs on all ranks of the initialised process group (one process otherwise): the unfinished
    chunks are dealt round-robin, ``unfinished[rank::world]`` (on a fresh build: chunk i on rank
    i % W).  Resumes a partial build with the same identity; returns at once if it is complete.

    Args:
        teacher: the frozen teacher (``plugins.teacher.build_teacher``).
        dataset: items ``(image [3, H, W] normalised, label, index, flipped)``, built with random
            flip off (checked: a flipped item raises).  Image ``i`` must come back with index i.
        path: the cache folder (created).
        meta: the identity, ``cache_identity(teacher.digest, network, rec, len(dataset), D)``.
        batch_size: images per teacher forward (each forward also embeds their mirrors: 2x).
        num_workers: DataLoader workers decoding images.
        chunk_size: images per resumable chunk.
        dtype: ``"float16"`` (default, half the disk) or ``"float32"``.
        overwrite: replace an existing cache made for something else (refused otherwise).
        progress: tqdm bar with ETA on rank 0 (counts rank 0's images).

    Returns:
        ``path``.
    """
    rank, world = rank_and_world()
    missing = [k for k in IDENTITY_KEYS if k not in meta]
    if missing:
        raise ValueError(f"build_teacher_cache: meta lacks {missing}; make it with "
                         f"plugins.teacher_cache.cache_identity")
    if meta["num_images"] != len(dataset):
        raise ValueError(f"build_teacher_cache: meta says {meta['num_images']} images, the "
                         f"dataset has {len(dataset)}")
    if dtype not in DTYPES:
        raise ValueError(f"teacher cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    full_meta = dict(meta, dtype=dtype, chunk_size=int(chunk_size),
                     format_version=FORMAT_VERSION, complete=False,
                     layout="embeddings [num_images, 2, D]: slot 0 plain, slot 1 mirrored")
    path = os.path.abspath(path)
    flags = collective_device()
    failure, complete = None, False
    if rank == 0:
        try:
            complete = _prepare(path, full_meta, overwrite)
        except (ValueError, OSError) as err:
            failure = err
    _agree(failure, flags)
    flag = torch.tensor([int(complete)], dtype=torch.int64, device=flags)
    all_reduce(flag, "max")
    if int(flag):
        return path

    ranges = chunk_ranges(len(dataset), chunk_size)
    unfinished = [(c, s, e) for c, (s, e) in enumerate(ranges) if c not in finished_chunks(path)]
    failure = None
    try:
        _embed_chunks(teacher, dataset, path, unfinished[rank::world], batch_size, num_workers,
                      DTYPES[dtype], progress and rank == 0, world)
    except Exception as err:  # re-raised below on this rank; the other ranks stop too
        failure = err
    _agree(failure, flags)
    failure = None
    if rank == 0:
        missing_chunks = sorted(set(range(len(ranges))) - finished_chunks(path))
        if missing_chunks:
            failure = RuntimeError(f"teacher cache {path}: chunks {missing_chunks[:10]} are not "
                                   f"marked done after every rank finished; re-run the build")
        else:
            save_json(os.path.join(path, META_FILE), dict(full_meta, complete=True))
    _agree(failure, flags)
    return path


def _init_distributed() -> bool:
    """Initialise the process group from torchrun's environment when needed; True if we did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available()
                                                      and dist.is_initialized()):
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return True


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _amp_dtype(cfg: Mapping[str, Any]) -> Optional[torch.dtype]:
    """The teacher's autocast dtype of config key ``amp_dtype`` (None for "auto")."""
    from plugins.builders import AMP_DTYPES
    return AMP_DTYPES[cfg.get("amp_dtype", "auto")]


def build_from_config(cfg: Mapping[str, Any], overwrite: bool = False,
                      chunk_size: int = DEFAULT_CHUNK_SIZE, dtype: str = "float16") -> str:
    """Everything ``--build-teacher-cache`` does: (initialise the process group under torchrun,)
    build the teacher and the flip-free dataset from the config, and fill ``cfg.teacher_cache``.

    Config keys read: rec, num_classes, seed, batch_size, num_workers, teacher_network,
    teacher_checkpoint, teacher_embedding_size, teacher_cache, teacher_fp16 (falling back to
    fp16 when a config lacks it), amp_dtype (default "auto") and skip_bad_records (default False).
    """
    from data.dataset import FaceRecordDataset
    from engine.runtime import resolve_num_workers

    if not cfg.get("teacher_cache"):
        raise ValueError("config key 'teacher_cache' is not set: name the folder that will hold "
                         "the teacher-embedding cache (about num_image x 2 x 512 x 2 bytes)")
    created = _init_distributed()
    try:
        teacher = build_teacher(cfg["teacher_network"], cfg["teacher_checkpoint"],
                                embedding_size=cfg["teacher_embedding_size"], device=_device(),
                                fp16=bool(cfg.get("teacher_fp16", cfg["fp16"])),
                                autocast_dtype=_amp_dtype(cfg))
        dataset = FaceRecordDataset(cfg["rec"], num_classes=cfg["num_classes"], flip=False,
                                    seed=cfg["seed"],
                                    skip_bad=bool(cfg.get("skip_bad_records", False)))
        meta = cache_identity(teacher.digest, cfg["teacher_network"], cfg["rec"], len(dataset),
                              cfg["teacher_embedding_size"])
        return build_teacher_cache(teacher, dataset, cfg["teacher_cache"], meta,
                                   batch_size=cfg["batch_size"],
                                   num_workers=resolve_num_workers(cfg["num_workers"],
                                                                   _device().type),
                                   chunk_size=chunk_size, dtype=dtype, overwrite=overwrite)
    finally:
        if created:
            dist.destroy_process_group()
