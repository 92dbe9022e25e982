"""Training data: the RecordIO face dataset, a resumable distributed sampler and the loader.

``FaceRecordDataset`` reads an arcface_torch training folder (``train.rec``, ``train.idx`` and
optionally ``property``) and returns ``(image [3, 112, 112], label, index, flipped)``.  The flip of
item ``i`` in epoch ``e`` comes from ``numpy.random.default_rng([seed, e])`` (``plugins.flips``, the
rule a fork's keyed loader shares), not from a worker's random state, so it is the same in every
worker, process and resumed run; the teacher-embedding cache relies on this to look embeddings up
by ``(index, flipped)``.  With ``pixels="uint8"`` the image is the decoded ``[112, 112, 3]`` bytes
(mirrored), normalised later on the training device by ``data.pixels.normalise_batch`` to the same
bits.

``ResumableDistributedSampler`` deals one permutation per epoch out as contiguous global batches:
the batch gathered over ranks is the same for any world size with the same global batch, and a run
resumed mid-epoch sees exactly the samples the interrupted run had not consumed.
"""
from __future__ import annotations

import logging
import os
import random
from functools import partial
from typing import Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from data.image_codec import decode_rgb
from data.pixels import normalise_image
from plugins.distributed import rank_and_world
from plugins.flips import flip_flags
from plugins.recordio import RecordReader, unpack

logger = logging.getLogger(__name__)

Item = Tuple[torch.Tensor, torch.Tensor, int, bool]
PIXELS = ("float", "uint8")


def read_property(path: str) -> Tuple[int, int, int]:
    """Parse an InsightFace ``property`` file ``num_classes,height,width``."""
    with open(path) as f:
        text = f.read().strip()
    try:
        values = tuple(int(v) for v in text.split(","))
        if len(values) != 3 or min(values) < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width' (e.g. '85742,112,112'), "
                         f"got {text[:60]!r}") from None
    return values  # type: ignore[return-value]


def image_keys(reader: RecordReader) -> np.ndarray:
    """Image record keys, resolved as arcface_torch does, ``[N]`` int64.

    When record 0 exists and has ``flag > 0`` it is an InsightFace header record whose
    ``label[0]`` is the first key after the images: the images are ``range(1, label[0])``.
    Otherwise every key of the ``.idx``, in file order.  Deviation: a record 0 with ``flag > 0``
    that carries an image (an im2rec set with several labels per image) is an image, not a
    header; arcface_torch would read ``range(1, label[0])`` there and lose the set.
    """
    if 0 in reader:
        header, body = reader.read(0)
        if header.flag > 0 and not body:
            end = int(header.label[0])
            if end < 1:
                raise ValueError(f"{reader.rec_path}: header record (key 0) gives {end} as the "
                                 f"end of the image keys; expected >= 1")
            return np.arange(1, end, dtype=np.int64)
    return reader.key_array.copy()


class FaceRecordDataset(Dataset):
    """Face images and class labels from an arcface_torch RecordIO folder.

    Args:
        root: folder with ``train.rec`` and ``train.idx`` (and ``property``, optional).
        num_classes: number of classes; default: from ``property``, else ``max(label) + 1``.
            Given together with ``property``, the two must agree.
        flip: random horizontal flip (probability 0.5), decided per ``(epoch, index)``.
        seed: seed of the flip decisions.
        skip_bad: drop records with a bad label or an unreadable header when indexing, and replace
            an undecodable image at item time by the next good record (see ``__getitem__``).
            Default False: the first bad record raises ValueError naming file, key and offset.
        image_size: expected decoded size (square), 112 for arcface_torch.
        pixels: ``"float"``: the image of an item is ``[3, S, S]`` float32 in [-1, 1] =
            ``(x / 255 - 0.5) / 0.5``; ``"uint8"``: the decoded ``[S, S, 3]`` uint8 RGB bytes
            (mirrored like the float image), for a loader that normalises on the training device
            (``data.pixels.normalise_batch``: the same float bits, a quarter of the bytes to pin
            and copy).  An attribute: it may be changed before a loader starts its workers.

    Item ``i``: ``(image, label int64 scalar tensor, index i, flipped bool)``; ``index`` and
    ``flipped`` identify the image exactly (the teacher-embedding cache key).
    """

    def __init__(self,
                 root: str,
                 num_classes: Optional[int] = None,
                 flip: bool = True,
                 seed: int = 0,
                 skip_bad: bool = False,
                 image_size: int = 112,
                 pixels: str = "float") -> None:
        if pixels not in PIXELS:
            raise ValueError(f"pixels must be one of {list(PIXELS)}, got {pixels!r}")
        self.root, self.pixels = os.fspath(root), pixels
        self.reader = RecordReader(os.path.join(self.root, "train.rec"),
                                   os.path.join(self.root, "train.idx"))
        self.flip, self.seed, self.skip_bad, self.image_size = flip, seed, skip_bad, image_size
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes} (config key "
                             f"'num_classes' for {self.root})")
        prop_path = os.path.join(self.root, "property")
        prop_classes = read_property(prop_path)[0] if os.path.isfile(prop_path) else None
        if num_classes is not None and prop_classes is not None and num_classes != prop_classes:
            raise ValueError(f"num_classes={num_classes} but {prop_path} says {prop_classes}; "
                             f"fix the config or the property file")
        num_classes = num_classes if num_classes is not None else prop_classes
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        keys, labels, problems = self._index(num_classes)
        if problems and not skip_bad:
            raise ValueError(f"{problems[min(problems)]} ({len(problems)} bad record(s) in all; "
                             f"skip_bad=True drops them)")
        if problems:
            logger.warning("%s: skipping %d bad records, e.g. %s", self.root, len(problems),
                           problems[min(problems)])
            keep = np.ones(keys.size, dtype=bool)
            keep[list(problems)] = False
            keys, labels = keys[keep], labels[keep]
        if keys.size == 0:
            raise ValueError(f"{self.root}: no usable image records")
        self.keys = keys
        self.offsets = self.reader.offsets_of(keys)      # [N] int64, one lookup per item saved
        self.labels = labels.astype(np.int64)
        self.num_classes = int(num_classes if num_classes is not None else self.labels.max() + 1)
        self.dropped = len(problems)
        self.skipped = 0
        # the epoch lives in shared memory so persistent DataLoader workers see set_epoch();
        # each process reads it through its own numpy view (no torch call per item)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._epoch_view: Optional[np.ndarray] = None
        self._flips_epoch: Optional[int] = None
        self._flips = np.zeros(0, dtype=bool)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_epoch_view"] = None       # a pickled view would be a copy: rebuilt from _epoch
        return state

    def _index(self, num_classes: Optional[int]) -> Tuple[np.ndarray, np.ndarray, Dict[int, str]]:
        """Image keys ``[N]``, their labels ``[N]`` (NaN if unreadable) and the problems found
        (position -> message): unreadable headers, labels that are not a class id."""
        keys = image_keys(self.reader)
        labels, problems = self.reader.scan_labels(keys)
        upper = np.inf if num_classes is None else num_classes
        bad = ~np.isnan(labels) & ((labels != np.floor(labels)) | (labels < 0) | (labels >= upper))
        valid = f"[0, {num_classes})" if num_classes is not None else "non-negative integers"
        for i in np.flatnonzero(bad).tolist():
            key = int(keys[i])
            problems[i] = (f"{self.reader.rec_path}: key {key}, byte offset "
                           f"{self.reader.offset(key)}: label {float(labels[i])} is not a class "
                           f"id in {valid}; fix the data or num_classes")
        return keys, labels, problems

    def __len__(self) -> int:
        return int(self.keys.size)

    # -- flips -------------------------------------------------------------------------------
    def flip_flags(self, epoch: int) -> np.ndarray:
        """``[N]`` bool: whether item ``i`` is mirrored in ``epoch`` (all False without flip)."""
        return flip_flags(self.seed, epoch, len(self), self.flip)

    def set_epoch(self, epoch: int) -> None:
        """Select the flip decisions of ``epoch`` (call before iterating the loader)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch[0] = epoch

    @property
    def epoch(self) -> int:
        if self._epoch_view is None:
            self._epoch_view = self._epoch.numpy()
        return int(self._epoch_view[0])

    def flipped(self, index: int) -> bool:
        """Flip decision of item ``index`` in the current epoch."""
        epoch = self.epoch
        if self._flips_epoch != epoch:
            self._flips, self._flips_epoch = self.flip_flags(epoch), epoch
        return bool(self._flips[index])

    # -- items -------------------------------------------------------------------------------
    def _where(self, index: int) -> str:
        return (f"{self.reader.rec_path}: key {int(self.keys[index])}, byte offset "
                f"{int(self.offsets[index])}")

    def decode(self, index: int) -> np.ndarray:
        """``[S, S, 3]`` uint8 RGB image of item ``index`` (not flipped).

        Raises ValueError naming file, key and byte offset if it cannot be decoded."""
        where = self._where(index)
        _, body = unpack(self.reader.read_at(int(self.offsets[index]), int(self.keys[index])),
                         where)
        try:
            img = decode_rgb(body)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}; skip_bad=True replaces such records") from exc
        if img.shape != (self.image_size, self.image_size, 3):
            raise ValueError(f"{where}: image is {img.shape[1]}x{img.shape[0]}, expected "
                             f"{self.image_size}x{self.image_size} aligned faces")
        return img

    def __getitem__(self, index: int) -> Item:
        """Item ``index``; with ``skip_bad`` an undecodable image is replaced by the next good
        record (``index + 1``, ... wrapping around), and the returned ``index``/``flipped`` are
        those of the record actually returned, so ``(index, flipped)`` always names the image.
        A batch may then hold one record twice; ``self.skipped`` counts the replacements (per
        process: each DataLoader worker has its own count)."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        for attempt in range(len(self)):
            current = (index + attempt) % len(self)
            try:
                img = self.decode(current)
            except ValueError as exc:
                if not self.skip_bad:
                    raise
                self.skipped += 1
                logger.warning("skipped %d undecodable records so far: %s", self.skipped, exc)
                continue
            flipped = self.flipped(current)
            if self.pixels == "uint8":
                image = torch.from_numpy(cv2.flip(img, 1) if flipped else
                                         np.require(img, requirements=["C", "W"]))
            else:
                image = torch.from_numpy(normalise_image(img, flipped))
            return image, torch.from_numpy(np.array(self.labels[current])), current, flipped
        raise ValueError(f"{self.root}: no decodable image in the whole dataset")


class ResumableDistributedSampler(Sampler[int]):
    """Per-epoch permutation dealt out as contiguous global batches; resumable mid-epoch.

    Args:
        num_samples: dataset size ``N``.
        batch_size: per-rank batch ``B``; the global batch is ``G = W * B``.
        num_replicas: world size ``W``; default from the process group (1 without one).
        rank: this rank; default from the process group.
        shuffle: permute with ``numpy.random.default_rng([seed, epoch])``; else identity order.
        seed: permutation seed (the same on every rank).

    Step ``s`` of an epoch gives rank ``r`` the indices
    ``perm[c + s*G + r*B : c + s*G + (r+1)*B]`` where ``c`` is the number of samples of this
    epoch already consumed (``set_epoch(epoch, consumed)``).  The global batch gathered in rank
    order is therefore ``perm[c + s*G : c + (s+1)*G]``, whatever ``W`` is.  Incomplete last global
    batches are dropped (``drop_last``).  Use with ``DataLoader(batch_size=B, drop_last=True)``.
    """

    def __init__(self,
                 num_samples: int,
                 batch_size: int,
                 num_replicas: Optional[int] = None,
                 rank: Optional[int] = None,
                 shuffle: bool = True,
                 seed: int = 0) -> None:
        if num_replicas is None or rank is None:
            default_rank, default_world = rank_and_world()
            num_replicas = default_world if num_replicas is None else num_replicas
            rank = default_rank if rank is None else rank
        if num_samples < 0 or batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"ResumableDistributedSampler needs num_samples >= 0, batch_size >= 1"
                             f" and 0 <= rank < num_replicas; got num_samples={num_samples}, "
                             f"batch_size={batch_size}, rank={rank}, num_replicas={num_replicas}")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.consumed = 0, 0

    @property
    def global_batch(self) -> int:
        return self.num_replicas * self.batch_size

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        """Select ``epoch``, skipping the first ``consumed`` samples of its permutation
        (steps already done x global batch, counted over all ranks)."""
        if epoch < 0 or not 0 <= consumed <= self.num_samples:
            raise ValueError(f"set_epoch needs epoch >= 0 and 0 <= consumed <= {self.num_samples}"
                             f", got epoch={epoch}, consumed={consumed}")
        self.epoch, self.consumed = int(epoch), int(consumed)

    def steps(self) -> int:
        """Global steps left in the current epoch."""
        return (self.num_samples - self.consumed) // self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        """``[N]`` int64 sample order of ``epoch`` (same on every rank)."""
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def indices(self) -> np.ndarray:
        """``[steps * B]`` this rank's indices for the rest of the current epoch."""
        g, b = self.global_batch, self.batch_size
        steps = self.steps()
        block = self.permutation(self.epoch)[self.consumed:self.consumed + steps * g]
        return block.reshape(steps, self.num_replicas, b)[:, self.rank].reshape(-1)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.steps() * self.batch_size


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Optimizer steps in a full epoch (incomplete global batches dropped)."""
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    return num_samples // global_batch


def _seed_worker(seed: int, worker_id: int) -> None:
    # torch seeds each worker from the loader generator; derive numpy/random from it too
    worker_seed = (torch.initial_seed() + seed) % 2 ** 32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def can_pin_memory() -> bool:
    """Whether pinned host memory means anything here: an accelerator torch can copy to."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def collate_batch(items: List[tuple]) -> tuple:
    """``default_collate``, except in the main process (``num_workers = 0``), where the images
    are stacked by numpy into a C-order batch (contiguous, like torch's stack: the memory format
    decides the conv kernels, so the bits).  In the main process torch's stack copies each of
    the B items in its own intra-op parallel region, and on busy cores every region waits for a
    descheduled thread (0.37 s per 32 images measured on 2 loaded cores); DataLoader workers run
    single-threaded and there ``default_collate`` also stacks straight into shared memory."""
    if get_worker_info() is not None:
        return default_collate(items)
    images = torch.from_numpy(np.stack([item[0].numpy() for item in items]))     # C order
    return (images, *default_collate([item[1:] for item in items]))


def make_loader(dataset: Dataset,
                sampler: Sampler,
                batch_size: int,
                num_workers: int,
                pin_memory: bool = True,
                seed: int = 0) -> DataLoader:
    """DataLoader over ``sampler`` with ``drop_last``, seeded workers, persistent workers when
    ``num_workers > 0``, ``collate_batch`` and pinned memory only where an accelerator (CUDA,
    ...) is available.

    Args:
        dataset: map-style dataset (e.g. ``FaceRecordDataset``).
        sampler: index sampler (e.g. ``ResumableDistributedSampler``); call its and the dataset's
            ``set_epoch`` before each ``iter(loader)``.
        batch_size: per-rank batch ``B``.
        num_workers: worker processes (0 = load in the main process); a config's ``"auto"`` is
            resolved before (``engine.runtime.resolve_num_workers``).
        pin_memory: pin batches for asynchronous host-to-GPU copies; a request that is a no-op
            (and passed to the DataLoader as False, without its warning) with no accelerator.
        seed: seed of the workers' torch/numpy/random states.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"make_loader: num_workers must be an int >= 0, got {num_workers!r}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    extra = {"persistent_workers": True, "prefetch_factor": 2} if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_batch, pin_memory=pin_memory and can_pin_memory(),
                      drop_last=True, worker_init_fn=partial(_seed_worker, seed),
                      generator=generator, **extra)


__all__: List[str] = ["FaceRecordDataset", "ResumableDistributedSampler", "collate_batch",
                      "image_keys", "make_loader", "read_property", "steps_per_epoch"]
