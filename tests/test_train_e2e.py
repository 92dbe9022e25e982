"""End to end: train_distill on real gloo processes, every method; exact resume after SIGKILL;
a 2-process checkpoint resumed on 1 process."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from host.config import get_config
from host.synthetic import write_train_set
from plugins.backbones import get_model
from tests.distributed_harness import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IDS, PER_ID = 16, 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Synthetic data and a teacher trained briefly with the standalone head (its model.pt and
    learned classifier.pt are what the distillation runs load)."""
    from host.trainer import train
    root = tmp_path_factory.mktemp("train")
    write_train_set(str(root / "data"), NUM_IDS, PER_ID, seed=3)
    (root / "configs").mkdir()
    shutil.copy(os.path.join(REPO, "configs", "base.py"), root / "configs" / "base.py")
    teacher = job_config(root, "teacher", distill="none", network="tiny_t", max_steps=30,
                         lr=0.1, batch_size=16, num_epoch=100)
    summary = train(teacher)
    assert summary["losses"][-1] < summary["losses"][0]
    for name in ("model.pt", "classifier.pt"):
        shutil.copy(os.path.join(teacher.output, name),
                    root / ("teacher.pt" if name == "model.pt" else name))
    return root


def job_config(root, name, **overrides):
    """A tiny job config file in root/configs, loaded with the real loader."""
    values = dict(network="tiny_s", teacher_network="tiny_t",
                  teacher_checkpoint=str(root / "teacher.pt"),
                  teacher_classifier=str(root / "classifier.pt"),
                  margin_list=(1.0, 0.0, 0.35), margin_scale=16.0, rec=str(root / "data"),
                  num_classes=NUM_IDS, num_image=NUM_IDS * PER_ID, num_epoch=3, batch_size=8,
                  lr=0.05, lr_schedule="step", lr_steps=(), num_workers=0, val_targets=[],
                  frequent=100, save_every=1000, seed=5, output=str(root / "runs" / name),
                  gkd_k=4, gkd_warmup_epochs=0)
    values.update(overrides)
    lines = ["from easydict import EasyDict as edict", "config = edict()"]
    lines += [f"config.{k} = {v!r}" for k, v in values.items()]
    (root / "configs" / f"{name}.py").write_text("\n".join(lines) + "\n")
    return get_config(f"configs/{name}", root=str(root))


def _train_methods(rank, world, configs):
    from host.trainer import train
    return {cfg.distill: train(cfg) for cfg in configs}


def test_every_method_trains_on_two_processes(workdir):
    methods = ("none", "adadistill", "arcdistill", "gkd", "feature_mse")
    configs = [job_config(workdir, f"e2e_{m}", distill=m, max_steps=8,
                          margin_list=(1.0, 0.3, 0.0) if m == "arcdistill" else (1.0, 0.0, 0.35))
               for m in methods]
    results = run_distributed(_train_methods, 2, args=(configs,))
    for method, cfg in zip(methods, configs):
        summary = results[0][method]
        assert summary["steps"] == 8 and summary["skipped_steps"] == 0
        losses = summary["losses"]
        assert results[1][method]["losses"] == pytest.approx(losses)   # same loss on every rank
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, (method, losses)
        assert os.path.isfile(os.path.join(cfg.output, "model.pt"))
        assert os.path.isfile(os.path.join(cfg.output, "training.log"))
        ckpts = os.listdir(os.path.join(cfg.output, "checkpoints"))
        assert ckpts == ["step_000000008"], ckpts
        state = torch.load(os.path.join(cfg.output, "model.pt"), weights_only=True)
        get_model("tiny_s").load_state_dict(state)        # loadable by the backbone as is
    assert os.path.isfile(os.path.join(configs[0].output, "classifier.pt"))


def _run(root, name, *extra, wait_for=None):
    """Run train_distill.py in root (a fork-like cwd); optionally SIGKILL it as soon as the
    checkpoint ``wait_for`` exists.  Returns the process return code."""
    cmd = [sys.executable, os.path.join(REPO, "train_distill.py"), f"configs/{name}", *extra]
    proc = subprocess.Popen(cmd, cwd=str(root), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    if wait_for is not None:
        deadline = time.time() + 240
        while not os.path.isdir(wait_for) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    if wait_for is None:
        assert proc.returncode == 0, err.decode()[-3000:]
    return proc.returncode


@pytest.mark.parametrize("method", ["adadistill", "gkd"])
def test_sigkilled_run_resumes_to_the_same_weights(workdir, method):
    common = dict(distill=method, max_steps=30, save_every=4, batch_size=16, num_epoch=10)
    straight = job_config(workdir, f"straight_{method}", **common)
    killed = job_config(workdir, f"killed_{method}", **common)
    _run(workdir, f"straight_{method}")
    first_ckpt = os.path.join(killed.output, "checkpoints", "step_000000004")
    code = _run(workdir, f"killed_{method}", wait_for=first_ckpt)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(killed.output, "checkpoints", "step_000000030"))
    _run(workdir, f"killed_{method}", "--resume")
    log = open(os.path.join(killed.output, "training.log")).read()
    assert "resumed from" in log
    a = torch.load(os.path.join(straight.output, "model.pt"), weights_only=True)
    b = torch.load(os.path.join(killed.output, "model.pt"), weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _train_one(rank, world, cfg):
    from host.trainer import train
    return train(cfg)


def test_two_process_checkpoint_resumes_on_one_process(workdir):
    cfg = job_config(workdir, "reshard", distill="adadistill", max_steps=3, save_every=3)
    run_distributed(_train_one, 2, args=(cfg,))
    saved = torch.load(os.path.join(cfg.output, "checkpoints", "step_000000003", "rank_1.pt"),
                       weights_only=True)
    # one process with the same per-process batch: the global batch halves, so the 48 samples
    # already seen are 6 of the new steps, and the schedule continues from there
    cfg1 = job_config(workdir, "reshard", distill="adadistill", max_steps=9, save_every=3,
                      resume=True)
    summary = run_distributed(_train_one, 1, args=(cfg1,))[0]
    assert summary["steps"] == 9 and len(summary["losses"]) == 3
    log = open(os.path.join(cfg.output, "training.log")).read()
    assert "(epoch 0, step 6, 48 samples into the epoch, saved on 2 ranks)" in log
    resumed = torch.load(os.path.join(cfg.output, "checkpoints", "step_000000009", "rank_0.pt"),
                         weights_only=True)
    assert resumed["world_size"] == 1 and saved["world_size"] == 2
    assert resumed["head"]["centers"].shape[0] == NUM_IDS
