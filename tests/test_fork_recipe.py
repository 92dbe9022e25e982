"""The recipe of a shipped job in a fork's patched loop is train_distill.py's: the lr at every
optimizer step, Nesterov and momentum, the gradient clip -- and the teacher cache serves it.

The fork is the stand-in of upstream's train_v2.py (tests/upstream_standin.py: PolynomialLRWarmup
stepped after every batch, SGD momentum 0.9 without Nesterov, clip 5, ``MXFaceDataset`` with a
random flip), patched by patches/patch_train_v2.py.  ``configs/ms1mv2_mbf_adadistill`` and
``configs/ms1mv2_mbf_gkd`` run with every key kept -- all 26 / 20 epochs -- on 8 images of 8
classes at global batch 4 (2 optimizer steps per epoch), the fork's own network ``fork_plain``
(no BatchNorm) as student and teacher: on 1 process (batch 4), on 2 gloo processes (2 each) and
on 1 process with gradient_acc 2 (batches of 2).  Expected values: the schedule train_distill.py
builds for the same job and global batch (``plugins.lr_schedule.run_schedule``, bit for bit) and
the official scripts' formulas (tests/test_lr_schedule.py; tests/test_recipes.py shows
train_distill.py's own runs follow them).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from engine.config import get_config
from patches import patch_train_v2 as patcher
from plugins.lr_schedule import LRSchedule, run_schedule
from tests.distributed_harness import run_distributed
from tests.fork_runs import run_fork_script, run_in_children, write_shrunk_job
from tests.test_lr_schedule import official_adadistill_lr, official_gkd_lrs
from tests.upstream_standin import write_upstream_standin

NUM_IMAGES, GLOBAL_BATCH, DIM = 8, 4, 64
STEPS_PER_EPOCH = NUM_IMAGES // GLOBAL_BATCH
# run name -> (world size, batch_size per rank, gradient_acc): global batch 4 each
RUNS = {"one": (1, 4, 1), "two": (2, 2, 1), "acc": (1, 2, 2)}
JOBS = ("ms1mv2_mbf_adadistill", "ms1mv2_mbf_gkd")


def load_fork_module(fork: str, rel: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(fork, rel))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe_fork(tmp_path_factory):
    """The patched stand-in fork, its data, a fork_plain teacher (+ classifier) and the shrunk
    jobs ``<job>-<run>`` (see RUNS)."""
    from tools.synthetic import write_train_set
    root = str(tmp_path_factory.mktemp("fork_recipe"))
    fork = write_upstream_standin(root)
    assert patcher.main([os.path.join(fork, "train_v2.py")]) == 0
    write_train_set(os.path.join(root, "data"), num_ids=NUM_IMAGES, images_per_id=1, seed=6)
    torch.manual_seed(3)
    nets = load_fork_module(fork, "backbones/__init__.py", "standin_backbones")
    torch.save(nets.ForkPlainNet(num_features=DIM).state_dict(), os.path.join(root, "teacher.pt"))
    torch.save(torch.nn.functional.normalize(torch.randn(NUM_IMAGES, DIM), dim=1),
               os.path.join(root, "classifier.pt"))
    shrunk = dict(rec=os.path.join(root, "data"), num_classes=NUM_IMAGES, num_image=NUM_IMAGES,
                  num_workers=0, network="fork_plain", embedding_size=DIM,
                  teacher_network="fork_plain", teacher_checkpoint=os.path.join(root, "teacher.pt"),
                  teacher_embedding_size=DIM, teacher_cache=None)
    configs = {}
    for job in JOBS:
        extra = {"teacher_classifier": os.path.join(root, "classifier.pt")} if "gkd" in job \
            else {}
        for run, (_, batch, acc) in RUNS.items():
            name = f"{job}-{run}".replace("-", "_")
            configs[job, run] = write_shrunk_job(fork, job, name, batch_size=batch,
                                                 gradient_acc=acc, **shrunk, **extra,
                                                 output=os.path.join(root, "out", name))
    return fork, root, configs, shrunk


def _patched_runs(rank, world, fork, configs):
    return [run_fork_script(fork, "train_v2.py", config) for config in configs]


@pytest.fixture(scope="module")
def recipe_runs(recipe_fork):
    """{(job, run): [the record of each rank]} (tests/fork_runs.run_fork_script)."""
    fork, _, configs, _ = recipe_fork
    out = {}
    for world in (1, 2):
        names = [(job, run) for job in JOBS for run in RUNS if RUNS[run][0] == world]
        ranks = run_distributed(_patched_runs, world, args=(fork, [configs[n] for n in names]))
        for i, name in enumerate(names):
            out[name] = [records[i] for records in ranks]
    return out


def train_distill_schedule(fork: str, config: str) -> LRSchedule:
    """The schedule train_distill.py uses for this job at global batch 4 (2 steps per epoch)."""
    cfg = get_config(config, root=fork)
    return run_schedule(cfg, STEPS_PER_EPOCH, GLOBAL_BATCH)


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("job", JOBS)
def test_lr_at_every_step_is_train_distills(recipe_fork, recipe_runs, job, run):
    fork, _, configs, _ = recipe_fork
    schedule = train_distill_schedule(fork, configs[job, run])
    epochs = 26 if "adadistill" in job else 20
    assert schedule.total_steps == epochs * STEPS_PER_EPOCH
    if "adadistill" in job:
        official = [official_adadistill_lr(step // STEPS_PER_EPOCH, GLOBAL_BATCH, 1)
                    for step in range(schedule.total_steps)]
    else:
        official = [lr * GLOBAL_BATCH / 1024 for lr in official_gkd_lrs(STEPS_PER_EPOCH)]
    for rank, record in enumerate(recipe_runs[job, run]):
        assert len(record["lrs"]) == schedule.total_steps, (job, run, rank)
        for step, lrs in enumerate(record["lrs"]):
            assert lrs == [schedule.lr_at(step)] * len(lrs), (job, run, rank, step)   # bitwise
            assert lrs[0] == pytest.approx(official[step], rel=1e-12), (job, run, step)
    # the numbers a reader checks: AdaDistill 0.1 x 4 / 512, x 0.1 from epoch 7; GKD's warm-up
    first = recipe_runs[job, run][0]["lrs"]
    if "adadistill" in job:
        assert first[0][0] == pytest.approx(0.1 * 4 / 512)
        assert first[7 * STEPS_PER_EPOCH][0] == pytest.approx(0.01 * 4 / 512)
    else:
        assert first[0][0] == pytest.approx(2.5e-7 * 4 / 1024)
        assert max(lrs[0] for lrs in first) < 0.1 * 4 / 1024 + 1e-12


@pytest.mark.parametrize("job, nesterov, clips", [("ms1mv2_mbf_adadistill", False, [5.0]),
                                                  ("ms1mv2_mbf_gkd", True, [])])
def test_nesterov_momentum_and_clip_as_the_job_says(recipe_runs, job, nesterov, clips):
    for run in RUNS:
        for record in recipe_runs[job, run]:
            steps = len(record["lrs"])
            assert record["nesterov"] == [[nesterov] * 2] * steps, (job, run)  # backbone, head
            assert record["momentum"] == [[0.9] * 2] * steps
            # the fork clips the backbone at 5 once per optimizer step; GKD's recipe: no clip
            assert record["clips"] == clips * steps, (job, run)
            assert len(record["losses"]) == steps * RUNS[run][2]
            assert all(0 < loss < 1e3 for loss in record["losses"]), record["losses"]


def test_every_rank_reports_the_global_batch_loss(recipe_runs):
    for job in JOBS:
        two = recipe_runs[job, "two"]
        assert two[0]["losses"] == two[1]["losses"], job


# ------------------------------------------------------------------ the teacher cache

def _cached_and_online(fork, root, online, cached, gkd_cached):
    """Build a float32 teacher cache of the job, then train online and from the cache; the
    cached runs (AdaDistill, GKD with the cache's class means) never build or call the
    teacher."""
    import plugins.teacher
    from engine.teacher_cache_build import build_from_config
    import sys
    sys.path.insert(0, fork)
    cfg = get_config(cached, root=fork)
    build_from_config(cfg, dtype="float32")
    sys.path.remove(fork)
    online_record = run_fork_script(fork, "train_v2.py", online)

    def no_teacher():
        def refuse(*args, **kwargs):
            raise AssertionError("the cached run built or ran the teacher")
        plugins.teacher.build_teacher = refuse
        plugins.teacher.TeacherHook.teacher_embeddings = refuse

    cached_record = run_fork_script(fork, "train_v2.py", cached, before=no_teacher)
    return online_record, cached_record, run_fork_script(fork, "train_v2.py", gkd_cached)


def test_cached_run_gives_the_online_losses_without_the_teacher(recipe_fork):
    fork, root, _, shrunk = recipe_fork
    base = dict(shrunk, batch_size=4, num_epoch=2)   # 4 steps, flips of epochs 0 and 1
    online = write_shrunk_job(fork, "ms1mv2_mbf_adadistill", "cache_online", **base,
                              output=os.path.join(root, "out", "cache_online"))
    cached = write_shrunk_job(fork, "ms1mv2_mbf_adadistill", "cache_cached",
                              **dict(base, teacher_cache=os.path.join(root, "cache")),
                              output=os.path.join(root, "out", "cache_cached"))
    gkd = write_shrunk_job(fork, "ms1mv2_mbf_gkd", "cache_gkd",   # no classifier: class means
                           **dict(base, teacher_cache=os.path.join(root, "cache"),
                                  teacher_classifier=None, warmup_epoch=1),
                           output=os.path.join(root, "out", "cache_gkd"))
    (result,) = run_in_children([(_cached_and_online, fork, root, online, cached, gkd)])
    assert "error" not in result, result.get("error")
    online_record, cached_record, gkd_record = result
    assert len(online_record["losses"]) == len(cached_record["losses"]) == 4
    assert cached_record["losses"] == pytest.approx(online_record["losses"], rel=1e-5)
    assert cached_record["lrs"] == online_record["lrs"]
    assert len(gkd_record["losses"]) == 4 and all(0 < v < 1e3 for v in gkd_record["losses"])


# ------------------------------------------------------------------ the pieces, in process

def _sgd(momentum=0.9):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0, momentum=momentum)


@pytest.mark.filterwarnings("ignore:Detected call of")  # gradient_acc: as upstream
def test_scheduler_counts_batches_and_resumes_from_a_weights_only_checkpoint(tmp_path):
    from easydict import EasyDict
    from plugins.fork_recipe import RecipeLRScheduler, recipe_scheduler
    schedule = LRSchedule("step", base_lr=0.2, total_steps=12, steps_per_epoch=3,
                          milestones=(1, 3))
    opt = _sgd()
    sched = RecipeLRScheduler(opt, schedule, acc=2)
    used = []
    for batch in range(10):                  # the fork steps its scheduler after every batch
        if batch % 2 == 1:                   # ... and its optimizer after every 2nd
            used.append(opt.param_groups[0]["lr"])
            opt.step()
        sched.step()
    assert used == [schedule.lr_at(step) for step in range(5)]
    torch.save(sched.state_dict(), tmp_path / "sched.pt")
    again = RecipeLRScheduler(_sgd(), schedule, acc=2)
    again.load_state_dict(torch.load(tmp_path / "sched.pt", weights_only=True))
    for optimizer in (again.optimizer, opt):
        optimizer.step()
    again.step()
    sched.step()
    assert again.get_last_lr() == sched.get_last_lr() == [schedule.lr_at(5)]
    # a fork's own job, and a job that sets no schedule key: the fork's scheduler
    assert recipe_scheduler(EasyDict(lr_schedule="step"), _sgd()) is None
    assert recipe_scheduler(EasyDict(distill="adadistill", grad_clip=1.0), _sgd()) is None


def test_grad_clipper_uses_the_jobs_clip_or_the_forks():
    from easydict import EasyDict
    from plugins.fork_recipe import grad_clipper
    calls = []

    def fork_clip(parameters, max_norm, norm_type=2.0):
        calls.append((max_norm, norm_type))
        return torch.tensor(1.0)

    params = [torch.nn.Parameter(torch.ones(2))]
    assert grad_clipper(EasyDict(grad_clip=1.0), fork_clip) is fork_clip          # fork's job
    assert grad_clipper(EasyDict(distill="gkd"), fork_clip) is fork_clip          # key not set
    grad_clipper(EasyDict(distill="gkd", grad_clip=2.5), fork_clip)(params, 5)
    grad_clipper(EasyDict(distill="gkd", grad_clip=2.5), fork_clip)(params, max_norm=5,
                                                                    norm_type=2)
    assert calls == [(2.5, 2.0), (2.5, 2)]
    assert grad_clipper(EasyDict(distill="gkd", grad_clip=0.0), fork_clip)(params, 5) is None
    assert len(calls) == 2                                   # 0: no clipping at all


def test_nesterov_needs_momentum():
    from easydict import EasyDict
    from plugins.fork_recipe import apply_optimizer_keys
    opt = _sgd()
    apply_optimizer_keys(EasyDict(distill="gkd", nesterov=True, momentum=0.8), opt)
    assert (opt.param_groups[0]["nesterov"], opt.param_groups[0]["momentum"]) == (True, 0.8)
    with pytest.raises(ValueError, match="config key 'nesterov' = True needs SGD momentum > 0"):
        apply_optimizer_keys(EasyDict(distill="gkd", nesterov=True, momentum=0.0), _sgd())
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    apply_optimizer_keys(EasyDict(distill="gkd", nesterov=True, momentum=0.9), adam)
    assert "nesterov" not in adam.param_groups[0]          # AdamW: as train_distill.py
