import math

import pytest
import torch

from plugins.feature_kd import FeatureMSEHead
from plugins.heads import MarginSoftmaxHead
from tests.distributed_harness import run_distributed

D, C, N = 6, 9, 8
TOL = dict(atol=1e-5, rtol=1e-5)


def plain_margin_softmax(x, weight, labels, margin, s, m, straight_through):
    """One-process ArcFace / CosFace in float64 with the gradient written out by hand.

    Loss: mean_i -log softmax(z_i)[y_i], z_ij = s cos_ij except z_iy = s cos(theta + m) (ArcFace)
    or s (cos - m) (CosFace).  dL/dcos_ij = s (p_ij - [j = y_i]) / N, and the target column is
    multiplied by dz/dcos / s = sin(theta + m) / sin(theta) for exact ArcFace, 1 otherwise.
    Returns (loss, grad wrt x, grad wrt weight).
    """
    x = x.double().clone().requires_grad_(True)
    w = weight.double().clone().requires_grad_(True)
    cos = (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
    c = cos.detach()
    rows = torch.arange(len(labels))
    theta = torch.acos(c[rows, labels])
    logits = s * c.clone()
    logits[rows, labels] = s * (torch.cos(theta + m) if margin == "arcface"
                                else c[rows, labels] - m)
    p = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
    loss = -torch.log(p[rows, labels]).mean()
    onehot = torch.zeros_like(c)
    onehot[rows, labels] = 1.0
    grad_cos = s * (p - onehot) / len(labels)
    if margin == "arcface" and not straight_through:
        grad_cos[rows, labels] *= torch.sin(theta + m) / torch.sin(theta)
    cos.backward(grad_cos)
    return loss.item(), x.grad, w.grad


def make_batch(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, D, generator=g), torch.randn(C, D, generator=g),
            torch.tensor([3, 0, 8, 3, 5, 1, 0, 7]))


def run_margin_head(rank, world, x, weight, labels, margin, s, m, margin_grad):
    head = MarginSoftmaxHead(D, C, margin=margin, s=s, m=m, margin_grad=margin_grad)
    head.load_full_weight(weight)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    local = x[rows].clone().requires_grad_(True)
    loss = head(local, labels[rows])
    loss.backward()
    return {"loss": loss.item(), "grad": local.grad, "wgrad": head.weight.grad,
            "cos_target": head.stats["mean_cos_target"].item()}


CASES = [("arcface", 64.0, 0.5, "straight_through"), ("arcface", 64.0, 0.5, "exact"),
         ("cosface", 64.0, 0.4, "straight_through")]


@pytest.mark.parametrize("margin,s,m,margin_grad", CASES)
def test_matches_a_plain_one_process_margin_softmax(margin, s, m, margin_grad):
    x, weight, labels = make_batch(0)
    got = run_margin_head(0, 1, x, weight, labels, margin, s, m, margin_grad)
    loss, gx, gw = plain_margin_softmax(x, weight, labels, margin, s, m,
                                        margin_grad == "straight_through")
    assert abs(got["loss"] - loss) < 1e-5 * max(1.0, loss)
    torch.testing.assert_close(got["grad"].double(), gx, **TOL)
    torch.testing.assert_close(got["wgrad"].double(), gw, **TOL)


def test_weight_init_sharding_and_errors():
    torch.manual_seed(0)
    head = MarginSoftmaxHead(512, 1000)
    assert isinstance(head.weight, torch.nn.Parameter) and head.weight.shape == (1000, 512)
    assert abs(head.weight.std().item() - 0.01) < 5e-4 and abs(head.weight.mean().item()) < 5e-4
    assert head.sharded_keys == ("weight",) and (head.class_start, head.num_local) == (0, 1000)
    with pytest.raises(ValueError, match="margin_grad must be one of"):
        MarginSoftmaxHead(D, C, margin_grad="approx")
    with pytest.raises(ValueError, match=r"expects a \[C, D\] = \[9, 6\] table, got \[9, 5\]"):
        MarginSoftmaxHead(D, C).load_full_weight(torch.zeros(C, 5))
    with pytest.raises(ValueError, match=r"must be \[B, D\]"):
        MarginSoftmaxHead(D, C)(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long))


def test_sampled_classes_get_no_gradient_outside_the_kept_set():
    torch.manual_seed(5)
    head = MarginSoftmaxHead(D, 40, sample_rate=0.25)
    labels = torch.tensor([1, 5, 5, 30])
    head(torch.randn(4, D), labels).backward()
    touched = set(torch.nonzero(head.weight.grad.abs().sum(dim=1)).squeeze(1).tolist())
    assert {1, 5, 30} <= touched and len(touched) == 10


def feature_reference(student, teacher):
    """Paper Eq. 2 summed over D, averaged over samples; gradient by autograd in float64."""
    x = student.double().clone().requires_grad_(True)
    t = teacher.double()
    per_sample = [((x[i] / x[i].norm() - t[i] / t[i].norm()) ** 2).sum() for i in range(len(x))]
    loss = sum(per_sample) / len(x)
    loss.backward()
    return loss.item(), x.grad


def run_feature_head(rank, world, student, teacher, labels):
    head = FeatureMSEHead()
    rows = slice(rank * N // world, (rank + 1) * N // world)
    local = student[rows].clone().requires_grad_(True)
    loss = head(local, teacher[rows], labels[rows])
    loss.backward()
    return {"loss": loss.item(), "grad": local.grad, "cos": head.stats["mean_cos_st"].item()}


def test_feature_mse_value_gradient_and_checks():
    student, teacher, labels = make_batch(1)[0], make_batch(2)[0], make_batch(0)[2]
    got = run_feature_head(0, 1, student, teacher, labels)
    loss, grad = feature_reference(student, teacher)
    assert abs(got["loss"] - loss) < 1e-6
    torch.testing.assert_close(got["grad"].double(), grad, **TOL)
    cos = torch.nn.functional.cosine_similarity(student, teacher).mean().item()
    assert abs(got["cos"] - cos) < 1e-6 and abs(loss - (2 - 2 * cos)) < 1e-5
    head = FeatureMSEHead()
    assert not list(head.state_dict())     # a KD term: no classes, no state (feature_mse head
    #                                        wraps it with a margin head, plugins/heads/)
    with pytest.raises(ValueError, match=r"embeddings #1 must be \[B, D\]"):
        head(student, teacher[:, :3], labels)
    with pytest.raises(ValueError, match="student embeddings must be"):
        head(student[0], teacher, labels)


def _two_rank_worker(rank, world, margin_batch, feature_batch):
    x, weight, labels = margin_batch
    out = {case: run_margin_head(rank, world, x, weight, labels, *case) for case in CASES}
    out["feature"] = run_feature_head(rank, world, *feature_batch)
    return out


def test_two_ranks_give_the_one_process_loss_and_gradients():
    margin_batch = make_batch(3)
    feature_batch = (make_batch(4)[0], make_batch(5)[0], make_batch(4)[2])
    results = run_distributed(_two_rank_worker, 2, (margin_batch, feature_batch))
    for case in CASES:
        single = run_margin_head(0, 1, *margin_batch, *case)
        for key in ("loss", "cos_target"):
            assert all(abs(r[case][key] - single[key]) < 1e-5 * max(1, abs(single[key]))
                       for r in results)
        torch.testing.assert_close(torch.cat([r[case]["grad"] for r in results]), single["grad"],
                                   **TOL)
        torch.testing.assert_close(torch.cat([r[case]["wgrad"] for r in results]),
                                   single["wgrad"], **TOL)
    single = run_feature_head(0, 1, *feature_batch)
    assert all(abs(r["feature"]["loss"] - single["loss"]) < 1e-6 for r in results)
    assert all(abs(r["feature"]["cos"] - single["cos"]) < 1e-6 for r in results)
    torch.testing.assert_close(torch.cat([r["feature"]["grad"] for r in results]),
                               single["grad"], **TOL)
    assert math.isfinite(single["loss"])
