"""Checkpoints: atomic under SIGKILL, fallback from a corrupt newest one, resharding W -> W'."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from host.checkpoint import CheckpointManager
from plugins.distributed import rank_and_world, shard_range
from tests.distributed_harness import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ShardedHead(nn.Module):
    """A stand-in head: a learned class shard plus a center buffer, both sharded."""

    sharded_keys = ("weight", "centers")

    def __init__(self, num_classes=10, dim=3):
        super().__init__()
        rank, world = rank_and_world()
        self.num_classes = num_classes
        self.class_start, self.num_local = shard_range(num_classes, rank, world)
        rows = torch.arange(self.class_start, self.class_start + self.num_local,
                            dtype=torch.float32)
        self.weight = nn.Parameter(rows[:, None].repeat(1, dim))
        self.register_buffer("centers", -rows[:, None].repeat(1, dim))


def _state(rank_steps=2):
    head = ShardedHead()
    backbone = nn.Linear(3, 3)
    opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}],
                          lr=0.1, momentum=0.9)
    for _ in range(rank_steps):
        loss = backbone(head.weight).pow(2).sum() + head.weight.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return head, backbone, opt


def _save_worker(rank, world, out):
    head, backbone, opt = _state()
    CheckpointManager(out).save(7, {"backbone": backbone.state_dict(), "global_step": 7,
                                    "epoch": 0, "consumed": 0}, head, opt)
    full_momentum = opt.state[opt.param_groups[1]["params"][0]]["momentum_buffer"]
    return {"weight": head.weight.detach().clone(), "momentum": full_momentum.clone()}


def _load_worker(rank, world, out):
    head, _, opt = ShardedHead(), None, None
    backbone = nn.Linear(3, 3)
    opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}],
                          lr=0.1, momentum=0.9)
    path, common, shards = CheckpointManager(out).load_latest()
    CheckpointManager.restore(common, shards, head, opt)
    momentum = opt.state[opt.param_groups[1]["params"][0]]["momentum_buffer"]
    return {"weight": head.weight.detach().clone(), "centers": head.centers.clone(),
            "momentum": momentum.clone(), "start": head.class_start}


def test_checkpoint_of_4_ranks_resumes_on_1_and_2(tmp_path):
    out = str(tmp_path)
    saved = run_distributed(_save_worker, 4, args=(out,))
    full_weight = torch.cat([s["weight"] for s in saved])
    full_momentum = torch.cat([s["momentum"] for s in saved])
    assert full_weight.shape == (10, 3)
    for world in (1, 2):
        loaded = run_distributed(_load_worker, world, args=(out,))
        torch.testing.assert_close(torch.cat([r["weight"] for r in loaded]), full_weight)
        torch.testing.assert_close(torch.cat([r["momentum"] for r in loaded]), full_momentum)
        centers = torch.cat([r["centers"] for r in loaded])
        torch.testing.assert_close(centers, -torch.arange(10.)[:, None].repeat(1, 3))


def _save(out, step):
    head, backbone, opt = _state()
    CheckpointManager(out, keep=5).save(step, {"backbone": backbone.state_dict(),
                                               "global_step": step, "epoch": 0,
                                               "consumed": 0}, head, opt)


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    out = str(tmp_path)
    _save(out, 1)
    _save(out, 2)
    newest = os.path.join(out, "checkpoints", "step_000000002", "rank_0.pt")
    with open(newest, "r+b") as handle:      # same size, garbage content
        handle.write(b"\0" * 64)
    path, common, _ = CheckpointManager(out).load_latest()
    assert path.endswith("step_000000001") and common["global_step"] == 1
    assert "step_000000002 is unusable" in caplog.text


def test_truncated_file_is_detected_from_meta(tmp_path):
    out = str(tmp_path)
    _save(out, 1)
    _save(out, 2)
    newest = os.path.join(out, "checkpoints", "step_000000002", "common.pt")
    with open(newest, "r+b") as handle:
        handle.truncate(10)
    path, _, _ = CheckpointManager(out).load_latest()
    assert path.endswith("step_000000001")


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import host.checkpoint as ck
    from tests.test_checkpoint import _save
    kill_at, out = int(sys.argv[1]), sys.argv[2]
    calls = {{"n": 0}}
    real_save, real_replace = ck.atomic_torch_save, ck.os.replace
    def counting_save(obj, path):
        calls["n"] += 1
        if calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, path)
    def dying_replace(src, dst):
        if kill_at == 99 and dst.endswith("step_000000002"):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    ck.atomic_torch_save = counting_save
    ck.os.replace = dying_replace
    _save(out, 1) if kill_at == 0 else None
    calls["n"] = 0
    _save(out, 2)
""")


@pytest.mark.parametrize("kill_at", [1, 2, 99])
def test_sigkill_during_save_never_leaves_a_loadable_incomplete_checkpoint(tmp_path, kill_at):
    out = str(tmp_path)
    _save(out, 1)
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(repo=REPO))
    proc = subprocess.run([sys.executable, str(script), str(kill_at), out], cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    manager = CheckpointManager(out)
    assert [os.path.basename(p) for p in manager.list()] == ["step_000000001"]
    path, common, _ = manager.load_latest()
    assert common["global_step"] == 1
