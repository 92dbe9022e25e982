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

from plugins.backbones import get_model
from tests.distributed_harness import run_distributed
from tests.training_helpers import NUM_IDS, REPO, job_config

def _train_methods(rank, world, configs):
    from engine.trainer import train
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


def _train_distill_main(root, argv):
    """``python train_distill.py <argv>`` in ``root`` (a fork-like cwd), in a started process."""
    import train_distill
    os.chdir(root)
    train_distill.main(argv)


@pytest.mark.parametrize("method", ["adadistill", "gkd"])
def test_sigkilled_run_resumes_to_the_same_weights(workdir, monkeypatch, method):
    """Only the killed run is a process of its own (SIGKILL needs one: forked from the harness's
    preloaded forkserver); the uninterrupted reference and the resume (train_distill.py's own
    main with --resume) run in this process."""
    import train_distill
    from engine.trainer import train
    from tests.distributed_harness import start_process
    # 16 steps per epoch (128 images, batch 8): killed in epoch 0, resumed across the epoch end
    common = dict(distill=method, max_steps=20, save_every=4, batch_size=8, num_epoch=10)
    straight = job_config(workdir, f"straight_{method}", **common)
    killed = job_config(workdir, f"killed_{method}", **common)
    assert train(straight)["steps"] == 20
    first_ckpt = os.path.join(killed.output, "checkpoints", "step_000000004")
    proc = start_process(_train_distill_main, (str(workdir), [f"configs/killed_{method}"]))
    deadline = time.time() + 240
    while not os.path.isdir(first_ckpt) and proc.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(killed.output, "checkpoints", "step_000000020"))
    monkeypatch.chdir(workdir)
    train_distill.main([f"configs/killed_{method}", "--resume"])
    log = open(os.path.join(killed.output, "training.log")).read()
    assert "resumed from" in log and "finished: 20 steps" in log
    a = torch.load(os.path.join(straight.output, "model.pt"), weights_only=True)
    b = torch.load(os.path.join(killed.output, "model.pt"), weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _train_one(rank, world, cfg):
    from engine.trainer import train
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


def test_torchrun_command_and_cache_build_flag(workdir, monkeypatch):
    """The documented commands themselves: torchrun with 2 processes, and --build-teacher-cache."""
    cache = str(workdir / "cli_cache")
    import train_distill
    cfg = job_config(workdir, "cli_run", distill="adadistill", max_steps=2, teacher_cache=cache)
    monkeypatch.chdir(workdir)              # the build: train_distill.py's main, in this process
    train_distill.main(["configs/cli_run", "--build-teacher-cache"])
    assert os.path.isfile(os.path.join(cache, "meta.json"))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", os.path.join(REPO, "train_distill.py"),
                          "configs/cli_run"], cwd=str(workdir), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    log = open(os.path.join(cfg.output, "training.log")).read()
    assert "finished: 2 steps" in log
    saved = torch.load(os.path.join(cfg.output, "checkpoints", "step_000000002", "rank_1.pt"),
                       weights_only=True)
    assert saved["world_size"] == 2
