"""The distillation training loop: one optimizer step of the student per ``gradient_acc`` batches.

    loader -> (img, label, index, flipped)
    student(img) -> f_s [B, D]                      DDP; conv trunk under autocast with fp16
    teacher source(img, index, flipped) -> f_t      frozen teacher or its embedding cache
    head(f_s, label, teacher=f_t, epoch=e) -> loss  same value on every rank (plugins.heads)
    backward, unscale, clip, step, lr, log, verify, checkpoint
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from plugins.atomic_io import atomic_torch_save
from engine.checkpoint import CheckpointManager
from plugins.builders import build_head, build_teacher_source, check_config, teacher_class_means
from plugins.lr_schedule import run_schedule
from engine.run_guard import run_guard
from engine.run_identity import check_resume, run_identity
from engine.step_guard import BufferSnapshot
from engine.precision import precision_plan, scaler_step
from engine.runtime import (CONFIG_LOGGER, configure_cpu_threads, init_distributed,
                          seed_everything, setup_logging)
from plugins.ddp_gradient import exact_gradient_hook
from plugins.heads import DistillHead
from plugins.sharded_state import gather_full_table

LOG = logging.getLogger("train_distill")


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite`` non-finite losses in a row."""


def head_loss(head: DistillHead, student: torch.Tensor, labels: torch.Tensor,
              teacher: Optional[torch.Tensor], epoch: float) -> torch.Tensor:
    """The loss of one micro-batch: every registered head takes the same call."""
    return head(student, labels, teacher=teacher, epoch=epoch)


def _optimizer(cfg, student: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    groups = [{"params": list(student.parameters())}]
    head_params = [p for p in head.parameters() if p.requires_grad]
    if head_params:
        groups.append({"params": head_params})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


class ProgressMeter:
    """Averages the loss and head statistics between two progress lines and estimates the ETA."""

    def __init__(self, total_steps: int, global_batch: int, start_step: int) -> None:
        self.total_steps, self.global_batch = total_steps, global_batch
        self.start_step, self.t0 = start_step, time.time()
        self.last_time, self.last_step = self.t0, start_step
        self.sums, self.count = {}, 0

    def add(self, loss: float, stats: dict) -> None:
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1

    def line(self, step: int, epoch: int, lr: float, scale: Optional[float]) -> tuple:
        now = time.time()
        speed = (step - self.last_step) * self.global_batch / max(now - self.last_time, 1e-9)
        per_step = (now - self.t0) / max(step - self.start_step, 1)
        eta_hours = per_step * (self.total_steps - step) / 3600
        means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count, self.last_time, self.last_step = {}, 0, now, step
        extra = "".join(f"   {k} {v:.4f}" for k, v in means.items() if k != "loss")
        scale_txt = f"   Fp16 Grad Scale: {scale:.0f}" if scale is not None else ""
        text = (f"Speed {speed:.2f} samples/sec   Loss {means.get('loss', float('nan')):.4f}   "
                f"LearningRate {lr:.6f}   Epoch: {epoch}   Global Step: {step}{scale_txt}"
                f"   Required: {eta_hours:.2f} hours{extra}")
        return text, speed, means


def train(cfg) -> dict:
    """Run the training ``cfg`` describes; returns a small summary (rank 0 meaningful).

    The run holds its output folder's lock, refuses another run's checkpoints, and on SIGTERM /
    SIGINT saves a checkpoint at the next step boundary and returns (``summary["stopped_by"]``).
    """
    rank, world, _, _ = init_distributed()
    with run_guard(cfg, rank, world) as stop:
        return _train(cfg, stop)


def _train(cfg, stop) -> dict:
    """setup -> resume -> logging -> epochs of optimizer steps -> finish."""
    run = _setup(cfg)
    progress = _resume(run)
    logs = _open_logs(run)
    buffers = BufferSnapshot(run.student, run.head)   # a skipped step restores buffers
    meter = ProgressMeter(progress.total_steps, run.global_batch * run.acc, progress.step)
    run.student.train()
    run.head.train()
    finished = False
    while not finished and progress.epoch < cfg.num_epoch and progress.step < progress.total_steps:
        finished = _train_epoch(run, progress, logs, stop, buffers, meter)
    return _finish(run, progress, logs, stop)


@dataclass
class _Run:
    """What a run builds once (``_setup``)."""
    cfg: Any
    rank: int
    world: int
    device: torch.device
    precision: Any
    dataset: Any
    sampler: Any
    loader: Any
    student: nn.Module          # the bare network (state_dict, clipping)
    model: nn.Module            # the student as called: DDP-wrapped when world > 1
    teacher: Any                # teacher-embedding source or None
    head: DistillHead
    optimizer: torch.optim.Optimizer
    schedule: Any
    scaler: torch.amp.GradScaler
    checkpoints: CheckpointManager
    identity: Dict[str, Any]
    acc: int                    # micro-batches per optimizer step (gradient_acc)
    global_batch: int           # batch_size x world size
    steps_per_epoch: int


@dataclass
class _Progress:
    """Where the run is; what a checkpoint records and the summary reports."""
    total_steps: int
    epoch: int = 0
    step: int = 0
    consumed: int = 0           # samples of the current epoch already trained on (all ranks)
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    last_loss: float = float("nan")
    losses: List[float] = field(default_factory=list)
    stopped_by: int = 0


@dataclass
class _Logs:
    """Rank 0's TensorBoard writer and .bin verification callback (None elsewhere)."""
    writer: Any = None
    verifier: Any = None


def _setup(cfg) -> _Run:
    """Logging, checks, seeds, data, student, teacher source, head, DDP, optimizer, schedule."""
    from data.dataset import FaceRecordDataset, ResumableDistributedSampler, make_loader
    from plugins.backbones import resolve_model

    rank, world, _, device = init_distributed()
    setup_logging(cfg.output, rank)
    check_config(cfg)
    if device.type == "cpu":
        LOG.info("CPU: %d intra-op threads per process", configure_cpu_threads(cfg.num_workers))
    seed_everything(cfg.seed)
    precision = precision_plan(device, cfg)        # autocast dtype, GradScaler, channels_last
    LOG.info(precision.describe())

    dataset = FaceRecordDataset(cfg.rec, num_classes=cfg.num_classes, flip=cfg.flip,
                                seed=cfg.seed, skip_bad=cfg.skip_bad_records)
    if cfg.get("num_image", len(dataset)) != len(dataset):
        LOG.warning("config num_image=%d but %s holds %d images; using %d",
                    cfg.num_image, cfg.rec, len(dataset), len(dataset))
    acc = int(cfg.gradient_acc)
    global_batch = cfg.batch_size * world
    steps_per_epoch = len(dataset) // (global_batch * acc)
    if steps_per_epoch < 1:
        raise ValueError(f"{cfg.rec}: {len(dataset)} images do not fill one optimizer step of "
                         f"{global_batch * acc} (batch_size x world size x gradient_acc)")
    sampler = ResumableDistributedSampler(len(dataset), cfg.batch_size, num_replicas=world,
                                          rank=rank, shuffle=True, seed=cfg.seed)
    loader = make_loader(dataset, sampler, cfg.batch_size, cfg.num_workers, pin_memory=True,
                         seed=cfg.seed)     # pinned where an accelerator exists

    student = resolve_model(cfg.network, num_features=cfg.embedding_size,
                            fp16=precision.backbone_fp16).to(device)
    student = precision.memory_format(student)
    teacher = build_teacher_source(cfg, device=device, num_images=len(dataset))
    torch.manual_seed(cfg.seed + 1 + rank)   # class shards start from different noise per rank
    head = build_head(cfg, teacher_classifier=teacher_class_means(cfg, teacher)).to(device)
    torch.manual_seed(cfg.seed + 1000 + rank)
    model = student
    if world > 1:
        model = DistributedDataParallel(student, device_ids=[device.index]
                                        if device.type == "cuda" else None)
        # the heads give each rank the exact gradient of the global-batch mean for its own
        # samples: sum over ranks (DDP would average), the same gradient on any world size
        model.register_comm_hook(None, exact_gradient_hook)
    return _Run(cfg=cfg, rank=rank, world=world, device=device, precision=precision,
                dataset=dataset, sampler=sampler, loader=loader, student=student, model=model,
                teacher=teacher, head=head, optimizer=_optimizer(cfg, student, head),
                schedule=run_schedule(cfg, steps_per_epoch, global_batch * acc, log=LOG),
                scaler=precision.grad_scaler(),
                checkpoints=CheckpointManager(cfg.output, keep=cfg.keep_checkpoints),
                identity=run_identity(cfg, len(dataset)), acc=acc, global_batch=global_batch,
                steps_per_epoch=steps_per_epoch)


def _resume(run: _Run) -> _Progress:
    """A fresh ``_Progress``, or the one of the newest usable checkpoint when ``cfg.resume``
    (student, head, optimizer, scaler and RNG state restored; class shards re-split when the
    checkpoint was written on another world size)."""
    cfg = run.cfg
    total_steps = run.steps_per_epoch * cfg.num_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, int(cfg.max_steps))
    progress = _Progress(total_steps=total_steps)
    if not cfg.resume:
        return progress
    found = run.checkpoints.load_latest()
    if found is None:
        LOG.info("resume: no checkpoint in %s, starting from scratch", run.checkpoints.root)
        return progress
    path, common, shards = found
    check_resume(path, common.get("run"), run.identity)
    run.student.load_state_dict(common["backbone"])
    CheckpointManager.restore(common, shards, run.head, run.optimizer)
    if common["scaler"]:                 # a disabled scaler (fp32, CPU) saved {}
        run.scaler.load_state_dict(common["scaler"])
    epoch, step, consumed = common["epoch"], common["global_step"], common["consumed"]
    per_step = run.global_batch * run.acc
    if common["saved_world_size"] != run.world:
        # the same point of training in this world's steps (the schedule is per step)
        step = epoch * run.steps_per_epoch + consumed // per_step
    LOG.info("resumed from %s (epoch %d, step %d, %d samples into the epoch, saved on %d "
             "ranks)", path, epoch, step, consumed, common["saved_world_size"])
    if consumed >= run.steps_per_epoch * per_step:
        epoch, consumed = epoch + 1, 0
    progress.epoch, progress.step, progress.consumed = epoch, step, consumed
    return progress


def _open_logs(run: _Run) -> _Logs:
    """Rank 0: TensorBoard writer, the config dump, the .bin verification callback."""
    cfg, logs = run.cfg, _Logs()
    if run.rank != 0:
        return logs
    from torch.utils.tensorboard import SummaryWriter
    logs.writer = SummaryWriter(os.path.join(cfg.output, "tensorboard"))
    config_log = logging.getLogger(CONFIG_LOGGER)
    for key in sorted(cfg):
        config_log.info("%-28s %r", key, cfg[key])
    if cfg.get("val_targets") and cfg.verbose > 0:
        from eval.bin_verification import VerificationCallback
        logs.verifier = VerificationCallback(cfg.val_targets, cfg.rec, summary_writer=logs.writer)
    return logs


def _save_checkpoint(run: _Run, progress: _Progress) -> None:
    """Every rank's checkpoint of this step; rank 0 also writes model.pt."""
    common = {"backbone": run.student.state_dict(), "epoch": progress.epoch,
              "global_step": progress.step, "consumed": progress.consumed,
              "scaler": run.scaler.state_dict(), "num_classes": run.cfg.num_classes,
              "config_name": run.cfg.get("config_name", ""), "run": run.identity}
    run.checkpoints.save(progress.step, common, run.head, run.optimizer)
    if run.rank == 0:
        atomic_torch_save(run.student.state_dict(), os.path.join(run.cfg.output, "model.pt"))


def _train_epoch(run: _Run, progress: _Progress, logs: _Logs, stop, buffers: BufferSnapshot,
                 meter: "ProgressMeter") -> bool:
    """The rest of ``progress.epoch``: micro-batches, one optimizer step per ``acc`` of them.
    Returns True when the run is over (last step reached or a stop signal honoured); otherwise
    moves to the next epoch, saving a checkpoint at its end unless this step was just saved."""
    cfg = run.cfg
    run.dataset.set_epoch(progress.epoch)
    run.sampler.set_epoch(progress.epoch, consumed=progress.consumed)
    # exactly steps_per_epoch * acc batches per epoch, so no partial accumulation leaks over
    remaining = run.steps_per_epoch * run.acc - progress.consumed // (cfg.batch_size * run.world)
    bad_step, micro = False, 0
    for _, batch in zip(range(remaining), run.loader):
        if micro % run.acc == 0:
            buffers.take()
        micro += 1
        bad_step = not _micro_batch(run, progress, batch, sync=micro % run.acc == 0) or bad_step
        if micro % run.acc == 0:
            if _optimizer_step(run, progress, buffers, bad_step) and \
                    _after_step(run, progress, logs, stop, meter):
                return True
            bad_step = False
    progress.epoch, progress.consumed = progress.epoch + 1, 0
    if progress.step % cfg.save_every != 0:
        _save_checkpoint(run, progress)
    return False


def _micro_batch(run: _Run, progress: _Progress, batch, sync: bool) -> bool:
    """Forward and (when the loss is finite) backward of one micro-batch; False for a
    non-finite loss.  ``sync``: the last micro-batch of the step (DDP all-reduces then)."""
    images, labels, index, flipped = batch
    device = run.device
    images = run.precision.memory_format(images.to(device, non_blocking=True))
    labels = labels.to(device, non_blocking=True)
    for group in run.optimizer.param_groups:
        group["lr"] = run.schedule.lr_at(progress.step)
    embeddings = run.model(images).float()
    teacher_emb = None
    if run.teacher is not None:
        # index/flipped stay on the host where the loader made them: the cache reads them
        # there (a trip to the GPU and back would stall every step), the hook ignores them
        teacher_emb = run.teacher.teacher_embeddings(images, index, flipped).float()
    loss = head_loss(run.head, embeddings, labels, teacher_emb, progress.epoch)
    finite = bool(torch.isfinite(loss).item())
    if finite:
        context = nullcontext() if sync or run.world == 1 else run.model.no_sync()
        with context:
            run.scaler.scale(loss / run.acc).backward()
        progress.last_loss = loss.item()
    progress.consumed += run.cfg.batch_size * run.world
    return finite


def _optimizer_step(run: _Run, progress: _Progress, buffers: BufferSnapshot,
                    bad_loss: bool) -> bool:
    """The step after the step's micro-batches: skipped (gradients dropped, buffers restored)
    after a non-finite loss or buffer -- NonFiniteLossError after ``max_nonfinite`` in a row --,
    otherwise replicated gradients reduced, unscale, clip, step.  True when it stepped."""
    cfg = run.cfg
    bad_buffer = "" if bad_loss else buffers.first_nonfinite(run.world)
    if bad_loss or bad_buffer:
        run.optimizer.zero_grad(set_to_none=True)
        buffers.restore()   # BatchNorm stats, AdaDistill centers: as before the step
        progress.nonfinite_in_row += 1
        progress.skipped_steps += 1
        LOG.warning("non-finite %s at step %d: step skipped (%d in a row)",
                    bad_buffer or "loss", progress.step, progress.nonfinite_in_row)
        if progress.nonfinite_in_row >= cfg.max_nonfinite:
            raise NonFiniteLossError(
                f"{progress.nonfinite_in_row} non-finite losses in a row (max_nonfinite="
                f"{cfg.max_nonfinite}) at step {progress.step}: lower lr, check the data and the "
                f"teacher checkpoint, or enable fp16=False; resume from "
                f"{run.checkpoints.newest() or 'scratch (no checkpoint yet)'}")
        return False
    progress.nonfinite_in_row = 0
    run.head.reduce_replicated_grads()
    # unscale, found-inf agreed by all ranks, clip, step (or skip everywhere), update
    scaler_step(run.scaler, run.optimizer, run.student.parameters(), cfg.grad_clip)
    run.optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    progress.losses.append(progress.last_loss)
    return True


def _after_step(run: _Run, progress: _Progress, logs: _Logs, stop,
                meter: "ProgressMeter") -> bool:
    """Progress line and scalars, verification, stop request, checkpoint.  True when the run is
    over (its last step, or a stop signal: the step is saved first)."""
    cfg, step = run.cfg, progress.step
    meter.add(progress.last_loss, run.head.stats)
    if run.rank == 0 and (step % cfg.frequent == 0 or step == progress.total_steps):
        _log_progress(run, progress, logs, meter)
    if logs.verifier is not None and step % cfg.verbose == 0:
        logs.verifier(step, run.student)
    progress.stopped_by = progress.stopped_by or stop.requested(run.device)
    if progress.stopped_by and step < progress.total_steps:
        LOG.warning("%s: saving step %d and stopping", stop.name(progress.stopped_by), step)
        progress.total_steps = step          # saved below, then the run is over
    if step % cfg.save_every == 0 or step >= progress.total_steps:
        _save_checkpoint(run, progress)
    return step >= progress.total_steps


def _log_progress(run: _Run, progress: _Progress, logs: _Logs, meter: "ProgressMeter") -> None:
    """One progress line (arcface_torch's format) and its TensorBoard scalars (rank 0)."""
    step, lr = progress.step, run.schedule.lr_at(progress.step - 1)
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
    text, speed, means = meter.line(step, progress.epoch, lr, scale)
    LOG.info(text)
    for key, value in means.items():
        logs.writer.add_scalar(f"train/{key}", value, step)
    logs.writer.add_scalar("train/lr", lr, step)
    logs.writer.add_scalar("train/samples_per_sec", speed, step)


def _finish(run: _Run, progress: _Progress, logs: _Logs, stop) -> dict:
    """The learned classifier (classifier.pt, when the head trains one), the final model's
    verification, the summary."""
    cfg = run.cfg
    summary = {"steps": progress.step, "loss": progress.last_loss, "losses": progress.losses,
               "skipped_steps": progress.skipped_steps,
               "stopped_by": stop.name(progress.stopped_by)}
    table = _learned_classifier(run.head, cfg.num_classes)
    if table is not None and run.rank == 0:
        atomic_torch_save(table.cpu(), os.path.join(cfg.output, "classifier.pt"))
    if logs.verifier is not None and not progress.stopped_by:
        summary["verification"] = logs.verifier(progress.step, run.student)  # the final model
    if logs.writer is not None:
        logs.writer.close()
    LOG.info("finished: %d steps, last loss %.4f, %d skipped steps; model at %s", progress.step,
             progress.last_loss, progress.skipped_steps, os.path.join(cfg.output, "model.pt"))
    return summary


def _learned_classifier(head: DistillHead, num_classes: int) -> Optional[torch.Tensor]:
    """The full learned [C, D] classifier of a head that trains one (standalone margin head, GKD
    student classifier), gathered from all ranks; None for centers-only heads."""
    shard = head.learned_classifier()
    if shard is None:
        return None
    return gather_full_table(shard.float(), num_classes)
