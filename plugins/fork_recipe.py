"""The job's optimisation recipe inside a fork's patched training loop: learning rate at every
optimizer step, SGD flags, gradient clipping.

train_distill.py builds SGD with the job's ``momentum`` and ``nesterov``, sets the lr of optimizer
step ``j`` to ``schedule.lr_at(j)`` (``plugins/lr_schedule.py``: AdaDistill's step decays, GKD's
timm cosine with warm-up and ``lr_min``, arcface_torch's polynomial, all scaled to the run's global
batch by ``lr_reference_batch``) and clips the student's gradient norm at ``grad_clip`` (0: none).
A fork's loop builds its own optimizer, scheduler and clipping; the patch
(patches/patch_train_v2.py) routes two of its statements through here:

- ``lr_scheduler = recipe_scheduler(cfg, opt, train_loader) or PolyScheduler(...)``: sets the
  job's ``nesterov`` / ``momentum`` on the fork's SGD groups and returns ``RecipeLRScheduler`` --
  the very schedule train_distill.py uses, for the same job and global batch -- or None, and the
  fork's own scheduler is built as before;
- ``grad_clipper(cfg, torch.nn.utils.clip_grad_norm_)(backbone.parameters(), 5)``: the fork's clip
  call with the job's ``grad_clip`` in place of the fork's constant (0: no clipping).

A key group the job does not set keeps the fork's behaviour: without any of ``SCHEDULE_KEYS`` the
fork's scheduler runs, without ``grad_clip`` the fork's constant, without ``nesterov`` the fork's
flag; ``prepare_fork_config`` (``plugins/fork_loop.py``) leaves unset recipe keys out of the config,
so absence means "the fork's".  A fork's own job (no ``distill`` key) is never touched.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

import torch
from torch.optim import lr_scheduler as _lr_scheduler

from .config_defaults import DISTILL_DEFAULTS
from .distributed import rank_and_world
from .lr_schedule import LRSchedule, describe_scaling, schedule_from_config

LOG = logging.getLogger("kdface.fork_recipe")

# the keys of the lr curve: setting any of them makes the whole curve train_distill.py's
SCHEDULE_KEYS = ("lr_schedule", "lr_steps", "lr_reference_batch", "warmup_lr", "lr_min")
RECIPE_KEYS = SCHEDULE_KEYS + ("nesterov", "grad_clip")

_SchedulerBase = getattr(_lr_scheduler, "LRScheduler", None) or _lr_scheduler._LRScheduler


class RecipeLRScheduler(_SchedulerBase):
    """A job's ``LRSchedule`` as the scheduler a fork's loop steps once per batch.

    arcface_torch's ``train_v2.py`` steps its scheduler after every batch, also between the
    batches of one gradient accumulation, so after ``t`` batches the next optimizer step is number
    ``t // acc``: every param group trains at ``schedule.lr_at(t // acc)``, the lr train_distill.py
    gives that optimizer step.  The state (``last_epoch`` = batches seen) saves and loads with the
    fork's checkpoints (plain numbers only: it loads with ``weights_only=True``).

    Args:
        optimizer: the fork's optimizer.
        schedule: the job's schedule, in optimizer steps, scaled to the run's global batch.
        acc: batches per optimizer step (the fork's ``gradient_acc``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LRSchedule,
                 acc: int = 1) -> None:
        if acc < 1:
            raise ValueError(f"RecipeLRScheduler: gradient_acc must be >= 1, got {acc}")
        self.schedule, self.acc = schedule, int(acc)
        super().__init__(optimizer)

    def get_lr(self):
        lr = self.schedule.lr_at(self.last_epoch // self.acc)
        return [lr for _ in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        return {key: value for key, value in self.__dict__.items()
                if key not in ("optimizer", "schedule")}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.__dict__.update({key: value for key, value in state_dict.items()
                              if key not in ("optimizer", "schedule")})


class _Keys(dict):
    """A plain mapping with attribute access (what ``schedule_from_config`` reads)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def sets_schedule(cfg) -> bool:
    """Whether the lr curve is the job's (one of ``SCHEDULE_KEYS`` set) or the fork's."""
    return "distill" in cfg and any(key in cfg for key in SCHEDULE_KEYS)


def apply_optimizer_keys(cfg, optimizer: torch.optim.Optimizer) -> None:
    """The job's ``momentum`` and (when it sets it) ``nesterov`` on the fork's SGD param groups,
    as train_distill.py builds its SGD; other optimizers are left as the fork built them."""
    if "distill" not in cfg:
        return
    for group in optimizer.param_groups:
        if "nesterov" not in group:        # not SGD (AdamW: train_distill ignores both keys)
            continue
        if "momentum" in cfg:
            group["momentum"] = float(cfg.momentum)
        if "nesterov" in cfg:
            group["nesterov"] = bool(cfg.nesterov)
        if group["nesterov"] and (group["momentum"] <= 0 or group.get("dampening", 0) != 0):
            raise ValueError(f"config key 'nesterov' = True needs SGD momentum > 0 and dampening "
                             f"0 (config key 'momentum' = {group['momentum']}, dampening "
                             f"{group.get('dampening', 0)})")


def fork_steps_per_epoch(cfg, loader: Any, world: int, acc: int) -> int:
    """Optimizer steps per epoch of the fork's loop: the loader's batches per epoch on this rank
    (``len(loader)``) divided by ``acc``; without a sized loader, arcface_torch's own count
    ``num_image // (batch_size x world)``.  (A DistributedSampler pads the dataset to a multiple of
    the world size, so this can be one step more than train_distill.py's ``N // global batch``.)"""
    try:
        batches = len(loader)
    except TypeError:
        batches = int(cfg.num_image) // (int(cfg.batch_size) * world)
    steps = batches // acc
    if steps < 1:
        raise ValueError(f"config: {batches} batches per epoch do not fill one optimizer step of "
                         f"gradient_acc = {acc} batches")
    return steps


def recipe_scheduler(cfg, optimizer: torch.optim.Optimizer,
                     loader: Any = None) -> Optional[RecipeLRScheduler]:
    """Where the fork builds its scheduler: apply the job's optimizer keys, and return the job's
    lr schedule as a ``RecipeLRScheduler``, or None (the fork's own job, or a job that sets none
    of ``SCHEDULE_KEYS``: the fork's scheduler is built as before).

    The schedule is ``plugins.lr_schedule.schedule_from_config`` -- train_distill.py's -- for the
    global batch ``batch_size x world size x gradient_acc`` and the fork's steps per epoch
    (``fork_steps_per_epoch``); unset schedule keys take their defaults.  Rank 0 logs the
    global-batch scaling line train_distill.py logs.
    """
    apply_optimizer_keys(cfg, optimizer)
    if not sets_schedule(cfg):
        return None
    rank, world = rank_and_world()
    acc = int(cfg.get("gradient_acc", 1))
    keys = _Keys({key: DISTILL_DEFAULTS[key][0] for key in SCHEDULE_KEYS})
    keys.update(cfg)
    steps = fork_steps_per_epoch(keys, loader, world, acc)
    global_batch = int(keys.batch_size) * world * acc
    schedule = schedule_from_config(keys, steps, steps * int(keys.num_epoch), global_batch)
    if rank == 0:
        LOG.info(describe_scaling(keys, global_batch))
        LOG.info("lr schedule: the job's '%s' (as train_distill.py) over %d optimizer steps "
                 "(%d per epoch x %d epochs), in place of the fork's scheduler",
                 schedule.kind, schedule.total_steps, steps, int(keys.num_epoch))
    return RecipeLRScheduler(optimizer, schedule, acc)


def grad_clipper(cfg, clip: Callable[..., Any]) -> Callable[..., Any]:
    """The fork's clip function ``clip(parameters, max_norm, ...)`` for its own jobs and for jobs
    that do not set ``grad_clip``; otherwise the same call with ``max_norm = grad_clip``, or no
    clipping at all (returns None) for ``grad_clip`` 0 -- as train_distill.py."""
    if "distill" not in cfg or "grad_clip" not in cfg:
        return clip
    max_norm = float(cfg.grad_clip)

    def clip_at_recipe(parameters, *args, **kwargs):
        args = args[1:]                        # the fork's own max_norm, positional ...
        kwargs.pop("max_norm", None)           # ... or by keyword
        if max_norm <= 0:
            return None
        return clip(parameters, max_norm, *args, **kwargs)

    return clip_at_recipe
