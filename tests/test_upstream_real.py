"""The real upstream arcface_torch, when a checkout is at hand: ``KDFACE_UPSTREAM`` names an
insightface checkout (or its ``recognition/arcface_torch`` folder) at any commit.  Skipped
otherwise: upstream's code is never part of this repository.

The checkout's folder is copied to a temporary place and installed into by its documented way:
a patchable script (``train_v2.py``, or the ``train.py`` of 2022-01 .. 2022-05) is patched and
runs the shipped ``configs/ms1mv2_mbf_adadistill`` and ``configs/ms1mv2_mbf_gkd`` (every key kept,
tiny networks, 8 images, global batch 4: 52 / 40 optimizer steps) on 1 and 2 gloo processes on the
CPU (tests/upstream_cpu_shim.py: CUDA calls to the CPU, mxnet / torchvision stand-ins); the lr
of every step must be train_distill.py's for the same job and global batch, bit for bit, with
Nesterov and the clip as the job says; a cached AdaDistill run must give the online run's losses
without the teacher.  A 2021 PartialFC v1 fork trains two steps with train_distill.py after the
install.  Upstream's own ``using_wandb`` NameError (2023-01-01 .. 2023-01-05) is reported as such.

    KDFACE_UPSTREAM=/path/to/insightface .venv/bin/python -m pytest -q tests/test_upstream_real.py
"""
from __future__ import annotations

import io
import os
import shutil

import pytest
import torch

from engine.config import get_config
from patches import install_into_fork as installer
from patches import patch_train_v2 as patcher
from plugins.lr_schedule import run_schedule
from tests.distributed_harness import run_distributed
from tests.fork_runs import run_fork_script, run_in_children, write_shrunk_job
from tests.test_fork_vintages import _train_distill
from tests.upstream_cpu_shim import install as cpu_shim

SOURCE = os.environ.get("KDFACE_UPSTREAM")
pytestmark = pytest.mark.skipif(not SOURCE, reason="KDFACE_UPSTREAM names no upstream checkout")
SHRUNK = dict(num_classes=4, num_image=8, num_workers=0, network="tiny_s", embedding_size=64,
              teacher_network="tiny_t", teacher_embedding_size=64, teacher_cache=None,
              frequent=1, val_targets=[])


def _folder() -> str:
    nested = os.path.join(SOURCE, "recognition", "arcface_torch")
    return nested if os.path.isdir(nested) else SOURCE


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """(fork copy, its vintage, whether it was patched, {job name: configs/<name>}, root)."""
    from plugins.backbones import get_model
    from tools.synthetic import write_train_set
    root = str(tmp_path_factory.mktemp("upstream_real"))
    fork = os.path.join(root, "arcface_torch")
    shutil.copytree(_folder(), fork, ignore=shutil.ignore_patterns("*.pyc", "__pycache__"))
    vintage = installer.detect_vintage(fork)
    assert vintage is not None, f"{_folder()}: no train_v2.py / train.py of arcface_torch"
    if vintage.patchable:
        patcher.patch_file(os.path.join(fork, vintage.script))
    report = io.StringIO()   # the full copy: train_distill.py's loader computes the expected lr
    assert installer.install(fork, out=report) == 0, report.getvalue()
    write_train_set(os.path.join(root, "data"), num_ids=4, images_per_id=2, seed=8)
    torch.manual_seed(1)
    torch.save(get_model("tiny_t", num_features=64).state_dict(), os.path.join(root, "t.pt"))
    torch.save(torch.nn.functional.normalize(torch.randn(4, 64), dim=1),
               os.path.join(root, "c.pt"))
    os.makedirs(os.path.join(fork, "configs"), exist_ok=True)
    common = dict(SHRUNK, rec=os.path.join(root, "data"),
                  teacher_checkpoint=os.path.join(root, "t.pt"))
    jobs = {}
    for job in ("ms1mv2_mbf_adadistill", "ms1mv2_mbf_gkd"):
        extra = {"teacher_classifier": os.path.join(root, "c.pt")} if "gkd" in job else {}
        for world, batch in ((1, 4), (2, 2)):
            name = f"{job.split('_')[-1]}_{world}"
            jobs[name] = write_shrunk_job(fork, job, name, batch_size=batch, **common, **extra,
                                          output=os.path.join(root, "out", name))
    jobs["two_steps"] = write_shrunk_job(fork, "ms1mv2_mbf_adadistill", "two_steps",
                                         batch_size=4, **dict(common, num_epoch=1),
                                         output=os.path.join(root, "out", "two_steps"))
    for name, cache in (("online", None), ("cached", os.path.join(root, "cache"))):
        jobs[name] = write_shrunk_job(fork, "ms1mv2_mbf_adadistill", name, batch_size=4,
                                      **dict(common, num_epoch=2, teacher_cache=cache),
                                      output=os.path.join(root, "out", name))
    return fork, vintage, root, jobs


def _runs(rank, world, fork, script, configs):
    out = []
    for config in configs:
        try:
            out.append(run_fork_script(fork, script, config, before=cpu_shim))
        except NameError as error:              # upstream's own using_wandb (2023-01)
            out.append(f"NameError: {error}")
    return out


def test_the_lr_of_every_step_is_train_distills(upstream):
    fork, vintage, _, jobs = upstream
    if not vintage.patchable:
        pytest.skip(f"{vintage.shape} ({vintage.period}): not patchable, see the next test")
    for world in (1, 2):
        names = [name for name in jobs if name.endswith(f"_{world}")]
        ranks = run_distributed(_runs, world, args=(fork, vintage.script,
                                                    [jobs[n] for n in names]))
        for i, name in enumerate(names):
            if isinstance(ranks[0][i], str):
                assert ranks[0][i] == "NameError: name 'using_wandb' is not defined"
                pytest.skip("upstream's own using_wandb NameError (2023-01-01 .. 2023-01-05)")
            schedule = run_schedule(get_config(jobs[name], root=fork), 2, 4)
            for record in (records[i] for records in ranks):
                assert [lrs[0] for lrs in record["lrs"]] == \
                    [schedule.lr_at(step) for step in range(schedule.total_steps)], name
                gkd = name.startswith("gkd")
                assert {n for g in record["nesterov"] for n in g} == {gkd}
                assert record["clips"] == ([] if gkd else [5.0] * schedule.total_steps)


def _cached_and_online(fork, script, online, cached):
    import plugins.teacher
    from engine.teacher_cache_build import build_from_config
    build_from_config(get_config(cached, root=fork), dtype="float32")
    first = run_fork_script(fork, script, online, before=cpu_shim)

    def no_teacher():
        def refuse(*args, **kwargs):
            raise AssertionError("the cached run built or ran the teacher")
        plugins.teacher.build_teacher = refuse
        plugins.teacher.TeacherHook.teacher_embeddings = refuse

    return first, run_fork_script(fork, script, cached, before=no_teacher)


def test_the_cached_run_gives_the_online_losses(upstream):
    fork, vintage, _, jobs = upstream
    if not vintage.patchable or patcher.upstream_bugs(
            open(os.path.join(fork, vintage.script)).read()):
        pytest.skip("no patched run at this commit")
    (result,) = run_in_children([(_cached_and_online, fork, vintage.script, jobs["online"],
                                  jobs["cached"])])
    assert "error" not in result, result.get("error")
    online, cached = result
    assert len(online["losses"]) == 4 and cached["losses"] == pytest.approx(online["losses"],
                                                                           rel=1e-5)


def test_train_distill_trains_in_the_fork(upstream):
    fork, vintage, _, jobs = upstream
    if vintage.patchable:
        pytest.skip("patched (way 2); way 1 on a fork of this shape: tests/test_fork_vintages.py")
    (log,) = run_in_children([(_train_distill, fork, jobs["two_steps"])])
    assert isinstance(log, str), log
    assert "finished: 2 steps" in log and "uses lr 0.00078125 = 0.1 x 4 / 512" in log
