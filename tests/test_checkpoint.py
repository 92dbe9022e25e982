"""Checkpoints: atomic under SIGKILL, fallback from a corrupt newest one, resharding W -> W'."""
import hashlib
import json
import os
import signal

import pytest
import torch
from torch import nn

from engine.checkpoint import CheckpointManager
from plugins.distributed import rank_and_world, shard_range
from tests.distributed_harness import run_distributed, start_process

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


def _killer(kill_at, out):
    """In a process of its own: save step 2 and SIGKILL this process at the ``kill_at``-th file
    written (99: just before the step folder's final rename)."""
    import engine.checkpoint as ck
    calls = {"n": 0}
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
    _save(out, 2)


@pytest.mark.parametrize("kill_at", [1, 2, 99])
def test_sigkill_during_save_never_leaves_a_loadable_incomplete_checkpoint(tmp_path, kill_at):
    out = str(tmp_path)
    _save(out, 1)
    proc = start_process(_killer, (kill_at, out))
    proc.join(timeout=300)
    assert proc.exitcode == -signal.SIGKILL
    manager = CheckpointManager(out)
    assert [os.path.basename(p) for p in manager.list()] == ["step_000000001"]
    path, common, _ = manager.load_latest()
    assert common["global_step"] == 1


def _flip_byte_inside_tensor_data(path):
    """Flip one byte in the middle of the largest tensor record of a torch zip file (the file
    still unpickles: only the value changes)."""
    import zipfile
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    with open(path, "r+b") as handle:
        handle.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(handle.read(2), "little") for _ in range(2))
        handle.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x40]))


def test_flipped_bytes_inside_tensor_data_fall_back_naming_the_file(tmp_path, caplog):
    out = str(tmp_path)
    _save(out, 1)
    _save(out, 2)
    newest = os.path.join(out, "checkpoints", "step_000000002", "rank_0.pt")
    _flip_byte_inside_tensor_data(newest)
    torch.load(newest, weights_only=True)              # still loads: only a checksum can tell
    path, common, _ = CheckpointManager(out).load_latest()
    assert path.endswith("step_000000001") and common["global_step"] == 1
    assert "rank_0.pt" in caplog.text and "sha256" in caplog.text


@pytest.mark.parametrize("meta", ["[]", "{}", '{"step": 2, "world_size": 1, "files": []}',
                                  "not json"])
def test_malformed_meta_falls_back_with_a_warning(tmp_path, caplog, meta):
    out = str(tmp_path)
    _save(out, 1)
    _save(out, 2)
    with open(os.path.join(out, "checkpoints", "step_000000002", "meta.json"), "w") as handle:
        handle.write(meta)
    path, _, _ = CheckpointManager(out).load_latest()
    assert path.endswith("step_000000001")
    assert "meta.json" in caplog.text


def test_rank_file_missing_a_key_falls_back(tmp_path, caplog):
    out = str(tmp_path)
    _save(out, 1)
    _save(out, 2)
    folder = os.path.join(out, "checkpoints", "step_000000002")
    bad = os.path.join(folder, "rank_0.pt")
    state = torch.load(bad, weights_only=True)
    del state["optimizer"]
    torch.save(state, bad)
    meta = json.load(open(os.path.join(folder, "meta.json")))      # a consistent meta.json
    meta["files"]["rank_0.pt"] = os.path.getsize(bad)
    meta["sha256"]["rank_0.pt"] = hashlib.sha256(open(bad, "rb").read()).hexdigest()
    json.dump(meta, open(os.path.join(folder, "meta.json"), "w"))
    found = CheckpointManager(out).load_latest()
    assert found[0].endswith("step_000000001")
    assert "rank_0.pt: lacks the key(s) ['optimizer']" in caplog.text


def test_non_finite_state_is_never_written_and_names_the_tensor(tmp_path):
    from engine.checkpoint import NonFiniteStateError
    out = str(tmp_path)
    _save(out, 1)
    head, backbone, opt = _state()
    with torch.no_grad():
        backbone.bias[1] = float("inf")
    with pytest.raises(NonFiniteStateError, match=r"'backbone\.bias'.*step_000000001"):
        CheckpointManager(out).save(2, {"backbone": backbone.state_dict(), "global_step": 2,
                                        "epoch": 0, "consumed": 0}, head, opt)
    assert [os.path.basename(p) for p in CheckpointManager(out).list()] == ["step_000000001"]
    assert not os.path.exists(os.path.join(out, "checkpoints", "step_000000002.tmp"))


def test_disk_full_names_the_folder_and_the_space_needed(tmp_path, monkeypatch):
    import errno
    import plugins.atomic_io as atomic_io

    class FullFile:
        def __init__(self, real):
            self.real = real

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.real, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.real.close()

    real_open = open
    monkeypatch.setattr(atomic_io, "open", lambda *a, **k: FullFile(real_open(*a, **k)),
                        raising=False)
    target = tmp_path / "sub" / "model.pt"
    with pytest.raises(OSError, match=r"disk full.*sub.*needs about 0\.4 MB") as err:
        atomic_io.atomic_torch_save({"w": torch.zeros(100, 1000)}, str(target))
    assert err.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path / "sub") == []
