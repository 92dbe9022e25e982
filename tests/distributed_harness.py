"""Run a function on W real processes over gloo (loopback rendezvous) and collect the results.

Usage in a test::

    def _worker(rank, world, x):          # module-level, so it can be pickled for spawn
        ...
        return {"loss": loss.item(), "grad": grad}   # anything torch.save can store

    results = run_distributed(_worker, world_size=2, args=(x,))   # list, one entry per rank
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from typing import Any, Callable, List, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: Sequence, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        torch.save({"error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        raise
    finally:
        dist.destroy_process_group()


_CONTEXT = None


# What the forkserver imports once, so that no child pays for it: torch, and torch._dynamo, which
# the first torch.optim optimizer of a process imports (about 2 s per process on this CPU); our
# own modules and pytest (which each test module imports: the worker functions live there) are
# cheap but shared by every worker.  A module missing here is still imported by
# the child that needs it (the forkserver skips preloads that fail).
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "numpy", "pytest",
           "tests.distributed_harness", "tests.training_helpers", "engine.trainer",
           "plugins.builders", "plugins.heads", "plugins.teacher", "data.dataset"]


def _context():
    """A forkserver that has imported torch once: children start in a fraction of a second
    (spawn re-imports torch in every child; plain fork is unsafe after OpenMP has run)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def run_distributed(fn: Callable[..., Any], world_size: int, args: Sequence = ()) -> List[Any]:
    """Spawn ``world_size`` gloo processes running ``fn(rank, world_size, *args)``; return their
    results in rank order.  A failure on any rank raises with that rank's traceback."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = _context()
        procs = [ctx.Process(target=_entry, args=(rank, world_size, port, fn, tuple(args), out_dir))
                 for rank, port in zip(range(world_size), [free_port()] * world_size)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        results = []
        for rank in range(world_size):
            saved = torch.load(os.path.join(out_dir, f"{rank}.pt"), weights_only=False)
            if "error" in saved:
                raise RuntimeError(f"rank {rank} failed:\n{saved['error']}")
            results.append(saved["ok"])
        return results


def start_process(fn: Callable[..., Any], args: Sequence = ()):
    """Start ``fn(*args)`` in a process of its own, forked from the same forkserver (torch and
    the modules above already imported: it starts in a fraction of a second, where a new
    interpreter takes seconds).  Returns the started ``multiprocessing.Process``: ``join`` it,
    or ``kill`` it; its ``exitcode`` is ``-signal.SIGKILL`` after a SIGKILL.  No process group."""
    proc = _context().Process(target=fn, args=tuple(args))
    proc.start()
    return proc
