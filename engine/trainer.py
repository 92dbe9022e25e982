"""The distillation training loop: one optimizer step of the student per ``gradient_acc`` batches.

    loader -> (img, label, index, flipped)
    student(img) -> f_s [B, D]                      DDP; conv trunk under autocast with fp16
    teacher source(img, index, flipped) -> f_t      frozen teacher or its embedding cache
    head(f_s, label, teacher=f_t, epoch=e) -> loss  same value on every rank (plugins.heads)
    backward, unscale, clip                         queued on the device, nothing read yet
    ONE host read of the step's flags               engine/step_guard (all ranks agree)
    step or skip (rollback), lr, log, verify, checkpoint

``train_step`` is one optimizer step; bench/gpu_throughput.py times it on in-memory batches.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from plugins.atomic_io import atomic_torch_save
from engine.checkpoint import CheckpointManager
from plugins.builders import build_head, build_teacher_source, check_config, teacher_class_means
from plugins.lr_schedule import run_schedule
from engine.run_guard import run_guard
from engine.run_identity import check_resume, run_identity
from engine.stop_signal import StopRequest
from engine.compiled import compile_student
from engine.step_guard import StepFlags, StepGuard
from engine.precision import drop_scaled_step, precision_plan, step_scaled, unscale_gradients
from engine.runtime import (CONFIG_LOGGER, configure_cpu_threads, init_distributed,
                          resolve_num_workers, seed_everything, setup_logging)
from plugins.ddp_gradient import exact_gradient_hook
from plugins.deferred_checks import deferred
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
    """Keeps the loss and head statistics of every optimizer step on the device and reads them
    only when a progress line is due (``flush``: one host read for all the steps since the last
    one), then averages them for the line and estimates the ETA.

    Args:
        total_steps: the run's last step (for the ETA).
        global_batch: samples per optimizer step (for the speed).
        start_step: the step the run (or its resume) starts from.
        max_pending: steps kept on the device at most; more are read early (bounded memory when
            ``frequent`` is large).
    """

    def __init__(self, total_steps: int, global_batch: int, start_step: int,
                 max_pending: int = 1000) -> None:
        self.total_steps, self.global_batch = total_steps, global_batch
        self.start_step, self.t0 = start_step, time.time()
        self.last_time, self.last_step = self.t0, start_step
        self.max_pending = max_pending
        self.pending: List[Tuple[Tuple[str, ...], torch.Tensor]] = []
        self.read: List[Dict[str, float]] = []        # read, not yet averaged into a line

    def add(self, loss: torch.Tensor, stats: Dict[str, torch.Tensor]) -> None:
        """Record one optimizer step: its loss and the head's ``stats`` (0-d tensors), stacked
        on the loss's device in float64 -- no host read."""
        device = loss.device
        values = [loss.detach().reshape(()).double()] + [
            v.detach().reshape(()).to(device=device, dtype=torch.float64, non_blocking=True)
            for v in stats.values()]
        self.pending.append((("loss",) + tuple(stats), torch.stack(values)))
        if len(self.pending) >= self.max_pending:
            self.flush()

    def flush(self, extra: Optional[torch.Tensor] = None) -> Tuple[List[float], Optional[float]]:
        """Read the pending steps (one host read) and keep them for the next ``line``.  Returns
        their losses in step order and the value of ``extra`` (a 0-d tensor read with them,
        e.g. the loss scale), or None."""
        tensors = [row for _, row in self.pending]
        if extra is not None:
            tensors.append(extra.detach().reshape(1).to(tensors[0].device if tensors else
                                                        extra.device, torch.float64))
        values = torch.cat(tensors).tolist() if tensors else []
        losses, at = [], 0
        for names, row in self.pending:
            step = dict(zip(names, values[at:at + len(names)]))
            at += len(names)
            self.read.append(step)
            losses.append(step["loss"])
        self.pending = []
        return losses, (values[-1] if extra is not None else None)

    def line(self, step: int, epoch: int, lr: float, scale: Optional[float]) -> tuple:
        """The progress line of the steps read since the last line (call ``flush`` first)."""
        now = time.time()
        speed = (step - self.last_step) * self.global_batch / max(now - self.last_time, 1e-9)
        per_step = (now - self.t0) / max(step - self.start_step, 1)
        eta_hours = per_step * (self.total_steps - step) / 3600
        sums: Dict[str, float] = {}
        for values in self.read:
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
        means = {k: v / max(len(self.read), 1) for k, v in sums.items()}
        self.read, self.last_time, self.last_step = [], now, step
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
    run, progress = prepare_run(cfg)
    logs = _open_logs(run)
    meter = ProgressMeter(progress.total_steps, run.global_batch * run.acc, progress.step)
    finished = False
    while not finished and progress.epoch < cfg.num_epoch and progress.step < progress.total_steps:
        finished = _train_epoch(run, progress, logs, stop, meter)
    return _finish(run, progress, logs, stop, meter)


def prepare_run(cfg) -> Tuple["_Run", "_Progress"]:
    """What ``train`` builds before its first step: the run (``_setup``) and where it starts
    (``_resume``), student and head in training mode.  bench/gpu_throughput.py times
    ``train_step`` on it."""
    run = _setup(cfg)
    progress = _resume(run)
    run.student.train()
    run.head.train()
    return run, progress


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
    model: nn.Module            # the student as called: DDP-wrapped when world > 1, compiled
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
    guard: StepGuard            # the step's one host read; a skipped step's rollback
    label_group: Any = None     # gloo group gathering host labels (world > 1, wants_host_labels)


@dataclass
class _Progress:
    """Where the run is; what a checkpoint records and the summary reports."""
    total_steps: int
    epoch: int = 0
    step: int = 0
    consumed: int = 0           # samples of the current epoch already trained on (all ranks)
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    losses: List[float] = field(default_factory=list)   # read at progress lines and at the end
    stopped_by: int = 0
    resumed_from: Optional[str] = None   # the checkpoint this run resumed from

    @property
    def last_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


@dataclass
class _Logs:
    """Rank 0's TensorBoard writer and .bin verification callback (None elsewhere)."""
    writer: Any = None
    verifier: Any = None


def _setup(cfg) -> _Run:
    """Logging, checks, seeds, data, student, teacher source, head, DDP, optimizer, schedule."""
    from data.dataset import FaceRecordDataset, ResumableDistributedSampler, make_loader
    from data.device_batches import DeviceBatches, LoaderWaitMeter, host_pixels
    from plugins.backbones import resolve_model

    rank, world, _, device = init_distributed()
    setup_logging(cfg.output, rank)
    check_config(cfg)
    workers = resolve_num_workers(cfg.num_workers, device.type)     # "auto": CPUs per rank - 1
    if device.type == "cpu":
        LOG.info("CPU: %d intra-op threads per process", configure_cpu_threads(workers))
    seed_everything(cfg.seed)
    precision = precision_plan(device, cfg)        # autocast dtype, GradScaler, channels_last
    LOG.info(precision.describe())

    dataset = FaceRecordDataset(cfg.rec, num_classes=cfg.num_classes, flip=cfg.flip,
                                seed=cfg.seed, skip_bad=cfg.skip_bad_records,
                                pixels=host_pixels(device))     # uint8 to a GPU, float on CPU
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
    # pinned where an accelerator exists; batches on the device one ahead of the step
    loader = DeviceBatches(make_loader(dataset, sampler, cfg.batch_size, workers, seed=cfg.seed),
                           device, precision.memory_format,
                           LoaderWaitMeter(workers, cfg.batch_size, log=rank == 0))

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
    model = compile_student(model, device, cfg.get("compile", False), log=LOG)
    label_group = None
    if world > 1 and head.wants_host_labels:    # labels gathered on the host: no device read
        label_group = dist.new_group(backend="gloo")
    return _Run(cfg=cfg, rank=rank, world=world, device=device, precision=precision,
                dataset=dataset, sampler=sampler, loader=loader, student=student, model=model,
                teacher=teacher, head=head, optimizer=_optimizer(cfg, student, head),
                schedule=run_schedule(cfg, steps_per_epoch, global_batch * acc, log=LOG),
                scaler=precision.grad_scaler(),
                checkpoints=CheckpointManager(cfg.output, keep=cfg.keep_checkpoints),
                identity=run_identity(cfg, len(dataset)), acc=acc, global_batch=global_batch,
                steps_per_epoch=steps_per_epoch, guard=StepGuard(student, head, device, world),
                label_group=label_group)


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
    progress.resumed_from = path
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


def _train_epoch(run: _Run, progress: _Progress, logs: _Logs, stop,
                 meter: "ProgressMeter") -> bool:
    """The rest of ``progress.epoch``: one optimizer step per ``acc`` micro-batches.
    Returns True when the run is over (last step reached or a stop signal honoured); otherwise
    moves to the next epoch, saving a checkpoint at its end unless this step was just saved."""
    cfg = run.cfg
    run.dataset.set_epoch(progress.epoch)
    run.sampler.set_epoch(progress.epoch, consumed=progress.consumed)
    # exactly steps_per_epoch * acc batches per epoch, so no partial accumulation leaks over
    remaining = run.steps_per_epoch * run.acc - progress.consumed // (cfg.batch_size * run.world)
    batches = iter(run.loader)
    for _ in range(remaining // run.acc):
        flags = train_step(run, progress, itertools.islice(batches, run.acc), stop, meter)
        if not flags.skip and _after_step(run, progress, logs, meter):
            return True
    progress.epoch, progress.consumed = progress.epoch + 1, 0
    if progress.step % cfg.save_every != 0:
        _save_checkpoint(run, progress)
    return False


def train_step(run: _Run, progress: _Progress, batches: Iterable, stop,
               meter: Optional["ProgressMeter"] = None) -> StepFlags:
    """One optimizer step over ``run.acc`` micro-batches (``batches``, loader tuples, consumed
    one at a time): forward and backward of each, unscale and clip -- all queued on the device
    --, then ONE host read of the step's flags (``StepGuard.read``: non-finite loss or buffer,
    gradient overflow, failed input check, stop signal; all ranks agree), then the optimizer
    step, or the skip: gradients dropped, buffers and journaled rows rolled back, the scale kept
    (``NonFiniteLossError`` after ``max_nonfinite`` skips in a row).  A gradient overflow is
    GradScaler's skip: the step counts, the weights stay, the scale backs off.  ``meter`` (when
    given) gets the loss and head statistics of a kept step, on the device."""
    guard = run.guard
    guard.begin()
    try:
        with deferred() as checks:
            loss = None
            for micro, batch in enumerate(batches):
                loss = _micro_batch(run, progress, batch, sync=micro == run.acc - 1)
            run.head.reduce_replicated_grads()
            found_inf = unscale_gradients(run.scaler, run.optimizer)
            if run.cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(run.student.parameters(), run.cfg.grad_clip)
        flags, agreed_found_inf = guard.read(found_inf, checks, stop.signum)
        if flags.check_failed:
            checks.raise_first()
        progress.stopped_by = progress.stopped_by or flags.stop_signal
        if flags.skip:
            _skip_step(run, progress, flags)
            return flags
        progress.nonfinite_in_row = 0
        step_scaled(run.scaler, run.optimizer, flags.overflow, agreed_found_inf)
        run.optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        if meter is not None:
            meter.add(loss, run.head.stats)
        return flags
    finally:
        guard.end()


def _host_labels(run: _Run, index: torch.Tensor) -> np.ndarray:
    """The global batch's labels on the host (rank order), from the dataset's label table at the
    batch's ``index`` (which stays on the host): gathered over a gloo group when world > 1."""
    local = run.dataset.labels[index.numpy()]
    if run.world == 1:
        return local
    mine = torch.from_numpy(np.ascontiguousarray(local))
    parts = [torch.empty_like(mine) for _ in range(run.world)]
    dist.all_gather(parts, mine, group=run.label_group)
    return np.concatenate([part.numpy() for part in parts])


def _micro_batch(run: _Run, progress: _Progress, batch, sync: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch, its loss recorded by the step guard (a
    non-finite loss is backpropagated too: the whole step is dropped after the read).
    ``sync``: the last micro-batch of the step (DDP all-reduces then).  Returns the loss."""
    images, labels, index, flipped = batch          # on the device (DeviceBatches)
    for group in run.optimizer.param_groups:
        group["lr"] = run.schedule.lr_at(progress.step)
    embeddings = run.model(images).float()
    teacher_emb = None
    if run.teacher is not None:
        # index/flipped stay on the host where the loader made them: the cache reads them
        # there (a trip to the GPU and back would stall every step), the hook ignores them
        teacher_emb = run.teacher.teacher_embeddings(images, index, flipped).float()
    if run.head.wants_host_labels:
        run.head.use_host_labels(_host_labels(run, index))
    loss = head_loss(run.head, embeddings, labels, teacher_emb, progress.epoch)
    run.guard.loss(loss)
    context = nullcontext() if sync or run.world == 1 else run.model.no_sync()
    with context:
        run.scaler.scale(loss / run.acc).backward()
    progress.consumed += run.cfg.batch_size * run.world
    return loss


def _skip_step(run: _Run, progress: _Progress, flags: StepFlags) -> None:
    """Drop a step with a non-finite loss or buffer: gradients, buffers and journaled rows back
    as before it, the loss scale as it was; NonFiniteLossError after ``max_nonfinite`` in a
    row."""
    cfg = run.cfg
    what = "loss"
    if not flags.bad_loss:
        what = run.guard.first_nonfinite() or "a buffer on another rank"
    run.optimizer.zero_grad(set_to_none=True)
    run.guard.rollback()   # BatchNorm stats, AdaDistill centers: as before the step
    drop_scaled_step(run.scaler, run.optimizer)
    progress.nonfinite_in_row += 1
    progress.skipped_steps += 1
    LOG.warning("non-finite %s at step %d: step skipped (%d in a row)", what, progress.step,
                progress.nonfinite_in_row)
    if progress.nonfinite_in_row >= cfg.max_nonfinite:
        raise NonFiniteLossError(
            f"{progress.nonfinite_in_row} non-finite losses in a row (max_nonfinite="
            f"{cfg.max_nonfinite}) at step {progress.step}: lower lr, check the data and the "
            f"teacher checkpoint, or enable fp16=False; {_restart_advice(run, progress)}")


def _restart_advice(run: _Run, progress: _Progress) -> str:
    """Where to restart a run that blew up.  Not the checkpoint this run resumed from when no
    newer one was written since (it led straight back here): an earlier one, or --start-over."""
    newest = run.checkpoints.newest()
    if newest is None:
        return "resume from scratch (no checkpoint yet)"
    if progress.resumed_from is None or os.path.abspath(newest) != \
            os.path.abspath(progress.resumed_from):
        return f"resume from {newest}"
    earlier = run.checkpoints.list()[1:]
    again = (f"this run resumed from {newest} and failed before its next checkpoint, so "
             f"resuming it again needs a change (a lower lr)")
    if earlier:
        return (f"{again}; to go back further, move {newest} out of "
                f"{run.checkpoints.root} and --resume takes {earlier[0]}, or pass "
                f"--start-over to train from scratch")
    return (f"{again}; no earlier checkpoint is kept (keep_checkpoints="
            f"{run.checkpoints.keep}): pass --start-over to train from scratch")


def _after_step(run: _Run, progress: _Progress, logs: _Logs, meter: "ProgressMeter") -> bool:
    """Progress line and scalars (the meter's one read), verification, stop request (read with
    the step's flags), checkpoint.  True when the run is over (its last step, or a stop signal:
    the step is saved first)."""
    cfg, step = run.cfg, progress.step
    if step % cfg.frequent == 0 or step == progress.total_steps:
        scale = run.scaler._get_scale_async() if run.scaler.is_enabled() else None
        losses, scale_value = meter.flush(scale)
        progress.losses += losses
        if run.rank == 0:
            _log_progress(run, progress, logs, meter, scale_value)
    if logs.verifier is not None and step % cfg.verbose == 0:
        logs.verifier(step, run.student)
    if progress.stopped_by and step < progress.total_steps:
        LOG.warning("%s: saving step %d and stopping", StopRequest.name(progress.stopped_by),
                    step)
        progress.total_steps = step          # saved below, then the run is over
    if step % cfg.save_every == 0 or step >= progress.total_steps:
        _save_checkpoint(run, progress)
    return step >= progress.total_steps


def _log_progress(run: _Run, progress: _Progress, logs: _Logs, meter: "ProgressMeter",
                  scale: Optional[float]) -> None:
    """One progress line (arcface_torch's format) and its TensorBoard scalars (rank 0)."""
    step, lr = progress.step, run.schedule.lr_at(progress.step - 1)
    text, speed, means = meter.line(step, progress.epoch, lr, scale)
    LOG.info(text)
    for key, value in means.items():
        logs.writer.add_scalar(f"train/{key}", value, step)
    logs.writer.add_scalar("train/lr", lr, step)
    logs.writer.add_scalar("train/samples_per_sec", speed, step)


def _finish(run: _Run, progress: _Progress, logs: _Logs, stop, meter: "ProgressMeter") -> dict:
    """The learned classifier (classifier.pt, when the head trains one), the final model's
    verification, the summary."""
    cfg = run.cfg
    progress.losses += meter.flush()[0]      # steps after the last progress line
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
