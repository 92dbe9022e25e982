import math

import pytest

from host.lr_schedule import LRSchedule


def test_step_schedule_follows_adadistill_milestones():
    sched = LRSchedule("step", 0.1, total_steps=26 * 10, steps_per_epoch=10,
                       milestones=(8, 14, 20, 25))
    assert sched.lr_at(0) == pytest.approx(0.1)
    assert sched.lr_at(79) == pytest.approx(0.1)           # epoch 7
    assert sched.lr_at(80) == pytest.approx(0.01)          # epoch 8
    assert sched.lr_at(140) == pytest.approx(0.001)        # epoch 14
    assert sched.lr_at(200) == pytest.approx(1e-4)         # epoch 20
    assert sched.lr_at(259) == pytest.approx(1e-5)         # epoch 25


def test_polynomial_with_warmup_matches_arcface_torch_formula():
    sched = LRSchedule("polynomial", 0.1, total_steps=100, warmup_steps=10)
    assert sched.lr_at(0) == pytest.approx(0.01)
    assert sched.lr_at(9) == pytest.approx(0.1)
    assert sched.lr_at(55) == pytest.approx(0.1 * (1 - 45 / 90) ** 2)
    assert sched.lr_at(100) == pytest.approx(0.0)


def test_cosine_with_warmup():
    sched = LRSchedule("cosine", 0.1, total_steps=20, warmup_steps=4)
    assert sched.lr_at(1) == pytest.approx(0.05)
    assert sched.lr_at(4) == pytest.approx(0.1)
    assert sched.lr_at(12) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_bad_schedule_is_rejected():
    with pytest.raises(ValueError, match="polynomial, step or cosine"):
        LRSchedule("linear", 0.1, total_steps=10)
    with pytest.raises(ValueError, match="total_steps >= 1"):
        LRSchedule("step", 0.1, total_steps=0)
