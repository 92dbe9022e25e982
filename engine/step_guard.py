"""What one optimizer step must agree on, read with ONE host-device synchronisation, and the
rollback of a skipped step.

Per step the trainer needs to know: was a loss non-finite (any micro-batch), does a buffer the
forward passes changed hold a NaN/inf, did the scaled gradients overflow (GradScaler's found-inf),
did a head's deferred input check fail (``plugins.deferred_checks``), and was SIGTERM/SIGINT
received on any rank.  ``StepGuard.read`` stacks these as device values, all-reduces them (MAX)
once across ranks and reads them with one ``tolist()`` -- after the backward is queued, so the
GPU has the whole step's work while the CPU waits.

A skipped step must leave no trace: the forward passes of its micro-batches already moved the
modules' buffers (BatchNorm running mean/var and batch counts, AdaDistill's EMA class centers)
before the flags could be read.  ``begin`` copies the buffers before the step's first forward
and ``rollback`` puts them back, except:

- ``frozen_keys`` of a head (never changed by training, e.g. GKD's teacher classifier): no copy;
- ``journaled_keys`` of a head (a class-sharded table changed row by row, e.g. AdaDistill's
  ``[C_local, D]`` centers): the head saves the rows it is about to change
  (``DistillHead.journal_rows``), so a step copies ``[rows in the batch, D]``, not the table.

The finite check covers the copied buffers and the journaled rows (the rest of a journaled table
did not change, and every step starts from a finite state: checkpoints refuse NaN/inf).
Parameters and optimizer state need no copy: a skipped step never reaches ``optimizer.step``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from plugins.deferred_checks import DeferredChecks
from plugins.heads import DistillHead


@dataclass(frozen=True)
class StepFlags:
    """The step's flags as every rank agreed on them (MAX over ranks)."""
    bad_loss: bool          # a micro-batch's loss was NaN/inf
    bad_buffer: bool        # a buffer the forward changed holds a NaN/inf
    overflow: bool          # found-inf of the unscaled gradients (GradScaler's skip)
    check_failed: bool      # a head's deferred input check failed
    stop_signal: int        # SIGTERM/SIGINT number received on some rank (0: none)

    @property
    def skip(self) -> bool:
        """The step is dropped and rolled back (a non-finite loss or buffer)."""
        return self.bad_loss or self.bad_buffer


class StepGuard:
    """Flags of one optimizer step and the copies that undo it.

    Args:
        student: the bare student network (its buffers: BatchNorm statistics).
        head: the distillation head (its non-frozen buffers; ``journaled_keys`` by rows).
        device: where the flags live (the training device).
        world: world size; > 1 all-reduces the flags.
    """

    def __init__(self, student: nn.Module, head: nn.Module, device: torch.device,
                 world: int) -> None:
        self.modules = (student, head)
        self.device, self.world = device, world
        self.copies: Dict[Tuple[int, str], torch.Tensor] = {}
        self._bad_loss: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ buffers
    def _heads(self) -> List[Tuple[str, DistillHead]]:
        return [(name, m) for name, m in self.modules[1].named_modules()
                if isinstance(m, DistillHead)]

    def _skipped_names(self) -> set:
        names = set()
        for prefix, head in self._heads():
            dot = prefix + "." if prefix else ""
            names |= {dot + key for key in tuple(head.frozen_keys) + tuple(head.journaled_keys)}
        return names

    def _buffers(self):
        """``((module index, name), buffer)`` of every buffer a step copies."""
        skipped = self._skipped_names()
        for index, module in enumerate(self.modules):
            for name, buf in module.named_buffers():
                if not (index == 1 and name in skipped):
                    yield (index, name), buf

    @torch.no_grad()
    def begin(self) -> None:
        """Before the step's first forward: copy the buffers, open the heads' journals, reset the
        loss flag."""
        pairs = list(self._buffers())
        fresh = [(key, buf) for key, buf in pairs if key not in self.copies or
                 self.copies[key].shape != buf.shape or self.copies[key].dtype != buf.dtype
                 or self.copies[key].device != buf.device]
        for key, buf in fresh:
            self.copies[key] = torch.empty_like(buf)
        if pairs:        # one fused copy on a GPU instead of one kernel per BatchNorm buffer
            torch._foreach_copy_([self.copies[key] for key, _ in pairs],
                                 [buf for _, buf in pairs])
        for _, head in self._heads():
            head.begin_journal()
        self._bad_loss = None

    @torch.no_grad()
    def rollback(self) -> None:
        """Put the buffers and the journaled rows back as they were at ``begin``."""
        pairs = [(key, buf) for key, buf in self._buffers()
                 if key in self.copies and self.copies[key].shape == buf.shape]
        if pairs:
            torch._foreach_copy_([buf for _, buf in pairs], [self.copies[key] for key, _ in pairs])
        for _, head in self._heads():
            head.rollback_journal()

    @torch.no_grad()
    def end(self) -> None:
        """After the step (kept or rolled back): close the heads' journals, forget the loss."""
        for _, head in self._heads():
            head.end_journal()
        self._bad_loss = None

    @torch.no_grad()
    def _changed_values(self) -> List[torch.Tensor]:
        """The floating values the step changed: copied buffers, journaled rows."""
        values = [buf for _, buf in self._buffers() if buf.is_floating_point()]
        for _, head in self._heads():
            values += [head.get_buffer(name).index_select(0, rows)
                       for name, rows in head.journaled_rows()]
        return values

    def first_nonfinite(self) -> str:
        """The name of this rank's first non-finite buffer or journaled table ('' when all are
        finite here).  Reads the device: call it only to word a message about a skipped step."""
        named = [(f"buffer '{name}'" if index == 0 else f"head buffer '{name}'", buf)
                 for (index, name), buf in self._buffers() if buf.is_floating_point()]
        for prefix, head in self._heads():
            dot = prefix + "." if prefix else ""
            named += [(f"head buffer '{dot}{name}'", head.get_buffer(name).index_select(0, rows))
                      for name, rows in head.journaled_rows()]
        for label, value in named:
            if not bool(torch.isfinite(value).all()):
                return label
        return ""

    # ------------------------------------------------------------------ flags
    @torch.no_grad()
    def loss(self, loss: torch.Tensor) -> None:
        """Record whether a micro-batch's loss is finite (on the device; no read)."""
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    @torch.no_grad()
    def read(self, found_inf: Optional[torch.Tensor], checks: Optional[DeferredChecks],
             signum: int) -> Tuple[StepFlags, torch.Tensor]:
        """THE host read of the step: ``(flags, agreed found-inf)``.  ``found_inf``: this rank's
        0-d found-inf of the unscaled gradients (None without a scaler); ``checks``: the step's
        deferred checks; ``signum``: the stop signal this process received (0: none).  The agreed
        found-inf is the all-ranks value as a device tensor (for the scaler's update)."""
        device, false = self.device, torch.zeros((), dtype=torch.bool, device=self.device)
        by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
        for value in self._changed_values():
            by_dtype.setdefault(value.dtype, []).append(value.detach().reshape(-1))
        # one flattened copy per dtype: a few kernels, however many BatchNorm buffers there are
        bad = [~torch.isfinite(torch.cat(group)).all().to(device) for group in by_dtype.values()]
        bad_buffer = torch.stack(bad).any() if bad else false
        parts = [false if self._bad_loss is None else self._bad_loss, bad_buffer,
                 false if found_inf is None else found_inf.reshape(()).to(device) > 0,
                 false if checks is None else checks.failed(device)]
        flags = torch.stack(parts).to(torch.int32)
        flags = torch.cat([flags, flags.new_full((1,), int(signum))])   # a fill: no copy
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_loss, bad_buffer, overflow, check_failed, stop = flags.tolist()
        return (StepFlags(bool(bad_loss), bool(bad_buffer), bool(overflow), bool(check_failed),
                          int(stop)), flags[2])
