"""The training loop's guards: non-finite losses are skipped and counted, and too many in a row
stop the run with a clear message; start-up checks name the config key."""
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
