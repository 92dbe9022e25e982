"""Input checks that cost no host-device synchronisation inside a training step.

A head checks what it is given (labels in range, a classifier that fits the teacher...); the
condition is a device tensor, and reading it on the host would make the CPU wait for the GPU in
the middle of the step.  ``require(ok, message)``:

- outside ``deferred()`` (a head called on its own, a fork's loop, a test) reads ``ok`` at once
  and raises ``ValueError(message())`` when it is False -- the error at the call, as always;
- inside ``with deferred() as checks:`` (the trainer's step) only records it; the caller folds
  ``checks.failed()`` (one 0-d bool device tensor) into the step's single host read and, when it
  is True, calls ``checks.raise_first()``, which raises the first failed check's error.  The step
  reads its flags before ``optimizer.step()``, so a failed check stops the run before any weight
  moves.

``message`` is a callable, so the values it quotes are read only when the check failed.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, List, Optional, Tuple

import torch

_ACTIVE: contextvars.ContextVar[Optional["DeferredChecks"]] = contextvars.ContextVar(
    "kdface_deferred_checks", default=None)


class DeferredChecks:
    """The checks recorded inside one ``deferred()`` block, in call order."""

    def __init__(self) -> None:
        self.checks: List[Tuple[torch.Tensor, Callable[[], str]]] = []

    def failed(self, device: torch.device) -> torch.Tensor:
        """0-d bool on ``device``: True when any recorded check failed (no host read)."""
        if not self.checks:
            return torch.zeros((), dtype=torch.bool, device=device)
        oks = torch.stack([ok.to(device=device, non_blocking=True).reshape(())
                           for ok, _ in self.checks])
        return ~oks.all()

    def raise_first(self) -> None:
        """Raise ValueError of the first check that failed (reads the flags: call it only after
        ``failed()`` was read True)."""
        for ok, message in self.checks:
            if not bool(ok):
                raise ValueError(message())
        raise ValueError("a deferred check failed on another rank")


def require(ok: torch.Tensor, message: Callable[[], str]) -> None:
    """Check ``ok`` (0-d bool tensor): now (ValueError) or, inside ``deferred()``, with the step's
    one host read."""
    checks = _ACTIVE.get()
    if checks is None:
        if not bool(ok):
            raise ValueError(message())
        return
    checks.checks.append((ok.detach(), message))


@contextlib.contextmanager
def deferred() -> Iterator[DeferredChecks]:
    """Record the ``require`` calls of the block instead of reading them."""
    checks = DeferredChecks()
    token = _ACTIVE.set(checks)
    try:
        yield checks
    finally:
        _ACTIVE.reset(token)
