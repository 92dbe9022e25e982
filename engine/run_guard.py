"""What surrounds one training run: the output-folder lock, removal of temporary files a killed
run left behind, the refusal to start a fresh run over another run's checkpoints, and the
SIGTERM / SIGINT handlers (engine/stop_signal).

    with run_guard(cfg, rank, world) as stop:
        ...train; each optimizer step reads stop.signum with its flags (all ranks agree);
        a set signal: save that step and leave...
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from typing import Iterator, List

import torch
import torch.distributed as dist

from plugins.atomic_io import is_temporary_name
from engine.checkpoint import CheckpointManager, collective_device
from engine.run_lock import OutputLock
from engine.stop_signal import StopRequest

LOG = logging.getLogger("train_distill")


def _agree(failed: bool, world: int) -> bool:
    flag = torch.tensor([int(failed)], device=collective_device())
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def remove_stale_temporaries(output: str) -> List[str]:
    """Delete ``checkpoints/step_*.tmp/`` folders and ``.<name>.tmp.<pid>`` files of atomic
    writes in ``output``, its ``checkpoints/`` and checkpoint folders (call it holding the lock:
    then no live writer owns them).  Returns the removed paths."""
    removed = []
    root = os.path.join(output, "checkpoints")
    folders = [output] + ([root] if os.path.isdir(root) else [])
    if os.path.isdir(root):
        folders += [os.path.join(root, n) for n in os.listdir(root)
                    if os.path.isdir(os.path.join(root, n)) and not n.endswith(".tmp")]
    for folder in folders:
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if folder == root and name.startswith("step_") and name.endswith(".tmp") \
                    and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            elif is_temporary_name(name) and os.path.isfile(path):
                os.remove(path)
                removed.append(path)
    return removed


def check_fresh_output(cfg, rank: int, world: int) -> None:
    """A run that does not resume must not start over another run's checkpoints (they would be
    pruned mixed with the new ones, and a later --resume would pick the wrong run): refuse,
    unless ``cfg.start_over`` asks to delete them."""
    if cfg.get("resume"):
        return
    manager = CheckpointManager(cfg.output)
    found = manager.list()
    if not found:
        return
    if not cfg.get("start_over"):
        raise ValueError(
            f"{manager.root} holds checkpoints of an earlier run (newest: "
            f"{os.path.basename(found[0])}): pass --resume (config.resume = True) to continue "
            f"it, set another config.output, or pass --start-over (config.start_over = True) to "
            f"delete them and train from scratch")
    if rank == 0:
        for path in found:
            shutil.rmtree(path)
        LOG.warning("start_over: deleted %d checkpoint(s) of an earlier run in %s", len(found),
                    manager.root)
    if world > 1:
        dist.barrier()


@contextlib.contextmanager
def run_guard(cfg, rank: int, world: int) -> Iterator[StopRequest]:
    """Lock ``cfg.output`` (rank 0; all ranks fail together), clean up, check the folder, and
    record SIGTERM / SIGINT while the run lasts; yields the StopRequest."""
    from engine.runtime import setup_logging
    from plugins.config_defaults import check_types
    check_types(cfg, "config")          # also for configs not loaded by engine.config.get_config
    lock, error = OutputLock(cfg.output), ""
    if rank == 0:
        try:
            lock.acquire()
        except RuntimeError as err:
            error = str(err)
    if _agree(bool(error), world):
        raise RuntimeError(error or f"{cfg.output} is in use by another run (rank 0 could not "
                                    f"lock it)")
    stop = StopRequest()
    try:
        setup_logging(cfg.output, rank)
        if rank == 0:
            for path in remove_stale_temporaries(cfg.output):
                LOG.info("removed a temporary file left by an interrupted run: %s", path)
        if world > 1:
            dist.barrier()
        check_fresh_output(cfg, rank, world)
        stop.install()
        yield stop
    finally:
        stop.uninstall()
        lock.release()
