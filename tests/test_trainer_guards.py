"""The training loop's guards: non-finite losses are skipped and counted, and too many in a row
stop the run with a clear message; a skipped step restores everything (float16 path,
gradient_acc 2) while a gradient overflow is GradScaler's skip; start-up checks name the config
key."""
import os

import pytest
import torch

import engine.trainer as trainer
from tests.training_helpers import job_config


@pytest.fixture
def root(workdir):
    return workdir


def _nan_on(calls_to_poison):
    real = trainer.head_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] in calls_to_poison else loss
    return poisoned


def test_nonfinite_losses_are_skipped_and_counted(root, monkeypatch):
    monkeypatch.setattr(trainer, "head_loss", _nan_on({2, 3}))
    cfg = job_config(root, "nan_skip", distill="none", max_steps=4, num_epoch=10)
    summary = trainer.train(cfg)
    assert summary["skipped_steps"] == 2 and summary["steps"] == 4
    assert all(torch.isfinite(torch.tensor(summary["losses"])))
    log = open(os.path.join(cfg.output, "training.log")).read()
    assert "non-finite loss at step 1: step skipped (1 in a row)" in log
    assert "(2 in a row)" in log


def test_too_many_nonfinite_losses_stop_the_run(root, monkeypatch):
    monkeypatch.setattr(trainer, "head_loss", _nan_on(set(range(1, 100))))
    cfg = job_config(root, "nan_stop", distill="none", max_steps=10, max_nonfinite=3)
    with pytest.raises(trainer.NonFiniteLossError, match="3 non-finite losses in a row"):
        trainer.train(cfg)


def test_startup_checks_name_the_key(root):
    cfg = job_config(root, "no_teacher", distill="adadistill",
                     teacher_checkpoint=str(root / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="'teacher_checkpoint' = .*missing.pt"):
        trainer.train(cfg)
    cfg = job_config(root, "dims", distill="adadistill", teacher_embedding_size=256)
    with pytest.raises(ValueError, match=r"distill='adadistill' needs .*embedding_size=512 "
                                         r"\(student\) and teacher_embedding_size=256"):
        trainer.train(cfg)
    cfg = job_config(root, "fixed", distill="arcdistill", teacher_classifier=None,
                     margin_list=(1.0, 0.5, 0.0))
    with pytest.raises(ValueError, match="needs the teacher's classifier"):
        trainer.train(cfg)
    cfg = job_config(root, "combined", distill="none", margin_list=(1.0, 0.3, 0.2))
    with pytest.raises(ValueError, match=r"ArcFace \(1.0, m, 0.0\) or CosFace"):
        trainer.train(cfg)


def _state(run):
    """Everything a step may change: student (weights, BatchNorm), head state (AdaDistill's
    centers), optimizer state (momentum), and the loss scale."""
    opt = run.optimizer.state_dict()["state"]
    return {"student": {k: v.clone() for k, v in run.student.state_dict().items()},
            "head": {k: v.clone() for k, v in run.head.state_dict().items()},
            "momentum": {i: s["momentum_buffer"].clone() for i, s in opt.items()
                         if s.get("momentum_buffer") is not None},
            "scaler": run.scaler.state_dict()}


def _same(a, b):
    return a["scaler"] == b["scaler"] and all(
        a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k])
                                                 for k in a[part])
        for part in ("student", "head", "momentum"))


def _prepared(root, name):
    cfg = job_config(root, name, distill="adadistill", gradient_acc=2, max_steps=10,
                     num_epoch=10, fp16=True, amp_dtype="float16")
    run, progress = trainer.prepare_run(cfg)
    batches = iter(run.loader)
    stop = type("NoStop", (), {"signum": 0})()
    trainer.train_step(run, progress, [next(batches), next(batches)], stop)   # momentum exists
    return run, progress, batches, stop


def test_skipped_step_restores_everything_on_the_float16_path(root, monkeypatch):
    """gradient_acc 2, the second micro-batch's loss NaN: after the step, weights, BatchNorm,
    AdaDistill's centers (moved by both forwards), momentum and the loss scale are as before it
    (a non-finite loss does not back the scale off)."""
    run, progress, batches, stop = _prepared(root, "skip_fp16")
    before, step = _state(run), progress.step
    monkeypatch.setattr(trainer, "head_loss", _nan_on({2}))
    flags = trainer.train_step(run, progress, [next(batches), next(batches)], stop)
    assert flags.skip and flags.bad_loss and progress.step == step
    assert progress.skipped_steps == 1 and _same(before, _state(run))
    monkeypatch.undo()
    flags = trainer.train_step(run, progress, [next(batches), next(batches)], stop)
    assert not flags.skip and progress.step == step + 1 and progress.nonfinite_in_row == 0
    assert not _same(before, _state(run))               # the next step is a real one


def test_overflowing_gradients_of_a_finite_loss_are_gradscalers_skip(root, monkeypatch):
    """A finite loss whose scaled gradients overflow float16: GradScaler's documented skip --
    the step counts, weights and momentum stay, the scale halves; buffers keep the forward's
    update (as GradScaler.step never restored them either)."""
    run, progress, batches, stop = _prepared(root, "overflow_fp16")
    before, step = _state(run), progress.step
    real = trainer.head_loss
    monkeypatch.setattr(trainer, "head_loss", lambda *a, **k: real(*a, **k) * 1e30)
    flags = trainer.train_step(run, progress, [next(batches), next(batches)], stop)
    after = _state(run)
    assert flags.overflow and not flags.skip and progress.step == step + 1
    assert progress.skipped_steps == 0
    assert after["scaler"]["scale"] == before["scaler"]["scale"] / 2
    params = dict(run.student.named_parameters())
    assert all(torch.equal(after["student"][k], before["student"][k]) for k in params)
    assert all(torch.equal(after["momentum"][i], before["momentum"][i])
               for i in before["momentum"])
    assert not torch.equal(after["head"]["centers"], before["head"]["centers"])
