"""Learning-rate schedules of the papers, as pure functions of the optimizer step.

A schedule holds no state beyond the step the trainer passes in, so it resumes exactly, loads with
``weights_only=True`` and works on every torch version (arcface_torch's ``PolynomialLRWarmup``
passes ``verbose`` to ``_LRScheduler``, a TypeError on torch >= 2.7).

- ``polynomial`` (arcface_torch): linear warm-up over ``warmup_steps``, then
  ``lr = base * (1 - (t - warmup) / (total - warmup)) ** 2``.
- ``step`` (AdaDistill): ``lr = base * 0.1 ** (number of milestone epochs <= current epoch)``,
  after an optional linear warm-up.
- ``cosine`` (GKD): linear warm-up, then ``lr = base * (1 + cos(pi * progress)) / 2``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple


@dataclass(frozen=True)
class LRSchedule:
    """``lr_at(step)`` for ``kind`` in polynomial | step | cosine.

    Args:
        kind: schedule name.
        base_lr: learning rate after warm-up.
        total_steps: optimizer steps of the whole run.
        warmup_steps: linear warm-up steps from 0 to ``base_lr``.
        steps_per_epoch: optimizer steps per epoch (converts the step milestones).
        milestones: epochs at which the step schedule multiplies the lr by ``gamma``.
        gamma: factor of the step schedule.
    """

    kind: str
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    steps_per_epoch: int = 1
    milestones: Tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in ("polynomial", "step", "cosine"):
            raise ValueError(f"lr_schedule must be polynomial, step or cosine, got {self.kind!r}")
        if self.total_steps < 1 or self.steps_per_epoch < 1:
            raise ValueError(f"LRSchedule needs total_steps >= 1 and steps_per_epoch >= 1, got "
                             f"{self.total_steps} and {self.steps_per_epoch}")
        if not 0 <= self.warmup_steps < max(self.total_steps, 1) + 1:
            raise ValueError(f"warmup_steps {self.warmup_steps} must lie in [0, total_steps]")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "step":
            epoch = step // self.steps_per_epoch
            return self.base_lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        if self.kind == "polynomial":
            return self.base_lr * (1.0 - progress) ** 2
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_from_config(cfg, steps_per_epoch: int, total_steps: int) -> LRSchedule:
    """The schedule a config asks for (keys lr, lr_schedule, lr_steps, warmup_epoch)."""
    milestones: Sequence[int] = tuple(int(m) for m in cfg.lr_steps)
    return LRSchedule(kind=cfg.lr_schedule, base_lr=float(cfg.lr), total_steps=total_steps,
                      warmup_steps=int(round(float(cfg.warmup_epoch) * steps_per_epoch)),
                      steps_per_epoch=steps_per_epoch, milestones=tuple(milestones))
