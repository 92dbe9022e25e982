"""Running a fork's training script in a test process, and what the run did at every step.

``write_shrunk_job`` puts a shipped job into a fork's ``configs/`` with every key kept and only
the data, the networks and the batch shrunk (a wrapper that imports the job, as arcface_torch job
files are imported).  ``run_fork_script`` runs ``python <script> configs/<job>`` in the calling
process (a rank of ``tests.distributed_harness`` or a child of ``run_in_child``) and records, at
every optimizer step, the lr of each param group, their Nesterov and momentum flags, every
gradient-clip call's max norm, and every loss the patched loop computes.
"""
from __future__ import annotations

import os
import runpy
import sys
import tempfile
import traceback
from typing import Any, Callable, Dict, List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRAPPER = '''\
"""{job}, every key kept; only the data, the networks and the batch shrunk for a CPU test."""
from easydict import EasyDict as edict

from configs.{job} import config as _job

config = edict(dict(_job))
config.update({overrides!r})
'''


def write_shrunk_job(fork: str, job: str, name: str, **overrides: Any) -> str:
    """``fork/configs/<name>.py``: the shipped ``configs/<job>.py`` (copied beside it) with
    ``overrides``; returns ``configs/<name>``."""
    with open(os.path.join(REPO, "configs", job + ".py")) as handle:
        text = handle.read()
    with open(os.path.join(fork, "configs", job + ".py"), "w") as handle:
        handle.write(text)
    with open(os.path.join(fork, "configs", name + ".py"), "w") as handle:
        handle.write(WRAPPER.format(job=job, overrides=overrides))
    return "configs/" + name


def _purge_fork_modules() -> None:
    """Forget the modules a fork's script imported (its configs update in place)."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("configs", "backbones", "dataset", "losses", "lr_scheduler",
                                  "partial_fc", "partial_fc_v2", "utils", "config"):
            del sys.modules[name]


def run_fork_script(fork: str, script: str, config: str,
                    before: Callable[[], None] = None) -> Dict[str, List]:
    """Run ``python <script> <config>`` in ``fork`` in this process; return per optimizer step
    ``lrs`` (each group's), ``nesterov``, ``momentum``, the ``clips`` (max norm of each clip call)
    and the ``losses`` of every batch.  ``before``: called after the recorders are in place."""
    import plugins.fork_loop
    record: Dict[str, List] = {"lrs": [], "nesterov": [], "momentum": [], "clips": [],
                               "losses": []}
    sgd_step, clip = torch.optim.SGD.step, torch.nn.utils.clip_grad_norm_
    head_loss = plugins.fork_loop.fork_head_loss

    def step(self, *args, **kwargs):
        record["lrs"].append([group["lr"] for group in self.param_groups])
        record["nesterov"].append([group["nesterov"] for group in self.param_groups])
        record["momentum"].append([group["momentum"] for group in self.param_groups])
        return sgd_step(self, *args, **kwargs)

    def clip_recording(parameters, max_norm, *args, **kwargs):
        record["clips"].append(float(max_norm))
        return clip(parameters, max_norm, *args, **kwargs)

    def loss_recording(*args, **kwargs):
        loss = head_loss(*args, **kwargs)
        record["losses"].append(float(loss))
        return loss

    torch.optim.SGD.step = step
    torch.nn.utils.clip_grad_norm_ = clip_recording
    plugins.fork_loop.fork_head_loss = loss_recording
    cwd, path, argv = os.getcwd(), list(sys.path), list(sys.argv)
    try:
        if before is not None:
            before()
        os.chdir(fork)
        sys.path.insert(0, fork)
        _purge_fork_modules()
        sys.argv = [script, config]
        runpy.run_path(script, run_name="__main__")
    finally:
        torch.optim.SGD.step, torch.nn.utils.clip_grad_norm_ = sgd_step, clip
        plugins.fork_loop.fork_head_loss = head_loss
        os.chdir(cwd)
        sys.path[:], sys.argv = path, argv
        _purge_fork_modules()
    return record


def _child(fn: Callable[..., Any], args: tuple, out: str) -> None:
    try:
        result = {"ok": fn(*args)}
    except BaseException:
        result = {"error": traceback.format_exc()}
    torch.save(result, out)


def run_in_children(calls: List[tuple]) -> List[Any]:
    """``[fn(*args) for fn, *args in calls]``, each in a process of its own forked from the
    preloaded pool (tests/distributed_harness.py), all at once; an exception in a child comes
    back as ``{"error": traceback}``."""
    from tests.distributed_harness import start_process
    with tempfile.TemporaryDirectory() as folder:
        outs = [os.path.join(folder, f"{i}.pt") for i in range(len(calls))]
        procs = [start_process(_child, (call[0], tuple(call[1:]), out))
                 for call, out in zip(calls, outs)]
        for proc in procs:
            proc.join()
        results = []
        for proc, out in zip(procs, outs):
            if not os.path.exists(out):
                results.append({"error": f"the child died (exit code {proc.exitcode})"})
                continue
            saved = torch.load(out, weights_only=False)
            results.append(saved.get("ok", saved))
        return results
