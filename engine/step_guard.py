"""A skipped (non-finite) optimizer step must leave no trace: the forward passes of its
micro-batches already moved the modules' buffers -- BatchNorm running mean/var and batch counts,
AdaDistill's EMA class centers -- before the loss could be checked.  ``BufferSnapshot`` copies
every buffer before the step's first forward and puts the copies back when the step is skipped.

Parameters and optimizer state need no copy: a skipped step never reaches ``optimizer.step``.
Buffers a head declares in ``frozen_keys`` (never changed by training, e.g. GKD's teacher
classifier) are not copied either.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn


class BufferSnapshot:
    """Copies of every buffer of ``modules``, refreshed by ``take`` and written back by ``restore``.

    Buffers are found by name each time, so a module that replaces a buffer tensor is still
    restored.  The copies are allocated once and reused (one device-to-device copy per buffer and
    step: BatchNorm stats are tiny; AdaDistill's centers shard is ``[C_local, D]``).

    Args:
        modules: the modules whose buffers a forward pass may change (student, head).
    """

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = modules
        self.copies: Dict[Tuple[int, str], torch.Tensor] = {}

    def _buffers(self):
        for index, module in enumerate(self.modules):
            frozen = set(getattr(module, "frozen_keys", ()))
            for name, buf in module.named_buffers():
                if name not in frozen:
                    yield (index, name), buf

    @torch.no_grad()
    def take(self) -> None:
        for key, buf in self._buffers():
            copy = self.copies.get(key)
            if copy is None or copy.shape != buf.shape or copy.dtype != buf.dtype \
                    or copy.device != buf.device:
                self.copies[key] = buf.detach().clone()
            else:
                copy.copy_(buf)

    @torch.no_grad()
    def restore(self) -> None:
        for key, buf in self._buffers():
            copy = self.copies.get(key)
            if copy is not None and copy.shape == buf.shape:
                buf.copy_(copy)

    @torch.no_grad()
    def first_nonfinite(self, world: int = 1) -> str:
        """The name of this rank's first floating buffer holding a NaN/inf ('' when all are
        finite on every rank; 'a buffer on another rank' when only another rank has one).

        One all-reduce when ``world > 1``, so every rank takes the same skip decision."""
        named = [(key, buf) for key, buf in self._buffers() if buf.is_floating_point()]
        if not named:
            return ""
        bad = torch.stack([~torch.isfinite(buf).all() for _, buf in named])
        flag = bad.any().to(torch.int32).reshape(1)
        if world > 1:
            import torch.distributed as dist
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not int(flag.item()):
            return ""
        local = torch.nonzero(bad).flatten().tolist()
        if not local:
            return "a buffer on another rank"
        (index, name), _ = named[local[0]]
        return f"buffer '{name}'" if index == 0 else f"head buffer '{name}'"
