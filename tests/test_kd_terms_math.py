"""KD terms on one process: each against its independent float64 re-derivation
(tests/kd_terms_reference.py) for loss and gradient, gradcheck, and the edge cases."""
import pytest
import torch

from plugins.gkd import grouped_kd_loss
from plugins.kd_terms import (AngularKD, CorrelationCongruenceKD, EvaluationOrientedKD, FitNet,
                              LogitKD, MarginDistillationMargins, RelationalKD,
                              SimilarityPreservingKD)
from tests import kd_terms_reference as ref

TOL = dict(rtol=1e-10, atol=1e-12)


def _pair(n=6, ds=5, dt=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, ds, generator=g, dtype=torch.float64)
    t = torch.randn(n, dt, generator=g, dtype=torch.float64)
    return s, t


def _check(module, reference, s, t, labels=None):
    """Loss and gradient of ``module`` equal the reference's."""
    s1 = s.clone().requires_grad_(True)
    loss = module(s1, t, labels)
    loss.backward()
    s2 = s.clone().requires_grad_(True)
    expected = reference(s2, t)
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), **TOL)
    torch.testing.assert_close(s1.grad, s2.grad, **TOL)
    assert float(s1.grad.abs().sum()) > 0
    return loss


def test_angular_matches_reference():
    s, t = _pair()
    _check(AngularKD(), ref.angular, s, t)


def test_angular_is_half_of_feature_mse():
    from plugins.feature_kd import FeatureMSEHead
    s, t = _pair()
    labels = torch.arange(6)
    torch.testing.assert_close(2 * AngularKD()(s, t), FeatureMSEHead()(s, t, labels).double(),
                               rtol=1e-6, atol=1e-7)  # FeatureMSEHead computes in float32


@pytest.mark.parametrize("normalize,ds", [(True, 5), (False, 5), (True, 3), (False, 7)])
def test_fitnet_matches_reference(normalize, ds):
    s, t = _pair(ds=ds, dt=5, seed=1)
    head = FitNet(ds, 5, normalize=normalize, scale=0.5).double()
    if ds == 5:
        assert head.regressor is None
        _check(head, lambda x, y: ref.fitnet(x, y, normalize=normalize), s, t)
        return
    w, b = head.regressor.weight.detach().clone(), head.regressor.bias.detach().clone()
    _check(head, lambda x, y: ref.fitnet(x, y, w, b, normalize), s, t)
    # the regressor's gradient too
    wr, br = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ref.fitnet(s, t, wr, br, normalize).backward()
    torch.testing.assert_close(head.regressor.weight.grad, wr.grad, **TOL)
    torch.testing.assert_close(head.regressor.bias.grad, br.grad, **TOL)


def test_fitnet_gkd_release_form_is_half_feature_mse():
    """GKD release HintLoss: sum MSE of normalised embeddings / (2 B)."""
    s, t = _pair(seed=2)
    expected = ((torch.nn.functional.normalize(s) - torch.nn.functional.normalize(t)) ** 2
                ).sum() / (2 * s.shape[0])
    torch.testing.assert_close(FitNet(5, 5)(s, t), expected, **TOL)


@pytest.mark.parametrize("gram", ["row_normalized", "cosine"])
def test_sp_matches_reference(gram):
    s, t = _pair(dt=4, seed=3)
    _check(SimilarityPreservingKD(gram), lambda x, y: ref.sp(x, y, gram), s, t)


@pytest.mark.parametrize("order", [2, 4, None])
def test_cckd_matches_reference(order):
    s, t = _pair(dt=3, seed=4)
    _check(CorrelationCongruenceKD(0.4, order), lambda x, y: ref.cckd(x, y, 0.4, order), s, t)


def test_cckd_taylor_converges_to_exact_kernel():
    s, t = _pair(seed=5)
    exact = CorrelationCongruenceKD(0.4, None)(s, t)
    assert abs(float(CorrelationCongruenceKD(0.4, 12)(s, t) - exact)) < 1e-12
    assert abs(float(CorrelationCongruenceKD(0.4, 2)(s, t) - exact)) > 1e-6


@pytest.mark.parametrize("w_a", [50.0, 0.0])
def test_rkd_matches_reference(w_a):
    s, t = _pair(n=5, ds=4, dt=6, seed=6)
    head = RelationalKD(25.0, w_a)
    _check(head, lambda x, y: ref.rkd(x, y, 25.0, w_a), s, t)
    assert float(head.stats["distance"]) > 0 and (float(head.stats["angle"]) > 0) == (w_a > 0)


def test_rkd_is_scale_invariant_in_distance_and_zero_for_a_scaled_teacher():
    s, _ = _pair(n=5, seed=7)
    assert float(RelationalKD()(s, 3.0 * s)) < 1e-12


def test_ekd_matches_reference_over_two_steps():
    s, t = _pair(n=8, ds=4, dt=4, seed=8)
    labels = torch.tensor([0, 0, 1, 2, 1, 3, 3, 4])
    opts = dict(top_k=5, temperature=0.1, anchors=(2, 5, 10), momentum=0.3)
    head = EvaluationOrientedKD(**opts)
    state = [[0.0] * 3, [0.0] * 3]
    for step in range(2):
        s_step = s + 0.1 * step
        _check(head, lambda x, y: ref.ekd_step(x, y, labels.tolist(), state, **opts),
               s_step, t, labels)
        # module and reference each updated their own thresholds once in this step
        torch.testing.assert_close(head.student_thresholds, torch.tensor(state[0], dtype=torch.float64),
                                   **TOL)
        torch.testing.assert_close(head.teacher_thresholds, torch.tensor(state[1], dtype=torch.float64),
                                   **TOL)


def test_logit_kd_matches_reference_and_gkd():
    g = torch.Generator().manual_seed(9)
    zs = 10 * torch.randn(5, 13, generator=g, dtype=torch.float64)
    zt = 10 * torch.randn(5, 13, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 13, (5,), generator=g)
    x = zs.clone().requires_grad_(True)
    loss = LogitKD(4.0)(x, zt)
    loss.backward()
    expected, grad = ref.logit_kd(zs, zt, 4.0)
    assert abs(float(loss.detach()) - expected) < 1e-10
    torch.testing.assert_close(x.grad, grad, **TOL)
    gkd = grouped_kd_loss(zs, zt, labels, temperature=4.0, alpha=0.0, beta=1.0, k=13)
    torch.testing.assert_close(loss.detach(), gkd.total, **TOL)


def test_logit_kd_survives_huge_logit_gaps():
    zs = torch.tensor([[1e4, -1e4, 0.0]], dtype=torch.float64, requires_grad=True)
    zt = torch.tensor([[-1e4, 1e4, 0.0]], dtype=torch.float64)
    loss = LogitKD(1.0)(zs, zt)
    loss.backward()
    # p_t = e_1, p_s = e_0: KL = lse(b) - b_1 = 2e4; gradient (T / N)(p_s - p_t) = (1, -1, 0)
    assert abs(float(loss.detach()) - 2e4) < 1e-8
    torch.testing.assert_close(zs.grad, torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64))


def test_margin_distillation_margins_match_reference():
    g = torch.Generator().manual_seed(10)
    teacher = torch.randn(6, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 1])
    weight = weight.index_add(0, labels, 3 * teacher)  # centers near their samples: cos > 0
    m = MarginDistillationMargins(0.2, 0.5)(teacher, weight, labels)
    torch.testing.assert_close(m, torch.tensor(ref.margin_distillation(teacher, weight, labels),
                                            dtype=torch.float64),
                               **TOL)
    assert abs(float(m.max()) - 0.5) < 1e-12  # the sample closest to its center gets m_max


@pytest.mark.parametrize("make", [AngularKD, lambda: FitNet(4, 3), SimilarityPreservingKD,
                                  CorrelationCongruenceKD, RelationalKD])
def test_gradcheck(make):
    head = make().double()
    s, t = _pair(n=4, ds=4, dt=3 if isinstance(head, FitNet) else 4, seed=11)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: head(x, t), (s,))


# ------------------------------------------------------------------ edge cases and errors
def test_relational_terms_on_tiny_batches():
    s, t = _pair(n=2, seed=12)
    for head in (SimilarityPreservingKD(), CorrelationCongruenceKD(), RelationalKD()):
        assert torch.isfinite(head(s, t))
    one_s, one_t = s[:1], t[:1]
    assert float(SimilarityPreservingKD()(one_s, one_t)) == pytest.approx(0.0, abs=1e-15)
    assert float(CorrelationCongruenceKD()(one_s, one_t)) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="at least 2 samples"):
        RelationalKD()(one_s, one_t)
    with pytest.raises(ValueError, match=">= 2 samples"):
        EvaluationOrientedKD()(one_s, one_t, torch.tensor([0]))


def test_rkd_with_coincident_samples_is_finite():
    s, t = _pair(n=4, seed=13)
    s[1] = s[0]
    s.requires_grad_(True)
    loss = RelationalKD()(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_ekd_without_positive_pairs_and_without_negative_pairs():
    s, t = _pair(n=4, seed=14)
    head = EvaluationOrientedKD(temperature=0.1)
    loss = head(s, t, torch.arange(4))
    assert torch.isfinite(loss) and int(head.stats["num_positive_pairs"]) == 0
    assert float(head.stats["positive"]) == 0.0
    with pytest.raises(ValueError, match="no pair of different labels"):
        EvaluationOrientedKD()(s, t, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="needs the labels"):
        EvaluationOrientedKD()(s, t)


def test_shape_errors_are_clear():
    s, t = _pair(n=4, ds=5, dt=3)
    with pytest.raises(ValueError, match="equal embedding sizes"):
        AngularKD()(s, t)
    with pytest.raises(ValueError, match="batch sizes differ"):
        SimilarityPreservingKD()(s, t[:3])
    with pytest.raises(ValueError, match=r"must be \[B, D\]"):
        CorrelationCongruenceKD()(s[0], t[0])
    with pytest.raises(ValueError, match="expected student"):
        FitNet(4, 3)(s, t)
    with pytest.raises(ValueError, match="regressor='never'"):
        FitNet(5, 3, regressor="never")
    with pytest.raises(ValueError, match="labels must be an integer"):
        RelationalKD()(s, t, torch.zeros(4))
    with pytest.raises(ValueError, match="both be"):
        LogitKD()(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        LogitKD(0.0)
    with pytest.raises(ValueError, match="gram must be"):
        SimilarityPreservingKD("gaussian")
    with pytest.raises(ValueError, match="FPR denominators >= 2"):
        EvaluationOrientedKD(anchors=(1, 10))
    with pytest.raises(ValueError, match="m_min <= m_max"):
        MarginDistillationMargins(0.5, 0.2)


def test_rkd_with_coincident_samples_matches_reference():
    """Exactly coincident samples: zero difference vectors give zero angles (F.normalize), the
    Gram-based angles must agree with the explicit differences of the reference."""
    s, t = _pair(n=5, ds=4, dt=4, seed=15)
    s[3] = s[1]
    t[4] = t[0]
    _check(RelationalKD(), ref.rkd, s, t)


@pytest.mark.parametrize("make", [AngularKD, SimilarityPreservingKD, CorrelationCongruenceKD,
                                  RelationalKD, lambda: EvaluationOrientedKD(temperature=0.1)])
def test_float32_agrees_with_float64_on_face_like_embeddings(make):
    """Raw embeddings of norm ~20 (as face backbones give), computed in float32: the loss and
    gradient stay within 1e-4 (relative) of the float64 computation."""
    g = torch.Generator().manual_seed(16)
    s = 20 * torch.nn.functional.normalize(torch.randn(32, 64, generator=g, dtype=torch.float64))
    t = s + 4 * torch.randn(32, 64, generator=g, dtype=torch.float64)
    labels = torch.arange(32) // 4
    out = {}
    for dtype in (torch.float64, torch.float32):
        x = s.detach().to(dtype).clone().requires_grad_(True)
        loss = make()(x, t.to(dtype), labels)
        loss.backward()
        out[dtype] = (loss.detach().double(), x.grad.double())
    torch.testing.assert_close(out[torch.float32][0], out[torch.float64][0], rtol=1e-4, atol=1e-7)
    scale = float(out[torch.float64][1].abs().max())
    assert float((out[torch.float32][1] - out[torch.float64][1]).abs().max()) < 1e-4 * scale
