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
from typing import Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from host.atomic_io import atomic_torch_save
from host.checkpoint import CheckpointManager
from host.factory import build_head, build_teacher_source, check_config, teacher_class_means
from host.lr_schedule import run_schedule
from host.run_guard import run_guard
from host.run_identity import check_resume, run_identity
from host.step_guard import BufferSnapshot
from host.precision import precision_plan, scaler_step
from host.runtime import (CONFIG_LOGGER, configure_cpu_threads, exact_gradient_hook, init_distributed,
                          seed_everything, setup_logging)
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
    from host.dataset import FaceRecordDataset, ResumableDistributedSampler, make_loader
    from plugins.backbones import resolve_model

    rank, world, _, device = init_distributed()
    setup_logging(cfg.output, rank)
    check_config(cfg)
    if device.type == "cpu":
        LOG.info("CPU: %d intra-op threads per process", configure_cpu_threads(cfg.num_workers))
    seed_everything(cfg.seed)
    cuda = device.type == "cuda"
    precision = precision_plan(device, cfg)        # autocast dtype, GradScaler, channels_last
    LOG.info(precision.describe())

    dataset = FaceRecordDataset(cfg.rec, num_classes=cfg.num_classes, flip=cfg.flip,
                                seed=cfg.seed, skip_bad=cfg.skip_bad_records)
    if cfg.get("num_image", len(dataset)) != len(dataset):
        LOG.warning("config num_image=%d but %s holds %d images; using %d",
                    cfg.num_image, cfg.rec, len(dataset), len(dataset))
    identity = run_identity(cfg, len(dataset))
    acc = int(cfg.gradient_acc)
    global_batch = cfg.batch_size * world
    steps_per_epoch = len(dataset) // (global_batch * acc)
    if steps_per_epoch < 1:
        raise ValueError(f"{cfg.rec}: {len(dataset)} images do not fill one optimizer step of "
                         f"{global_batch * acc} (batch_size x world size x gradient_acc)")
    total_steps = steps_per_epoch * cfg.num_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, int(cfg.max_steps))
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
        model = DistributedDataParallel(student, device_ids=[device.index] if cuda else None)
        # the heads give each rank the exact gradient of the global-batch mean for its own
        # samples: sum over ranks (DDP would average), the same gradient on any world size
        model.register_comm_hook(None, exact_gradient_hook)
    optimizer = _optimizer(cfg, student, head)
    schedule = run_schedule(cfg, steps_per_epoch, global_batch * acc, log=LOG)
    scaler = precision.grad_scaler()
    checkpoints = CheckpointManager(cfg.output, keep=cfg.keep_checkpoints)

    epoch, step, consumed = 0, 0, 0
    if cfg.resume:
        found = checkpoints.load_latest()
        if found is None:
            LOG.info("resume: no checkpoint in %s, starting from scratch", checkpoints.root)
        else:
            path, common, shards = found
            check_resume(path, common.get("run"), identity)
            student.load_state_dict(common["backbone"])
            CheckpointManager.restore(common, shards, head, optimizer)
            if common["scaler"]:                 # a disabled scaler (fp32, CPU) saved {}
                scaler.load_state_dict(common["scaler"])
            epoch, step, consumed = common["epoch"], common["global_step"], common["consumed"]
            if common["saved_world_size"] != world:
                # the same point of training in this world's steps (the schedule is per step)
                step = epoch * steps_per_epoch + consumed // (global_batch * acc)
            LOG.info("resumed from %s (epoch %d, step %d, %d samples into the epoch, saved on %d "
                     "ranks)", path, epoch, step, consumed, common["saved_world_size"])
            if consumed >= steps_per_epoch * global_batch * acc:
                epoch, consumed = epoch + 1, 0

    writer = None
    verifier = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(cfg.output, "tensorboard"))
        config_log = logging.getLogger(CONFIG_LOGGER)
        for key in sorted(cfg):
            config_log.info("%-28s %r", key, cfg[key])
        if cfg.get("val_targets") and cfg.verbose > 0:
            from host.verification import VerificationCallback
            verifier = VerificationCallback(cfg.val_targets, cfg.rec, summary_writer=writer)

    def save_checkpoint() -> None:
        common = {"backbone": student.state_dict(), "epoch": epoch, "global_step": step,
                  "consumed": consumed, "scaler": scaler.state_dict(),
                  "num_classes": cfg.num_classes, "config_name": cfg.get("config_name", ""),
                  "run": identity}
        checkpoints.save(step, common, head, optimizer)
        if rank == 0:
            atomic_torch_save(student.state_dict(), os.path.join(cfg.output, "model.pt"))

    meter = ProgressMeter(total_steps, global_batch * acc, step)
    nonfinite_in_row, skipped_steps, last_loss, losses = 0, 0, float("nan"), []
    buffers, stopped_by = BufferSnapshot(student, head), 0   # a skipped step restores buffers
    student.train()
    head.train()
    while epoch < cfg.num_epoch and step < total_steps:
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, consumed=consumed)
        bad_step, micro = False, 0
        # exactly steps_per_epoch * acc batches per epoch, so no partial accumulation leaks over
        remaining = steps_per_epoch * acc - consumed // (cfg.batch_size * world)
        for _, (images, labels, index, flipped) in zip(range(remaining), loader):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            images = precision.memory_format(images)
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(step)
            if micro % acc == 0:
                buffers.take()
            embeddings = model(images).float()
            teacher_emb = None
            if teacher is not None:
                teacher_emb = teacher.teacher_embeddings(images, index.to(device),
                                                         flipped.to(device)).float()
            loss = head_loss(head, embeddings, labels, teacher_emb, epoch)
            micro += 1
            sync = micro % acc == 0
            if torch.isfinite(loss).item():
                context = nullcontext() if sync or world == 1 else model.no_sync()
                with context:
                    scaler.scale(loss / acc).backward()
                last_loss = loss.item()
            else:
                bad_step = True
            consumed += cfg.batch_size * world
            if not sync:
                continue
            bad_buffer = "" if bad_step else buffers.first_nonfinite(world)
            bad_step = bad_step or bool(bad_buffer)
            if bad_step:
                optimizer.zero_grad(set_to_none=True)
                buffers.restore()   # BatchNorm stats, AdaDistill centers: as before the step
                nonfinite_in_row += 1
                skipped_steps += 1
                LOG.warning("non-finite %s at step %d: step skipped (%d in a row)",
                            bad_buffer or "loss", step, nonfinite_in_row)
                if nonfinite_in_row >= cfg.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{nonfinite_in_row} non-finite losses in a row (max_nonfinite="
                        f"{cfg.max_nonfinite}) at step {step}: lower lr, check the data and the "
                        f"teacher checkpoint, or enable fp16=False; resume from "
                        f"{checkpoints.newest() or 'scratch (no checkpoint yet)'}")
                bad_step = False
                continue
            nonfinite_in_row = 0
            head.reduce_replicated_grads()
            # unscale, found-inf agreed by all ranks, clip, step (or skip everywhere), update
            scaler_step(scaler, optimizer, student.parameters(), cfg.grad_clip)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(last_loss)
            meter.add(last_loss, head.stats)
            if rank == 0 and (step % cfg.frequent == 0 or step == total_steps):
                text, speed, means = meter.line(step, epoch, schedule.lr_at(step - 1),
                                                scaler.get_scale() if scaler.is_enabled() else None)
                LOG.info(text)
                for key, value in means.items():
                    writer.add_scalar(f"train/{key}", value, step)
                writer.add_scalar("train/lr", schedule.lr_at(step - 1), step)
                writer.add_scalar("train/samples_per_sec", speed, step)
            if verifier is not None and step % cfg.verbose == 0:
                verifier(step, student)
            stopped_by = stopped_by or stop.requested(device)
            if stopped_by and step < total_steps:
                LOG.warning("%s: saving step %d and stopping", stop.name(stopped_by), step)
                total_steps = step          # saves below, then leaves the loop
            if step % cfg.save_every == 0 or step >= total_steps:
                save_checkpoint()
            if step >= total_steps:
                break
        else:
            epoch, consumed = epoch + 1, 0
            if step % cfg.save_every != 0:
                save_checkpoint()
            continue
        break

    summary = {"steps": step, "loss": last_loss, "losses": losses, "skipped_steps": skipped_steps,
               "stopped_by": stop.name(stopped_by)}
    table = _learned_classifier(head, cfg.num_classes)
    if table is not None and rank == 0:
        atomic_torch_save(table.cpu(), os.path.join(cfg.output, "classifier.pt"))
    if verifier is not None and not stopped_by:
        summary["verification"] = verifier(step, student)  # the final model's accuracy
    if writer is not None:
        writer.close()
    LOG.info("finished: %d steps, last loss %.4f, %d skipped steps; model at %s", step,
             last_loss, skipped_steps, os.path.join(cfg.output, "model.pt"))
    return summary


def _learned_classifier(head: DistillHead, num_classes: int) -> Optional[torch.Tensor]:
    """The full learned [C, D] classifier of a head that trains one (standalone margin head, GKD
    student classifier), gathered from all ranks; None for centers-only heads."""
    shard = head.learned_classifier()
    if shard is None:
        return None
    return gather_full_table(shard.float(), num_classes)
