import math

import pytest
import torch

from plugins.margin import (ACOS_EPS, apply_margin, arcface_margin, check_batch,
                            check_labels_range, check_margin_args, cosface_margin,
                            distributed_margin_cross_entropy, select_classes)


def test_arcface_margin_value_and_exact_gradient():
    c = torch.tensor([0.9, 0.3, -0.2, -0.8], dtype=torch.float64, requires_grad=True)
    m = 0.45
    out = arcface_margin(c, m)
    theta = [math.acos(v) for v in c.tolist()]
    torch.testing.assert_close(out, torch.tensor([math.cos(t + m) for t in theta],
                                                 dtype=torch.float64))
    out.sum().backward()
    # d cos(acos(c) + m) / dc = sin(theta + m) / sin(theta)
    expected = [math.sin(t + m) / math.sin(t) for t in theta]
    torch.testing.assert_close(c.grad, torch.tensor(expected, dtype=torch.float64))


def test_arcface_straight_through_keeps_value_and_passes_unit_gradient():
    c = torch.tensor([0.9, 0.3, -0.2], dtype=torch.float64, requires_grad=True)
    out = arcface_margin(c, 0.5, straight_through=True)
    torch.testing.assert_close(out, torch.cos(torch.acos(c.detach()) + 0.5))
    out.sum().backward()
    torch.testing.assert_close(c.grad, torch.ones(3, dtype=torch.float64))


def test_arcface_gradient_is_finite_at_a_perfect_match():
    c = torch.tensor([1.0, -1.0, 1.0 - ACOS_EPS / 10], requires_grad=True)
    out = arcface_margin(c, 0.5)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(c.grad).all()
    # beyond the clamp the target logit carries no gradient
    assert c.grad.tolist() == [0.0, 0.0, 0.0]
    clamped = torch.tensor(1 - ACOS_EPS).item()  # the fp32 value the clamp produces
    assert abs(out[0].item() - math.cos(math.acos(clamped) + 0.5)) < 1e-6


def test_cosface_margin_and_dispatch():
    c = torch.tensor([0.5, -0.1], requires_grad=True)
    out = apply_margin("cosface", c, 0.35)
    torch.testing.assert_close(out, torch.tensor([0.15, -0.45]))
    torch.testing.assert_close(cosface_margin(c, 0.35, straight_through=True), out)
    with pytest.raises(ValueError, match="margin must be one of"):
        apply_margin("sphereface", c, 0.35)


def test_distributed_cross_entropy_one_process_matches_explicit_softmax():
    torch.manual_seed(0)
    cos = (torch.rand(5, 7, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    target = torch.tensor([0, 3, 6, 2, 3])
    s, m = 30.0, 0.4
    result = distributed_margin_cross_entropy(cos, target, "cosface", s, m)
    ref = cos.detach().clone().requires_grad_(True)
    total = 0.0
    for i in range(5):
        z = s * ref[i]
        z = torch.cat([z[:target[i]], (s * (ref[i, target[i]] - m))[None], z[target[i] + 1:]])
        total = total - torch.log(torch.exp(z[target[i]]) / torch.exp(z).sum())
    (total / 5).backward()
    result.loss.backward()
    assert abs(result.loss.item() - total.item() / 5) < 1e-5
    torch.testing.assert_close(cos.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)
    assert abs(result.mean_cos_target.item()
               - ref.detach()[torch.arange(5), target].mean().item()) < 1e-6


def test_select_classes_keeps_positives_and_is_deterministic():
    local = torch.tensor([3, -2, 17, 3, 25, 0])  # -2 and 25 belong to other ranks (num_local 20)
    kept_all, cols_all = select_classes(local, 20, 1.0)
    assert kept_all is None and cols_all.tolist() == [3, -1, 17, 3, -1, 0]
    torch.manual_seed(7)
    kept, cols = select_classes(local, 20, 0.25)
    assert kept.numel() == 5 and torch.equal(kept, kept.sort().values)
    assert {0, 3, 17} <= set(kept.tolist())
    assert [kept[c].item() if c >= 0 else -1 for c in cols.tolist()] == [3, -1, 17, 3, -1, 0]
    torch.manual_seed(7)
    assert torch.equal(select_classes(local, 20, 0.25)[0], kept)
    # more positives than int(rate * num_local): all positives, nothing else
    kept_small, _ = select_classes(torch.tensor([1, 4, 6]), 10, 0.1)
    assert kept_small.tolist() == [1, 4, 6]


def test_argument_and_batch_checks():
    with pytest.raises(ValueError, match="margin must be one of"):
        check_margin_args("arc", 64.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="scale s must be > 0"):
        check_margin_args("arcface", 0.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="margin m must be in"):
        check_margin_args("arcface", 64.0, -0.1, 1.0)
    with pytest.raises(ValueError, match="sample_rate must be in"):
        check_margin_args("arcface", 64.0, 0.5, 0.0)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        check_batch(4, torch.zeros(3), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"must be \[B, D\] = \[3, 4\].*got \[3, 5\]"):
        check_batch(4, torch.zeros(3, dtype=torch.long), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\), found min 0 max 10"):
        check_labels_range(torch.tensor([0, 10]), 10)
    check_labels_range(torch.tensor([0, 9]), 10)


def test_static_sample_count_keeps_the_same_classes_without_a_host_read(monkeypatch):
    """When int(sample_rate * num_local) can hold every positive of the batch, select_classes
    marks the positives without counting them (no host read): the same kept classes and columns
    as the counting path, for the same RNG state."""
    import plugins.margin as margin
    assert margin.static_sample_count(3215, 1.0, 1024) == 3215
    assert margin.static_sample_count(100, 0.3, 31) is None        # 30 < 31 possible positives
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        local = torch.randint(-30, 60, (12,), generator=g)          # outside [0, 40): other ranks
        torch.manual_seed(trial)
        static = select_classes(local, 40, 0.5)                      # 20 >= 12: static
        monkeypatch.setattr(margin, "static_sample_count", lambda *a: None)
        torch.manual_seed(trial)
        counted = select_classes(local, 40, 0.5)
        monkeypatch.undo()
        assert torch.equal(static[0], counted[0]) and torch.equal(static[1], counted[1])
        assert static[0].numel() == 20
