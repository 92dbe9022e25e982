"""Per-class mean embeddings: a classifier for teachers that were saved without one.

GKD needs the teacher's classifier weights ``[C, D_t]``.  When only the teacher backbone is
available (arcface_torch keeps the Partial FC shards only with ``save_all_states=True``), the
L2-normalised class mean of the teacher's embeddings is the usual substitute:

.. math::

    w_c = \\frac{\\sum_{i: y_i = c} \\hat f_i}{\\lVert \\sum_{i: y_i = c} \\hat f_i \\rVert_2},
    \\qquad \\hat f_i = f_i / \\lVert f_i \\rVert_2

The accumulator works in one streaming pass (e.g. over the teacher-embedding cache), keeps float64
sums and integer counts, and merges across ranks by summing both (``all_reduce``), so each rank may
stream its own part of the data set.
"""
from __future__ import annotations

import torch

from .distributed import all_reduce


class ClassMeanAccumulator:
    """Streaming, mergeable per-class sums and counts of embeddings.

    Args:
        num_classes: number of classes ``C``; labels must lie in ``[0, C)``.
        embedding_size: embedding dimension ``D``.
        normalize_inputs: L2-normalise every embedding before summing (the default: each face
            counts equally, whatever its feature norm).
        device: where the sums live (default CPU).
    """

    def __init__(self, num_classes: int, embedding_size: int, normalize_inputs: bool = True,
                 device: torch.device | str | None = None) -> None:
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"ClassMeanAccumulator needs num_classes >= 1 and embedding_size >= 1,"
                             f" got {num_classes} and {embedding_size}")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.normalize_inputs = normalize_inputs
        self.sums = torch.zeros(num_classes, embedding_size, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``embeddings [N, D]`` (any float dtype), ``labels [N]`` integer classes."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"ClassMeanAccumulator.update: embeddings must be [N, "
                             f"{self.embedding_size}], got {list(embeddings.shape)}")
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"ClassMeanAccumulator.update: labels must be [{embeddings.shape[0]}],"
                             f" got {list(labels.shape)}")
        if labels.numel() == 0:
            return
        labels = labels.to(self.counts.device, torch.int64)
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"ClassMeanAccumulator.update: labels must lie in [0, "
                             f"{self.num_classes}), found range [{low}, {high}]; check that "
                             f"num_classes matches the data set")
        x = embeddings.to(self.sums.device, torch.float64)
        if self.normalize_inputs:
            x = torch.nn.functional.normalize(x, dim=1)
        self.sums.index_add_(0, labels, x)
        self.counts += torch.bincount(labels, minlength=self.num_classes)

    def all_reduce(self) -> "ClassMeanAccumulator":
        """Sum the sums and counts of every rank (in place; no-op on one process).  Returns self."""
        all_reduce(self.sums, "sum")
        all_reduce(self.counts, "sum")
        return self

    @torch.no_grad()
    def result(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The classifier ``[C, D]``: the L2-normalised mean of each class.

        Raises ValueError when a class has no sample (its mean is undefined), naming how many
        classes are empty and the first few of them.
        """
        empty = torch.nonzero(self.counts == 0).flatten()
        if empty.numel() > 0:
            first = empty[:10].tolist()
            raise ValueError(f"ClassMeanAccumulator.result: {empty.numel()} of {self.num_classes}"
                             f" classes have no sample (first: {first}); stream the whole data "
                             f"set (and call all_reduce() when each rank saw a part) first")
        return torch.nn.functional.normalize(self.sums, dim=1).to(dtype)
