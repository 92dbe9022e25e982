"""The flip rule of training: which images are mirrored in an epoch, from ``(seed, epoch)``.

With flip-only augmentation an image reaches the student and the teacher as itself or mirrored,
and the teacher-embedding cache stores both ``[i, 0]`` (plain) and ``[i, 1]`` (mirrored).  A run
that draws its flips from this rule knows, for every sample, which of the two it trained on, in
every DataLoader worker, process and resumed run.  ``data/dataset.py`` (train_distill.py) and a
fork's keyed loader (``plugins/fork_data.py``) both draw their flips here, so a job sees the same
mirrored images in either loop.
"""
from __future__ import annotations

import numpy as np


def flip_flags(seed: int, epoch: int, num_images: int, flip: bool = True) -> np.ndarray:
    """``[num_images]`` bool: whether image ``i`` is mirrored in ``epoch`` (probability 0.5 per
    image, ``numpy.random.default_rng([seed, epoch])``); all False when ``flip`` is False."""
    if not flip:
        return np.zeros(num_images, dtype=bool)
    return np.random.default_rng([seed, epoch]).random(num_images) < 0.5
