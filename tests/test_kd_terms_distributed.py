"""World-size invariance of the KD terms: the same global batch on 1, 2 and 4 gloo processes gives
the same loss on every rank, the same per-sample gradients (each rank's rows = the one-process
gradient's rows), the same EKD thresholds and FitNet regressor gradient (summed over ranks), and
for logit KD over class shards the same gradient of every logit column.  One spawn per world
size runs every method."""
import pytest
import torch

from plugins.distributed import shard_range
from plugins.kd_terms import (AngularKD, CorrelationCongruenceKD, EvaluationOrientedKD, FitNet,
                              LogitKD, MarginDistillationMargins, RelationalKD,
                              SimilarityPreservingKD, sum_replicated_grads)
from tests.distributed_harness import run_distributed

N, C = 8, 11
EKD_OPTS = dict(top_k=6, temperature=0.1, anchors=(2, 5, 10, 1000), momentum=0.3)


def _data():
    g = torch.Generator().manual_seed(0)
    d = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    data = {"s": d(N, 5), "t": d(N, 5), "t6": d(N, 6), "zs": 8 * d(N, C), "zt": 8 * d(N, C),
            "labels": torch.tensor([0, 0, 1, 2, 1, 3, 3, 4]),
            "fit_w": d(6, 5) * 0.3, "fit_b": d(6) * 0.1, "centers": d(C, 5)}
    data["centers"] = data["centers"].index_add(0, data["labels"], 2 * data["t"])
    return data


def _embedding_heads():
    return {"angular": (AngularKD(), "t"), "sp": (SimilarityPreservingKD(), "t6"),
            "sp_cos": (SimilarityPreservingKD("cosine"), "t6"),
            "cckd": (CorrelationCongruenceKD(), "t6"), "rkd": (RelationalKD(), "t6"),
            "fitnet": (FitNet(5, 6).double(), "t6")}


def _worker(rank, world, data):
    b = N // world
    rows = slice(rank * b, (rank + 1) * b)
    out = {}
    for name, (head, teacher_key) in _embedding_heads().items():
        if name == "fitnet":
            with torch.no_grad():
                head.regressor.weight.copy_(data["fit_w"])
                head.regressor.bias.copy_(data["fit_b"])
        s = data["s"][rows].clone().requires_grad_(True)
        loss = head(s, data[teacher_key][rows], data["labels"][rows])
        loss.backward()
        out[name] = {"loss": loss.detach(), "grad": s.grad}
        if name == "fitnet":
            sum_replicated_grads(head.parameters())
            out[name]["w_grad"] = head.regressor.weight.grad
    ekd = EvaluationOrientedKD(**EKD_OPTS)
    for step in range(2):
        s = (data["s"][rows] + 0.2 * step).requires_grad_(True)
        loss = ekd(s, data["t"][rows], data["labels"][rows])
        loss.backward()
        out[f"ekd{step}"] = {"loss": loss.detach(), "grad": s.grad,
                             "thresholds": torch.stack([ekd.student_thresholds,
                                                        ekd.teacher_thresholds]).clone()}
    start, num = shard_range(C, rank, world)
    cols = slice(start, start + num)
    zs = data["zs"][:, cols].clone().requires_grad_(True)
    loss = LogitKD(4.0)(zs, data["zt"][:, cols])
    loss.backward()
    out["logit_kd"] = {"loss": loss.detach(), "grad": zs.grad}
    labels = data["labels"]
    target_col = torch.where((labels >= start) & (labels < start + num), labels - start, -1)
    out["margins"] = MarginDistillationMargins()(data["t"], data["centers"][cols], target_col)
    return out


@pytest.fixture(scope="module")
def results():
    data = _data()
    return data, {1: [_worker(0, 1, data)], 2: run_distributed(_worker, 2, (data,)),
                  4: run_distributed(_worker, 4, (data,))}


TOL = dict(rtol=1e-10, atol=1e-13)
METHODS = ["angular", "sp", "sp_cos", "cckd", "rkd", "fitnet", "ekd0", "ekd1"]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("method", METHODS)
def test_embedding_terms_are_world_size_invariant(results, method, world):
    _, runs = results
    one = runs[1][0][method]
    for rank_out in runs[world]:
        torch.testing.assert_close(rank_out[method]["loss"], one["loss"], **TOL)
    grad = torch.cat([r[method]["grad"] for r in runs[world]])
    torch.testing.assert_close(grad, one["grad"], **TOL)
    assert float(one["grad"].abs().sum()) > 0
    for key in ("thresholds", "w_grad"):
        if key in one:
            for rank_out in runs[world]:
                torch.testing.assert_close(rank_out[method][key], one[key], **TOL)


@pytest.mark.parametrize("world", [2, 4])
def test_logit_kd_over_class_shards_is_world_size_invariant(results, world):
    _, runs = results
    one = runs[1][0]["logit_kd"]
    for rank_out in runs[world]:
        torch.testing.assert_close(rank_out["logit_kd"]["loss"], one["loss"], **TOL)
    grad = torch.cat([r["logit_kd"]["grad"] for r in runs[world]], dim=1)
    torch.testing.assert_close(grad, one["grad"], **TOL)


@pytest.mark.parametrize("world", [2, 4])
def test_margin_distillation_margins_are_world_size_invariant(results, world):
    _, runs = results
    for rank_out in runs[world]:
        torch.testing.assert_close(rank_out["margins"], runs[1][0]["margins"], **TOL)


def test_world_one_is_not_trivial(results):
    """The shared one-process run is itself the re-derived value (guards the comparison)."""
    from tests import kd_terms_reference as ref
    data, runs = results
    assert abs(float(runs[1][0]["rkd"]["loss"]) - float(ref.rkd(data["s"], data["t6"]))) < 1e-9
