"""A fork's own loader made to yield ``(img, label, index, flipped)``, with train_distill.py's flips.

The teacher-embedding cache is keyed by (dataset index, flipped), and train_distill.py's dataset
mirrors image ``i`` in epoch ``e`` by ``plugins.flips.flip_flags(seed, e)``.  arcface_torch's
``get_dataloader`` (``MXFaceDataset`` over a .rec, ``RandomHorizontalFlip`` in its transform, a
``DistributedSampler``, ``DataLoaderX``) yields ``(img, label)`` and flips at random.  For a job of
ours the patch wraps the loader's construction, ``train_loader = keyed_loader(cfg,
get_dataloader(...))``, and unpacks the two extra items in the loop (``for _, (img, local_labels,
*sample_keys) in enumerate(train_loader)``).  The loader object stays the fork's (its class, its
workers, its device copies, its sampler and ``set_epoch``); two things change, in place:

- the batch sampler draws its indices from a wrapper of the fork's sampler that yields
  ``(index, epoch)`` (the sampler runs in the main process, so ``epoch`` is the fork's own
  ``sampler.epoch`` after its ``set_epoch``, or the number of passes for a sampler without one);
- the dataset gets a ``__getitems__`` (torch.utils.data's batched-fetch hook, torch >= 2.0) that
  takes the fork's random flip out of its transform, reads each item through the dataset's own
  ``__getitem__`` (its decoder, its normalisation), mirrors it where ``flip_flags`` says so (the
  width axis of the normalised ``[3, H, W]`` tensor, as the cache stores mirrors) and returns
  ``(img, label, index, flipped)``.

So the fork keeps its data pipeline, a job sees the mirrored images train_distill.py would give it
(config key ``flip`` honoured), and the cache gets its keys.  What a loader must be, each refused
by name when missing: a ``torch.utils.data.DataLoader`` over a map-style dataset with a
``BatchSampler`` (not DALI, not an iterable dataset); items ``(image tensor [3, H, W], label)``; a
transform (if the dataset has one) made only of ``ToPILImage``, ``ToTensor``, ``PILToTensor``,
``ConvertImageDtype``, ``Normalize(0.5, 0.5)`` and ``RandomHorizontalFlip`` -- any other
augmentation would train on images the cache does not hold.  With ``teacher_cache`` set such a
loader is refused (ValueError: what is missing and how to adapt it); without, the loader is left
as the fork made it, with a warning when ``flip = False`` cannot be honoured.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, Sampler

from .flips import flip_flags

LOG = logging.getLogger("kdface.fork_data")

# arcface_torch's base default; forks of 2022-01 .. 2022-05 have no `seed` key
DEFAULT_SEED = 2048
DETERMINISTIC_TRANSFORMS = ("ToPILImage", "ToTensor", "PILToTensor", "ConvertImageDtype",
                            "Normalize")
ADAPT = ("make the fork's loader a torch DataLoader over a map-style dataset whose items are "
         "(image tensor [3, H, W], label), with a batch_size (BatchSampler) and only "
         "RandomHorizontalFlip as augmentation (arcface_torch's get_dataloader over a .rec is "
         "such a loader), or train with train_distill.py, which reads the .rec itself")


class EpochKeyedSampler(Sampler):
    """Yields ``(index, epoch)`` for every index of ``sampler`` (the fork's), ``epoch`` read when
    a pass starts: ``sampler.epoch`` (DistributedSampler after ``set_epoch``), else the number of
    passes started so far."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler, self.passes = sampler, 0

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = int(getattr(self.sampler, "epoch", self.passes))
        self.passes += 1
        return ((int(index), epoch) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class _Unflipped:
    """Stands where the fork's ``RandomHorizontalFlip`` stood: the image unchanged."""

    def __call__(self, image: Any) -> Any:
        return image

    def __repr__(self) -> str:
        return "Unflipped(kdface: flips from (seed, epoch), see plugins/fork_data.py)"


class KeyedItems:
    """The ``__getitems__`` a keyed dataset gets: ``[(index, epoch), ...]`` ->
    ``[(img [3, H, W], label, index, flipped), ...]``."""

    def __init__(self, dataset: Any, seed: int, flip: bool) -> None:
        self.dataset, self.seed, self.flip = dataset, int(seed), bool(flip)
        self._epoch: Optional[int] = None
        self._flags = np.zeros(0, dtype=bool)

    def flipped(self, index: int, epoch: int) -> bool:
        if self._epoch != epoch:
            self._flags = flip_flags(self.seed, epoch, len(self.dataset), self.flip)
            self._epoch = epoch
        return bool(self._flags[index])

    def __call__(self, keys: Sequence[Tuple[int, int]]) -> List[tuple]:
        return [self.item(*key) for key in keys]

    def item(self, index: int, epoch: int) -> tuple:
        sample = self.dataset[index]
        if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and
                isinstance(sample[0], torch.Tensor) and sample[0].dim() == 3):
            got = (f"{len(sample)} items" if isinstance(sample, (tuple, list))
                   else type(sample).__name__)
            raise TypeError(f"keyed loader: {type(self.dataset).__name__}[{index}] gave {got}; "
                            f"expected (image tensor [3, H, W], label); {ADAPT}")
        image, label = sample
        flipped = self.flipped(index, epoch)
        if flipped:
            image = torch.flip(image, dims=[2])
        return image, label, index, flipped


def _transform_steps(transform: Any) -> List[Any]:
    """The steps of a ``Compose``-like transform (its ``transforms`` list), or ``[transform]``."""
    steps = getattr(transform, "transforms", None)
    return steps if isinstance(steps, list) else [transform]


def _transform_problem(transform: Any) -> Optional[str]:
    """Why the dataset's transform cannot be keyed, or None (nothing is changed)."""
    steps = _transform_steps(transform)
    if steps[0] is transform and type(transform).__name__ == "RandomHorizontalFlip":
        return "its transform is a bare RandomHorizontalFlip; wrap it in a Compose"
    for step in steps:
        name = type(step).__name__
        if name == "Normalize":
            mean = np.asarray(getattr(step, "mean", ()), dtype=float)
            std = np.asarray(getattr(step, "std", ()), dtype=float)
            if mean.size == 0 or not (np.allclose(mean, 0.5) and np.allclose(std, 0.5)):
                return (f"its transform normalises with mean {mean.tolist()} and std "
                        f"{std.tolist()}, not (x / 255 - 0.5) / 0.5 as the cache's images")
        elif name not in DETERMINISTIC_TRANSFORMS + ("RandomHorizontalFlip", "_Unflipped"):
            return (f"its transform applies {name}: the cache holds one embedding per image and "
                    f"one per mirror, so the horizontal flip must be the only augmentation")
    return None


def unkeyable(loader: Any) -> Optional[str]:
    """Why ``loader`` cannot be keyed (a sentence naming what is missing), or None."""
    if not isinstance(loader, DataLoader):
        return (f"the loader is a {type(loader).__name__}, not a torch DataLoader (DALI and "
                f"other pipelines decode and flip without telling which images they flipped)")
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        return f"its dataset {type(dataset).__name__} is iterable, not indexed"
    if not isinstance(loader.batch_sampler, BatchSampler):
        return (f"it has no BatchSampler (batch_sampler: "
                f"{type(loader.batch_sampler).__name__}); build it with batch_size and sampler")
    if not hasattr(type(dataset), "__getitem__") or not hasattr(type(dataset), "__len__"):
        return f"its dataset {type(dataset).__name__} has no __getitem__ / __len__"
    transform = getattr(dataset, "transform", None)
    return None if transform is None else _transform_problem(transform)


def is_keyed(loader: Any) -> bool:
    """Whether ``keyed_loader`` has keyed ``loader`` (it yields index and flip flag)."""
    return isinstance(getattr(loader, "batch_sampler", None), BatchSampler) and \
        isinstance(loader.batch_sampler.sampler, EpochKeyedSampler)


def keyed_loader(cfg, loader: Any) -> Any:
    """The fork's ``loader``, keyed in place for a job of ours (see the module docstring); the
    fork's own job (no ``distill`` key) gets it unchanged.

    Raises:
        ValueError: ``teacher_cache`` is set and the loader cannot be keyed (the message names
            what is missing and how to adapt the loader).
    """
    if "distill" not in cfg or is_keyed(loader):
        return loader
    problem = unkeyable(loader)
    if problem:
        if cfg.get("teacher_cache"):
            raise ValueError(f"config key 'teacher_cache' is set, but the fork's loader cannot "
                             f"yield the (index, flipped) the teacher-embedding cache is keyed "
                             f"by: {problem}. To adapt it: {ADAPT}")
        if not cfg.get("flip", True) and int(os.environ.get("RANK", "0")) == 0:
            LOG.warning("config key 'flip' = False is not honoured by the patched loop: the "
                        "fork's loader keeps its own augmentation (%s)", problem)
        return loader
    dataset = loader.dataset
    transform = getattr(dataset, "transform", None)
    if transform is not None:
        steps = _transform_steps(transform)
        steps[:] = [_Unflipped() if type(step).__name__ == "RandomHorizontalFlip" else step
                    for step in steps]
    dataset.__getitems__ = KeyedItems(dataset, cfg.get("seed", DEFAULT_SEED),
                                      cfg.get("flip", True))
    loader.batch_sampler.sampler = EpochKeyedSampler(loader.batch_sampler.sampler)
    return loader
