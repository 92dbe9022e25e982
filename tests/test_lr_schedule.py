"""Learning-rate schedules: the pure functions, and every paper config's schedule against the
official training scripts' formulas written out independently (AdaDistill's LambdaLR with
lr = 0.1 / 512 x global batch; GKD's timm CosineLRScheduler stepped after every iteration),
including the global-batch scaling, at every step of shrunk runs."""
import math
import os

import pytest

from engine.config import get_config
from plugins.lr_schedule import LRSchedule, batch_scale, describe_scaling, run_schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ADADISTILL_FAMILY = [
    "ms1mv2_mbf_adadistill", "ms1mv2_mbf_adadistill_m040", "ms1mv2_mbf_adadistill_m050",
    "ms1mv2_mbf_adadistill_plain", "ms1mv2_mbf_adacosdistill", "ms1mv2_mbf_adacosdistill_m030",
    "ms1mv2_mbf_adacosdistill_m040", "ms1mv2_mbf_arcdistill", "ms1mv2_mbf_arcdistill_m045",
    "ms1mv2_mbf_cosdistill", "ms1mv2_mbf_standalone", "ms1mv2_r50_arcface_teacher",
    "ms1mv2_r50_cosface_teacher"]
GKD_FAMILY = ["ms1mv2_mbf_gkd", "ms1mv2_mbf_gkd_adaptive"]


# ------------------------------------------------ the official formulas, written out on their own
def official_adadistill_lr(epoch, batch_size, world_size):
    """train_AdaDistill.py: SGD lr = cfg.lr / 512 * batch_size * world_size, LambdaLR stepped once
    per epoch with config.py's lr_step_func (warmup_epoch = -1, so never the warm-up branch)."""
    initial = 0.1 / 512 * batch_size * world_size
    return initial * 0.1 ** len([m for m in [8, 14, 20, 25] if m - 1 <= epoch])


def official_gkd_lrs(n_iter_per_epoch, lr=0.1, num_epoch=20, warmup_epoch=4, min_lr=2.5e-7,
                     warmup_lr=2.5e-7):
    """train_gkd.py's loop with timm's CosineLRScheduler(t_initial=num_steps, lr_min, warmup_lr_init,
    warmup_t=warmup_steps, cycle_limit=1, t_in_epochs=False): the constructor sets the groups to
    warmup_lr_init; after each optimizer step, step_update(global index of that step) sets
    the lr of the next step.  Returns the lr each iteration trains with."""
    num_steps = int(num_epoch * n_iter_per_epoch)
    warmup_steps = int(warmup_epoch * n_iter_per_epoch)
    increment = (lr - warmup_lr) / warmup_steps

    def timm_value(t):
        if t < warmup_steps:
            return warmup_lr + t * increment
        cycle = t // num_steps
        t_curr = t - num_steps * cycle
        if cycle < 1:
            return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t_curr / num_steps))
        return min_lr

    current, used = warmup_lr, []
    for epoch in range(num_epoch):
        for batch_idx in range(n_iter_per_epoch):
            used.append(current)                          # optimizer.step() with this lr
            current = timm_value(epoch * n_iter_per_epoch + batch_idx)   # scheduler.step_update
    return used


# ------------------------------------------------ every paper config, every step
@pytest.mark.parametrize("job", ADADISTILL_FAMILY)
@pytest.mark.parametrize("world", [4, 8, 3])
def test_adadistill_family_lr_matches_official_at_every_step(job, world):
    cfg = get_config(f"configs/{job}", root=REPO)
    assert cfg.lr_schedule == "step" and cfg.num_epoch == 26 and cfg.warmup_epoch == 0
    steps_per_epoch = 3                                  # shrunk data: 3 steps per epoch
    global_batch = cfg.batch_size * world
    schedule = run_schedule(cfg, steps_per_epoch, global_batch)
    assert schedule.total_steps == 26 * steps_per_epoch
    for step in range(schedule.total_steps):
        expected = official_adadistill_lr(step // steps_per_epoch, cfg.batch_size, world)
        assert schedule.lr_at(step) == pytest.approx(expected, rel=1e-12), (job, world, step)
    # the numbers a reader checks: 0.1 on the paper's 4 GPUs, 0.2 on 8; first decay at epoch 7
    if world in (4, 8):
        assert schedule.lr_at(0) == pytest.approx(0.1 * world / 4, rel=1e-12)
        assert schedule.lr_at(7 * steps_per_epoch - 1) == pytest.approx(0.1 * world / 4)
        assert schedule.lr_at(7 * steps_per_epoch) == pytest.approx(0.01 * world / 4)


@pytest.mark.parametrize("job", GKD_FAMILY)
@pytest.mark.parametrize("world,n_iter", [(8, 7), (4, 14), (16, 3)])
def test_gkd_lr_matches_official_timm_cosine_at_every_step(job, world, n_iter):
    cfg = get_config(f"configs/{job}", root=REPO)
    assert (cfg.lr_schedule, cfg.num_epoch, cfg.warmup_epoch) == ("cosine", 20, 4)
    global_batch = cfg.batch_size * world
    schedule = run_schedule(cfg, n_iter, global_batch)
    scale = global_batch / 1024                          # the recipe is 0.1 at 8 x 128
    official = official_gkd_lrs(n_iter)
    assert len(official) == schedule.total_steps
    for step, lr in enumerate(official):
        assert schedule.lr_at(step) == pytest.approx(lr * scale, rel=1e-12), (job, world, step)


def test_gkd_cosine_is_one_cycle_not_restarted_after_warmup():
    """The issue's measured numbers: with warm-up over 4 of 20 epochs the official lr at epoch 10
    is 0.050 (ours restarted the cosine: 0.069) and 0.015 at epoch 15 (ours: 0.022)."""
    cfg = get_config("configs/ms1mv2_mbf_gkd", root=REPO)
    n_iter = 1000
    schedule = run_schedule(cfg, n_iter, 1024)
    assert schedule.lr_at(10 * n_iter) == pytest.approx(0.05, abs=1e-4)
    assert schedule.lr_at(15 * n_iter) == pytest.approx(0.0146, abs=1e-4)
    assert schedule.lr_at(0) == schedule.lr_at(1) == pytest.approx(2.5e-7)   # timm's one-step lag
    assert schedule.lr_at(4 * n_iter + 1) == pytest.approx(
        2.5e-7 + 0.5 * (0.1 - 2.5e-7) * (1 + math.cos(math.pi * 4 / 20)))
    assert schedule.lr_at(20 * n_iter) == pytest.approx(2.5e-7 + 0.5 * (0.1 - 2.5e-7) * (
        1 + math.cos(math.pi * (20 * n_iter - 1) / (20 * n_iter))))


def test_scaling_and_startup_line():
    ada = get_config("configs/ms1mv2_mbf_adadistill", root=REPO)
    assert batch_scale(ada, 512) == 1.0 and batch_scale(ada, 1024) == 2.0
    line = describe_scaling(ada, 1024)
    assert "global batch 512" in line and "global batch is 1024" in line and "lr 0.2" in line
    demo = get_config("configs/demo_student", root=REPO)
    assert demo.lr_reference_batch is None and batch_scale(demo, 4096) == 1.0
    assert "lr 0.1" in describe_scaling(demo, 4096) and "no global-batch scaling" in \
        describe_scaling(demo, 4096)
    bad = dict(ada, lr_reference_batch=0)
    with pytest.raises(ValueError, match="lr_reference_batch"):
        batch_scale(bad, 128)


# ------------------------------------------------ the pure functions
def test_step_schedule_counts_milestones_from_epoch_zero():
    sched = LRSchedule("step", 0.1, total_steps=26 * 10, steps_per_epoch=10,
                       milestones=(7, 13, 19, 24))
    assert sched.lr_at(0) == pytest.approx(0.1)
    assert sched.lr_at(69) == pytest.approx(0.1)           # epoch 6
    assert sched.lr_at(70) == pytest.approx(0.01)          # epoch 7: the official 8th epoch
    assert sched.lr_at(130) == pytest.approx(0.001)        # epoch 13
    assert sched.lr_at(190) == pytest.approx(1e-4)         # epoch 19
    assert sched.lr_at(240) == pytest.approx(1e-5)         # epoch 24
    assert sched.lr_at(259) == pytest.approx(1e-5)         # epoch 25, the last


def test_polynomial_with_warmup_matches_arcface_torch_formula():
    sched = LRSchedule("polynomial", 0.1, total_steps=100, warmup_steps=10)
    assert sched.lr_at(0) == pytest.approx(0.01)
    assert sched.lr_at(9) == pytest.approx(0.1)
    assert sched.lr_at(55) == pytest.approx(0.1 * (1 - 45 / 90) ** 2)
    assert sched.lr_at(100) == pytest.approx(0.0)


def test_cosine_warmup_overrides_the_start_of_one_cosine():
    sched = LRSchedule("cosine", 0.1, total_steps=20, warmup_steps=4, warmup_lr=0.02, lr_min=0.001)
    f = [0.02 + t * (0.1 - 0.02) / 4 if t < 4 else
         0.001 + 0.5 * 0.099 * (1 + math.cos(math.pi * t / 20)) for t in range(20)]
    assert [sched.lr_at(j) for j in range(21)] == pytest.approx([f[0]] + f)
    assert sched.lr_at(25) == pytest.approx(0.001)         # past the single cycle: lr_min
    no_warmup = LRSchedule("cosine", 0.1, total_steps=10)
    assert no_warmup.lr_at(0) == pytest.approx(0.1)
    assert no_warmup.lr_at(6) == pytest.approx(0.05 * (1 + math.cos(math.pi * 5 / 10)))


def test_bad_schedule_is_rejected():
    with pytest.raises(ValueError, match="polynomial, step or cosine"):
        LRSchedule("linear", 0.1, total_steps=10)
    with pytest.raises(ValueError, match="total_steps >= 1"):
        LRSchedule("step", 0.1, total_steps=0)
    with pytest.raises(ValueError, match="warmup_steps 11"):
        LRSchedule("cosine", 0.1, total_steps=10, warmup_steps=11)
    with pytest.raises(ValueError, match="warmup_lr and lr_min"):
        LRSchedule("cosine", 0.1, total_steps=10, lr_min=-1.0)
