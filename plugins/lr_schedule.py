"""Learning-rate schedules of the papers, as pure functions of the optimizer step.

A schedule holds no state beyond the step the trainer passes in, so it resumes exactly, loads with
``weights_only=True`` and works on every torch version (arcface_torch's ``PolynomialLRWarmup``
passes ``verbose`` to ``_LRScheduler``, a TypeError on torch >= 2.7).

- ``polynomial`` (arcface_torch): linear warm-up over ``warmup_steps``, then
  ``lr = base * (1 - (t - warmup) / (total - warmup)) ** 2``.
- ``step`` (AdaDistill): ``lr = base * 0.1 ** #{m in milestones: m <= epoch}`` with the epoch
  counted from 0, after an optional linear warm-up.  The official AdaDistill LambdaLR
  ``0.1 ** #{m in (8, 14, 20, 25): m - 1 <= epoch}`` is ``lr_steps = (7, 13, 19, 24)`` here.
- ``cosine`` (GKD, timm's ``CosineLRScheduler`` with ``t_in_epochs=False``, one cycle): ONE cosine
  from ``base`` down to ``lr_min`` over all ``total_steps``,
  ``f(t) = lr_min + (base - lr_min) * (1 + cos(pi * t / total)) / 2``; during the first
  ``warmup_steps`` the linear ramp ``warmup_lr + t * (base - warmup_lr) / warmup_steps`` replaces
  ``f(t)`` (it overrides the start of the same cosine, it does not shift it).  timm is stepped
  after each optimizer step with the index of the step just taken, so optimizer step ``j`` trains
  with ``f(j - 1)`` (step 0 with ``f(0)``, the value set at construction); ``lr_at`` returns
  exactly that.

The recipe of a paper is defined by its GLOBAL batch: ``lr_reference_batch`` is the global batch
at which ``lr`` holds, and a run of global batch ``G`` multiplies the whole curve by
``G / lr_reference_batch`` (linear scaling; what AdaDistill's script does with
``lr = 0.1 / 512 * batch_size * world_size``).  ``None`` keeps ``lr`` as written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

KINDS = ("polynomial", "step", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """``lr_at(step)`` for ``kind`` in polynomial | step | cosine.

    Args:
        kind: schedule name.
        base_lr: learning rate after warm-up (already scaled to the run's global batch).
        total_steps: optimizer steps of the whole run.
        warmup_steps: linear warm-up steps.
        steps_per_epoch: optimizer steps per epoch (converts the step milestones).
        milestones: 0-based epochs from which the step schedule multiplies the lr by ``gamma``.
        gamma: factor of the step schedule.
        warmup_lr: ``cosine`` only: lr of the warm-up's first step (timm's ``warmup_lr_init``).
        lr_min: ``cosine`` only: the floor of the cosine (timm's ``lr_min``).
    """

    kind: str
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    steps_per_epoch: int = 1
    milestones: Tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_lr: float = 0.0
    lr_min: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"lr_schedule must be polynomial, step or cosine, got {self.kind!r}")
        if self.total_steps < 1 or self.steps_per_epoch < 1:
            raise ValueError(f"LRSchedule needs total_steps >= 1 and steps_per_epoch >= 1, got "
                             f"{self.total_steps} and {self.steps_per_epoch}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} must lie in [0, total_steps]")
        if self.warmup_lr < 0 or self.lr_min < 0:
            raise ValueError(f"warmup_lr and lr_min must be >= 0, got {self.warmup_lr} and "
                             f"{self.lr_min}")

    def lr_at(self, step: int) -> float:
        """Learning rate the optimizer uses for optimizer step ``step`` (0-based)."""
        if self.kind == "cosine":
            return self._timm_cosine(max(step - 1, 0))
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "step":
            epoch = step // self.steps_per_epoch
            return self.base_lr * self.gamma ** sum(m <= epoch for m in self.milestones)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.base_lr * (1.0 - progress) ** 2

    def _timm_cosine(self, t: int) -> float:
        if t < self.warmup_steps:
            return self.warmup_lr + t * (self.base_lr - self.warmup_lr) / self.warmup_steps
        if t >= self.total_steps:   # timm: past the single cycle the lr stays at lr_min
            return self.lr_min
        return self.lr_min + 0.5 * (self.base_lr - self.lr_min) * (
            1.0 + math.cos(math.pi * t / self.total_steps))


def batch_scale(cfg, global_batch: int) -> float:
    """``global_batch / lr_reference_batch`` (1 when the config sets no reference batch)."""
    ref = cfg.get("lr_reference_batch")
    if ref is None:
        return 1.0
    if int(ref) < 1:
        raise ValueError(f"config key 'lr_reference_batch' must be a positive global batch or "
                         f"None, got {ref!r}")
    return global_batch / int(ref)


def schedule_from_config(cfg, steps_per_epoch: int, total_steps: int,
                         global_batch: Optional[int] = None) -> LRSchedule:
    """The schedule a config asks for (keys lr, lr_reference_batch, lr_schedule, lr_steps,
    warmup_epoch, warmup_lr, lr_min), scaled to ``global_batch`` (None: no scaling)."""
    scale = 1.0 if global_batch is None else batch_scale(cfg, global_batch)
    milestones: Sequence[int] = tuple(int(m) for m in cfg.lr_steps)
    return LRSchedule(kind=cfg.lr_schedule, base_lr=float(cfg.lr) * scale,
                      total_steps=total_steps,
                      warmup_steps=int(round(float(cfg.warmup_epoch) * steps_per_epoch)),
                      steps_per_epoch=steps_per_epoch, milestones=tuple(milestones),
                      warmup_lr=float(cfg.get("warmup_lr", 0.0)) * scale,
                      lr_min=float(cfg.get("lr_min", 0.0)) * scale)


def describe_scaling(cfg, global_batch: int) -> str:
    """The start-up line: the recipe's global batch, this run's, and the lr it therefore uses."""
    ref = cfg.get("lr_reference_batch")
    lr = float(cfg.lr) * batch_scale(cfg, global_batch)
    if ref is None:
        return (f"learning rate: lr {lr:g} as configured for this run's global batch "
                f"{global_batch} (lr_reference_batch None: no global-batch scaling)")
    return (f"learning rate: the recipe's lr {float(cfg.lr):g} holds at global batch {int(ref)}; "
            f"this run's global batch is {global_batch} (batch_size x world size x "
            f"gradient_acc), so it uses lr {lr:g} = {float(cfg.lr):g} x {global_batch} / "
            f"{int(ref)}")


def run_schedule(cfg, steps_per_epoch: int, global_batch: int, log=None) -> LRSchedule:
    """The trainer's schedule: ``num_epoch`` epochs of ``steps_per_epoch`` steps, scaled to the
    run's ``global_batch``; ``log`` (a logger) receives the start-up line of ``describe_scaling``."""
    if log is not None:
        log.info(describe_scaling(cfg, global_batch))
    return schedule_from_config(cfg, steps_per_epoch, steps_per_epoch * int(cfg.num_epoch),
                                global_batch)
