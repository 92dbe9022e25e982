"""Run integrity: a skipped step changes nothing, checkpoints hold only finite tensors, belong to
this run (identity, lock, fresh-run refusal) and survive SIGTERM; bad counts fail at load time."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import data.dataset as host_dataset
import engine.trainer as trainer
from tests.training_helpers import REPO, job_config


def _all_tensors(obj, prefix=""):
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _all_tensors(value, f"{prefix}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _all_tensors(value, f"{prefix}.{i}")


def _saved_files(output):
    files = glob.glob(os.path.join(output, "checkpoints", "step_*", "*.pt"))
    files += glob.glob(os.path.join(output, "*.pt"))
    assert files
    return files


def _assert_all_finite(output):
    for path in _saved_files(output):
        for name, tensor in _all_tensors(torch.load(path, weights_only=True)):
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"{path}: {name} is not finite"


def _poison_batches(monkeypatch, which):
    """Make the loader's batches number ``which`` (1-based) all +inf."""
    real = host_dataset.make_loader

    def make_loader(*args, **kwargs):
        loader = real(*args, **kwargs)

        class Poisoned:
            def __iter__(self):
                for n, (images, *rest) in enumerate(loader, start=1):
                    if n in which:
                        images = torch.full_like(images, float("inf"))
                    yield (images, *rest)
        return Poisoned()
    monkeypatch.setattr(host_dataset, "make_loader", make_loader)


def test_inf_batch_is_skipped_and_every_saved_tensor_is_finite(workdir, monkeypatch):
    _poison_batches(monkeypatch, {2})
    cfg = job_config(workdir, "inf_batch", distill="adadistill", max_steps=4, num_epoch=10,
                     save_every=1, keep_checkpoints=10)
    summary = trainer.train(cfg)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4
    _assert_all_finite(cfg.output)


def test_step_guard_restores_batchnorm_and_centers_bitwise():
    """Two micro-batches (gradient_acc 2) move BatchNorm stats and AdaDistill centers (the second
    one poisoned); the rollback restores both bitwise -- the centers from the rows the head
    journaled (a copy of the touched rows, never of the [C_local, D] table)."""
    from engine.step_guard import StepGuard
    from plugins.heads import AdaDistillHead
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                              torch.nn.Flatten(), torch.nn.LazyLinear(8),
                              torch.nn.BatchNorm1d(8))
    net(torch.randn(4, 3, 6, 6))
    head = AdaDistillHead(8, 50, margin="arcface", s=16.0, m=0.5)
    before = {k: v.clone() for k, v in list(net.state_dict().items()) + list(
        head.state_dict().items())}
    guard = StepGuard(net, head, torch.device("cpu"), 1)
    guard.begin()
    assert not any(copy.shape == head.centers.shape for copy in guard.copies.values())
    labels = torch.tensor([0, 1, 1, 3])
    loss = head(net(torch.randn(4, 3, 6, 6)), labels, torch.randn(4, 8))
    guard.loss(loss)
    labels = torch.tensor([3, 4, 1, 7])
    head.use_host_labels(labels.numpy())          # the trainer's host-side round count
    emb = net(torch.full((4, 3, 6, 6), float("inf")))
    loss = head(emb, labels, torch.full((4, 8), float("nan")))
    guard.loss(loss)
    assert not torch.isfinite(loss)
    journaled = torch.cat([rows for _, rows in head.journaled_rows()])
    assert sorted(set(journaled.tolist())) == [0, 1, 3]   # rows of valid samples (+ row 0)
    changed = [k for k, v in list(net.state_dict().items()) + list(head.state_dict().items())
               if not torch.equal(v, before[k])]
    assert "centers" in changed and any("running_var" in k for k in changed)
    flags, _ = guard.read(None, None, 0)
    assert flags.bad_loss and flags.bad_buffer and flags.skip
    assert guard.first_nonfinite() == "buffer '1.running_mean'"
    guard.rollback()
    guard.end()
    for key, value in list(net.state_dict().items()) + list(head.state_dict().items()):
        assert torch.equal(value, before[key]), key
    assert head.journaled_rows() == []


def test_huge_lr_from_the_start_never_writes_a_non_finite_tensor(workdir):
    cfg = job_config(workdir, "huge_lr", distill="adadistill", lr=1e8, max_steps=12,
                     num_epoch=10, save_every=1, keep_checkpoints=3, max_nonfinite=2)
    with pytest.raises(RuntimeError, match="non-finite") as err:
        trainer.train(cfg)
    _assert_all_finite(cfg.output)
    assert "resume from" in str(err.value) or "newest good checkpoint" in str(err.value)


def test_blow_up_stops_before_its_checkpoint_and_resumes_with_a_sane_lr(workdir):
    base = dict(distill="adadistill", num_epoch=10, save_every=3, keep_checkpoints=3,
                max_nonfinite=2)
    trainer.train(job_config(workdir, "blow_up", lr=0.05, max_steps=6, **base))
    with pytest.raises(RuntimeError, match=r"non-finite") as err:
        trainer.train(job_config(workdir, "blow_up", lr=1e8, max_steps=12, resume=True, **base))
    # it blew up right after resuming from step 6: the advice is not "resume from step 6"
    # again but the checkpoint before it (or --start-over)
    message = str(err.value)
    newest, earlier = (os.path.join(workdir, "runs", "blow_up", "checkpoints", f"step_{n:09d}")
                       for n in (6, 3))
    assert f"resume from {newest}" not in message
    assert f"this run resumed from {newest}" in message and f"--resume takes {earlier}" in message
    assert "--start-over" in message
    cfg = job_config(workdir, "blow_up", lr=0.05, max_steps=8, resume=True, **base)
    _assert_all_finite(cfg.output)
    log = open(os.path.join(cfg.output, "training.log")).read()
    assert re.search(r"non-finite (buffer '[\w.]+running_var'|loss) at step 7: step skipped",
                     log), log[-2000:]
    summary = trainer.train(cfg)
    assert summary["steps"] == 8 and summary["skipped_steps"] == 0
    _assert_all_finite(cfg.output)


def test_blow_up_advice_without_an_earlier_checkpoint_is_start_over(tmp_path):
    from types import SimpleNamespace
    from engine.checkpoint import CheckpointManager
    only = tmp_path / "checkpoints" / "step_000000004"
    only.mkdir(parents=True)
    run = SimpleNamespace(checkpoints=CheckpointManager(str(tmp_path), keep=1))
    fresh = trainer._Progress(total_steps=10)
    assert trainer._restart_advice(run, fresh) == f"resume from {only}"
    resumed = trainer._Progress(total_steps=10, resumed_from=str(only))
    advice = trainer._restart_advice(run, resumed)
    assert f"resume from {only}" not in advice and "--start-over" in advice
    assert "no earlier checkpoint is kept (keep_checkpoints=1)" in advice
    assert trainer._restart_advice(SimpleNamespace(checkpoints=CheckpointManager(
        str(tmp_path / "none"))), fresh) == "resume from scratch (no checkpoint yet)"


def test_fresh_run_into_a_folder_with_checkpoints_refuses_unless_start_over(workdir):
    cfg = job_config(workdir, "fresh_twice", distill="none", max_steps=2)
    trainer.train(cfg)
    with pytest.raises(ValueError, match=r"holds checkpoints.*--resume.*--start-over"):
        trainer.train(cfg)
    cfg = job_config(workdir, "fresh_twice", distill="none", max_steps=1, start_over=True)
    assert trainer.train(cfg)["steps"] == 1
    names = os.listdir(os.path.join(cfg.output, "checkpoints"))
    assert names == ["step_000000001"]


@pytest.mark.parametrize("change", [dict(network="tiny_t"), dict(distill="feature_mse"),
                                    dict(optimizer="adamw")])
def test_resume_with_a_state_shaping_change_names_the_key(workdir, change):
    name = "ident_" + "_".join(change)
    trainer.train(job_config(workdir, name, distill="none", max_steps=2))
    other = job_config(workdir, name, **dict(dict(distill="none", max_steps=4, resume=True),
                                             **change))
    key = next(iter(change))
    with pytest.raises(ValueError, match=rf"another run.*'{key}'"):
        trainer.train(other)


def test_identity_names_every_differing_state_key_and_ignores_the_others():
    from engine.run_identity import check_resume, run_identity
    cfg = dict(distill="none", network="tiny_s", embedding_size=512, num_classes=16,
               optimizer="sgd", rec="/nonexistent/data", lr=0.1)
    saved = run_identity(cfg, 128)
    assert check_resume("ck", saved, run_identity(dict(cfg, lr=0.2), 128)) is None
    with pytest.raises(ValueError, match=r"'num_classes': 16 -> 20; 'dataset': .*images:128.* -> "
                                         r".*images:99"):
        check_resume("ck", saved, run_identity(dict(cfg, num_classes=20), 99))
    assert run_identity(cfg, 128)["digest"] == saved["digest"]
    assert run_identity(dict(cfg, lr=0.3), 128)["digest"] == saved["digest"]
    assert run_identity(dict(cfg, network="r18"), 128)["digest"] != saved["digest"]


def test_resume_with_another_lr_is_allowed_and_logged(workdir):
    trainer.train(job_config(workdir, "ident_lr", distill="none", max_steps=2))
    cfg = job_config(workdir, "ident_lr", distill="none", max_steps=3, resume=True, lr=0.01,
                     seed=6)
    assert trainer.train(cfg)["steps"] == 3
    log = open(os.path.join(cfg.output, "training.log")).read()
    assert "resume with a changed config key 'lr': 0.05 -> 0.01" in log
    assert "resume with a changed config key 'seed': 5 -> 6" in log


HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from engine.run_lock import OutputLock
    lock = OutputLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_second_run_on_a_locked_folder_refuses_and_a_dead_holder_does_not_block(workdir,
                                                                                 tmp_path):
    cfg = job_config(workdir, "locked", distill="none", max_steps=1)
    script = tmp_path / "holder.py"
    script.write_text(HOLDER.format(repo=REPO))
    proc = subprocess.Popen([sys.executable, str(script), cfg.output], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        with pytest.raises(RuntimeError, match=rf"in use by another run \(pid {proc.pid}"):
            trainer.train(cfg)
    finally:
        proc.kill()
        proc.wait()
    assert trainer.train(cfg)["steps"] == 1          # the kernel released the dead holder's lock


def _signalled_run(workdir, job, name, result):
    """In a process of its own: train configs/<job> and send this process SIG<name> during the
    third step; write the summary's ``[steps, stopped_by]`` to ``result``."""
    os.chdir(workdir)
    from engine.config import get_config
    real, calls = trainer.head_loss, {"n": 0}

    def head_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), getattr(signal, "SIG" + name))
        return real(*args, **kwargs)
    trainer.head_loss = head_loss
    summary = trainer.train(get_config("configs/" + job))
    with open(result, "w") as handle:
        json.dump([summary["steps"], summary.get("stopped_by")], handle)


@pytest.mark.parametrize("name", ["TERM", "INT"])
def test_signal_saves_at_a_step_boundary_and_resumes_bitwise(workdir, tmp_path, name):
    from tests.distributed_harness import start_process
    job = f"sig{name.lower()}"
    ref = job_config(workdir, job + "_ref", distill="adadistill", max_steps=5, num_epoch=10)
    trainer.train(ref)
    cfg = job_config(workdir, job, distill="adadistill", max_steps=5, num_epoch=10)
    result = tmp_path / "stopped.json"
    proc = start_process(_signalled_run, (str(workdir), job, name, str(result)))
    proc.join(timeout=300)
    assert proc.exitcode == 0
    assert json.loads(result.read_text()) == [3, f"SIG{name}"]
    assert os.listdir(os.path.join(cfg.output, "checkpoints")) == ["step_000000003"]
    resumed = job_config(workdir, job, distill="adadistill", max_steps=5, num_epoch=10,
                         resume=True)
    assert trainer.train(resumed)["steps"] == 5
    a = torch.load(os.path.join(ref.output, "model.pt"), weights_only=True)
    b = torch.load(os.path.join(cfg.output, "model.pt"), weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_stale_temporary_files_are_removed_at_start_up(workdir):
    cfg = job_config(workdir, "stale", distill="none", max_steps=1)
    trainer.train(cfg)
    stale_dir = os.path.join(cfg.output, "checkpoints", "step_000000007.tmp")
    os.makedirs(stale_dir)
    stale_file = os.path.join(cfg.output, ".model.pt.tmp.999999")
    open(stale_file, "w").close()
    cfg = job_config(workdir, "stale", distill="none", max_steps=2, resume=True)
    trainer.train(cfg)
    assert not os.path.exists(stale_dir) and not os.path.exists(stale_file)


@pytest.mark.parametrize("key", ["batch_size", "gradient_acc", "save_every", "frequent",
                                 "num_epoch", "keep_checkpoints", "max_nonfinite", "max_steps",
                                 "embedding_size", "num_classes"])
def test_zero_counts_are_refused_at_load_naming_the_key(workdir, key):
    with pytest.raises(ValueError, match=rf"config key '{key}' must be >= 1, got 0"):
        job_config(workdir, f"zero_{key}", **{key: 0})


def test_negative_num_workers_is_refused(workdir):
    with pytest.raises(ValueError, match=r"config key 'num_workers' must be >= 0, got -1"):
        job_config(workdir, "neg_workers", num_workers=-1)


def test_nan_teacher_classifier_is_refused_naming_the_file(workdir, tmp_path):
    table = torch.load(workdir / "classifier.pt", weights_only=True).clone()
    table[3, 1] = float("nan")
    bad = tmp_path / "nan_classifier.pt"
    torch.save(table, bad)
    cfg = job_config(workdir, "nan_classifier", distill="adadistill", teacher_classifier=str(bad))
    with pytest.raises(ValueError, match=r"nan_classifier.pt.*non-finite"):
        trainer.train(cfg)


def test_wrong_teacher_architecture_hint_names_teacher_network(workdir):
    cfg = job_config(workdir, "wrong_teacher", distill="adadistill", teacher_network="tiny_s")
    with pytest.raises(ValueError, match="teacher_network"):
        trainer.train(cfg)


def _signal_one_rank_worker(rank, world, ref, cfg, resumed):
    import engine.trainer as tr
    tr.train(ref)
    real, calls = tr.head_loss, {"n": 0}

    def head_loss(*args, **kwargs):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    tr.head_loss = head_loss
    stopped = tr.train(cfg)
    tr.head_loss = real
    saved = sorted(os.listdir(os.path.join(cfg.output, "checkpoints")))
    final = tr.train(resumed)
    return {"stopped": (stopped["steps"], stopped["stopped_by"]), "saved": saved,
            "final": final["steps"]}


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_and_resumes_bitwise(workdir):
    from tests.distributed_harness import run_distributed
    kw = dict(distill="adadistill", max_steps=5, num_epoch=10, batch_size=4)
    ref = job_config(workdir, "sig2_ref", **kw)
    cfg = job_config(workdir, "sig2", **kw)
    resumed = job_config(workdir, "sig2", resume=True, **kw)
    results = run_distributed(_signal_one_rank_worker, 2, args=(ref, cfg, resumed))
    for result in results:
        assert result["stopped"] == (3, "SIGTERM")
        assert result["saved"] == ["step_000000003"]
        assert result["final"] == 5
    a = torch.load(os.path.join(ref.output, "model.pt"), weights_only=True)
    b = torch.load(os.path.join(cfg.output, "model.pt"), weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for rank in range(2):
        name = f"checkpoints/step_000000005/rank_{rank}.pt"
        ha = torch.load(os.path.join(ref.output, name), weights_only=True)["head"]
        hb = torch.load(os.path.join(cfg.output, name), weights_only=True)["head"]
        assert torch.equal(ha["centers"], hb["centers"])


def _train_distill_cli(root, argv, stderr):
    """``python train_distill.py <argv>`` in ``root``, in a started process: file descriptor 2 to
    the file ``stderr``; the process exits with main's SystemExit code, as the script does."""
    import train_distill
    handle = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(handle, 2)
    os.close(handle)
    os.chdir(root)
    train_distill.main(argv)


def test_train_distill_exits_128_plus_signal_after_saving(workdir, tmp_path):
    from tests.distributed_harness import start_process
    cfg = job_config(workdir, "cli_term", distill="none", max_steps=10 ** 6, num_epoch=1000,
                     save_every=1)
    first = os.path.join(cfg.output, "checkpoints", "step_000000001")
    stderr = tmp_path / "stderr.txt"
    proc = start_process(_train_distill_cli, (str(workdir), ["configs/cli_term"], str(stderr)))
    deadline = time.time() + 240
    while not os.path.isdir(first) and proc.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    proc.terminate()                                  # SIGTERM
    proc.join(timeout=240)
    err = stderr.read_text()
    assert proc.exitcode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    log = open(os.path.join(cfg.output, "training.log")).read()
    assert re.search(r"SIGTERM: saving step (\d+) and stopping", log)
    step = int(re.search(r"SIGTERM: saving step (\d+)", log).group(1))
    names = os.listdir(os.path.join(cfg.output, "checkpoints"))
    assert f"step_{step:09d}" in names and not any(n.endswith(".tmp") for n in names)
