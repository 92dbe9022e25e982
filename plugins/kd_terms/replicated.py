"""Gradients of replicated parameters (e.g. FitNet's regressor): each rank's backward holds only
its own samples' share, so the exact gradient of the global loss is their SUM over ranks."""
from __future__ import annotations

from typing import Iterable

import torch

from ..distributed import all_reduce


def sum_replicated_grads(parameters: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce (sum) the ``.grad`` of every parameter that has one; no-op on one process.
    Call after ``backward`` and before the optimizer step, in the same order on every rank."""
    for p in parameters:
        if p.grad is not None:
            all_reduce(p.grad, "sum")
