"""Process-level set-up of a run: the process group (torchrun or a single process), the device,
seeds, and arcface_torch-style logging."""
from __future__ import annotations

import datetime
import logging
import os
import random
import sys
from typing import Tuple, Union

import numpy as np
import torch
import torch.distributed as dist


def init_distributed(timeout_minutes: float = 60.0) -> Tuple[int, int, int, torch.device]:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU), or run alone.

    ``timeout_minutes`` bounds how long ranks wait for each other in a collective: long enough
    for rank 0's verification and checkpoint writing while the others wait.
    Returns ``(rank, world_size, local_rank, device)``."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    else:
        rank, world, local_rank = 0, 1, 0
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return rank, world, local_rank, device


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (what a container or a job scheduler
    grants), else ``os.cpu_count()``."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _cpu_share() -> int:
    """This training process's share of the CPUs: available CPUs // processes on this node."""
    return max(1, available_cpus() // max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1))


# one worker: 4,000-9,500 uint8 items/s (bench/bench_dataset.py, 2 loaded / quiet cores); 8 of
# them: ~10x or more the fastest step measured on an H200 (student alone, 3,799 images/s)
AUTO_WORKERS_MAX = 8


def resolve_num_workers(num_workers: Union[int, str], device_type: str) -> int:
    """DataLoader workers of this process for config key ``num_workers``: an int as given;
    ``"auto"``: on an accelerator, this process's CPU share (``available_cpus() //
    LOCAL_WORLD_SIZE``) minus one for the training process itself, at most
    ``AUTO_WORKERS_MAX``; on a CPU, 1 when the share is 2 or more (the training step needs the
    cores; one worker decodes thousands of images per second), else 0."""
    if num_workers != "auto":
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"config key 'num_workers' must be an int >= 0 or 'auto', got "
                             f"{num_workers!r}")
        return num_workers
    share = _cpu_share()
    if device_type == "cpu":
        return 1 if share >= 2 else 0
    return max(0, min(share - 1, AUTO_WORKERS_MAX))


def configure_cpu_threads(num_workers: int) -> int:
    """On the CPU path, give each training process its share of the cores minus its DataLoader
    workers (OpenMP threads that outnumber free cores spin and wait: on 2 cores a step is ~8x
    slower with 2 threads beside one worker than with 1).  OMP_NUM_THREADS, when set, wins.
    Returns the number of intra-op threads in use."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, _cpu_share() - num_workers))
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


CONFIG_LOGGER = "train_distill.config"


def setup_logging(output: str, rank: int) -> logging.Logger:
    """Rank 0 logs to stdout and ``output/training.log`` in arcface_torch's format
    (``Training: %(asctime)s-%(message)s``); other ranks log warnings only."""
    logger = logging.getLogger()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    formatter = logging.Formatter("Training: %(asctime)s-%(message)s")
    if rank == 0:
        os.makedirs(output, exist_ok=True)
        handlers = [logging.FileHandler(os.path.join(output, "training.log")),
                    logging.StreamHandler(sys.stdout)]
        logger.setLevel(logging.INFO)
    else:
        handlers = [logging.StreamHandler(sys.stderr)]
        logger.setLevel(logging.WARNING)
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    # the full config goes to training.log only, not to the console
    config_logger = logging.getLogger(CONFIG_LOGGER)
    config_logger.propagate = False
    for handler in list(config_logger.handlers):
        config_logger.removeHandler(handler)
    if rank == 0:
        config_logger.addHandler(handlers[0])
        config_logger.setLevel(logging.INFO)
    return logger
