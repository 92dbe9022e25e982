"""Config key ``compile`` (engine/compiled.py): torch.compile of the student gives the plain run's
numbers within float tolerance, and checkpoints pass between compiled and plain runs both ways
(the trainer saves the bare network, never the compiled wrapper's ``_orig_mod.`` keys).

The compiled run pays Inductor's code generation on its first step (C++ kernels via gcc, cached
under TORCHINDUCTOR_CACHE_DIR): tens of seconds on a cold cache, a few on a warm one."""
import os
import shutil

import pytest
import torch

import engine.trainer as trainer
from engine.compiled import compile_mode
from tests.training_helpers import job_config


def test_compile_setting_to_mode():
    assert compile_mode(False, "cuda") == "" and compile_mode(None, "cpu") == ""
    assert compile_mode(True, "cpu") == "default" == compile_mode("default", "cuda")
    assert compile_mode("reduce-overhead", "cuda") == "reduce-overhead"
    assert compile_mode("reduce-overhead", "cpu") == "default"        # CUDA graphs: CUDA only
    assert compile_mode("max-autotune", "cpu") == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="'compile' must be False, True or one of"):
        compile_mode("fast", "cuda")


def test_compile_key_is_checked_at_load(workdir):
    assert job_config(workdir, "compile_default").compile is False
    with pytest.raises(ValueError, match="config key 'compile' must be one of"):
        job_config(workdir, "compile_bad", compile="fast")


def _backbone(output, step):
    path = os.path.join(output, "checkpoints", f"step_{step:09d}", "common.pt")
    return torch.load(path, weights_only=True)["backbone"]


def test_compiled_run_matches_plain_and_checkpoints_pass_both_ways(workdir):
    common = dict(distill="adadistill", num_epoch=10, save_every=2, keep_checkpoints=3,
                  frequent=1)
    plain = job_config(workdir, "compile_plain", max_steps=4, **common)
    reference = trainer.train(plain)

    # plain -> compiled: resume the plain run's step 2 with compile on, train steps 3 and 4
    compiled = job_config(workdir, "compile_on", max_steps=4, resume=True, compile=True, **common)
    shutil.copytree(os.path.join(plain.output, "checkpoints", "step_000000002"),
                    os.path.join(compiled.output, "checkpoints", "step_000000002"))
    summary = trainer.train(compiled)
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    log = open(os.path.join(compiled.output, "training.log")).read()
    assert "compile: torch.compile(student, mode='default')" in log
    assert summary["losses"] == pytest.approx(reference["losses"][2:], rel=1e-4, abs=1e-5)
    start, want, got = (_backbone(plain.output, 2), _backbone(plain.output, 4),
                        _backbone(compiled.output, 4))
    assert set(got) == set(want) and not any("_orig_mod" in key for key in got)
    # what the two steps changed, compiled vs plain: Inductor reorders float sums (measured
    # 2e-4 relative on the weights' update, 6e-7 on the BatchNorm statistics)
    for buffers in (False, True):
        keys = [k for k in want if want[k].is_floating_point() and ("running" in k) == buffers]
        plain_step = torch.cat([(want[k] - start[k]).flatten() for k in keys])
        compiled_step = torch.cat([(got[k] - start[k]).flatten() for k in keys])
        assert plain_step.norm() > 0
        assert (compiled_step - plain_step).norm() <= 2e-3 * plain_step.norm()
    model = torch.load(os.path.join(compiled.output, "model.pt"), weights_only=True)
    assert set(model) == set(want)

    # compiled -> plain: the compiled run's step 4 resumes without compile
    again = job_config(workdir, "compile_on", max_steps=6, resume=True, **common)
    summary = trainer.train(again)
    assert summary["steps"] == 6 and len(summary["losses"]) == 2
    log = open(os.path.join(again.output, "training.log")).read()
    assert "resumed from" in log and "step_000000004" in log
