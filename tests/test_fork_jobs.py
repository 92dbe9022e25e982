"""Every shipped job config starts in a fork's patched train_v2.py; what that loop cannot honour
is said by name at start-up, the recipe keys a job sets are in its config dump; a fork's own job
is left exactly as the fork runs it (same dump, same losses, same lr curve).

The fork is the stand-in of upstream arcface_torch (tests/upstream_standin.py), patched by
patches/patch_train_v2.py.  Each shipped ``configs/<job>.py`` (found by glob, so configs added
later are covered) runs through a wrapper that keeps every key of the job and shrinks only the
data (8 images of 8 of the 16 classes, batch 4, one epoch: two steps) and the teacher (``tiny_t``
with the job's teacher embedding size, random weights; a random [C, D_t] teacher classifier).
They run one after the other in two processes side by side (one torch import each), the first of
them starting with a fork's own job under the original and then the patched script.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from patches import patch_train_v2 as patcher
from plugins.heads import head_names, head_spec
from tests.test_install_into_fork import PYTHON, REPO, fork_env
from tests.upstream_standin import write_upstream_standin

NUM_CLASSES = 16
NUM_IMAGES, BATCH = 8, 4      # two steps of one epoch (BatchNorm and the batch terms need >= 2)
JOBS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
              if os.path.basename(p) not in ("base.py", "__init__.py"))
NEEDS_TEACHER = tuple(name for name in head_names() if head_spec(name).needs_teacher)

RUN_JOBS = '''\
"""python run_jobs.py <script>:<job>...: run each job with its script in this one process
(one torch import)."""
import runpy
import sys
import traceback

for run in sys.argv[1:]:
    script, job = run.split(":")
    print("=== run " + run, file=sys.stderr, flush=True)
    for name in [m for m in sys.modules if m == "configs" or m.startswith("configs.")]:
        del sys.modules[name]   # the fork's get_config updates configs.base in place
    sys.argv = [script, "configs/" + job]
    try:
        runpy.run_path(script, run_name="__main__")
    except BaseException:
        traceback.print_exc()
    print("=== end " + run, file=sys.stderr, flush=True)
'''

WRAPPER = '''\
"""{job}, every key kept; only the data and the teacher shrunk for a CPU test."""
from easydict import EasyDict as edict

from configs.{job} import config as _job

config = edict(dict(_job))
config.update({overrides!r})
'''


def job_values(job: str) -> dict:
    path = os.path.join(REPO, "configs", job + ".py")
    spec = importlib.util.spec_from_file_location("_shipped_" + job, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.config)


def fork_dump(stderr: str) -> dict:
    """The config the fork's loop dumps (``: key   value`` lines) -> {key: value text}."""
    return {m.group(1): m.group(2) for m in re.finditer(r"-: (\S+) +(.*)$", stderr, re.M)}


FORK_OWN_JOB = '''\
from easydict import EasyDict as edict

config = edict()
config.network = "fork_plain"
config.embedding_size = 64
config.margin_list = (1.0, 0.3, 0.2)   # a combined margin: fine for PartialFC_V2, not for our heads
config.rec = {rec!r}
config.num_classes = 16
config.num_image = {num_image}
config.num_epoch = 2
config.warmup_epoch = 1
config.batch_size = {batch}
config.output = {output!r}
'''
# a fork's own job, under the fork's original script and then the patched one (before any of
# our jobs ran in the process, so that nothing of theirs is left over for it)
FORK_OWN_RUNS = ("train_v2_original.py:fork_job", "train_v2.py:fork_job")


@pytest.fixture(scope="module")
def shipped_runs(tmp_path_factory):
    """{"<script>:<job>": the stderr of that run} for the fork's own job (original and patched
    script) and for every shipped job (key ``train_v2.py:shrunk_<job>``)."""
    from tools.synthetic import write_train_set
    from plugins.backbones import get_model
    root = str(tmp_path_factory.mktemp("shipped_jobs"))
    fork = write_upstream_standin(root)
    path = os.path.join(fork, "train_v2.py")
    assert patcher.main([path]) == 0
    shutil.copy(path + ".orig", os.path.join(fork, "train_v2_original.py"))
    write_train_set(os.path.join(root, "data"), num_ids=NUM_IMAGES, images_per_id=1, seed=5)
    with open(os.path.join(fork, "configs", "fork_job.py"), "w") as handle:
        handle.write(FORK_OWN_JOB.format(rec=os.path.join(root, "data"), num_image=NUM_IMAGES,
                                         batch=BATCH, output=os.path.join(root, "fork_own")))
    for job in JOBS:
        shutil.copy(os.path.join(REPO, "configs", job + ".py"), os.path.join(fork, "configs"))
        values = job_values(job)
        overrides = dict(rec=os.path.join(root, "data"), num_classes=NUM_CLASSES,
                         num_image=NUM_IMAGES, num_epoch=1, warmup_epoch=0, batch_size=BATCH,
                         num_workers=0, output=os.path.join(root, "out", job))
        if values.get("gkd_tau_batch"):      # the adaptive-k block shrinks with the batch
            overrides["gkd_tau_batch"] = overrides["batch_size"]
        if values.get("distill", "adadistill") in NEEDS_TEACHER:
            dim = values.get("teacher_embedding_size", 512)
            teacher = os.path.join(root, f"teacher_{dim}.pt")
            table = os.path.join(root, f"classifier_{dim}.pt")
            if not os.path.exists(teacher):
                torch.manual_seed(dim)
                torch.save(get_model("tiny_t", num_features=dim).state_dict(), teacher)
                torch.save(torch.randn(NUM_CLASSES, dim), table)
            overrides.update(teacher_network="tiny_t", teacher_checkpoint=teacher,
                             teacher_classifier=table, teacher_cache=None)
        with open(os.path.join(fork, "configs", f"shrunk_{job}.py"), "w") as handle:
            handle.write(WRAPPER.format(job=job, overrides=overrides))
    with open(os.path.join(fork, "run_jobs.py"), "w") as handle:
        handle.write(RUN_JOBS)
    env = dict(fork_env(), PYTHONPATH=REPO)
    shipped = [f"train_v2.py:shrunk_{j}" for j in JOBS]
    # two processes side by side (the machine's 2 cores), every other job each: the two r50
    # teacher jobs, next to each other in sorted order, land in different ones
    groups = [[*FORK_OWN_RUNS, *shipped[0::2]], shipped[1::2]]
    logs = [os.path.join(root, f"run_jobs_{i}.log") for i in range(len(groups))]
    procs = []
    for group, log in zip(groups, logs):      # to files: a full pipe would stall the other one
        with open(log, "w") as handle:
            procs.append(subprocess.Popen([PYTHON, "run_jobs.py", *group], cwd=fork, env=env,
                                          stdout=subprocess.DEVNULL, stderr=handle))
    runs = {}
    for group, proc, log in zip(groups, procs, logs):
        proc.wait(timeout=1200)
        with open(log) as handle:
            stderr = handle.read()
        assert proc.returncode == 0, stderr
        found = dict(re.findall(r"=== run (\S+)\n(.*?)=== end ", stderr, re.S))
        assert sorted(found) == sorted(group), stderr
        runs.update(found)
    return runs


def test_jobs_are_found():
    assert "ms1mv2_mbf_adadistill" in JOBS and "ms1mv2_mbf_gkd" in JOBS and len(JOBS) >= 7


@pytest.mark.parametrize("job", JOBS)
def test_shipped_job_starts_in_the_patched_loop(shipped_runs, job):
    from plugins.fork_loop import FORK_MARGIN_SCALE, NOT_HONOURED
    from plugins.fork_recipe import RECIPE_KEYS
    run = shipped_runs["train_v2.py:shrunk_" + job]
    values = job_values(job)
    assert "Traceback" not in run, run
    steps = re.findall(r"step (\d+) epoch 0 loss (\S+) lr \S+ head (\w+)", run)
    assert [s[0] for s in steps] == ["1", "2"], run   # 8 images, global batch 4
    assert all(float(s[1]) == float(s[1]) and float(s[1]) > 0 for s in steps), steps
    method = values.get("distill", "adadistill")
    head = "PartialFC_V2" if method == "none" else head_spec(method).cls.__name__
    assert {s[2] for s in steps} == {head}
    # each key the fork's loop does not honour, set by the job to another value, is named once
    warned = re.findall(r"config key '(\w+)' = (.*?) is not honoured by the patched train_v2.py",
                        run)
    expected = {key for key, (_, same) in NOT_HONOURED.items()
                if key in values and not same(values[key])}
    if method == "none" and float(values.get("margin_scale", 64.0)) != FORK_MARGIN_SCALE:
        expected.add("margin_scale")
    assert sorted(k for k, _ in warned) == sorted(expected), run
    # the dump shows only what is in effect: none of the keys the loop ignores, and exactly the
    # recipe keys the job sets (honoured); the others follow the fork
    dump = fork_dump(run)
    assert dump["network"] == values["network"] and dump["distill"] == method
    assert not set(NOT_HONOURED) & set(dump), sorted(set(NOT_HONOURED) & set(dump))
    assert {key for key in RECIPE_KEYS if key in dump} == \
        {key for key in RECIPE_KEYS if key in values}, job
    if "lr_schedule" in values:
        assert dump["lr_schedule"] == values["lr_schedule"]
        assert f"lr schedule: the job's '{values['lr_schedule']}' (as train_distill.py)" in run


def test_a_forks_own_job_dumps_and_trains_as_unpatched(shipped_runs):
    original, patched = (shipped_runs[run] for run in FORK_OWN_RUNS)
    assert "Traceback" not in original + patched, original + patched
    assert fork_dump(patched) == fork_dump(original) and "network" in fork_dump(original)
    assert "distill" not in fork_dump(patched) and "not honoured" not in patched
    # the same losses and the same lr curve (the fork's PolynomialLRWarmup) line by line
    steps = [re.findall(r"step \d+ epoch \d+ loss \S+ lr \S+ head \w+", text)
             for text in (original, patched)]
    assert steps[0] == steps[1] and len(steps[0]) == 4
    lrs = [float(line.split(" lr ")[1].split()[0]) for line in steps[0]]
    assert len(set(lrs)) > 2          # warm-up then decay: the curve is not flat


# ------------------------------------------------------------------ start-up checks, in process

def distill_cfg(**values):
    from easydict import EasyDict
    cfg = EasyDict(distill="none", margin_list=(1.0, 0.5, 0.0), rec="r", num_classes=4,
                   num_epoch=1, warmup_epoch=0, embedding_size=8, network="r18")
    cfg.update(values)
    return cfg


def test_a_job_without_distill_is_not_touched():
    from easydict import EasyDict
    from plugins.fork_loop import prepare_fork_config
    cfg = EasyDict(network="r50", lr_schedule="cosine", grad_clip=1.0, anything=1)
    before = dict(cfg)
    prepare_fork_config(cfg)
    assert dict(cfg) == before


@pytest.mark.parametrize("key, value, says", [
    ("max_steps", 10, "num_epoch full epochs"),
    ("save_every", 100, "each epoch end"),
    ("keep_checkpoints", 3, "checkpoints"),
    ("max_nonfinite", 5, "non-finite"),
    ("skip_bad_records", True, "a bad record fails"),
    ("amp_dtype", "bfloat16", "float16 autocast on GPUs"),
    ("channels_last", True, "memory format"),
    ("margin_scale", 32.0, "PartialFC_V2 margin scale"),
])
def test_each_key_the_loop_ignores_is_warned_by_name(caplog, key, value, says):
    from plugins.fork_loop import prepare_fork_config
    cfg = distill_cfg(**{key: value})
    with caplog.at_level(logging.WARNING, logger="kdface.fork_loop"):
        prepare_fork_config(cfg)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"config key '{key}' = {value!r} is not honoured by the "
                                  f"patched train_v2.py: it uses ")
    assert says in messages[0] and "train_distill.py" in messages[0]
    assert key not in cfg or key == "margin_scale"   # dropped from the dump; the scale stays


@pytest.mark.parametrize("key, value", [
    ("lr_schedule", "cosine"), ("nesterov", True), ("grad_clip", 0.0), ("lr_reference_batch", 512),
    ("flip", False), ("teacher_cache_force", True), ("max_steps", None),
    ("skip_bad_records", False), ("amp_dtype", "auto"), ("channels_last", False),
    ("margin_scale", 64.0)])
def test_honoured_keys_and_values_the_loop_gives_anyway_are_not_warned(caplog, key, value):
    from plugins.fork_loop import prepare_fork_config
    with caplog.at_level(logging.WARNING, logger="kdface.fork_loop"):
        prepare_fork_config(distill_cfg(**{key: value}))
    assert not caplog.records


def test_grad_reduction_is_refused_everywhere(tmp_path):
    from engine.config import get_config
    from plugins.fork_loop import prepare_fork_config
    from plugins.config_defaults import check_types
    for mode in ("exact", "arcface_torch"):
        with pytest.raises(ValueError, match=r"configs/<job>.py: config key 'grad_reduction' was "
                                             r"removed: every training path now gives .* "
                                             r"delete the line"):
            prepare_fork_config(distill_cfg(grad_reduction=mode))
        with pytest.raises(ValueError, match="'grad_reduction' was removed"):
            check_types({"grad_reduction": mode}, "x.py")
    (tmp_path / "configs").mkdir()
    shutil.copy(os.path.join(REPO, "configs", "base.py"), tmp_path / "configs" / "base.py")
    (tmp_path / "configs" / "job.py").write_text(
        "from easydict import EasyDict as edict\nconfig = edict()\n"
        "config.grad_reduction = 'arcface_torch'\n")
    with pytest.raises(ValueError, match=r"job.py: config key 'grad_reduction' was removed: "
                                         r".*PartialFC_V2 multiplies"):
        get_config("configs/job", root=str(tmp_path))


def test_recipe_keys_stay_when_the_job_sets_them_and_leave_when_not():
    from plugins.fork_loop import prepare_fork_config
    from plugins.fork_recipe import RECIPE_KEYS
    cfg = distill_cfg(lr_schedule="step", grad_clip=0.0)
    prepare_fork_config(cfg)
    assert (cfg.lr_schedule, cfg.grad_clip) == ("step", 0.0)
    assert not {key for key in RECIPE_KEYS if key in cfg} - {"lr_schedule", "grad_clip"}
    assert cfg.flip is True and cfg.teacher_cache is None      # honoured, in the dump


def test_student_names_resolve_fork_first_then_ours(monkeypatch):
    import types
    from easydict import EasyDict
    from plugins.fork_loop import model_builder
    from plugins.backbones import resolve_model

    def fork_get_model(name, **kwargs):
        if name == "forknet":
            return torch.nn.Linear(2, kwargs.get("num_features", 512))
        raise ValueError()

    fork = types.ModuleType("backbones")
    fork.get_model = fork_get_model
    fork.__file__ = "/fork/backbones/__init__.py"
    monkeypatch.setitem(sys.modules, "backbones", fork)
    assert model_builder(EasyDict(network="x"), fork_get_model) is fork_get_model  # fork job
    build = model_builder(EasyDict(distill="none"), fork_get_model)
    assert build is resolve_model
    assert isinstance(build("forknet", num_features=3), torch.nn.Linear)   # the fork's name
    assert type(build("mobilefacenet", num_features=8)).__name__ != "Linear"  # ours
    with pytest.raises(ValueError, match=r"unknown backbone 'mobilefacenett'; valid names: "
                                         r"r18, .*mobilefacenet.* \(the fork's backbones"
                                         r".get_model at /fork/backbones/__init__.py refused "
                                         r"it too"):
        build("mobilefacenett", num_features=8)
